"""`raydapt serve JOB|MODEL_DIR`: an OpenAI-compatible HTTP server on Ray Serve and vLLM.

    raydapt serve jobs/demo.yaml serve.port=8000
    curl -s localhost:8000/v1/completions \
        -d '{"model": "final", "prompt": "12+34=", "max_tokens": 8}'

Serves `serve.model`, else the train stage's export (`layout.export_dir`), plus the LoRA
adapters of `serve.adapters` (or `<export>/adapter`), selected by the request's `model`.
Everything is validated in `plan`, in the driver, before a replica reserves CPUs or a GPU.

    from raydapt.pipeline import run_stage
    url = run_stage("serve", job, model_dir="runs/demo/train/final", block=False)["url"]
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve

from raydapt.config import JobConfig
from raydapt.serve.app import build_app
from raydapt.serve.spec import ReplicaSpec, build_spec

APP_NAME = "raydapt"


@dataclass(frozen=True)
class ServePlan:
    """The checked replica spec, and how the command behaves once the app is up."""

    job: JobConfig
    spec: ReplicaSpec
    block: bool
    output: None = None  # serving writes no output


def plan(job: JobConfig, model_dir: str | Path | None = None, block: bool = True) -> ServePlan:
    return ServePlan(job, build_spec(job, str(model_dir) if model_dir else None), block)


def fingerprint(p: ServePlan) -> None:
    """Serving is never up to date: it always starts the app."""
    return None


def run(p: ServePlan) -> dict[str, Any]:
    """Start Serve on `serve.host:serve.port`, deploy the app; returns {"url": base URL}.

    With `block`, waits for Ctrl-C and then shuts Serve down; without, the caller owns the
    running app (`shutdown()` stops it).
    """
    s = p.job.serve
    serve.start(proxy_location=s.proxy_location, http_options={"host": s.host, "port": s.port})
    serve.run(build_app(p.job, p.spec), name=APP_NAME, route_prefix="/")
    url = f"http://{s.host}:{s.port}"
    print(f"[serve] OpenAI API at {url}/v1 (models: {url}/v1/models)", flush=True)
    if p.block:
        try:
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:
            print("[serve] shutting down", flush=True)
        finally:
            shutdown()
    return {"url": url, "model": p.spec.name}


def shutdown() -> None:
    """Stop every Serve application and the proxies of this cluster."""
    serve.shutdown()
