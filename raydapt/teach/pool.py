"""The teacher actor pool: Ray Data feeds batches to actors that each own one engine for life.

    ds.map_batches(TeacherActor, concurrency=(min_actors, max_actors), batch_size=...,
                   num_cpus=cpus_per_actor, num_gpus=..., runtime_env=...)

Why our own map_batches stage and not `ray.data.llm`'s vLLM processor: that processor turns
every logprob position into a Python dict ({token_id: {logprob, rank, decoded_token}}) that
then travels through Arrow, keeps only `outputs[0]` (so n > 1 samples are lost), detokenizes
every top-k token, and runs its own chat-template/tokenize stages we do not want for token
ids that are already prepared. Here the actor converts vLLM's flat logprob lists to dense
(T, k) arrays at once, and writes each finished batch as one atomic targets part itself.
So the only thing flowing back to the driver is (id, tokens) per row, and a crash (of the
driver or an actor) loses at most the batches in flight: `PartStore.done_ids()` tells a
rerun what is already done.

On a multi-node cluster the output folder must be shared storage (as for Ray Train's
storage_path), since actors on other nodes write the parts.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import pyarrow as pa

from raydapt.config import TeachConfig
from raydapt.faults import park_until_killed
from raydapt.models import load_tokenizer
from raydapt.progress import Progress
from raydapt.targets import PartStore
from raydapt.teach.hf_backend import HFBackend
from raydapt.teach.spec import ActorSpec
from raydapt.teach.work import teach_batch

log = logging.getLogger(__name__)

FAIL_AFTER_ENV = "RAYDAPT_TEACH_FAIL_AFTER_PARTS"  # test hook: an actor crashes after N parts
HOLD_ENV = "RAYDAPT_TEACH_HOLD_FILE"  # fault tests: one actor parks after writing a part


def hold_for_kill(path: str, part: Any, table: pa.Table) -> None:
    """Fault-injection point: the first actor to get here parks until something kills it.

    It has written its part but not yet returned the batch, the worst moment to die: the
    retried batch writes the same ids again, and only `PartStore.finalize`'s dedupe keeps
    each id once. The claim is an O_EXCL file, so exactly one actor of the pool holds.
    """
    try:
        os.close(os.open(path + ".claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    park_until_killed(path, {"part": str(part), "ids": table.column("id").to_pylist()})


def make_backend(spec: ActorSpec) -> Any:
    if spec.backend == "hf":
        return HFBackend(spec)
    from raydapt.teach.vllm_backend import VLLMBackend  # imports vLLM (seconds); hf runs need none

    return VLLMBackend(spec)


class TeacherActor:
    """A Ray Data callable class: builds the engine once, then turns batches into parts."""

    def __init__(self, spec: ActorSpec):
        self.spec = spec
        self.backend = make_backend(spec)
        self.student_tok = (
            None if spec.same_tokenizer else load_tokenizer(spec.student_tokenizer_path)
        )
        self.store = PartStore(spec.final)
        self.parts = 0
        self.fail_after = int(os.environ.get(FAIL_AFTER_ENV, "0") or 0)
        self.hold_file = os.environ.get(HOLD_ENV, "")

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.time()
        table = teach_batch(self.backend, batch, self.spec, self.student_tok)
        part = self.store.write(table)
        if self.hold_file:
            hold_for_kill(self.hold_file, part, table)
        t1 = time.time()
        self.parts += 1
        if self.fail_after and self.parts >= self.fail_after:
            raise RuntimeError(
                f"{FAIL_AFTER_ENV}={self.fail_after}: simulated crash after {self.parts} part(s)"
            )
        lengths = pa.compute.list_value_length(table.column("input_ids"))
        return pa.table(
            {
                "id": table.column("id"),
                "tokens": lengths.cast(pa.int64()),
                "actor": pa.array([os.getpid()] * table.num_rows, pa.int64()),
                "t0": pa.array([t0] * table.num_rows, pa.float64()),
                "t1": pa.array([t1] * table.num_rows, pa.float64()),
            }
        )


def actor_env(tcfg: TeachConfig) -> dict[str, str]:
    """The env vars every teacher actor gets (bench/teacher.py gives its raw engine the same)."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(max(1, round(tcfg.kv_cache_gib)))}
    for k in (FAIL_AFTER_ENV, HOLD_ENV, "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM"):
        if k in os.environ:
            env[k] = os.environ[k]
    if not tcfg.gpus_per_actor and "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ:
        # vLLM keeps one core per engine for its scheduler process, which on a 2-core node
        # leaves the model one thread; the scheduler mostly waits on the model anyway
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    return env


def run_pool(rows: pa.Table, spec: ActorSpec, tcfg: TeachConfig) -> dict:
    """Teach every row of `rows` through the pool; parts land in PartStore(spec.final)."""
    import ray.data

    bs = max(1, int(tcfg.batch_size))
    # One block per batch, so the autoscaling pool can spread batches over its actors.
    blocks = [rows.slice(i, bs) for i in range(0, rows.num_rows, bs)]
    ds = ray.data.from_arrow(blocks)
    env = actor_env(tcfg)
    num_gpus = tcfg.gpus_per_actor or 0
    if num_gpus and tcfg.tensor_parallel_size > 1:
        num_gpus = max(num_gpus, tcfg.tensor_parallel_size)
    out = ds.map_batches(
        TeacherActor,
        fn_constructor_args=(spec,),
        batch_size=bs,
        batch_format="pyarrow",
        concurrency=(tcfg.min_actors, max(tcfg.min_actors, tcfg.max_actors)),
        num_cpus=tcfg.cpus_per_actor,
        runtime_env={"env_vars": env},
        **({"num_gpus": num_gpus} if num_gpus else {}),
    )
    n_rows = n_tokens = 0
    actors: set[int] = set()
    batches: dict[tuple[int, float], tuple[float, int]] = {}  # (actor, start) -> (end, tokens)
    with Progress("teach", total=rows.num_rows, unit="rows") as bar:
        for b in out.iter_batches(batch_format="pyarrow", batch_size=None):
            n_rows += b.num_rows
            n_tokens += int(pa.compute.sum(b.column("tokens")).as_py() or 0)
            actors.update(b.column("actor").to_pylist())
            cols = (b.column(c).to_pylist() for c in ("actor", "t0", "t1", "tokens"))
            for a, t0, t1, n in zip(*cols, strict=True):
                end, tok = batches.get((a, t0), (t1, 0))
                batches[(a, t0)] = (end, tok + n)
            bar.update(b.num_rows, tokens=n_tokens, actors=len(actors))
    # busy: seconds inside batches (engine + conversion + part write); span: first start to last end
    starts = [t0 for _, t0 in batches]
    return {
        "rows": n_rows,
        "tokens": n_tokens,
        "actors": len(actors),
        "busy_s": sum(e - t0 for (_, t0), (e, _) in batches.items()),
        "span_s": (max(e for e, _ in batches.values()) - min(starts)) if batches else 0.0,
        "batch_tokens_per_s": [n / max(e - t0, 1e-9) for (_, t0), (e, n) in batches.items()],
    }
