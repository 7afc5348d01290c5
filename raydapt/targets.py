"""The targets dataset: the contract between the teacher pool and the trainer.

Parquet files plus `manifest.json`, one row per training sequence (the contract in README.md,
"Architecture"):

    id             string                              stable content-hash id, exactly once
    input_ids      list<int32>                         prompt + response tokens, length T
    loss_mask      list<uint8>                         1 where the loss applies
                                                       (aligned with logits[t])
    topk_ids       list<fixed_size_list<ID, k>>        teacher's top-k ids for token t+1
    topk_logprobs  list<fixed_size_list<float16, k>>   their log-probabilities (temperature 1)
    sample_ids     list<list<ID>>                      signal sampled | topk+sampled: the
                                                       distinct ids drawn at position t
    sample_counts  list<list<COUNT>>                   how often each was drawn (COUNT uint8
                                                       up to 255 draws, else uint16)

Signals (`teach.signal`, the manifest's `signal`, absent = topk): `topk` stores the top-k
columns; `sampled` stores only the sample columns (`samples` draws from the whole teacher
distribution, RS-KD); `topk+sampled` both, the draws taken from outside the top k.

Alignment: position t holds the teacher's distribution over token t+1 given tokens 0..t,
the same alignment as the student's `logits[t]`; vLLM's `prompt_logprobs[t+1]` is that
distribution. The last position has no next token: its top-k is padding and its loss_mask 0.

Encoding: ID is uint16 when the vocabulary fits (else int32); the manifest's `encoding`
says which. float16 logprobs keep the KL exact to well under 1e-3 (tests check it).

Exactly once: the teacher writes parts into `<final>.parts/`, each part written to a
temporary name and renamed, so a part either exists whole or not at all. A rerun reads the
ids already done and computes only the rest. `finalize` consolidates the parts, keeping each
id once, into `<final>/` through an atomic rename; the manifest is written last.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydapt.errors import UserError
from raydapt.storage import atomic_dir, finish_manifest, read_manifest


def id_dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "int32"


def count_type(samples: int) -> pa.DataType:
    return pa.uint8() if samples <= 255 else pa.uint16()


def schema(
    k: int,
    id_dtype: str = "int32",
    generation: bool = False,
    logits: bool = True,
    signal: str = "topk",
    samples: int = 0,
) -> pa.Schema:
    ids_t = {"uint16": pa.uint16(), "int32": pa.int32()}[id_dtype]
    fields = [
        pa.field("id", pa.string()),
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("loss_mask", pa.list_(pa.uint8())),
    ]
    if logits and signal != "topk":
        fields += [
            pa.field("sample_ids", pa.list_(pa.list_(ids_t))),
            pa.field("sample_counts", pa.list_(pa.list_(count_type(samples)))),
        ]
    if logits and signal != "sampled":
        fields += [
            pa.field("topk_ids", pa.list_(pa.list_(ids_t, k))),
            pa.field("topk_logprobs", pa.list_(pa.list_(pa.float16(), k))),
        ]
    if generation:
        fields += [
            pa.field("prompt_ids", pa.list_(pa.int32())),
            pa.field("response_ids", pa.list_(pa.int32())),
            pa.field("text", pa.string()),
            pa.field("sample_index", pa.int32()),
        ]
    return pa.schema(fields)


def _fixed_list(values: np.ndarray, k: int, item_type: pa.DataType) -> pa.Array:
    """(T, k) numpy -> fixed_size_list<item, k> array of length T, without Python loops."""
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=item_type)
    return pa.FixedSizeListArray.from_arrays(flat, k)


def _list_of(arrays: list[pa.Array], item_type: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([len(a) for a in arrays])
    values = pa.concat_arrays(arrays) if arrays else pa.array([], type=item_type)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def make_table(
    ids: list[str],
    input_ids: list[np.ndarray],
    loss_mask: list[np.ndarray],
    topk_ids: list[np.ndarray] | None,
    topk_logprobs: list[np.ndarray] | None,
    k: int,
    id_dtype: str = "int32",
    generation: dict[str, list] | None = None,
    draws: tuple[list[np.ndarray], list[np.ndarray]] | None = None,
    signal: str = "topk",
    samples: int = 0,
) -> pa.Table:
    """Dense per-row arrays -> a table in the targets schema.

    topk_ids[i] and topk_logprobs[i] have shape (T_i, k), aligned with input_ids[i] (T_i,);
    for the sampled signals, draws = (ids, counts) with draws[0][i] of shape (T_i, s) (count
    0: an unused slot, dropped here).
    """
    logits = topk_ids is not None or draws is not None
    sch = schema(k, id_dtype, generation is not None, logits, signal, samples)
    cols: dict[str, pa.Array] = {
        "id": pa.array(ids, pa.string()),
        "input_ids": pa.array([np.asarray(x, np.int32) for x in input_ids], pa.list_(pa.int32())),
        "loss_mask": pa.array([np.asarray(x, np.uint8) for x in loss_mask], pa.list_(pa.uint8())),
    }
    if logits and signal != "topk":
        if draws is None:
            raise ValueError(f"signal {signal!r} needs the teacher's draws")
        id_t = sch.field("sample_ids").type.value_type.value_type
        cnt_t = sch.field("sample_counts").type.value_type.value_type
        cols["sample_ids"], cols["sample_counts"] = _draw_lists(*draws, id_t, cnt_t)
    if logits and signal != "sampled":
        np_id = np.uint16 if id_dtype == "uint16" else np.int32
        for i, (t, a, b) in enumerate(zip(input_ids, topk_ids, topk_logprobs)):
            if a.shape != (len(t), k) or b.shape != (len(t), k):
                raise ValueError(
                    f"row {ids[i]}: top-k shapes {a.shape}/{b.shape} != ({len(t)}, {k})"
                )
        cols["topk_ids"] = _list_of(
            [
                _fixed_list(a.astype(np_id), k, sch.field("topk_ids").type.value_type.value_type)
                for a in topk_ids
            ],
            sch.field("topk_ids").type.value_type,
        )
        cols["topk_logprobs"] = _list_of(
            [_fixed_list(b.astype(np.float16), k, pa.float16()) for b in topk_logprobs],
            sch.field("topk_logprobs").type.value_type,
        )
    if generation is not None:
        cols["prompt_ids"] = pa.array(generation["prompt_ids"], pa.list_(pa.int32()))
        cols["response_ids"] = pa.array(generation["response_ids"], pa.list_(pa.int32()))
        cols["text"] = pa.array(generation["text"], pa.string())
        cols["sample_index"] = pa.array(generation["sample_index"], pa.int32())
    return pa.table([cols[f.name] for f in sch], schema=sch)


def _draw_lists(
    ids: list[np.ndarray], counts: list[np.ndarray], id_t: pa.DataType, cnt_t: pa.DataType
) -> tuple[pa.Array, pa.Array]:
    """Per-row (T, s) ids and counts -> list<list<ID>> and list<list<COUNT>>, keeping the
    slots drawn at least once (in their order), without Python loops over positions."""
    rows = np.zeros(len(ids) + 1, np.int32)
    rows[1:] = np.cumsum([len(a) for a in ids])
    keep = [np.asarray(c) > 0 for c in counts]
    per_pos = np.concatenate([k.sum(1) for k in keep]) if ids else np.zeros(0, np.int64)
    inner = np.zeros(len(per_pos) + 1, np.int32)
    inner[1:] = np.cumsum(per_pos)
    np_id = np.uint16 if id_t == pa.uint16() else np.int32
    np_cnt = np.uint8 if cnt_t == pa.uint8() else np.uint16
    flat_ids = np.concatenate([np.asarray(a)[k] for a, k in zip(ids, keep)]) if ids else []
    flat_cnt = np.concatenate([np.asarray(c)[k] for c, k in zip(counts, keep)]) if ids else []
    out_ids = pa.ListArray.from_arrays(
        pa.array(rows),
        pa.ListArray.from_arrays(pa.array(inner), pa.array(np.asarray(flat_ids, np_id), id_t)),
    )
    out_cnt = pa.ListArray.from_arrays(
        pa.array(rows),
        pa.ListArray.from_arrays(pa.array(inner), pa.array(np.asarray(flat_cnt, np_cnt), cnt_t)),
    )
    return out_ids, out_cnt


def decode_row_topk(table: pa.Table, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Row i's (T, k) top-k ids (int64) and logprobs (float32)."""
    ids = table.column("topk_ids")[i].values.flatten().to_numpy(zero_copy_only=False)
    lps = table.column("topk_logprobs")[i].values.flatten().to_numpy(zero_copy_only=False)
    k = table.schema.field("topk_ids").type.value_type.list_size
    return ids.astype(np.int64).reshape(-1, k), lps.astype(np.float32).reshape(-1, k)


