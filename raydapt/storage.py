"""Atomic output folders and manifests: nothing half-written is ever read as complete.

Every stage writes into `<final>.tmp-<random>` and renames it to `<final>` only after the
manifest is written. A folder counts as complete only if it holds `manifest.json` with
`"complete": true`; leftover `.tmp-*` folders from a crash are ignored and swept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raydapt.errors import UserError

MANIFEST = "manifest.json"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_json(obj: Any) -> str:
    """Stable hash of a JSON-able object (sorted keys)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())[:16]


def hash_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def hash_files(paths: list[Path]) -> str:
    """Hash of several files' contents (and relative names), in sorted order."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(hash_file(p).encode())
    return h.hexdigest()[:16]


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The manifest of a complete folder, or None if the folder is absent or incomplete."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    return data if data.get("complete") is True else None


def require_manifest(folder: str | os.PathLike, what: str, produced_by: str) -> dict:
    """Like read_manifest but raises a UserError that says which stage produces it."""
    m = read_manifest(folder)
    if m is None:
        state = "is incomplete (a crashed run?)" if Path(folder).exists() else "does not exist"
        raise UserError(f"{what} at {folder} {state}; run `raydapt {produced_by}` first")
    return m


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def sweep_tmp(final: Path) -> None:
    """Remove leftover temporary folders of `final` from crashed runs."""
    for stale in final.parent.glob(f"{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `final` in one rename.

    The caller must call `finish_manifest(tmp, manifest)` inside the block; a block that
    raises leaves `final` untouched and deletes the temporary folder.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_tmp(final)
    tmp = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if read_manifest(tmp) is None:
            raise RuntimeError(f"internal: {tmp} finished without a manifest")
        if final.exists():
            old = final.with_name(f"{final.name}.tmp-old-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def finish_manifest(folder: Path, manifest: dict) -> dict:
    """Write the manifest last, marked complete, with a timestamp and versions."""
    manifest = dict(manifest)
    manifest.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if "versions" not in manifest:  # versions() imports torch, transformers and ray: seconds
        manifest["versions"] = versions()
    manifest["complete"] = True
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def versions() -> dict:
    import sys

    out = {"python": sys.version.split()[0]}
    for mod in ("raydapt", "torch", "transformers", "ray", "pyarrow"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is not an error here
            pass
    return out


def up_to_date(folder: str | os.PathLike, fingerprint: str) -> bool:
    m = read_manifest(folder)
    return m is not None and m.get("fingerprint") == fingerprint
