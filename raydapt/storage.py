"""Atomic output folders and manifests: nothing half-written is ever read as complete.

Every stage writes into `<final>.tmp-<random>` and renames it to `<final>` only after the
manifest is written. A folder counts as complete only if it holds `manifest.json` with
`"complete": true`; leftover `.tmp-*` folders from a crash are ignored and swept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raydapt.errors import UserError

MANIFEST = "manifest.json"

log = logging.getLogger(__name__)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_json(obj: Any) -> str:
    """Stable hash of a JSON-able object (sorted keys)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())[:16]


def hash_file(path: str | os.PathLike, chunk: int = 1 << 20, digits: int = 16) -> str:
    """sha256 of a file's bytes, hex, cut to `digits` (64: the whole digest)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:digits]


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


def finish_record(path: str | os.PathLike, record: dict) -> dict:
    """A one-file output (eval's metrics): written atomically, marked complete, like a manifest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**record, "complete": True}
    write_json_atomic(path, record)
    return record


def versions() -> dict:
    import sys

    out = {"python": sys.version.split()[0]}
    for mod in ("raydapt", "torch", "transformers", "ray", "pyarrow"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is not an error here
            pass
    return out


def read_record(output: str | os.PathLike) -> dict | None:
    """The complete manifest of a stage output: `<folder>/manifest.json`, or a JSON record
    file itself (eval writes one file per model). None if absent or incomplete."""
    path = Path(output)
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("complete") is True else None
    return read_manifest(path)


def up_to_date(output: str | os.PathLike, fingerprint: str) -> bool:
    """The one up-to-date rule: the output is complete and records this fingerprint."""
    m = read_record(output)
    return m is not None and m.get("fingerprint") == fingerprint


# ----------------------------------------------------------------------------- locks


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def output_lock(output: str | os.PathLike) -> Iterator[Path]:
    """Hold `<output>.lock` while a stage writes `output`; a second run gets a UserError.

    The lock file names its holder (pid, host, start time). A lock left by a process that no
    longer runs on this host is taken over, with a log line saying so; a holder on another
    host cannot be checked from here, so its lock is only ever removed by hand.
    """
    path = Path(f"{Path(output)}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_json(path)
            if holder.get("host") == me["host"] and not _pid_alive(int(holder.get("pid", 0) or 0)):
                log.warning(
                    "taking over the lock %s of pid %s (started %s), which no longer runs",
                    path,
                    holder.get("pid"),
                    holder.get("started"),
                )
                path.unlink(missing_ok=True)
                continue
            raise UserError(
                f"{output} is being written by another run (pid {holder.get('pid')} on "
                f"{holder.get('host')}, started {holder.get('started')}); wait for it, or, if that "
                f"run is gone, delete {path}"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield path
    finally:
        if read_json(path).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
