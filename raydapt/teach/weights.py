"""Push a trainer's weights into a live vLLM engine: the rollout side of on-policy distillation.

    payload = to_payload(model.state_dict())        # trainer, rank 0: plain numpy, HF names
    ref = ray.put(payload)                          # zero-copy for every actor on the node
    engine.load_weights(ray.get(ref), version=120)  # rollout actor (WeightedVLLMBackend)

Why this path. On-policy distillation samples from the student as it trains, so every N steps
the rollout engines must take the trainer's new weights; restarting an engine costs 20-35 s on
this CPU, an in-place reload well under one. vLLM 0.32's worker has `reload_weights`, a
layerwise in-place reload: each layer goes back to meta, takes the new checkpoint-format
tensors (HF names), is rebuilt (on CPU that re-runs oneDNN's weight packing) and copied into
its old storage. The direct `model.load_weights(...)` that GPU trainers call (TRL's colocate
mode, OpenRLHF) fails on vLLM CPU, whose linear layers keep only a packed copy.

What each step guards against (each found by a probe, see tests/onpolicy):

- The prefix cache is reset after every load: it is keyed by token ids, not by weights, so
  without the reset a prompt longer than one block (128 tokens on CPU) reuses KV computed
  with the old weights and the engine generates what neither model would.
- The payload is checked against the engine's own checkpoint (names and shapes) before
  anything is loaded: a reload that fails half-way leaves the engine unusable, and a layer
  given only some of its tensors (q_proj without k_proj, v_proj) is filled with
  uninitialised memory. So every tensor of the checkpoint must be there, and nothing else.
- Numpy, not torch, crosses Ray: `ray.get` of numpy arrays is zero-copy from the object
  store (milliseconds for 230 MB), torch tensors are pickled (more than a second). bfloat16
  travels as its int16 bit pattern.
- Wrapper prefixes that FSDP, activation checkpointing or torch.compile add to names are
  stripped; tied embeddings need no `lm_head.weight` (vLLM ties it to the embedding).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raydapt.errors import UserError

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "module.")
_BF16 = "bfloat16"


def clean_name(name: str) -> str:
    """An HF parameter name without the wrappers' prefixes (they may appear mid-name)."""
    for p in WRAPPER_PREFIXES:
        name = name.replace(p, "")
    return name


def to_payload(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """A state dict as {name: numpy array} plus the names that travel as bfloat16 bits."""
    arrays, bf16 = {}, []
    for name, t in state_dict.items():
        t = t.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            bf16.append(clean_name(name))
            t = t.view(torch.int16)
        arrays[clean_name(name)] = t.numpy()
    return {"arrays": arrays, "bfloat16": bf16}


def from_payload(payload: Mapping[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, viewing the payload's arrays without copying them."""
    bf16 = set(payload.get("bfloat16", ()))
    for name, a in payload["arrays"].items():
        t = torch.from_numpy(np.asarray(a))
        yield name, t.view(torch.bfloat16) if name in bf16 else t


def checkpoint_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a safetensors checkpoint, from the headers alone (no tensor read)."""
    folder = Path(model_dir)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no *.safetensors checkpoint to take names and shapes from")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        shapes.update({k: tuple(v["shape"]) for k, v in header.items()})
    return shapes


def check_payload(
    payload: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], tied: bool
) -> None:
    """Every tensor the checkpoint has (lm_head optional when tied), the same shapes, no other.

    Raises ValueError naming the first offending tensors, before anything is loaded.
    """
    arrays = payload["arrays"]
    optional = {"lm_head.weight"} if tied else set()
    missing = sorted(set(expected) - set(arrays) - optional)
    unknown = sorted(set(arrays) - set(expected) - optional)
    wrong = sorted(
        f"{k} {tuple(arrays[k].shape)} (engine has {expected[k]})"
        for k in set(arrays) & set(expected)
        if tuple(arrays[k].shape) != tuple(expected[k])
    )
    problems = [
        f"{label}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
        for label, names in (("missing", missing), ("not in the model", unknown), ("shape", wrong))
        if names
    ]
    if problems:
        raise ValueError(
            "weights do not match the rollout engine's model ("
            + "; ".join(problems)
            + "): send the full state dict of the same architecture, with HF names"
        )


def load_into_engine(
    llm: Any, payload: Mapping[str, Any], version: int | str, in_process: bool = True
) -> float:
    """Reload the engine's weights in place from `payload`; seconds taken. Call check_payload
    first: this assumes the payload is complete and well-shaped.

    in_process: the engine's worker lives in this process, so it takes the tensors as they
    are (views of the payload's arrays). Otherwise (vLLM's default multiprocess engine, tensor
    parallel workers) `collective_rpc` would serialise every tensor into each worker's
    message, so the weights go through a safetensors file in shared memory instead, which
    each worker reads with vLLM's own loader (`reload_weights(weights_path=...)`).
    """
    t0 = time.perf_counter()
    if in_process:
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": from_payload(payload)})
    else:
        with shared_checkpoint(payload) as folder:
            llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
    llm.reset_prefix_cache()  # KV computed with the old weights must never be reused
    llm.llm_engine.set_weight_version(str(version))
    return time.perf_counter() - t0


@contextlib.contextmanager
def shared_checkpoint(payload: Mapping[str, Any]) -> Iterator[Path]:
    """`payload` as a one-file safetensors folder in /dev/shm (a temporary folder where there
    is none), removed on exit. The engine points its model path there during the reload and
    never reads it again: raydapt reloads only with explicit weights."""
    from safetensors.torch import save_file

    shm = Path("/dev/shm")
    folder = Path(tempfile.mkdtemp(prefix="raydapt-weights-", dir=shm if shm.is_dir() else None))
    try:
        # save_file refuses tensors that share memory; the payload's views never do
        save_file(
            {name: t.contiguous() for name, t in from_payload(payload)},
            str(folder / "model.safetensors"),
        )
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