class PartStore:
    """Staging folder of whole parts; the unit of exactly-once progress."""

    def __init__(self, final: str | os.PathLike):
        self.final = Path(final)
        self.dir = self.final.with_name(self.final.name + ".parts")

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.parquet")) if self.dir.exists() else []

    def done_ids(self) -> set[str]:
        done: set[str] = set()
        for f in self.files():
            try:
                done.update(pq.read_table(f, columns=["id"]).column("id").to_pylist())
            except (pa.ArrowInvalid, OSError):
                f.unlink(missing_ok=True)  # a torn part cannot exist (rename), but be safe
        return done

    def write(self, table: pa.Table) -> Path:
        """Write one part atomically: temp name, fsync, rename."""
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"part-{uuid.uuid4().hex[:12]}.parquet"
        tmp = self.dir / f".{name}.tmp"
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.dir / name)
        return self.dir / name

    def finalize(self, manifest: dict, rows_per_file: int = 4096) -> dict:
        """Consolidate the parts into `final/`, each id once, then remove the staging folder."""
        tables = [pq.read_table(f) for f in self.files()]
        if not tables:
            raise UserError(f"no targets were produced for {self.final}")
        table = pa.concat_tables(tables, promote_options="default")
        table = _unique_by_id(table)
        with atomic_dir(self.final) as tmp:
            for i, start in enumerate(range(0, table.num_rows, rows_per_file)):
                pq.write_table(
                    table.slice(start, rows_per_file),
                    tmp / f"targets-{i:05d}.parquet",
                    compression="zstd",
                )
            n_tokens = int(
                pa.compute.sum(pa.compute.list_value_length(table.column("input_ids"))).as_py()
            )
            size = sum(f.stat().st_size for f in tmp.glob("*.parquet"))
            manifest = {
                **manifest,
                "rows": table.num_rows,
                "tokens": n_tokens,
                "bytes": size,
                "bytes_per_token": size / max(n_tokens, 1),
                "columns": table.schema.names,
            }
            manifest = finish_manifest(tmp, manifest)
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)
        return manifest


