"""The on-policy batch source: rollout engines sample, teacher engines score, one actor serves
each step's rows to every trainer rank and takes the trainer's weights back.

    driver:   source = start_source(plan)                 # before trainer.fit()
    rank r:   table, stats = ray.get(source.batch.remote(step))   # same rows for every rank
    rank 0:   ray.get(source.sync.remote([ray.put(payload)], step))  # every rollout.sync_every

Why one source actor between the pools and the trainer: every rank must train on its slice of
the same global batch, generated once; the actor caches a step's rows until the step after
next, so ranks that ask at different moments (or a worker group that restarts and redoes a
step) get identical rows. The three pools stay independent: rollout engines
(`rollout.num_actors`, `rollout.cpus_per_actor`), teacher engines (`teach.min_actors`,
`teach.cpus_per_actor`) and Train workers each reserve their own resources and may sit on
different nodes; the teacher never enters the trainer's memory.

Ordering: rank 0 pushes weights after step s and all ranks meet at a barrier before any asks
for step s + 1, so with `sync_every: 1` every batch is sampled from the weights that train on
it (`lag` 0); with N, batches lag by up to N - 1 steps, recorded per step.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raydapt.config import RolloutConfig
from raydapt.onpolicy.rows import length_stats, rollout_rows, step_seed
from raydapt.teach.spec import ActorSpec, Sampling

ENV_KEYS = ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")


@dataclass(frozen=True)
class SourceSpec:
    """What the source is told (plain values, built by train.stage.plan)."""

    prompts_file: str  # the prepared prompts parquet (split == "train" rows are used)
    rollout: ActorSpec  # the student's engine (its weights are replaced as training goes)
    teacher: ActorSpec  # the teacher's engine (k = teach.k)
    cfg: RolloutConfig
    teacher_actors: int
    teacher_cpus: float
    teacher_gpus: float
    teacher_kv_gib: float
    rows_per_step: int


def engine_env(kv_cache_gib: float, gpus: float) -> dict[str, str]:
    env = {"VLLM_CPU_KVCACHE_SPACE": str(max(1, round(kv_cache_gib)))}
    env |= {k: os.environ[k] for k in ENV_KEYS if k in os.environ}
    if not gpus:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"  # as teach.pool.actor_env: 2-core nodes
    return env


class EngineActor:
    """One vLLM engine for life: a rollout engine (student) or a teacher engine."""

    def __init__(self, spec: ActorSpec):
        from raydapt.teach.vllm_backend import VLLMBackend

        self.backend = VLLMBackend(spec)

    def generate(
        self, prompts: list[list[int]], seeds: list[int], gen: Sampling
    ) -> list[tuple[list[int], bool]]:
        out = self.backend.generate(prompts, [[s] for s in seeds], gen)
        return [(row[0][0], row[0][2]) for row in out]

    def score_tokens(self, seqs: list[np.ndarray]) -> list:
        return self.backend.score_tokens(seqs)

    def load_weights(self, payload: dict, version: int) -> float:
        return self.backend.load_weights(payload, version)


def _split(items: list, parts: int) -> list[list]:
    """Contiguous, nearly equal chunks (order kept, so results concatenate back in order)."""
    bounds = np.linspace(0, len(items), parts + 1).astype(int)
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class RolloutSource:
    """Serves each step's on-policy rows (see the module docstring)."""

    def __init__(self, spec: SourceSpec):
        import ray

        table = pq.read_table(spec.prompts_file, columns=["prompt_ids", "split"])
        train = table.filter(pc.equal(table.column("split"), "train"))
        self.prompts = [list(p) for p in train.column("prompt_ids").to_pylist()]
        if not self.prompts:
            raise ValueError(f"{spec.prompts_file}: no prompts of split train")
        self.spec = spec
        c = spec.cfg
        engine = ray.remote(EngineActor)
        self.rollouts = [
            engine.options(
                num_cpus=c.cpus_per_actor,
                num_gpus=c.gpus_per_actor,
                runtime_env={"env_vars": engine_env(c.kv_cache_gib, c.gpus_per_actor)},
            ).remote(spec.rollout)
            for _ in range(c.num_actors)
        ]
        self.teachers = [
            engine.options(
                num_cpus=spec.teacher_cpus,
                num_gpus=spec.teacher_gpus,
                runtime_env={"env_vars": engine_env(spec.teacher_kv_gib, spec.teacher_gpus)},
            ).remote(spec.teacher)
            for _ in range(spec.teacher_actors)
        ]
        self.version = 0
        self.cache: dict[int, tuple[pa.Table, dict]] = {}

    def batch(self, step: int) -> tuple[pa.Table, dict]:
        """Step `step`'s rows (rows_per_step of them) and their statistics."""
        import ray

        if step in self.cache:
            return self.cache[step]
        c, n = self.spec.cfg, self.spec.rows_per_step
        rng = np.random.default_rng(step_seed(c.seed, step, -1))
        pick = rng.choice(len(self.prompts), n, replace=len(self.prompts) < n)
        prompts = [self.prompts[i] for i in pick]
        seeds = [step_seed(c.seed, step, i) for i in range(n)]
        gen = Sampling(temperature=c.temperature, max_tokens=c.max_tokens, seed=c.seed)
        t0 = time.perf_counter()
        parts = zip(_split(prompts, len(self.rollouts)), _split(seeds, len(self.rollouts)))
        futures = [a.generate.remote(p, s, gen) for a, (p, s) in zip(self.rollouts, parts)]
        samples = [x for f in ray.get(futures) for x in f]
        t1 = time.perf_counter()
        seqs = [np.asarray([*p, *r], np.int64) for p, (r, _) in zip(prompts, samples)]
        chunks = _split(seqs, len(self.teachers))
        scored = ray.get([a.score_tokens.remote(s) for a, s in zip(self.teachers, chunks)])
        scores = [x for part in scored for x in part]
        t2 = time.perf_counter()
        responses = [r for r, _ in samples]
        table = rollout_rows(step, prompts, responses, scores, self.spec.teacher.k)
        stats = {
            **length_stats(responses, [e for _, e in samples], c.max_tokens),
            "weight_version": self.version,
            "lag": step - 1 - self.version,
            "rollout_s": t1 - t0,
            "score_s": t2 - t1,
            "prompt_epoch": step * n / len(self.prompts),
        }
        self.cache = {s: v for s, v in self.cache.items() if s >= step - 1}
        self.cache[step] = (table, stats)
        return table, stats

    def sync(self, payload_ref: list, version: int) -> float:
        """Push the trainer's weights (`[ref]`: the ObjectRef, unresolved, so each engine
        reads it from the object store itself) to every rollout engine; the slowest one's
        seconds."""
        import ray

        seconds = ray.get([a.load_weights.remote(payload_ref[0], version) for a in self.rollouts])
        self.version = version
        return max(seconds)

    def shutdown(self) -> None:
        import ray

        for a in self.rollouts + self.teachers:
            ray.kill(a)


def start_source(spec: SourceSpec) -> Any:
    """The source actor (0 CPUs: it waits on the engines). The caller kills it when done."""
    import ray

    return ray.remote(RolloutSource).options(num_cpus=0).remote(spec)
