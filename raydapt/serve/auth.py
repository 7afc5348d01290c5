"""Optional API keys as `Authorization: Bearer <key>`.

Keys come from the env var named by `serve.api_keys_env` (comma-separated) and/or the file
`serve.api_keys_file` (one key per line, `#` comments). Neither set: no auth. Only SHA-256
digests of the keys leave the driver, so the keys never sit in Serve's deployment config or
in logs; requests are checked by comparing digests in constant time. Nothing here logs
headers.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from raydapt.config import ServeConfig
from raydapt.errors import UserError


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_key_digests(cfg: ServeConfig) -> list[str]:
    """Digests of all configured keys; empty means auth is off."""
    keys: list[str] = []
    if cfg.api_keys_env:
        keys += [k.strip() for k in os.environ.get(cfg.api_keys_env, "").split(",") if k.strip()]
    if cfg.api_keys_file:
        path = Path(cfg.api_keys_file)
        if not path.is_file():
            raise UserError(
                f"serve.api_keys_file: {path} not found; create it with one key per "
                "line, or leave serve.api_keys_file empty"
            )
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
        if not keys:
            raise UserError(
                f"serve.api_keys_file: {path} holds no keys; auth would lock everyone out"
            )
    return sorted({digest(k) for k in keys})


def authorized(header: str | None, digests: list[str]) -> bool:
    """True when auth is off or `header` is `Bearer <one of the keys>`."""
    if not digests:
        return True
    if not header or not header.lower().startswith("bearer "):
        return False
    d = digest(header[7:].strip())
    ok = False
    for ref in digests:  # no early exit: same time whichever key matches
        ok |= hmac.compare_digest(d, ref)
    return ok
