"""`raydapt prepare`: Ray Data reads, validates, tokenizes; the driver dedupes, packs and splits.

    raydapt prepare jobs/demo.yaml prepare.seq_len=128

Why the work is split this way: tokenizing is the expensive part and is embarrassingly
parallel, so Ray Data runs it in a pool of tokenizer actors (one tokenizer load each).
Exact dedupe and packing depend on global order, and they are cheap once rows are token ids,
so the driver streams the tokenized rows in a fixed order and does both; the output is
therefore deterministic for a given input whatever the parallelism.

Output (layout.prepared_dir): `train/` and `validation/` parquet shards with columns
`id`, `input_ids` (<= seq_len, unpadded), `loss_mask` (aligned with logits: mask[t] = 1
when predicting token t+1 counts) and `label` (-1 if none); `prompts/` with the train
split's prompts for teacher generation; and `manifest.json`, written last.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
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
from raydapt.storage import atomic_dir, finish_manifest, hash_json, read_manifest, up_to_date

log = logging.getLogger(__name__)

EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "txt"}
REASONS = ("malformed", "empty", "too_long_chars", "too_long_tokens", "duplicate")
SPLITS = ("train", "validation")


# ----------------------------------------------------------------------------- inputs


def materialize_world(cfg: JobConfig) -> Path:
    """Generate the embedded world's jsonl files once per world config."""
    from raydapt.world import write_world

    c = cfg.corpus
    out = layout.corpus_dir(cfg)
    key = hash_json([c.world_tasks, c.world_train, c.world_heldout, c.world_markov_docs, c.world_seed])
    m = read_manifest(out)
    if m and m.get("fingerprint") == key:
        return out
    with atomic_dir(out) as tmp:
        summary = write_world(tmp, c.world_tasks, c.world_train, c.world_heldout, c.world_markov_docs, c.world_seed)
        finish_manifest(tmp, {"fingerprint": key, **summary})
    return out


def input_paths(cfg: JobConfig) -> list[str]:
    """Expand corpus paths (files, folders, globs, URIs) into a sorted list of files."""
    if cfg.corpus.source == "world":
        return [str(materialize_world(cfg) / "train.jsonl")]
    files: list[str] = []
    for p in cfg.corpus.paths:
        if "://" in p:
            files.append(p)
        elif any(ch in p for ch in "*?["):
            matched = sorted(glob.glob(p, recursive=True))
            if not matched:
                raise UserError(f"corpus.paths: no file matches {p!r}")
            files += matched
        elif os.path.isdir(p):
            inside = sorted(str(f) for f in Path(p).rglob("*") if f.suffix in EXTENSIONS)
            if not inside:
                raise UserError(f"corpus.paths: folder {p} holds no .jsonl/.parquet/.txt files")
            files += inside
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise UserError(f"corpus.paths: file not found: {p} (check the path, or use a glob)")
    return files


def corpus_files_for_tokenizer(cfg: JobConfig) -> Path:
    """A local text file to train a preset model's tokenizer on."""
    for p in input_paths(cfg):
        if "://" not in p and Path(p).suffix in (".jsonl", ".txt"):
            return Path(p)
    raise UserError("a preset model needs a local .jsonl or .txt corpus to train its tokenizer on")


def file_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    ext = Path(path.split("?")[0]).suffix
    if ext not in EXTENSIONS:
        raise UserError(f"corpus: cannot tell the format of {path}; set corpus.format (jsonl|parquet|txt)")
    return EXTENSIONS[ext]


def describe_files(paths: list[str]) -> list[dict]:
    """Sizes and mtimes, for the manifest and the up-to-date check."""
    import pyarrow.fs as pafs

    out = []
    for p in paths:
        try:
            fs, inner = pafs.FileSystem.from_uri(p) if "://" in p else (pafs.LocalFileSystem(), os.path.abspath(p))
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
            raise UserError(f"corpus: unreadable parquet shard {p}: {e}; remove or re-export it") from None


# ----------------------------------------------------------------------------- tokenizing


@dataclass
class Doc:
    """One tokenized document. `target` marks tokens that are predicted (token-aligned)."""

    hash: str
    ids: list[int]
    target: list[int]
    label: int = -1
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    answer: str | None = None


