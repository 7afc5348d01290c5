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

Faults: an engine that dies mid-step (its actor or node lost) is replaced, a new rollout engine
gets the latest pushed weights, and the whole step is redone with the same seeds; rows leave
the source only complete, so no batch is trained twice (`redone` counts the redos).

Asynchronous rollouts (`rollout.max_staleness` s > 0): as soon as step t's rows are served, a
thread of the source starts step t + 1's rollouts, so they run while the trainer trains step t
(before its weights are pushed). Each engine reports the weight version it sampled with; a
prefetched batch more than s steps behind is thrown away and sampled again.

GKD's mix (`rollout.on_policy_fraction` < 1): a seeded coin per step picks the student's own
samples or the prepared reference responses; both are scored by the teacher alike.

The EOS guard (`rollout.eos_guard`): see `eos_check`.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raydapt.config import RolloutConfig
from raydapt.errors import UserError
from raydapt.faults import park_until_killed
from raydapt.onpolicy.rows import length_stats, on_policy_step, rollout_rows, step_seed
from raydapt.teach.spec import ActorSpec, Sampling

ENV_KEYS = ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")
HOLD_ENGINE_ENV = "RAYDAPT_HOLD_ENGINE"  # fault tests: role:call[,...], e.g. rollout:2,teacher:5


@dataclass(frozen=True)
class EngineHold:
    """Fault injection (tests/onpolicy, bench/chaos.py): at each (role, call) of `points`, the
    call-th generate (role rollout) or score (role teacher) call of an engine parks until
    killed, once: the first engine to get there writes `<file>.<role>.<call>` (its pid), and
    engines that find the file go on. Calls count per engine process."""

    points: tuple[tuple[str, int], ...]
    file: str

    def path(self, role: str, call: int) -> str:
        return f"{self.file}.{role}.{call}"


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
    last_step: int = 0  # the trainer's max_steps: nothing is prefetched past it
    reference_files: tuple[str, ...] = ()  # prepared train shards (on_policy_fraction < 1)
    hold: EngineHold | None = None


def engine_env(kv_cache_gib: float, gpus: float) -> dict[str, str]:
    env = {"VLLM_CPU_KVCACHE_SPACE": str(max(1, round(kv_cache_gib)))}
    env |= {k: os.environ[k] for k in ENV_KEYS if k in os.environ}
    if not gpus:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"  # as teach.pool.actor_env: 2-core nodes
    return env


class EngineActor:
    """One vLLM engine for life: a rollout engine (student) or a teacher engine."""

    def __init__(self, spec: ActorSpec, role: str = "", hold: EngineHold | None = None):
        from raydapt.teach.vllm_backend import VLLMBackend

        self.backend = VLLMBackend(spec)
        self.role, self.hold, self.calls = role, hold, 0

    def _count_call(self) -> None:
        self.calls += 1
        h = self.hold
        if h and (self.role, self.calls) in h.points:
            path = h.path(self.role, self.calls)
            if not os.path.exists(path):
                park_until_killed(path, {"role": self.role, "call": self.calls})

    def generate(
        self, prompts: list[list[int]], seeds: list[int], gen: Sampling
    ) -> tuple[list[tuple[list[int], bool]], int]:
        """(response ids, ended) per prompt, and the weight version that sampled them."""
        self._count_call()
        return self.probe(prompts, seeds, gen), self.backend.weight_version

    def score_tokens(self, seqs: list[np.ndarray]) -> list:
        self._count_call()
        return self.backend.score_tokens(seqs)

    def probe(
        self, prompts: list[list[int]], seeds: list[int], gen: Sampling
    ) -> list[tuple[list[int], bool]]:
        """Samples for the EOS guard's probe (not a step's work: not counted for holds)."""
        out = self.backend.generate(prompts, [[s] for s in seeds], gen)
        return [(row[0][0], row[0][2]) for row in out]

    def load_weights(self, payload: dict, version: int) -> float:
        return self.backend.load_weights(payload, version)


