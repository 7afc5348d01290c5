"""`raydapt prepare`: Ray Data reads, validates, tokenizes; the driver dedupes, packs and splits.

    raydapt prepare jobs/demo.yaml prepare.seq_len=128

Why the work is split this way: tokenizing is the expensive part and is embarrassingly
parallel, so Ray Data runs it in a pool of tokenizer actors (one tokenizer load each).
Exact dedupe and packing depend on global order, and they are cheap once rows are token ids,
so the driver streams the tokenized rows in a fixed order and does both; the output is
therefore deterministic for a given input whatever the parallelism.

Output (layout.prepared_dir): `train/` and `validation/` parquet shards with columns
`id`, `input_ids` (<= seq_len, unpadded), `loss_mask` (aligned with logits: mask[t] = 1
when predicting token t+1 counts) and `label` (-1 if none); `prompts/` with the prompts
of both splits (column `split`) for teacher generation; and `manifest.json`, written last.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydapt import layout
from raydapt.config import JobConfig, PrepareConfig
from raydapt.errors import UserError
from raydapt.models import check_vocab, load_tokenizer, tokenizer_hash
from raydapt.prepare.tokenize import Tokenize
from raydapt.progress import Progress
from raydapt.rows import loss_mask_of, pack
from raydapt.sources import EXTENSIONS, input_paths, model_path
from raydapt.storage import atomic_dir, finish_manifest, hash_json, require_manifest

REASONS = ("malformed", "empty", "too_long_chars", "too_long_tokens", "duplicate")
SPLITS = ("train", "validation")


# ----------------------------------------------------------------------------- inputs


def file_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    ext = Path(path.split("?")[0]).suffix
    if ext not in EXTENSIONS:
        raise UserError(
            f"corpus: cannot tell the format of {path}; set corpus.format (jsonl|parquet|txt)"
        )
    return EXTENSIONS[ext]


def describe_files(paths: list[str]) -> list[dict]:
    """Sizes and mtimes, for the manifest and the up-to-date check."""
    import pyarrow.fs as pafs

    out = []
    for p in paths:
        try:
            fs, inner = (
                pafs.FileSystem.from_uri(p)
                if "://" in p
                else (pafs.LocalFileSystem(), os.path.abspath(p))
            )
            info = fs.get_file_info(inner)
        except (OSError, pa.ArrowInvalid) as e:
            raise UserError(f"corpus: cannot stat {p}: {e}") from None
        if info.type == pafs.FileType.NotFound:
            raise UserError(f"corpus: file not found: {p}")
        out.append({"path": p, "size": info.size, "mtime": info.mtime_ns})
    return out


def _check_parquet(paths: list[str]) -> None:
    for p in paths:
        if "://" in p:
            continue
        try:
            pq.ParquetFile(p).metadata  # noqa: B018 - reading the footer is the check
        except Exception as e:  # noqa: BLE001 - any failure here means an unreadable shard
            raise UserError(
                f"corpus: unreadable parquet shard {p}: {e}; remove or re-export it"
            ) from None


# ----------------------------------------------------------------------------- packing


@dataclass
class _Split:
    """Accumulates one split's docs and writes full shards as they fill."""

    name: str
    dir: Path
    cfg: PrepareConfig
    docs: list = field(default_factory=list)
    hashes: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    shards: int = 0
    rows: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    buffer: list = field(default_factory=list)

    def add(self, h: str, ids: np.ndarray, target: np.ndarray, label: int) -> None:
        if label >= 0 or not self.cfg.pack:
            self._emit([(ids, loss_mask_of(target), h, label)])
            return
        self.docs.append((ids, target))
        self.hashes.append(h)
        if len(self.docs) >= 512:  # pack in chunks; the open last row carries over
            self.flush_docs(keep_tail=True)

    def flush_docs(self, keep_tail: bool = False) -> None:
        packed = pack(self.docs, self.cfg.seq_len)
        if keep_tail and len(packed) > 1:
            last = packed.pop()
            keep = last[2]
        else:
            keep = []
        rows = []
        for ids, mask, members in packed:
            rid = hashlib.sha256("".join(self.hashes[i] for i in members).encode()).hexdigest()[:20]
            rows.append((ids, mask, rid, -1))
        self.docs = [self.docs[i] for i in keep]
        self.hashes = [self.hashes[i] for i in keep]
        self._emit(rows)

    def _emit(self, rows: list) -> None:
        self.buffer += rows
        while len(self.buffer) >= self.cfg.rows_per_shard:
            self._write(self.buffer[: self.cfg.rows_per_shard])
            self.buffer = self.buffer[self.cfg.rows_per_shard :]

    def close(self) -> None:
        if self.docs:
            self.flush_docs()
        if self.buffer:
            self._write(self.buffer)
            self.buffer = []

    def _write(self, rows: list) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        table = pa.table(
            {
                "id": pa.array([r[2] for r in rows], pa.string()),
                "input_ids": pa.array([r[0] for r in rows], pa.list_(pa.int32())),
                "loss_mask": pa.array([r[1] for r in rows], pa.list_(pa.uint8())),
                "label": pa.array([r[3] for r in rows], pa.int32()),
            }
        )
        pq.write_table(table, self.dir / f"part-{self.shards:05d}.parquet", compression="zstd")
        self.shards += 1
        self.rows += len(rows)
        self.tokens += sum(len(r[0]) for r in rows)
        self.loss_tokens += int(sum(int(r[1].sum()) for r in rows))


