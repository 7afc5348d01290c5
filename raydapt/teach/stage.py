"""`raydapt teach JOB`: checks, exactly-once bookkeeping and lineage around the actor pool.

    raydapt teach jobs/distill-offline.yaml teach.kind=score teach.k=16 teach.max_actors=2

Order of work: every input check runs before an engine starts (k cap, teacher folder,
tokenizers, prompt lengths, empty input). Then, if the targets manifest already records this
fingerprint (teacher weights, tokenizers, the `teach` section, the prepared manifest), the
stage prints "up to date" and stops. Otherwise it reads `PartStore.done_ids()`, drops the rows
already done, runs the pool on the rest and finalizes: the final folder holds each id once.

Rows longer than the engine context are an error (naming the first rows and their lengths),
not a silent drop: a distillation set that quietly loses its longest rows is biased. Raise
`teach.max_model_len` or prepare with a smaller `prepare.seq_len`.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raydapt import layout
from raydapt.config import JobConfig
from raydapt.errors import UserError
from raydapt.models import engine_dtype, load_tokenizer, tokenizer_hash, weights_hash
from raydapt.sources import model_path
from raydapt.storage import hash_json, read_json, require_manifest, write_json_atomic
from raydapt.targets import PartStore, id_dtype_for
from raydapt.teach.convert import MAX_K, sample_id
from raydapt.teach.pool import run_pool
from raydapt.teach.spec import ActorSpec, Sampling

# Keys of the `teach` section that change only how fast the work runs, never its output.
RESOURCE_KEYS = (
    "min_actors",
    "max_actors",
    "batch_size",
    "cpus_per_actor",
    "gpus_per_actor",
    "kv_cache_gib",
    "gpu_memory_utilization",
    "tensor_parallel_size",
)
FINGERPRINT_FILE = "fingerprint.json"


def _check_k(cfg: JobConfig) -> None:
    if cfg.teach.kind != "generate" and not 1 <= cfg.teach.k <= MAX_K:
        raise UserError(
            f"teach.k={cfg.teach.k}: the teacher stores between 1 and {MAX_K} logprobs "
            "per position; lower teach.k"
        )


def _teacher_info(cfg: JobConfig) -> dict:
    from transformers import AutoConfig

    path = model_path(cfg, "teacher")  # an explicit path never falls back to the preset
    tok = load_tokenizer(path)
    mcfg = AutoConfig.from_pretrained(str(path), trust_remote_code=cfg.teacher.trust_remote_code)
    max_pos = int(getattr(mcfg, "max_position_embeddings", 0) or 2048)
    if cfg.teach.max_model_len > max_pos:
        raise UserError(
            f"teach.max_model_len={cfg.teach.max_model_len} "
            "exceeds the teacher's max_position_embeddings "
            f"({max_pos}, {path}); lower it or set 0 to use the model's"
        )
    on_gpu = cfg.teach.gpus_per_actor > 0
    return {
        "path": str(Path(path).resolve()) if os.path.isdir(path) else str(path),
        "weights_hash": weights_hash(path),
        "tokenizer_hash": tokenizer_hash(tok),
        "vocab_size": int(getattr(mcfg, "vocab_size", len(tok))),
        "dtype": engine_dtype(cfg.teacher.dtype, path, on_gpu)
        if cfg.teach.backend == "vllm"
        else cfg.teacher.dtype,
        "max_model_len": cfg.teach.max_model_len or max_pos,
    }


def _check_tokenizers(cfg: JobConfig, teacher: dict, source: dict) -> bool:
    same = teacher["tokenizer_hash"] == source["tokenizer_hash"]
    if not same and cfg.teach.kind != "generate":
        raise UserError(
            f"teach.kind={cfg.teach.kind} needs the teacher and student to share a tokenizer, "
            "but the teacher "
            f"{teacher['path']} has tokenizer {teacher['tokenizer_hash']} "
            "and the prepared data (student) uses "
            f"{source.get('tokenizer_path')} with tokenizer {source['tokenizer_hash']}; "
            "use a teacher with the "
            "student's tokenizer, or teach.kind=generate "
            "(text targets are re-tokenized for the student)"
        )
    return same


def load_rows(cfg: JobConfig, prepared: Path) -> pa.Table:
    """The rows to teach: prepared split rows (score) or prompts (generate)."""
    if cfg.teach.kind == "score":
        splits = ["train", "validation"] if cfg.teach.split == "all" else [cfg.teach.split]
        files = [f for s in splits for f in sorted(glob.glob(str(prepared / s / "*.parquet")))]
        tables = [pq.read_table(f, columns=["id", "input_ids", "loss_mask"]) for f in files]
        what = f"{'+'.join(splits)} split"
    else:
        files = sorted(glob.glob(str(prepared / "prompts" / "*.parquet")))
        tables = [_prompts_of_split(pq.read_table(f), cfg.teach.split) for f in files]
        what = f"prompts of teach.split={cfg.teach.split} (prompts/*.parquet)"
    rows = pa.concat_tables(tables) if tables else None
    if rows is None or rows.num_rows == 0:
        hint = (
            "the corpus has no prompt/response or chat rows"
            if cfg.teach.kind != "score"
            else "check teach.split"
        )
        raise UserError(f"teach: the prepared data at {prepared} has no {what} to teach ({hint})")
    return rows


def _prompts_of_split(table: pa.Table, split: str) -> pa.Table:
    """The prompts of `split` (train | validation | all); older prompts/ hold train only."""
    if split != "all" and "split" in table.column_names:
        table = table.filter(pa.compute.equal(table.column("split"), split))
    elif split == "validation":
        table = table.slice(0, 0)
    return table.select(["id", "prompt", "prompt_ids"])


def check_lengths(cfg: JobConfig, rows: pa.Table, max_model_len: int) -> None:
    col = "input_ids" if cfg.teach.kind == "score" else "prompt_ids"
    lengths = pa.compute.list_value_length(rows.column(col)).to_numpy(zero_copy_only=False)
    limit = (
        max_model_len if cfg.teach.kind == "score" else max_model_len - 1
    )  # generate needs >= 1 new token
    bad = [
        (rows.column("id")[int(i)].as_py(), int(lengths[i]))
        for i in (lengths > limit).nonzero()[0][:5]
    ]
    empty = int((lengths == 0).sum())
    if bad:
        raise UserError(
            f"teach: {int((lengths > limit).sum())} row(s) in column {col} "
            "are longer than the engine context "
            f"({max_model_len} tokens, "
            "teach.max_model_len or the teacher's max_position_embeddings), e.g. "
            + ", ".join(f"id {i} with {n} tokens" for i, n in bad)
            + "; raise teach.max_model_len or prepare with a smaller prepare.seq_len"
        )
    if empty:
        raise UserError(f"teach: {empty} row(s) have an empty {col}; rerun `raydapt prepare`")


@dataclass(frozen=True)
class TeachPlan:
    """The checked inputs of one teach run."""

    job: JobConfig
    output: Path
    teacher: dict  # path, weights_hash, tokenizer_hash, vocab_size, dtype, max_model_len
    source: dict  # the prepared manifest
    same_tokenizer: bool
    rows: pa.Table = field(repr=False)


def plan(job: JobConfig) -> TeachPlan:
    """Every input check before an engine starts: k, teacher, tokenizers, row lengths."""
    _check_k(job)
    prepared = layout.prepared_dir(job)
    source = require_manifest(prepared, "prepared data", "prepare JOB")
    teacher = _teacher_info(job)
    same_tok = _check_tokenizers(job, teacher, source)
    rows = load_rows(job, prepared)
    check_lengths(job, rows, teacher["max_model_len"])
    return TeachPlan(job, layout.targets_dir(job), teacher, source, same_tok, rows)


def fingerprint(p: TeachPlan) -> str:
    teach = {k: v for k, v in dataclasses.asdict(p.job.teach).items() if k not in RESOURCE_KEYS}
    teacher = {
        k: p.teacher[k] for k in ("weights_hash", "tokenizer_hash", "dtype", "max_model_len")
    }
    return hash_json(
        {
            "teach": teach,
            "teacher": teacher,
            "student_tokenizer": p.source["tokenizer_hash"],
            "source": hash_json(p.source),
            "v": 1,
        }
    )


def open_store(final: Path, fp: str) -> PartStore:
    """The staging folder, emptied first if it holds parts of another fingerprint."""
    store = PartStore(final)
    mark = store.dir / FINGERPRINT_FILE
    if store.dir.exists():
        old = read_json(mark)
        if old.get("fingerprint") != fp:
            shutil.rmtree(store.dir)
    store.dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(mark, {"fingerprint": fp})
    return store


def pending(cfg: JobConfig, rows: pa.Table, done: set[str]) -> pa.Table:
    """Rows not yet done. A prompt is done when all its n samples are (they share one part)."""
    ids = rows.column("id").to_pylist()
    if cfg.teach.kind == "score":
        keep = [i for i, x in enumerate(ids) if x not in done]
    else:
        keep = [
            i
            for i, x in enumerate(ids)
            if any(sample_id(x, j) not in done for j in range(cfg.teach.n))
        ]
    return rows.take(pa.array(keep, pa.int64()))


def engine_version(backend: str) -> dict:
    if backend == "vllm":
        import vllm

        return {"vllm": vllm.__version__}
    import transformers

    return {"transformers": transformers.__version__}


def run(p: TeachPlan) -> dict:
    """Run the pool on the rows not done yet, then finalize. Returns the targets manifest
    plus what this run computed."""
    cfg, rows, final, fp = p.job, p.rows, p.output, fingerprint(p)
    store = open_store(final, fp)
    done = store.done_ids()
    todo = pending(cfg, rows, done)
    print(
        f"[teach] {cfg.teach.kind} with {cfg.teach.backend}: {rows.num_rows} input rows, "
        f"{rows.num_rows - todo.num_rows} already done",
        flush=True,
    )
    t0 = time.perf_counter()
    stats = {"rows": 0, "tokens": 0, "actors": 0}
    if todo.num_rows:
        stats = run_pool(todo, actor_spec(p), cfg.teach)
    seconds = time.perf_counter() - t0
    missing = pending(cfg, rows, store.done_ids())
    if missing.num_rows:  # parts vanished under us (another run on the same output_dir?)
        raise UserError(
            f"teach: {missing.num_rows} of {rows.num_rows} rows have no targets part in "
            f"{store.dir} "
            f"after the pool finished (first: {missing.column('id')[0].as_py()}); "
            "the folder was "
            "changed from outside this run. "
            "Run one teach per output_dir, then rerun to compute the rest"
        )
    manifest = store.finalize(lineage(p, fp))
    print(
        f"[teach] computed {stats['rows']} rows / {stats['tokens']} tokens in {seconds:.1f}s; "
        f"{manifest['rows']} rows, {manifest['bytes_per_token']:.1f} bytes/token -> {final}",
        flush=True,
    )
    return {
        **manifest,
        "computed_rows": stats["rows"],
        "computed_tokens": stats["tokens"],
        "already_done": len(done),
        "actors_used": stats["actors"],
        "seconds": seconds,
        "pool": {k: stats[k] for k in ("busy_s", "span_s", "batch_tokens_per_s") if k in stats},
    }


def actor_spec(p: TeachPlan) -> ActorSpec:
    t, teacher = p.job.teach, p.teacher
    return ActorSpec(
        backend=t.backend,
        kind=t.kind,
        k=t.k,
        signal=t.signal,
        samples=t.samples if t.signal != "topk" else 0,
        model=teacher["path"],
        dtype=teacher["dtype"],
        max_model_len=teacher["max_model_len"],
        tensor_parallel_size=t.tensor_parallel_size,
        gpu_memory_utilization=t.gpu_memory_utilization,
        num_gpus=t.gpus_per_actor,
        trust_remote_code=p.job.teacher.trust_remote_code,
        seed=t.seed,
        id_dtype=id_dtype_for(teacher["vocab_size"]),
        same_tokenizer=p.same_tokenizer,
        student_tokenizer_path=p.source.get("tokenizer_path"),
        final=str(Path(p.output).resolve()),
        gen=sampling(p.job),
    )


def sampling(cfg: JobConfig) -> Sampling:
    t = cfg.teach
    return Sampling(
        n=t.n,
        temperature=t.temperature,
        top_p=t.top_p,
        max_tokens=t.max_tokens,
        stop=tuple(t.stop),
        seed=t.seed,
    )


def lineage(p: TeachPlan, fp: str) -> dict[str, Any]:
    cfg, teacher, source = p.job, p.teacher, p.source
    logits = cfg.teach.kind != "generate"
    return {
        "fingerprint": fp,
        "kind": cfg.teach.kind,
        "backend": cfg.teach.backend,
        "split": cfg.teach.split,
        "k": cfg.teach.k if logits else None,
        "signal": cfg.teach.signal if logits else None,
        "samples": cfg.teach.samples if logits and cfg.teach.signal != "topk" else None,
        "teacher": {
            k: teacher[k]
            for k in ("path", "weights_hash", "tokenizer_hash", "dtype", "max_model_len")
        },
        "tokenizer_hash": source["tokenizer_hash"],
        "tokenizer_path": source.get("tokenizer_path"),
        "engine": engine_version(cfg.teach.backend),
        "vllm_version": engine_version("vllm")["vllm"] if cfg.teach.backend == "vllm" else None,
        "sampling": dataclasses.asdict(sampling(cfg))
        if cfg.teach.kind != "score"
        else {"prompt_logprobs": cfg.teach.k, "temperature": 1.0},
        "source": {
            "path": str(layout.prepared_dir(cfg)),
            "manifest_hash": hash_json(source),
            "fingerprint": source.get("fingerprint"),
        },
        "encoding": {"topk_ids": id_dtype_for(teacher["vocab_size"]), "topk_logprobs": "float16"}
        if logits
        else {},
    }