class EnginesLost(Exception):
    """Engines of one pool died during a step (indices into the pool)."""

    def __init__(self, role: str, dead: list[int], cause: BaseException):
        super().__init__(f"{role} engines {dead} died: {cause}")
        self.role, self.dead = role, dead


def gather(role: str, futures: list) -> list:
    """Every future's result, in order; EnginesLost naming each dead engine, if any died."""
    import ray

    results, dead, cause = [], [], None
    for i, f in enumerate(futures):
        try:
            results.append(ray.get(f))
        except ray.exceptions.RayActorError as e:
            dead.append(i)
            cause = e
    if dead:
        raise EnginesLost(role, dead, cause)
    return results


def eos_check(
    step: int,
    ends: list[float],
    n: int,
    cfg: RolloutConfig,
    teacher_ended: float,
) -> bool:
    """The EOS guard. `ends`: the teacher's log-prob of the end-of-sequence token at each of
    this step's n responses that ended with it; `teacher_ended`: the share of the teacher's
    own samples (the source's probe at start) that ended within rollout.max_tokens. True when
    that position must leave the loss (eos_guard: mask); raises UserError (eos_guard: stop).

    Why: when the teacher and the student end answers with different tokens (a chat model's
    end-of-turn against the tokenizer's eos), the teacher gives the student's EOS almost no
    mass, the KD loss pushes the student off it, and response lengths run to max_tokens (or,
    the other way round, collapse); the length statistics show it only after the damage.

    Both signs are needed. A low log-prob alone also marks a student that ends too early, a
    mistake on-policy KD should correct (a near one-hot teacher gives a premature EOS -20);
    a teacher whose own samples never end is the mismatch.
    """
    if cfg.eos_guard == "off" or not ends or teacher_ended > 0:
        return False
    median = float(np.median(ends))
    if median >= cfg.eos_min_logprob:
        return False
    if cfg.eos_guard == "mask":
        return True
    raise UserError(
        f"rollout.eos_guard: the teacher's own samples never end within rollout.max_tokens="
        f"{cfg.max_tokens}, and at step {step} it gives the end-of-sequence token the student "
        f"ended {len(ends)} of {n} responses with a median log-prob of {median:.1f} (below "
        f"rollout.eos_min_logprob={cfg.eos_min_logprob}): the two disagree on where answers "
        "end, and distilling that drives response length to run away or collapse. Check that "
        "teacher and student end turns with the same token (the tokenizer's eos, the chat "
        "template's end of turn) or raise rollout.max_tokens, or set rollout.eos_guard: mask "
        "(train without that position) or off"
    )


def references(files: tuple[str, ...], max_len: int, max_tokens: int) -> list[tuple[list, list]]:
    """(prompt, response) token lists of unpacked prepared rows: the response is what the row
    learns (from its first loss position on), cut to max_tokens; rows longer than max_len
    are left out (the teacher engine could not score them)."""
    out = []
    for f in files:
        t = pq.read_table(f, columns=["input_ids", "loss_mask"])
        for ids, mask in zip(t.column("input_ids").to_pylist(), t.column("loss_mask").to_pylist()):
            first = mask.index(1) if 1 in mask else -1
            if first < 0:
                continue
            prompt, response = ids[: first + 1], ids[first + 1 :][:max_tokens]
            if len(prompt) + len(response) + 1 <= max_len:
                out.append((prompt, response))
    return out