def split_of(h: str, val_fraction: float) -> str:
    return "validation" if int(h[:8], 16) % 10_000 < val_fraction * 10_000 else "train"


def split_files(prepared: str | os.PathLike, split: str) -> list[str]:
    """Parquet files of one split of a complete prepared folder."""
    require_manifest(prepared, "prepared data", "prepare JOB")
    files = sorted(str(f) for f in (Path(prepared) / split).glob("*.parquet"))
    if not files:
        raise UserError(
            f"prepared data at {prepared} has no {split!r} rows; "
            "lower/raise prepare.val_fraction or add data"
        )
    return files


# ----------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class PreparePlan:
    """Everything `run` needs, checked: input files, their format, the student's tokenizer."""

    job: JobConfig
    output: Path
    paths: tuple[str, ...]
    format: str
    files: tuple[dict, ...]  # path, size, mtime of each input
    tokenizer_path: str
    tokenizer_hash: str
    pad_id: int
    eos_id: int | None
    vocab_size: int


def plan(job: JobConfig) -> PreparePlan:
    """Check the corpus files and the student's tokenizer; read only."""
    from transformers import AutoConfig

    paths = input_paths(job)
    fmts = {file_format(p, job.corpus.format) for p in paths}
    if len(fmts) > 1:
        raise UserError(f"corpus.paths mixes formats {sorted(fmts)}; prepare one format per job")
    fmt = fmts.pop()
    files = describe_files(paths)
    if fmt == "parquet":
        _check_parquet(paths)
    model_dir = model_path(job, "student")
    tok = load_tokenizer(model_dir)
    mcfg = AutoConfig.from_pretrained(model_dir)
    check_vocab(mcfg, tok, f"student {model_dir}")
    if job.prepare.seq_len > getattr(mcfg, "max_position_embeddings", 1 << 30):
        raise UserError(
            f"prepare.seq_len={job.prepare.seq_len} exceeds the student's "
            f"max_position_embeddings ({mcfg.max_position_embeddings}, {model_dir})"
        )
    return PreparePlan(
        job,
        layout.prepared_dir(job),
        tuple(paths),
        fmt,
        tuple(files),
        str(model_dir),
        tokenizer_hash(tok),
        tok.pad_token_id if tok.pad_token_id is not None else 0,
        tok.eos_token_id,
        len(tok),
    )


def fingerprint(p: PreparePlan) -> str:
    return hash_json(
        {
            "files": list(p.files),
            "tok": p.tokenizer_hash,
            "prepare": p.job.prepare.__dict__,
            "corpus": p.job.corpus.__dict__,
            "v": 1,
        }
    )


def run(p: PreparePlan) -> dict:
    """Tokenize in Ray Data, then dedupe, split, pack and write the shards atomically."""
    job = p.job
    opts = {**job.prepare.__dict__, "format": p.format}
    tokenized = tokenize_dataset(
        list(p.paths), p.format, p.tokenizer_path, opts, job.prepare.num_blocks
    )
    with atomic_dir(p.output) as tmp:
        stats = write_prepared(tokenized, tmp, job.prepare)
        if stats["rows"]["train"] == 0 and stats["prompts"] == 0:  # prompts: for the teacher
            raise UserError(
                f"corpus {p.paths[0] if len(p.paths) == 1 else list(p.paths)} has zero usable rows "
                f"(dropped: {stats['dropped']}); "
                "check the row format: text, prompt+response, or messages"
            )
        manifest = finish_manifest(
            tmp,
            {
                "fingerprint": fingerprint(p),
                "seq_len": job.prepare.seq_len,
                "pack": job.prepare.pack,
                "tokenizer_path": p.tokenizer_path,
                "tokenizer_hash": p.tokenizer_hash,
                "pad_id": p.pad_id,
                "eos_id": p.eos_id,
                "vocab_size": p.vocab_size,
                "format": p.format,
                "source_files": list(p.files),
                **stats,
            },
        )
    print(
        f"[prepare] {manifest['documents']} docs -> {manifest['rows']['train']} train / "
        f"{manifest['rows']['validation']} validation rows, "
        f"{manifest['tokens']['train']} train tokens; "
        f"dropped {manifest['dropped']} -> {p.output}",
        flush=True,
    )
    return manifest