class Tokenize:
    """Rows (text | prompt+response | messages) -> token ids and target masks, or a drop reason.

    A callable class so Ray Data loads the tokenizer once per actor.
    """

    def __init__(self, tokenizer_path: str, opts: dict):
        from raydapt.models import load_tokenizer

        self.tok = load_tokenizer(tokenizer_path)
        self.opts = opts
        mode = opts["chat_template"]
        has = bool(getattr(self.tok, "chat_template", None))
        if mode == "always" and not has:
            raise UserError(f"prepare.chat_template=always but the tokenizer at {tokenizer_path} has none")
        self.use_template = has and mode != "never"
        self._wrap = self._template_wrap() if self.use_template else None

    def _template_wrap(self) -> tuple[str, str] | None:
        """(prefix, suffix) around a user prompt, when the template inserts content verbatim.

        Rendering jinja per row dominates tokenizing short rows; most templates are a fixed
        prefix and suffix around the content, which is checked here on two probes.
        """
        def render(content: str) -> str:
            return self.tok.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )

        probe = "\x00raydapt-probe\x00"
        full = render(probe)
        if full.count(probe) != 1:
            return None
        prefix, suffix = full.split(probe)
        return (prefix, suffix) if render("a b") == prefix + "a b" + suffix else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = _rows_of(batch, self.opts["format"])
        out: dict[str, list] = {k: [] for k in ("hash", "ids", "target", "label", "reason", "prompt", "prompt_ids", "answer", "where")}
        for row, where in rows:
            doc, reason = self.doc(row)
            out["reason"].append(reason)
            out["where"].append(where if reason else "")
            out["hash"].append(doc.hash if doc else "")
            out["ids"].append(np.asarray(doc.ids if doc else [], np.int32))
            out["target"].append(np.asarray(doc.target if doc else [], np.uint8))
            out["label"].append(doc.label if doc else -1)
            out["prompt"].append(doc.prompt if doc else None)
            out["prompt_ids"].append(np.asarray((doc.prompt_ids if doc else None) or [], np.int32))
            out["answer"].append(doc.answer if doc else None)
        return pa.table(
            {
                "hash": pa.array(out["hash"], pa.string()),
                "ids": pa.array(out["ids"], pa.list_(pa.int32())),
                "target": pa.array(out["target"], pa.list_(pa.uint8())),
                "label": pa.array(out["label"], pa.int32()),
                "reason": pa.array(out["reason"], pa.string()),
                "where": pa.array(out["where"], pa.string()),
                "prompt": pa.array(out["prompt"], pa.string()),
                "prompt_ids": pa.array(out["prompt_ids"], pa.list_(pa.int32())),
                "answer": pa.array(out["answer"], pa.string()),
            }
        )

    def doc(self, row: Any) -> tuple[Doc | None, str]:
        if not isinstance(row, dict):
            return None, "malformed"
        o = self.opts
        try:
            if "messages" in row and row["messages"] is not None:
                parts = self._messages(row["messages"])
            elif "prompt" in row and "response" in row and row["prompt"] is not None:
                parts = self._prompt_response(row["prompt"], row["response"])
            elif "text" in row:
                parts = self._text(row["text"])
            else:
                return None, "malformed"
        except _Drop as d:
            return None, d.reason
        ids, target, prompt_ids = parts
        label = row.get("label", -1)
        if label is None:
            label = -1
        if not isinstance(label, int) or isinstance(label, bool):
            return None, "malformed"
        if len(ids) > o["seq_len"]:
            if o["drop_longer"]:
                return None, "too_long_tokens"
            ids, target = ids[: o["seq_len"]], target[: o["seq_len"]]
        content = json.dumps([ids, target, label])
        h = hashlib.sha256(content.encode()).hexdigest()[:20]
        prompt = row.get("prompt") if isinstance(row.get("prompt"), str) else None
        answer = row.get("answer") if isinstance(row.get("answer"), str) else None
        return Doc(h, ids, target, label, prompt, prompt_ids, answer), ""

    def _check_str(self, s: Any) -> str:
        if not isinstance(s, str):
            raise _Drop("malformed")
        if not s.strip():
            raise _Drop("empty")
        if len(s) > self.opts["max_chars"]:
            raise _Drop("too_long_chars")
        return s

    def _encode(self, text: str, first: bool) -> list[int]:
        # The Rust tokenizer directly: the transformers wrapper doubles the cost per row.
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is not None:
            return backend.encode(text, add_special_tokens=first).ids
        return self.tok(text, add_special_tokens=first)["input_ids"]

    def _eos(self) -> list[int]:
        return [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []

    def _text(self, text: Any):
        ids = self._encode(self._check_str(text), True) + self._eos()
        return ids, [0] + [1] * (len(ids) - 1), None

    def _prompt_response(self, prompt: Any, response: Any):
        prompt, response = self._check_str(prompt), self._check_str(response)
        if self._wrap:
            ptext = self._wrap[0] + prompt + self._wrap[1]
        elif self.use_template:
            ptext = self.tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
        else:
            ptext = prompt + "\n"
        p_ids = self._encode(ptext, True)
        r_ids = self._encode(response, False) + self._eos()
        return p_ids + r_ids, [0] * len(p_ids) + [1] * len(r_ids), p_ids

    def _messages(self, messages: Any):
        if not isinstance(messages, list) or not messages:
            raise _Drop("malformed" if not isinstance(messages, list) else "empty")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _Drop("malformed")
            self._check_str(m.get("content"))
        if not any(m["role"] == "assistant" for m in messages):
            raise _Drop("empty")  # nothing to learn from
        ids: list[int] = []
        target: list[int] = []
        for i, m in enumerate(messages):
            # Render prefixes and diff them, so masks follow the template exactly.
            text = self._render(messages[: i + 1], False)
            new = self._encode(text, True)[len(ids):]
            if m["role"] == "assistant":
                head = self._encode(self._render(messages[:i], True), True)[len(ids):]
                target += [0] * len(head) + [1] * (len(new) - len(head))
            else:
                target += [0] * len(new)
            ids += new
        return ids, target, None

    def _render(self, messages: list[dict], gen_prompt: bool) -> str:
        if self.use_template:
            return self.tok.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=False)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant: " if gen_prompt else "")


