"""Shared fixtures: one small world, one tiny model, and one local Ray cluster per session.

Engines and clusters are expensive on 2 cores, so they are built once and shared.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory):
    """A small generated world: train.jsonl and heldout.jsonl."""
    from raydapt.world import write_world

    out = tmp_path_factory.mktemp("world")
    write_world(out, n_train=600, n_heldout=40, n_markov=60, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(world_dir, tmp_path_factory):
    """A tiny random Llama (2 layers, hidden 128, head_dim 64) with a BPE trained on the world."""
    from raydapt.models import init_model

    return init_model("tiny", world_dir / "train.jsonl", tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct imported from its packaged GGUF (`make setup` installs it) into
    this test run's own cache, once (~35 s): the real LLM of the real-model tests."""
    from raydapt import imports

    cache = tmp_path_factory.mktemp("import-cache")
    before = os.environ.get("RAYDAPT_CACHE")
    os.environ["RAYDAPT_CACHE"] = str(cache)
    try:
        return imports.ensure_imported(imports.PACKAGED_EXAMPLE)
    finally:
        if before is None:
            os.environ.pop("RAYDAPT_CACHE")
        else:
            os.environ["RAYDAPT_CACHE"] = before


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray cluster with more logical CPUs than cores (Train workers each
    reserve one CPU, so two would fill a 2-core machine), shared by all tests.

    Tests that need a cluster of another shape shut this one down themselves; the next user
    of this fixture starts it again.
    """
    import ray

    yield _ensure_ray
    if ray.is_initialized():
        ray.shutdown()


def _ensure_ray():
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=8,
            include_dashboard=False,
            object_store_memory=1 << 30,
            runtime_env={
                "env_vars": {
                    "RAY_USAGE_STATS_ENABLED": "0",
                    "HF_HUB_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false",
                    "VLLM_CPU_KVCACHE_SPACE": "1",
                }
            },
        )
    return ray


@pytest.fixture
def ray_cluster(ray_session):
    """The shared local Ray cluster, started if needed."""
    return ray_session()
