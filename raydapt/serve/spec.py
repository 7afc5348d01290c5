"""What a Serve replica is told: a typed spec, built and checked in the driver.

The replica (raydapt.serve.app) only reads it: the model folder, the LoRA adapters it may
load, the vLLM engine arguments, limits, and the digests of the API keys (never the keys).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raydapt.config import JobConfig
from raydapt.errors import UserError
from raydapt.layout import export_dir
from raydapt.models import engine_dtype
from raydapt.serve.auth import load_key_digests
from raydapt.serve.lora import resolve_adapters

_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted max_lora_rank values


@dataclass(frozen=True)
class ReplicaSpec:
    """One replica's settings. `engine` holds vLLM AsyncEngineArgs keyword arguments."""

    name: str
    model_dir: str
    adapters: dict[str, str] = field(default_factory=dict)  # LoRA name -> adapter folder
    engine: dict[str, Any] = field(default_factory=dict)
    max_n: int = 8
    max_loras: int = 4
    key_digests: tuple[str, ...] = ()


def resolve_model_dir(cfg: JobConfig, model_dir: str | None = None) -> Path:
    """The HF folder to serve: the argument, `serve.model`, or the train stage's export."""
    src = model_dir or cfg.serve.model
    path = Path(src).expanduser() if src else export_dir(cfg)
    where = "model folder argument" if model_dir else ("serve.model" if src else "train export")
    if not (path / "config.json").is_file():
        raise UserError(
            f"{where}: {path} holds no HF model (config.json); run `raydapt train` "
            "first or set serve.model to a model folder"
        )
    return path.resolve()


def replica_env(cfg: JobConfig) -> dict[str, str]:
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(cfg.serve.kv_cache_gib))),
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Route handling and the engine's output loop on the replica's own event loop: the
        # default extra user-code thread cost ~15 ms per request here (bench/serve.py).
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    }
    if not cfg.serve.gpus_per_replica:
        # AsyncLLM always runs its engine core in a child process; on CPU this keeps vLLM's
        # worker inside that child instead of starting a third process (one import of torch
        # and vLLM fewer per replica start; see raydapt.teach.vllm_backend)
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    for k in (
        "HF_HUB_OFFLINE",
        "HF_HOME",
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD",
        "VLLM_ENABLE_V1_MULTIPROCESSING",
    ):
        if k in os.environ:
            env[k] = os.environ[k]
    return env


def build_spec(cfg: JobConfig, model_dir: str | None = None) -> ReplicaSpec:
    """Everything a replica needs, checked in the driver (no keys: only their digests)."""
    s = cfg.serve
    path = resolve_model_dir(cfg, model_dir)
    name = s.name or (path.name if model_dir or s.model else cfg.name)
    adapters = resolve_adapters(cfg, path, name)
    rank = next((r for r in _LORA_RANKS if r >= s.max_lora_rank), _LORA_RANKS[-1])
    engine: dict[str, Any] = {
        "model": str(path),
        "dtype": engine_dtype(s.dtype, path, s.gpus_per_replica > 0),
        "enforce_eager": s.gpus_per_replica == 0,
        "max_model_len": s.max_model_len or None,
        "disable_log_stats": True,
        "enable_lora": bool(adapters),
        "max_logprobs": 20,
    }
    if adapters:
        engine.update(max_loras=s.max_loras, max_lora_rank=rank, max_cpu_loras=s.max_loras)
    return ReplicaSpec(
        name=name,
        model_dir=str(path),
        adapters=adapters,
        engine=engine,
        max_n=s.max_n,
        max_loras=s.max_loras,
        key_digests=tuple(load_key_digests(s)),
    )