class _Drop(Exception):
    def __init__(self, reason: str):
        self.reason = reason


def _rows_of(batch: pa.Table, fmt: str) -> list[tuple[Any, str]]:
    """(row, origin) pairs. jsonl arrives as raw lines (read_text) so bad JSON is countable."""
    paths = batch.column("path").to_pylist() if "path" in batch.column_names else [""] * batch.num_rows
    if fmt == "jsonl":
        out = []
        for line, path in zip(batch.column("text").to_pylist(), paths):
            if not line.strip():
                out.append(({"text": ""}, path))
                continue
            try:
                out.append((json.loads(line), path))
            except json.JSONDecodeError:
                out.append((None, f"{path}: {line[:80]!r}"))
        return out
    cols = [c for c in batch.column_names if c != "path"]
    return list(zip(batch.select(cols).to_pylist(), paths))


# ----------------------------------------------------------------------------- packing


def pack(docs: list[tuple[np.ndarray, np.ndarray]], seq_len: int) -> list[tuple[np.ndarray, np.ndarray, list[int]]]:
    """Greedy packing of (ids, target) docs into rows of at most seq_len tokens.

    Returns (input_ids, loss_mask, doc_indices) per row. loss_mask is aligned with logits:
    loss_mask[t] = target[t+1], so a row's last position and every first token of a
    document (whose target is 0) never count.
    """
    rows = []
    cur: list[int] = []
    length = 0
    for i, (ids, _) in enumerate(docs):
        if cur and length + len(ids) > seq_len:
            rows.append(cur)
            cur, length = [], 0
        cur.append(i)
        length += len(ids)
    if cur:
        rows.append(cur)
    out = []
    for members in rows:
        ids = np.concatenate([docs[i][0] for i in members]).astype(np.int32)
        target = np.concatenate([docs[i][1] for i in members]).astype(np.uint8)
        mask = np.zeros_like(target)
        mask[:-1] = target[1:]
        out.append((ids, mask, members))
    return out


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
            self._emit([(ids, self._unit_mask(target), h, label)])
            return
        self.docs.append((ids, target))
        self.hashes.append(h)
        if len(self.docs) >= 512:  # pack in chunks; the open last row carries over
            self.flush_docs(keep_tail=True)

    @staticmethod
    def _unit_mask(target: np.ndarray) -> np.ndarray:
        mask = np.zeros_like(target)
        mask[:-1] = target[1:]
        return mask

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
            self.buffer = self.buffer[self.cfg.rows_per_shard:]

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
    from raydapt.storage import require_manifest

    require_manifest(prepared, "prepared data", "prepare JOB")
    files = sorted(str(f) for f in (Path(prepared) / split).glob("*.parquet"))
    if not files:
        raise UserError(f"prepared data at {prepared} has no {split!r} rows; lower/raise prepare.val_fraction or add data")
    return files


# ----------------------------------------------------------------------------- the stage


def fingerprint(cfg: JobConfig, files: list[dict], tok_hash: str) -> str:
    return hash_json({"files": files, "tok": tok_hash, "prepare": cfg.prepare.__dict__, "corpus": cfg.corpus.__dict__, "v": 1})


