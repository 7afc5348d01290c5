"""`raydapt prepare`: Ray Data reads, validates, tokenizes; the driver dedupes, packs and splits.

    raydapt prepare jobs/demo.yaml prepare.seq_len=128

Why the work is split this way: tokenizing is the expensive part and is embarrassingly
parallel, so Ray Data runs it as tasks on `prepare.workers` CPUs; each worker process
builds the tokenizer once (from the driver's `TokenizerSpec`, without transformers) and keeps
it, so neither a rerun nor a new block pays for a process start or a tokenizer load.
Exact dedupe and packing depend on global order, and they are cheap once rows are token ids
and handled in bulk, so the driver streams the tokenized rows in a fixed order and does
both; the output is therefore deterministic for a given input whatever the parallelism.

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
from raydapt.prepare.tokenize import tokenize_batch, tokenizer_spec
from raydapt.progress import Progress
from raydapt.rows import loss_mask_of, pack_starts
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
    """Accumulates one split's docs and writes full shards as they fill.

    Rows are kept as pieces (numpy views of the tokenized batches) until a shard is full;
    the shard is then built in bulk: one concatenation per column, the loss mask shifted
    once over the whole shard and cut at row ends (`loss_mask_of` per row, in one go).
    Packing is greedy in document order (`raydapt.rows.pack_starts`), in chunks of 512 docs
    whose open last row carries over.
    """

    name: str
    dir: Path
    cfg: PrepareConfig
    docs: list = field(default_factory=list)  # pending (ids, target) to pack
    hashes: list = field(default_factory=list)
    lens: list = field(default_factory=list)
    shards: int = 0
    rows: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    # emitted rows not yet written: their pieces, and per row its piece count, length, id, label
    ids: list = field(default_factory=list)
    targets: list = field(default_factory=list)
    row_pieces: list = field(default_factory=list)
    row_lens: list = field(default_factory=list)
    row_ids: list = field(default_factory=list)
    row_labels: list = field(default_factory=list)

    def add(self, h: str, ids: np.ndarray, target: np.ndarray, label: int) -> None:
        if label >= 0 or not self.cfg.pack:
            self.ids.append(ids)
            self.targets.append(target)
            self._emit(1, len(ids), h, label)
            return
        self.docs.append((ids, target))
        self.hashes.append(h)
        self.lens.append(len(ids))
        if len(self.docs) >= 512:  # pack in chunks; the open last row carries over
            self.flush_docs(keep_tail=True)

    def flush_docs(self, keep_tail: bool = False) -> None:
        starts = pack_starts(self.lens, self.cfg.seq_len)
        keep = starts[-1] if keep_tail and len(starts) > 1 else len(self.docs)
        bounds = [*starts, len(self.docs)]
        for r, start in enumerate(starts):
            end = bounds[r + 1]
            if start >= keep:
                break
            members = "".join(self.hashes[start:end])
            for ids, target in self.docs[start:end]:
                self.ids.append(ids)
                self.targets.append(target)
            rid = hashlib.sha256(members.encode()).hexdigest()[:20]
            self._emit(end - start, sum(self.lens[start:end]), rid, -1)
        del self.docs[:keep], self.hashes[:keep], self.lens[:keep]

    def _emit(self, pieces: int, length: int, rid: str, label: int) -> None:
        self.row_pieces.append(pieces)
        self.row_lens.append(length)
        self.row_ids.append(rid)
        self.row_labels.append(label)
        if len(self.row_ids) >= self.cfg.rows_per_shard:
            self._write(self.cfg.rows_per_shard)

    def close(self) -> None:
        if self.docs:
            self.flush_docs()
        if self.row_ids:
            self._write(len(self.row_ids))

    def _write(self, n: int) -> None:
        """The first n buffered rows -> one parquet shard."""
        p = sum(self.row_pieces[:n])
        ids = np.concatenate(self.ids[:p]).astype(np.int32, copy=False)
        target = np.concatenate(self.targets[:p]).astype(np.uint8, copy=False)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(self.row_lens[:n], out=offsets[1:])
        mask = loss_mask_of(target)  # shifted once over the shard; each row's last is 0
        lengths = np.diff(offsets)
        mask[offsets[1:][lengths > 0] - 1] = 0
        off32 = pa.array(offsets, pa.int32())
        self.dir.mkdir(parents=True, exist_ok=True)
        table = pa.table(
            {
                "id": pa.array(self.row_ids[:n], pa.string()),
                "input_ids": pa.ListArray.from_arrays(off32, pa.array(ids, pa.int32())),
                "loss_mask": pa.ListArray.from_arrays(off32, pa.array(mask, pa.uint8())),
                "label": pa.array(self.row_labels[:n], pa.int32()),
            }
        )
        pq.write_table(table, self.dir / f"part-{self.shards:05d}.parquet", compression="zstd")
        self.shards += 1
        self.rows += n
        self.tokens += int(offsets[-1])
        self.loss_tokens += int(mask.sum(dtype=np.int64))
        del self.ids[:p], self.targets[:p], self.row_pieces[:n], self.row_lens[:n]
        del self.row_ids[:n], self.row_labels[:n]


def split_of(h: str, val_fraction: float) -> str:
    return "validation" if int(h[:8], 16) % 10_000 < val_fraction * 10_000 else "train"


def split_files(prepared: str | os.PathLike, split: str, required: bool = True) -> list[str]:
    """Parquet files of one split of a complete prepared folder; an empty split is a user
    error unless `required` is false (on-policy KD: a corpus of open instructions has no
    train rows, only prompts)."""
    require_manifest(prepared, "prepared data", "prepare JOB")
    files = sorted(str(f) for f in (Path(prepared) / split).glob("*.parquet"))
    if not files and required:
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
    if job.prepare.chat_template == "always" and not getattr(tok, "chat_template", None):
        # Tokenize checks it too, but in a Ray task; here it fails before any work starts
        raise UserError(f"prepare.chat_template=always but the tokenizer at {model_dir} has none")
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
    """The parallel part: a Ray Data pipeline of read -> Tokenize (`workers` tasks at a time).

    Tasks rather than an actor pool: an actor is a new worker process per run, which costs
    its interpreter start and imports (measured: about 2 s of CPU per actor, on every run);
    task workers are pooled and keep their tokenizer (`tokenize_batch`), one per process.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    kw = {"override_num_blocks": num_blocks} if num_blocks else {}
    if fmt == "parquet":
        ds = ray.data.read_parquet(paths, include_paths=True, **kw)
    else:
        ds = ray.data.read_text(paths, include_paths=True, drop_empty_lines=False, **kw)
    return ds.map_batches(
        tokenize_batch,
        # the fast tokenizer itself, not its folder: workers skip importing transformers
        fn_args=(tokenizer_spec(tokenizer_path), opts),
        batch_format="pyarrow",
        batch_size=1024,
        # `workers` CPUs, as two half-CPU tasks each: Ray Data sees a task finish only on
        # its next scheduling poll (every 0.1 s) and then starts the next one, so with one
        # task per CPU each CPU idled ~0.2 s per block (measured); the second task runs then.
        compute=ray.data.TaskPoolStrategy(size=2 * opts.get("workers", 2)),
        num_cpus=0.5,
    )