def _split(items: list, parts: int) -> list[list]:
    """Contiguous, nearly equal chunks (order kept, so results concatenate back in order)."""
    bounds = np.linspace(0, len(items), parts + 1).astype(int)
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class RolloutSource:
    """Serves each step's on-policy rows (see the module docstring)."""

    def __init__(self, spec: SourceSpec):
        table = pq.read_table(spec.prompts_file, columns=["prompt_ids", "split"])
        train = table.filter(pc.equal(table.column("split"), "train"))
        self.prompts = [list(p) for p in train.column("prompt_ids").to_pylist()]
        if not self.prompts:
            raise ValueError(f"{spec.prompts_file}: no prompts of split train")
        self.spec = spec
        c = spec.cfg
        self.references: list[tuple[list, list]] = []
        if c.on_policy_fraction < 1:
            self.references = references(
                spec.reference_files, spec.rollout.max_model_len, c.max_tokens
            )
            if not self.references:
                raise ValueError(f"{spec.reference_files}: no reference rows short enough")
        self.rollouts = [self._engine("rollout") for _ in range(c.num_actors)]
        self.teachers = [self._engine("teacher") for _ in range(spec.teacher_actors)]
        self.version = 0
        self.payload: list = []  # [ObjectRef] of the last pushed weights, for new engines
        self.cache: dict[int, tuple[pa.Table, dict]] = {}
        self.prefetched: dict[int, Future] = {}
        self.teacher_ended: float | None = None  # the EOS guard's probe, drawn once
        self.threads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")

    def _engine(self, role: str) -> Any:
        import ray

        s, c = self.spec, self.spec.cfg
        cpus, gpus, kv, spec = (
            (c.cpus_per_actor, c.gpus_per_actor, c.kv_cache_gib, s.rollout)
            if role == "rollout"
            else (s.teacher_cpus, s.teacher_gpus, s.teacher_kv_gib, s.teacher)
        )
        return (
            ray.remote(EngineActor)
            .options(
                num_cpus=cpus,
                num_gpus=gpus,
                runtime_env={"env_vars": engine_env(kv, gpus)},
            )
            .remote(spec, role, s.hold)
        )

    def _teacher_ended(self) -> float:
        """The share of the teacher's own samples, on up to 16 train prompts at the rollout's
        settings, that end within max_tokens: drawn once (the EOS guard's probe). With the
        guard off nothing is drawn and 1.0 stands in (eos_check ignores it; it is not
        logged)."""
        if self.spec.cfg.eos_guard == "off":
            return 1.0
        if self.teacher_ended is None:
            c = self.spec.cfg
            prompts = self.prompts[:16]
            gen = Sampling(temperature=c.temperature, max_tokens=c.max_tokens, seed=c.seed)
            seeds = [step_seed(c.seed, 0, i) for i in range(len(prompts))]
            rows = gather("teacher", [self.teachers[0].probe.remote(prompts, seeds, gen)])[0]
            self.teacher_ended = float(np.mean([e for _, e in rows]))
        return self.teacher_ended

    def _replace(self, role: str, dead: list[int]) -> None:
        """New engines for the dead ones; a new rollout engine first gets the latest weights."""
        import ray

        pool = self.rollouts if role == "rollout" else self.teachers
        for i in dead:
            ray.kill(pool[i])  # an unavailable (not yet dead) actor must not come back
            pool[i] = self._engine(role)
            if role == "rollout" and self.payload:
                ray.get(pool[i].load_weights.remote(self.payload[0], self.version))

    def batch(self, step: int) -> tuple[pa.Table, dict]:
        """Step `step`'s rows (rows_per_step of them) and their statistics; a step whose
        engines died is redone from the start with the same prompts and seeds."""
        if step in self.cache:
            return self.cache[step]
        c = self.spec.cfg
        redone, result, prefetched = 0, None, False
        ahead = self.prefetched.pop(step, None)
        if ahead is not None:
            try:
                result = ahead.result()
            except EnginesLost as e:
                print(f"[on-policy] step {step} (prefetched): {e}; replacing them")
                self._replace(e.role, e.dead)
                redone += 1
            else:
                prefetched = result[1]["lag"] <= c.max_staleness
                if not prefetched:  # too old: sample again, synchronously
                    result = None
        while result is None:
            try:
                result = self._make(step)
            except EnginesLost as e:
                if redone >= c.max_engine_restarts:
                    raise RuntimeError(
                        f"step {step}: {e}; gave up after rollout.max_engine_restarts="
                        f"{c.max_engine_restarts} redos"
                    ) from e
                print(f"[on-policy] step {step}: {e}; replacing them and redoing the step")
                self._replace(e.role, e.dead)
                redone += 1
        table, stats = result
        stats["redone"] = redone
        stats["prefetched"] = float(prefetched)
        self.cache = {s: v for s, v in self.cache.items() if s >= step - 1}
        self.cache[step] = (table, stats)
        if c.max_staleness > 0 and step < self.spec.last_step:
            self.prefetched = {step + 1: self.threads.submit(self._make, step + 1)}
        return table, stats

    def _make(self, step: int) -> tuple[pa.Table, dict]:
        c, n = self.spec.cfg, self.spec.rows_per_step
        on_policy = on_policy_step(c.seed, step, c.on_policy_fraction)
        rng = np.random.default_rng(step_seed(c.seed, step, -1))
        t0 = time.perf_counter()
        if on_policy:
            pick = rng.choice(len(self.prompts), n, replace=len(self.prompts) < n)
            prompts = [self.prompts[i] for i in pick]
            seeds = [step_seed(c.seed, step, i) for i in range(n)]
            gen = Sampling(temperature=c.temperature, max_tokens=c.max_tokens, seed=c.seed)
            parts = zip(_split(prompts, len(self.rollouts)), _split(seeds, len(self.rollouts)))
            futures = [a.generate.remote(p, s, gen) for a, (p, s) in zip(self.rollouts, parts)]
            done = gather("rollout", futures)
            samples = [x for rows, _ in done for x in rows]
            version = min(int(v) for _, v in done)  # the oldest weights any engine sampled with
        else:  # GKD's other share: the reference responses
            pick = rng.choice(len(self.references), n, replace=len(self.references) < n)
            prompts = [self.references[i][0] for i in pick]
            samples = [(self.references[i][1], True) for i in pick]
            version = self.version
        t1 = time.perf_counter()
        seqs = [np.asarray([*p, *r], np.int64) for p, (r, _) in zip(prompts, samples)]
        chunks = _split(seqs, len(self.teachers))
        futures = [a.score_tokens.remote(s) for a, s in zip(self.teachers, chunks)]
        scores = [x for part in gather("teacher", futures) for x in part]
        t2 = time.perf_counter()
        responses = [r for r, _ in samples]
        # the teacher's log-prob of each ended response's last token (its EOS)
        ended = [e and len(r) > 0 for r, e in samples]
        ends = [float(sc[2][len(q) - 2]) for q, sc, e in zip(seqs, scores, ended) if e]
        mask_eos = eos_check(step, ends, n, c, self._teacher_ended())
        table = rollout_rows(
            step, prompts, responses, scores, self.spec.teacher.k, ended if mask_eos else None
        )
        stats = {
            **length_stats(responses, [e for _, e in samples], c.max_tokens),
            "weight_version": version,
            "lag": step - 1 - version,
            "rollout_s": t1 - t0,
            "score_s": t2 - t1,
            "prompt_epoch": step * n / len(self.prompts),
            "on_policy": float(on_policy),
            "eos_masked": sum(ended) if mask_eos else 0,
        }
        if self.teacher_ended is not None:  # probed (guard on): a 1.0 stand-in would mislead
            stats["teacher_ended_fraction"] = self.teacher_ended
        if ends:
            stats["eos_teacher_logprob"] = float(np.median(ends))
        return table, stats

    def sync(self, payload_ref: list, version: int) -> float:
        """Push the trainer's weights (`[ref]`: the ObjectRef, unresolved, so each engine
        reads it from the object store itself) to every rollout engine; the slowest one's
        seconds. An engine lost here is replaced (with these weights) at the next step."""
        t0 = time.perf_counter()
        self.payload = payload_ref
        self.version = version
        futures = [a.load_weights.remote(payload_ref[0], version) for a in self.rollouts]
        try:
            return max(gather("rollout", futures))
        except EnginesLost as e:
            print(f"[on-policy] sync {version}: {e}; replacing them")
            self._replace(e.role, e.dead)
            return time.perf_counter() - t0

    def shutdown(self) -> None:
        import ray

        self.threads.shutdown(wait=False, cancel_futures=True)
        for a in self.rollouts + self.teachers:
            ray.kill(a)


def start_source(spec: SourceSpec) -> Any:
    """The source actor (0 CPUs: it waits on the engines). The caller kills it when done."""
    import ray

    return ray.remote(RolloutSource).options(num_cpus=0).remote(spec)