def run(cfg: JobConfig) -> dict:
    """The prepare stage. Returns the manifest (and skips work when it is up to date)."""
    from transformers import AutoConfig

    from raydapt.models import check_vocab, resolve_model, tokenizer_hash

    paths = input_paths(cfg)
    fmts = {file_format(p, cfg.corpus.format) for p in paths}
    if len(fmts) > 1:
        raise UserError(f"corpus.paths mixes formats {sorted(fmts)}; prepare one format per job")
    fmt = fmts.pop()
    files = describe_files(paths)
    if fmt == "parquet":
        _check_parquet(paths)
    model_dir = resolve_model(cfg, "student")
    from raydapt.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    check_vocab(AutoConfig.from_pretrained(model_dir), tok, f"student {model_dir}")
    if cfg.prepare.seq_len > getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", 1 << 30):
        raise UserError(f"prepare.seq_len={cfg.prepare.seq_len} exceeds the student's max_position_embeddings")
    t_hash = tokenizer_hash(tok)
    fp = fingerprint(cfg, files, t_hash)
    out = layout.prepared_dir(cfg)
    if up_to_date(out, fp):
        log.info("prepare: up to date (%s)", out)
        print(f"prepare: up to date ({out})")
        return {**read_manifest(out), "skipped": True}
    opts = {**cfg.prepare.__dict__, "format": fmt}
    from raydapt.cluster import connect

    connect(cfg.cluster)  # a no-op under `raydapt run`; library callers get a cluster too
    tokenized = tokenize_dataset(paths, fmt, str(model_dir), opts, cfg.prepare.num_blocks)
    with atomic_dir(out) as tmp:
        stats = write_prepared(tokenized, tmp, cfg.prepare)
        if stats["rows"]["train"] == 0:
            raise UserError(
                f"corpus {paths[0] if len(paths) == 1 else paths} has zero usable rows "
                f"(dropped: {stats['dropped']}); check the row format: text, prompt+response, or messages"
            )
        manifest = {
            "fingerprint": fp,
            "seq_len": cfg.prepare.seq_len,
            "pack": cfg.prepare.pack,
            "tokenizer_path": str(model_dir),
            "tokenizer_hash": t_hash,
            "pad_id": tok.pad_token_id if tok.pad_token_id is not None else 0,
            "eos_id": tok.eos_token_id,
            "vocab_size": len(tok),
            "format": fmt,
            "source_files": files,
            **stats,
        }
        manifest = finish_manifest(tmp, manifest)
    print(
        f"prepare: {manifest['documents']} docs -> {manifest['rows']['train']} train / "
        f"{manifest['rows']['validation']} validation rows, {manifest['tokens']['train']} train tokens; "
        f"dropped {manifest['dropped']} -> {out}"
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
    it = batches.iter_batches(batch_format="pyarrow", batch_size=None) if hasattr(batches, "iter_batches") else batches
    splits = {s: _Split(s, out / s, pcfg) for s in SPLITS}
    dropped = dict.fromkeys(REASONS, 0)
    examples: dict[str, list[str]] = {}
    seen: set[str] = set()
    prompts: dict[str, list] = {"id": [], "prompt": [], "prompt_ids": [], "answer": []}
    n_docs = 0
    for table in it:
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
            ids = cols["ids"][i].values.to_numpy(zero_copy_only=False)
            target = cols["target"][i].values.to_numpy(zero_copy_only=False)
            split = split_of(hashes[i], pcfg.val_fraction)
            splits[split].add(hashes[i], ids, target, labels[i])
            if split == "train" and cols["prompt"][i].is_valid and len(cols["prompt_ids"][i]):
                prompts["id"].append(hashes[i])
                prompts["prompt"].append(cols["prompt"][i].as_py())
                prompts["prompt_ids"].append(cols["prompt_ids"][i].values.to_numpy(zero_copy_only=False))
                prompts["answer"].append(cols["answer"][i].as_py())
    for s in splits.values():
        s.close()
    if prompts["id"]:
        (out / "prompts").mkdir()
        pq.write_table(
            pa.table({**prompts, "prompt_ids": pa.array(prompts["prompt_ids"], pa.list_(pa.int32()))}),
            out / "prompts" / "part-00000.parquet",
        )
    return {
        "documents": n_docs,
        "dropped": dropped,
        "drop_examples": examples,
        "rows": {s: splits[s].rows for s in SPLITS},
        "tokens": {s: splits[s].tokens for s in SPLITS},
        "loss_tokens": {s: splits[s].loss_tokens for s in SPLITS},
        "prompts": len(prompts["id"]),
    }