def write_prepared(batches: Any, out: Path, pcfg: PrepareConfig) -> dict:
    """The ordered part: dedupe, split, pack, write shards and prompts. `batches` is a
    Ray Dataset or any iterable of tokenized pyarrow tables (the single-process baseline).

    Everything per batch is columnar (numpy views of the flat token arrays, Arrow filters
    for the prompts); the only per-row Python left is the set lookup of exact dedupe and
    handing each kept doc to its split's packer, which is all order-dependent work.
    """
    it = (
        batches.iter_batches(batch_format="pyarrow", batch_size=None)
        if hasattr(batches, "iter_batches")
        else batches
    )
    splits = {s: _Split(s, out / s, pcfg) for s in SPLITS}
    dropped = dict.fromkeys(REASONS, 0)
    examples: dict[str, list[str]] = {}
    seen: set[str] = set()
    prompts: list[pa.Table] = []
    n_docs = truncated = 0
    bar = Progress("prepare", unit="docs")
    for table in it:
        bar.update(table.num_rows)
        if not table.num_rows:
            continue
        reasons = table.column("reason").to_pylist()
        hashes = table.column("hash").to_pylist()
        labels = table.column("label").to_numpy()
        ids, ids_off = _flat(table.column("ids"))
        target, target_off = _flat(table.column("target"))
        learned = np.concatenate(([0], np.cumsum(target, dtype=np.int64)))
        learns = (learned[target_off[1:]] > learned[target_off[:-1]]).tolist()  # target.any()
        where = None
        kept = []
        for i, reason in enumerate(reasons):
            if not reason and pcfg.dedupe and hashes[i] in seen:
                reason = "duplicate"
            if reason:
                dropped[reason] += 1
                if len(examples.setdefault(reason, [])) < 3:
                    where = table.column("where").to_pylist() if where is None else where
                    if where[i]:
                        examples[reason].append(where[i])
                continue
            seen.add(hashes[i])
            kept.append(i)
        if not kept:
            continue
        n_docs += len(kept)
        truncated += int(table.column("truncated").to_numpy(zero_copy_only=False)[kept].sum())
        split_names = [split_of(hashes[i], pcfg.val_fraction) for i in kept]
        for i, split in zip(kept, split_names):
            label = int(labels[i])
            if learns[i] or label >= 0:  # a prompt-only row waits for the teacher
                splits[split].add(
                    hashes[i],
                    ids[ids_off[i] : ids_off[i + 1]],
                    target[target_off[i] : target_off[i + 1]],
                    label,
                )
        prompts.append(_prompts_of(table, kept, split_names))
    bar.close()
    for s in splits.values():
        s.close()
    prompt_rows = pa.concat_tables(prompts) if prompts else None
    n_prompts = {s: 0 for s in SPLITS}
    if prompt_rows is not None and prompt_rows.num_rows:
        (out / "prompts").mkdir()
        split_col = prompt_rows.column("split").to_pylist()
        n_prompts = {s: split_col.count(s) for s in SPLITS}
        answers = prompt_rows.column("answer")
        if answers.null_count == len(answers):  # as pa.array infers a column of Nones
            prompt_rows = prompt_rows.set_column(3, "answer", pa.nulls(len(answers)))
        pq.write_table(prompt_rows.combine_chunks(), out / "prompts" / "part-00000.parquet")
    return {
        "documents": n_docs,
        "dropped": dropped,
        "truncated": truncated,  # kept, cut to seq_len (prepare.drop_longer: false)
        "drop_examples": examples,
        "rows": {s: splits[s].rows for s in SPLITS},
        "tokens": {s: splits[s].tokens for s in SPLITS},
        "loss_tokens": {s: splits[s].loss_tokens for s in SPLITS},
        "prompts": n_prompts["train"],
        "prompts_validation": n_prompts["validation"],
    }


def _flat(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list column as numpy: row i is values[off[i]:off[i + 1]]."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    off = arr.offsets.to_numpy()
    return arr.values.to_numpy(zero_copy_only=False)[off[0] : off[-1]], off - off[0]


def _prompts_of(table: pa.Table, kept: list[int], split_names: list[str]) -> pa.Table:
    """The kept rows that carry a prompt for the teacher: id, prompt, prompt_ids, answer, split."""
    has = np.zeros(table.num_rows, bool)
    has[kept] = True
    has &= table.column("prompt").is_valid().to_numpy(zero_copy_only=False)
    has &= np.diff(_flat(table.column("prompt_ids"))[1]) > 0
    rows = table.select(["hash", "prompt", "prompt_ids", "answer"]).filter(pa.array(has))
    splits = [s for s, h in zip(split_names, has[kept]) if h]
    return rows.rename_columns(["id", "prompt", "prompt_ids", "answer"]).append_column(
        "split", pa.array(splits, pa.string())
    )