def _unique_by_id(table: pa.Table) -> pa.Table:
    ids = table.column("id").to_pylist()
    seen: set[str] = set()
    keep = []
    for i, x in enumerate(ids):
        if x not in seen:
            seen.add(x)
            keep.append(i)
    order = sorted(keep, key=lambda i: ids[i])  # deterministic order whatever the pool size
    return table.take(pa.array(order, pa.int64()))


def read_targets(folder: str | os.PathLike) -> tuple[dict, list[Path]]:
    """The manifest and parquet files of a complete targets folder."""
    folder = Path(folder)
    m = read_manifest(folder)
    if m is None:
        raise UserError(
            f"targets at {folder} are missing or incomplete; run `raydapt teach JOB` first"
        )
    return m, sorted(folder.glob("targets-*.parquet"))


def check_compatible(
    manifest: dict,
    student_tokenizer_hash: str,
    teach_k: int,
    where: str,
    signal: str = "topk",
    samples: int = 0,
) -> None:
    """Logit targets only make sense with the student's tokenizer, and are the ones this job's
    `teach` section asks for only when they hold top-`teach.k` of the `teach.signal` kind (the
    trainer reads both). Targets written before signals existed hold top-k."""
    problems = []
    held = manifest.get("signal") or "topk"
    if held != signal:
        problems.append(
            f"the targets hold the {held!r} signal but teach.signal={signal!r}; rerun "
            f"`raydapt teach JOB` to write {signal!r} targets, or set teach.signal={held}"
        )
    elif signal != "topk" and manifest.get("samples") != samples:
        problems.append(
            f"the targets hold {manifest.get('samples')} draws per position but "
            f"teach.samples={samples}; rerun `raydapt teach JOB`, or set "
            f"teach.samples={manifest.get('samples')}"
        )
    t_hash = manifest.get("tokenizer_hash")
    if t_hash != student_tokenizer_hash:
        problems.append(
            f"the targets were scored with tokenizer {t_hash} "
            f"({manifest.get('tokenizer_path', '?')}) "
            f"but the student's tokenizer is {student_tokenizer_hash}; rerun `raydapt teach` with "
            "the student's tokenizer (teach.kind=score needs a shared vocabulary)"
        )
    k = manifest.get("k")
    if isinstance(k, int) and k != teach_k and signal != "sampled":
        problems.append(
            f"the targets hold top-{k} but teach.k={teach_k}; rerun `raydapt teach JOB` "
            f"to score top-{teach_k}, or set teach.k={k}"
        )
    if problems:
        raise UserError(f"{where}: " + "; ".join(problems))
