"""Connect to a Ray cluster (`--address` / RAY_ADDRESS) or start a local one sized for 2 cores.

Ray Train V2 reserves one CPU per worker, so on a 2-core machine two workers would starve
Ray Data tasks and the Tune driver. A local cluster therefore advertises more logical CPUs
than cores (`cluster.num_cpus`, 8 by default): the work is small and mostly waits.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from urllib.parse import urlparse

from raydapt.config import ClusterConfig
from raydapt.errors import UserError

log = logging.getLogger(__name__)

RUNTIME_ENV_VARS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    # Train V2 copies every print of a worker into its log as well: each line shows twice
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def _env_vars() -> dict[str, str]:
    """Env vars for every worker, minus those a submitting Ray Job already sets.

    Under `ray job submit`, ray.init refuses a runtime env that repeats a key of the job's
    own; the job's values win, since the user chose them at submission.
    """
    import json

    env = dict(RUNTIME_ENV_VARS)
    for k in ("HF_HUB_OFFLINE", "VLLM_CPU_KVCACHE_SPACE", "HF_HOME", "PYTHONPATH"):
        if k in os.environ:
            env[k] = os.environ[k]
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}") or "{}")
    taken = set((job.get("runtime_env") or {}).get("env_vars") or {})
    if taken:
        env = {k: v for k, v in env.items() if k not in taken}
    return env


def _reachable(address: str, timeout_s: float) -> None:
    """Fail fast on an address that nothing listens on; ray.init would retry for minutes."""
    if address in ("auto", "local"):
        return
    url = urlparse(address if "://" in address else f"ray://{address}")
    host, port = url.hostname, url.port or (10001 if url.scheme == "ray" else 6379)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise UserError(
                    f"no Ray cluster answers at {address} ({e}); check --address / RAY_ADDRESS, "
                    "or leave both unset to start a local cluster"
                ) from None
            time.sleep(0.5)


def quiet_worker() -> None:
    """Runs in every Ray worker: drop a per-second warning from Ray internals that would
    bury raydapt's own progress lines on the console."""
    import logging

    # Train V2's placement-group cleaner polls the State API, which needs the dashboard that
    # a local cluster here does not start; its cleanup on a crashed controller is all it loses.
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def connect(cfg: ClusterConfig | None = None, address: str | None = None):
    """ray.init against `address`, RAY_ADDRESS, the job's cluster.address, or a new local cluster."""
    import ray

    cfg = cfg or ClusterConfig()
    if ray.is_initialized():
        return ray.get_runtime_context()
    address = address or os.environ.get("RAY_ADDRESS") or cfg.address
    runtime_env = {"env_vars": _env_vars(), "worker_process_setup_hook": "raydapt.cluster.quiet_worker"}
    if address:
        _reachable(address, cfg.connect_timeout_s)
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        log.info("starting a local Ray cluster with %d logical CPUs", cfg.num_cpus)
        ray.init(
            address="local",  # never attach to a stray `ray start` cluster by accident
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus or None,
            object_store_memory=int(cfg.object_store_gib * 2**30),
            include_dashboard=False,
            runtime_env=runtime_env,
            log_to_driver=True,
        )
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("RAYDAPT_PROGRESS", "1") == "1"
    return ray.get_runtime_context()