def tokenize_dataset(paths: list[str], fmt: str, tokenizer_path: str, opts: dict, num_blocks: int):
    """The parallel part: a Ray Data pipeline of read -> Tokenize (actor pool)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    kw = {"override_num_blocks": num_blocks} if num_blocks else {}
    if fmt == "parquet":
        ds = ray.data.read_parquet(paths, include_paths=True, **kw)
    else:
        ds = ray.data.read_text(paths, include_paths=True, drop_empty_lines=False, **kw)
    return ds.map_batches(
        Tokenize,
        fn_constructor_args=(tokenizer_path, opts),
        batch_format="pyarrow",
        batch_size=1024,
        compute=ray.data.ActorPoolStrategy(size=opts.get("workers", 2)),
        num_cpus=1,
    )


def write_prepared(batches: Any, out: Path, pcfg: PrepareConfig) -> dict:
    """The ordered part: dedupe, split, pack, write shards and prompts. `batches` is a
    Ray Dataset or any iterable of tokenized pyarrow tables (the single-process baseline)."""
    it = (
        batches.iter_batches(batch_format="pyarrow", batch_size=None)
        if hasattr(batches, "iter_batches")
        else batches
    )
    splits = {s: _Split(s, out / s, pcfg) for s in SPLITS}
    dropped = dict.fromkeys(REASONS, 0)
    examples: dict[str, list[str]] = {}
    seen: set[str] = set()
    prompts: dict[str, list] = {k: [] for k in ("id", "prompt", "prompt_ids", "answer", "split")}
    n_docs = truncated = 0
    bar = Progress("prepare", unit="docs")
    for table in it:
        bar.update(table.num_rows)
        cols = {c: table.column(c) for c in table.column_names}
        reasons = cols["reason"].to_pylist()
        hashes = cols["hash"].to_pylist()
        labels = cols["label"].to_pylist()
        for i, reason in enumerate(reasons):
            if not reason and pcfg.dedupe and hashes[i] in seen:
                reason = "duplicate"
            if reason:
                dropped[reason] += 1
                if len(examples.setdefault(reason, [])) < 3 and cols["where"][i].as_py():
                    examples[reason].append(cols["where"][i].as_py())
                continue
            seen.add(hashes[i])
            n_docs += 1
            truncated += cols["truncated"][i].as_py()
            ids = cols["ids"][i].values.to_numpy(zero_copy_only=False)
            target = cols["target"][i].values.to_numpy(zero_copy_only=False)
            split = split_of(hashes[i], pcfg.val_fraction)
            if target.any() or labels[i] >= 0:  # a prompt-only row waits for the teacher
                splits[split].add(hashes[i], ids, target, labels[i])
            if cols["prompt"][i].is_valid and len(cols["prompt_ids"][i]):
                prompts["split"].append(split)
                prompts["id"].append(hashes[i])
                prompts["prompt"].append(cols["prompt"][i].as_py())
                prompts["prompt_ids"].append(
                    cols["prompt_ids"][i].values.to_numpy(zero_copy_only=False)
                )
                prompts["answer"].append(cols["answer"][i].as_py())
    bar.close()
    for s in splits.values():
        s.close()
    if prompts["id"]:
        (out / "prompts").mkdir()
        pq.write_table(
            pa.table(
                {**prompts, "prompt_ids": pa.array(prompts["prompt_ids"], pa.list_(pa.int32()))}
            ),
            out / "prompts" / "part-00000.parquet",
        )
    return {
        "documents": n_docs,
        "dropped": dropped,
        "truncated": truncated,  # kept, cut to seq_len (prepare.drop_longer: false)
        "drop_examples": examples,
        "rows": {s: splits[s].rows for s in SPLITS},
        "tokens": {s: splits[s].tokens for s in SPLITS},
        "loss_tokens": {s: splits[s].loss_tokens for s in SPLITS},
        "prompts": prompts["split"].count("train"),
        "prompts_validation": prompts["split"].count("validation"),
    }
