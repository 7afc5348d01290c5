"""What a Ray actor sees: shared by the benches that give a raw engine raydapt's settings.

from _probe import ENGINE_ENV_PREFIXES, probe_actor, scoped_env
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

# what an actor's environment may hold that changes how its engine runs
ENGINE_ENV_PREFIXES = ("VLLM_", "OMP_", "KMP_", "MKL_", "GOMP_")


def probe_actor(
    num_cpus: float, env: dict[str, str], num_gpus: float = 0, in_process: bool = False
) -> dict:
    """The engine env vars and torch threads of a Ray actor with these resources and env.

    Ray sets OMP_NUM_THREADS to an actor's whole CPUs, so an engine in (or forked from) the
    actor runs with that many threads; a raw baseline must get the same. `in_process`: first
    do what a teacher actor's VLLMBackend does (keep a CPU engine in the actor's process).
    """
    import ray

    @ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, runtime_env={"env_vars": env})
    class Probe:
        def env(self) -> dict:
            import torch

            if in_process:
                from raydapt.teach.vllm_backend import in_process_engine

                in_process_engine(1)  # CPU, tensor parallel 1
            seen = {k: v for k, v in os.environ.items() if k.startswith(ENGINE_ENV_PREFIXES)}
            return {"env": seen, "torch_threads": torch.get_num_threads()}

    a = Probe.remote()
    try:
        return ray.get(a.env.remote())
    finally:
        ray.kill(a)


@contextmanager
def scoped_env(
    env: dict[str, str], prefixes: tuple[str, ...] = ENGINE_ENV_PREFIXES
) -> Iterator[None]:
    """This process's env with exactly `env` for the keys under `prefixes`, restored after."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(prefixes)}
    for k in saved:
        del os.environ[k]
    os.environ.update(env)
    try:
        yield
    finally:
        for k in [k for k in os.environ if k.startswith(prefixes)]:
            del os.environ[k]
        os.environ.update(saved)
