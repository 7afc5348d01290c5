"""FSDP2 wrapping and the small distributed helpers the train loop needs.

`ray.train.torch.prepare_model(parallel_strategy="fsdp")` raises without CUDA,
so raydapt calls `torch.distributed.fsdp.fully_shard` itself: once per decoder block, then
on the root, the layout torchtune and torchtitan use. On CPU the process group is gloo and
parameters stay fp32; on GPU it is nccl and compute runs in bf16 with fp32 gradient
reduction (`MixedPrecisionPolicy`).

With no process group (Train local mode, `train.num_workers=0`, or a plain script) nothing
is sharded and every collective below is the identity, so one code path serves both.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without a process group."""
    if not is_dist():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place, also returned); identity without a process group."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if is_dist():
        dist.barrier()


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of an HF model (also through a PEFT wrapper)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.endswith("layers") and len(mod) > 0:
            return list(mod)
    for name, mod in model.named_modules():  # GPT-2 style `h`
        if isinstance(mod, nn.ModuleList) and name.endswith(".h") and len(mod) > 0:
            return list(mod)
    raise ValueError(f"no decoder block list (`layers`/`h`) found in {type(model).__name__}")


def mixed_precision(precision: str, use_gpu: bool) -> str:
    """Resolve train.precision: auto means bf16 on GPU and fp32 on CPU."""
    if precision == "auto":
        return "bf16" if use_gpu else "fp32"
    return precision


def shard_model(
    model: nn.Module,
    precision: str = "fp32",
    reshard_after_forward: bool = True,
    min_world: int = 2,
) -> nn.Module:
    """fully_shard every decoder block, then the root.

    No-op without a process group, and on fewer than `min_world` ranks: one rank has
    nothing to shard, and FSDP's copy-in/copy-out cost 30% of the throughput of a
    1-GPU run (bench/train_gpu.py). Unsharded bf16 then runs under `autocast_for`.
    """
    if not is_dist() or dist.get_world_size() < min_world:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in decoder_blocks(model):
        fully_shard(block, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Global grad norm over all ranks (DTensor aware); clips when max_norm > 0."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def device_for(use_gpu: bool) -> torch.device:
    if use_gpu and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def autocast_for(model: nn.Module, precision: str, device: torch.device):
    """bf16 autocast for an unsharded model (FSDP's MixedPrecisionPolicy covers sharded ones)."""
    import contextlib

    from torch.distributed.fsdp import FSDPModule

    if precision != "bf16" or isinstance(model, FSDPModule):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
