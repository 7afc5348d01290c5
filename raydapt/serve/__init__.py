"""`raydapt serve JOB|MODEL_DIR`: an OpenAI-compatible HTTP server on Ray Serve and vLLM.

    raydapt serve jobs/demo.yaml serve.port=8000
    curl -s localhost:8000/v1/completions -d '{"model": "final", "prompt": "12+34=", "max_tokens": 8}'

Serves `serve.model`, else the train stage's export (`layout.export_dir`), plus the LoRA
adapters of `serve.adapters` (or `<export>/adapter`), selected by the request's `model`.
Everything is validated here, in the driver, before a replica reserves CPUs or a GPU.

    from raydapt.serve import run
    url = run(cfg, "runs/demo/train/final", block=False)   # returns http://host:port
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from raydapt.config import JobConfig
from raydapt.errors import UserError

log = logging.getLogger(__name__)

APP_NAME = "raydapt"
_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted max_lora_rank values


def resolve_model_dir(cfg: JobConfig, model_dir: str | None = None) -> Path:
    """The HF folder to serve: the argument, `serve.model`, or the train stage's export."""
    from raydapt.layout import export_dir

    src = model_dir or cfg.serve.model
    path = Path(src).expanduser() if src else export_dir(cfg)
    where = "model folder argument" if model_dir else ("serve.model" if src else "train export")
    if not (path / "config.json").is_file():
        raise UserError(f"{where}: {path} holds no HF model (config.json); run `raydapt train` "
                        "first or set serve.model to a model folder")
    return path.resolve()


def _kv_env(cfg: JobConfig) -> dict[str, str]:
    import os

    env = {"VLLM_CPU_KVCACHE_SPACE": str(max(1, round(cfg.serve.kv_cache_gib))),
           "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0",
           # Route handling and the engine's output loop on the replica's own event loop: the
           # default extra user-code thread cost ~15 ms per request here (bench/serve.py).
           "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
    if not cfg.serve.gpus_per_replica:
        # AsyncLLM always runs its engine core in a child process; on CPU this keeps vLLM's
        # worker inside that child instead of starting a third process (one import of torch
        # and vLLM fewer per replica start; see raydapt.teacher.vllm_backend)
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    for k in ("HF_HUB_OFFLINE", "HF_HOME", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD",
              "VLLM_ENABLE_V1_MULTIPROCESSING"):
        if k in os.environ:
            env[k] = os.environ[k]
    return env


def build_spec(cfg: JobConfig, model_dir: str | None = None) -> dict:
    """Everything a replica needs, as plain data (no keys: only their digests)."""
    from raydapt.models import engine_dtype
    from raydapt.serve.auth import load_key_digests
    from raydapt.serve.lora import resolve_adapters

    s = cfg.serve
    path = resolve_model_dir(cfg, model_dir)
    name = s.name or (path.name if model_dir or s.model else cfg.name)
    adapters = resolve_adapters(cfg, path, name)
    rank = next((r for r in _LORA_RANKS if r >= s.max_lora_rank), _LORA_RANKS[-1])
    engine: dict[str, Any] = {
        "model": str(path), "dtype": engine_dtype(s.dtype, path, s.gpus_per_replica > 0), "enforce_eager": s.gpus_per_replica == 0,
        "max_model_len": s.max_model_len or None, "disable_log_stats": True,
        "enable_lora": bool(adapters), "max_logprobs": 20,
    }
    if adapters:
        engine.update(max_loras=s.max_loras, max_lora_rank=rank, max_cpu_loras=s.max_loras)
    return {"name": name, "model_dir": str(path), "adapters": adapters, "engine": engine,
            "max_n": s.max_n, "max_loras": s.max_loras, "key_digests": load_key_digests(s)}


def build_app(cfg: JobConfig, model_dir: str | None = None) -> Any:
    """The Serve application (bound deployment) for `cfg.serve`; validates before binding."""
    from ray import serve
    from ray.serve.config import BackpressureConfig

    from raydapt.serve.app import Server

    s = cfg.serve
    spec = build_spec(cfg, model_dir)
    deployment = serve.deployment(Server).options(
        name="OpenAIServer",
        autoscaling_config={"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                            "initial_replicas": s.min_replicas,
                            "target_ongoing_requests": s.target_ongoing_requests},
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=s.retry_after_s),
        ray_actor_options={"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica,
                           "runtime_env": {"env_vars": _kv_env(cfg)}},
        health_check_period_s=10, health_check_timeout_s=60, graceful_shutdown_timeout_s=5,
        # the proxy already logs method, path, status and latency of every request; a second
        # line per request from the replica costs CPU that generation needs on small machines
        logging_config={"enable_access_log": False},
    )
    return deployment.bind(spec)


def from_target(target: str, overrides: list[str] | None = None) -> tuple[JobConfig, str | None]:
    """`raydapt serve JOB|MODEL_DIR`: a job YAML, or a model folder served with default settings."""
    from raydapt.config import load_job

    if Path(target).is_dir():
        return load_job(None, overrides), target
    return load_job(target, overrides), None


def run(cfg: JobConfig, model_dir: str | None = None, block: bool = True) -> str:
    """Start Serve on `serve.host:serve.port`, deploy the app, return its base URL.

    With `block`, waits for Ctrl-C and then shuts Serve down; without, the caller owns the
    running app (`shutdown()` stops it).
    """
    from ray import serve

    from raydapt.cluster import connect

    app = build_app(cfg, model_dir)  # all validation before the cluster is touched
    connect(cfg.cluster)
    serve.start(proxy_location=cfg.serve.proxy_location,
                http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    print(f"raydapt serve: OpenAI API at {url}/v1 (models: {url}/v1/models)", flush=True)
    if not block:
        return url
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("raydapt serve: shutting down", flush=True)
    finally:
        shutdown()
    return url


def shutdown() -> None:
    """Stop every Serve application and the proxies of this cluster."""
    from ray import serve

    serve.shutdown()


__all__ = ["APP_NAME", "build_app", "build_spec", "from_target", "resolve_model_dir", "run",
           "shutdown"]
