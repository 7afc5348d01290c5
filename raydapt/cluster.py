"""Connect to a Ray cluster (`--address` / RAY_ADDRESS) or start a local one sized for 2 cores.

Ray Train V2 reserves one CPU per worker, so on a 2-core machine two workers would starve
Ray Data tasks and the Tune driver. A local cluster therefore advertises more logical CPUs
than cores (`cluster.num_cpus`, 8 by default): the work is small and mostly waits.

An existing cluster may require Ray's token authentication. Ray only sends a token when
RAY_AUTH_MODE=token is set in this process's environment (an explicit address never turns it
on by itself), with the token in RAY_AUTH_TOKEN, in the file RAY_AUTH_TOKEN_PATH names, or in
~/.ray/auth_token. Without it ray.init retries for about 20 s and ends in a traceback, so
`connect` asks the cluster first and turns a refusal into a UserError naming the variables.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from urllib.parse import urlparse

from raydapt.config import ClusterConfig
from raydapt.errors import UserError

RUNTIME_ENV_VARS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    # Train V2 copies every print of a worker into its log as well: each line shows twice
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # vLLM logs to stdout by default, which Ray relays to the driver's console; on stderr its
    # lines join Ray's in <output_dir>/logs/ (raydapt.logs)
    "VLLM_LOGGING_STREAM": "ext://sys.stderr",
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


AUTH_HELP = (
    "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to the cluster's token "
    "(`ray get-auth-token` prints it "
    "on the head node), or RAY_AUTH_TOKEN_PATH to a file holding it, "
    "in the environment that runs raydapt"
)


def _auth_refused(address: str, detail: object) -> UserError:
    mode = os.environ.get("RAY_AUTH_MODE", "")
    if mode.lower() == "token":
        why = f"the Ray cluster at {address} refused this process's token ({detail})"
    else:
        why = (
            f"the Ray cluster at {address} requires token authentication and RAY_AUTH_MODE is "
            f"{mode or 'unset'} here, so no token was sent ({detail})"
        )
    return UserError(f"{why}; {AUTH_HELP}")


def _is_auth_error(e: BaseException) -> bool:
    """True when `e` or an exception it came from is Ray refusing the token.

    ray.init wraps the AuthenticationError of the GCS connection into a ConnectionError whose
    cause carries it only as text, hence the check on the messages as well.
    """
    from ray.exceptions import AuthenticationError

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if (
            isinstance(e, AuthenticationError)
            or "InvalidAuthToken" in str(e)
            or "AuthenticationError" in str(e)
        ):
            return True
        e = e.__cause__ or e.__context__
    return False


def _check_auth(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast, naming the variables to set, when the cluster at `address` wants a token this
    process does not send. Any failure other than a refused token is left to ray.init."""
    import threading

    from ray.exceptions import AuthenticationError

    try:
        # RAY_AUTH_MODE=token with no token, or RAY_AUTH_TOKEN_PATH naming an unreadable file
        from ray._private.authentication import authentication_token_setup as token_setup

        token_setup.ensure_token_if_auth_enabled(None, create_token_if_missing=False)
    except AuthenticationError as e:
        raise UserError(
            f"no Ray auth token found for {address} ({e.message}); {AUTH_HELP}"
        ) from None
    except Exception:  # noqa: BLE001 - a Ray without these internals: ray.init checks the same
        pass
    if address in ("auto", "local") or "://" in address:
        return  # a Ray Client (ray://) address: ray.init's own auth error is mapped instead
    refused: list[AuthenticationError] = []

    def probe() -> None:
        try:
            from ray._private.services import canonicalize_bootstrap_address
            from ray._raylet import GcsClient

            # one RPC: a GCS answers it at once, and refuses it at once without the right token
            _ = GcsClient(address=canonicalize_bootstrap_address(address)).cluster_id
        except AuthenticationError as e:
            refused.append(e)
        except Exception:  # noqa: BLE001 - the probe is only for the token; ray.init reports the rest
            pass

    # in a thread: something that is not a GCS on that port keeps the client waiting for 40 s
    thread = threading.Thread(target=probe, name="raydapt-auth-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if refused:
        raise _auth_refused(address, refused[0].message)


def quiet_worker() -> None:
    """Runs in every Ray worker: drop a per-second warning from Ray internals that would
    bury raydapt's own progress lines on the console."""

    # Train V2's placement-group cleaner polls the State API, which needs the dashboard that
    # a local cluster here does not start; its cleanup on a crashed controller is all it loses.
    logging.getLogger(
        "ray.train.v2._internal.execution.controller.placement_group_cleaner"
    ).setLevel(logging.ERROR)


def connect(cfg: ClusterConfig | None = None, address: str | None = None, verbose: bool = False):
    """ray.init against `address`, RAY_ADDRESS, the job's cluster.address, or a new local cluster.

    Ray Data's own progress bars show only with `verbose`: each stage reports its progress
    through raydapt.progress instead.
    """
    import ray

    cfg = cfg or ClusterConfig()
    if ray.is_initialized():
        return ray.get_runtime_context()
    address = address or os.environ.get("RAY_ADDRESS") or cfg.address
    runtime_env = {
        "env_vars": _env_vars(),
        "worker_process_setup_hook": "raydapt.cluster.quiet_worker",
    }
    if address:
        _reachable(address, cfg.connect_timeout_s)
        _check_auth(address)
        print(f"[raydapt] connecting to Ray at {address}", flush=True)
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        except Exception as e:
            if _is_auth_error(e):
                raise _auth_refused(address, "Ray: authentication failed") from None
            if (
                "://" in address
                and isinstance(e, ConnectionError)
                and os.environ.get("RAY_AUTH_MODE", "").lower() != "token"
            ):
                # a Ray Client server refuses a missing token by not answering: the client times out
                raise UserError(
                    f"the Ray Client server at {address} did not answer ({e}); "
                    "if the cluster uses token "
                    f"authentication (Ray 2.60 may turn it on by itself), {AUTH_HELP}"
                ) from None
            raise
    else:
        print(f"[raydapt] starting a local Ray cluster, {cfg.num_cpus} logical CPUs", flush=True)
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
    ctx.enable_progress_bars = verbose
    return ray.get_runtime_context()
