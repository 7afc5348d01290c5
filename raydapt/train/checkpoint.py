"""Sharded checkpoints (torch.distributed.checkpoint), exact resume, and the HF export.

A checkpoint folder holds the DCP shards of {"model", "optim"} (`__<rank>_0.distcp` and
`.metadata`), one `rng_<rank>.pt` per rank, and `meta.json` (step, scheduler state, world
size and the run's `ckpt_key`: what a resuming run must share with it), written last by rank 0.
Each rank writes into its own
temporary folder and passes it to `ray.train.report(checkpoint=...)`; Ray Train uploads all
ranks' files into one `<storage>/<run>/checkpoint_<step>/` folder and registers it only
after every rank reported, so a crash mid-save leaves nothing that a resume would read.
In Train local mode (`num_workers=0`) Ray keeps no checkpoints, so they go to
`<train_dir>/checkpoints/checkpoint_<N>/` through `storage.atomic_dir` instead, and
`train.keep_checkpoints` is applied here (`prune_local`).

The data position is the step itself (see data.py), so model, optimizer, scheduler, step
and RNG are all a resume needs for the loss curve to continue exactly.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from raydapt.errors import UserError
from raydapt.storage import atomic_dir, finish_manifest, read_manifest
from raydapt.train.fsdp import barrier, world
from raydapt.train.modes import apply_lora, is_classification, load_student

META = "meta.json"


def _write_shards(folder: Path, model: nn.Module, optim: torch.optim.Optimizer, meta: dict) -> None:
    rank, _ = world()
    msd, osd = get_state_dict(model, optim)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder))
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, folder / f"rng_{rank}.pt")
    if rank == 0:
        (folder / META).write_text(json.dumps(meta, indent=2, sort_keys=True))


def save(
    model: nn.Module,
    optim: torch.optim.Optimizer,
    sched: Any,
    step: int,
    ckpt_key: str,
    metrics: dict,
    train_dir: Path,
    local_mode: bool,
    keep: int = 0,
) -> None:
    """Save a checkpoint at `step` and report it (with `metrics`) to Ray Train. All ranks call.

    keep: train.keep_checkpoints, the newest N to keep (0: all). Ray Train applies it to its
    own checkpoints (CheckpointConfig); local mode's are pruned here, once the new one is
    complete, so a crash mid-save never leaves fewer than N whole checkpoints."""
    import ray.train  # slow to import (about 1 s); only workers report

    _, size = world()
    meta = {
        "step": step,
        "ckpt_key": ckpt_key,
        "world_size": size,
        "scheduler": sched.state_dict(),
        "complete": True,
    }
    name = f"checkpoint_{step:06d}"
    if local_mode:
        final = train_dir / "checkpoints" / name
        with atomic_dir(final) as tmp:
            _write_shards(tmp, model, optim, meta)
            finish_manifest(tmp, meta)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(final)))
        prune_local(train_dir, keep)
        return
    tmp = Path(tempfile.mkdtemp(prefix=f"raydapt-{name}-"))
    try:
        _write_shards(tmp, model, optim, meta)
        barrier()
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
            checkpoint_dir_name=name,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_folder(folder: Path, ckpt_key: str) -> dict:
    """meta.json of a complete, compatible checkpoint folder; UserError otherwise."""
    meta_path = folder / META
    if not meta_path.is_file() or not (folder / ".metadata").is_file():
        raise UserError(
            f"checkpoint {folder} is incomplete (no {META} or .metadata); delete it, or set "
            "train.resume=false to start over"
        )
    meta = json.loads(meta_path.read_text())
    key = meta.get(
        "ckpt_key", meta.get("fingerprint")
    )  # checkpoints before the rename say "fingerprint"
    if key != ckpt_key:
        raise UserError(
            f"checkpoint {folder} was written by an incompatible run (model, train.mode or its "
            f"options differ: {key} != {ckpt_key}); use another job name or "
            "output_dir, or set train.resume=false to start over"
        )
    return meta


def complete_local(train_dir: Path) -> list[Path]:
    """Complete local-mode checkpoints, oldest first (torn `.tmp-*` folders are ignored)."""
    root = train_dir / "checkpoints"
    return [
        p for p in sorted(root.glob("checkpoint_*")) if ".tmp-" not in p.name and read_manifest(p)
    ]


def latest_local(train_dir: Path) -> Path | None:
    """The newest complete local-mode checkpoint."""
    done = complete_local(train_dir)
    return done[-1] if done else None


def prune_local(train_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete local-mode checkpoints (keep 0: none); the
    deleted folders. Torn `.tmp-*` folders are left to `atomic_dir`'s own cleanup."""
    if keep <= 0:
        return []
    old = complete_local(train_dir)[:-keep]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return old


def latest_ray(run_dir: Path) -> Path | None:
    """The newest checkpoint folder of a Ray Train run directory, for driver-side checks."""
    found = [p for p in sorted(run_dir.glob("checkpoint_*")) if p.is_dir()]
    return found[-1] if found else None


def restore(
    folder: Path, model: nn.Module, optim: torch.optim.Optimizer, sched: Any, ckpt_key: str
) -> int:
    """Load model, optimizer, scheduler and RNG from `folder`; returns the step to continue from."""
    meta = check_folder(folder, ckpt_key)
    rank, _ = world()
    msd, osd = get_state_dict(model, optim)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    sched.load_state_dict(meta["scheduler"])
    rng = folder / f"rng_{rank}.pt"
    if rng.is_file():  # absent when resuming on more ranks than saved
        saved = torch.load(rng, weights_only=True)
        torch.set_rng_state(saved["torch"])
        if "cuda" in saved and torch.cuda.is_available():
            torch.cuda.set_rng_state(saved["cuda"])
    return int(meta["step"])


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU (rank 0 gets it; all ranks must call)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def export(model: nn.Module, tc: Any, student_path: str, out: Path, manifest: dict) -> Path | None:
    """Write the trained model to `out` in HF format (plus `adapter/` for LoRA), atomically.

    All ranks call (gathering the state dict is a collective); rank 0 writes.
    """
    sd = full_state_dict(model)
    rank, _ = world()
    if rank == 0:
        with atomic_dir(out) as tmp:
            files = _write_export(sd, tc, student_path, tmp)
            finish_manifest(tmp, {**manifest, "files": files})
    barrier()
    return out if rank == 0 else None


def _write_export(sd: dict, tc: Any, student_path: str, tmp: Path) -> list[str]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # slow to import

    tok = AutoTokenizer.from_pretrained(student_path)
    if tc.mode == "lora":
        peft_model = apply_lora(load_student(student_path, tc), tc)
        peft_model.load_state_dict(sd, strict=True)
        peft_model.save_pretrained(tmp / "adapter")
        tok.save_pretrained(tmp / "adapter")
        if tc.lora_merge:
            peft_model.merge_and_unload().save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
    else:
        if is_classification(tc):
            model = load_student(student_path, tc)
        else:
            model = AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(student_path), dtype=torch.float32
            )
        model.load_state_dict(sd, strict=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    gen = Path(student_path) / "generation_config.json"
    if gen.is_file() and (tmp / "config.json").is_file():
        shutil.copy(gen, tmp / "generation_config.json")
    return sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
