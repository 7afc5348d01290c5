"""Training rows on a worker: loaded once from a Ray Data shard, batched by a pure function.

The driver builds `ray.data.read_parquet` datasets (prepared shards, or teacher targets)
and hands them to the TorchTrainer unsplit; no worker opens a file itself. Each worker
streams its `ray.train.get_dataset_shard(name)` once into an in-memory Arrow table sorted
by row id.

Why every worker holds every row, and why the batch of a step is a pure function:
exact resume. Ray Data's streaming split assigns blocks to workers in whatever order they
ask, so neither the rows a worker sees nor their order is reproducible between runs. Here
the rows of global micro-batch g are positions [g*G, (g+1)*G) of the infinite sequence
perm(seed, 0) ++ perm(seed, 1) ++ ... over the id-sorted rows, and rank r takes its slice
of B rows. The data position is therefore the step number alone: a resumed run restores
the step and sees exactly the batches the killed run would have seen, and the global batch
is the same for any worker count (1 worker x 2B rows == 2 workers x B rows). The cost is
memory: each worker holds the whole split (about 4 bytes per token, plus 4*k per token for
top-k targets), which suits corpora of up to some million rows per node.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

TOPK_COLUMNS = ("topk_ids", "topk_logprobs")


def load_rows(batches: Iterable[pa.Table], columns: list[str]) -> pa.Table:
    """Arrow batches (from a Ray Data shard) -> one table of `columns`, sorted by id."""
    tables = [b.select([c for c in columns if c in b.column_names]) for b in batches]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in columns[:1]})
    table = pa.concat_tables(tables, promote_options="default").combine_chunks()
    return table.take(pc.sort_indices(table, [("id", "ascending")]))


def load_shard(name: str, columns: list[str]) -> pa.Table:
    """Stream the Ray Train dataset shard `name` into memory (one pass)."""
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    return load_rows(shard.iter_batches(batch_format="pyarrow", batch_size=1024), columns)


def epoch_perm(n: int, seed: int, epoch: int) -> np.ndarray:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g).numpy()


def micro_batch_rows(n: int, seed: int, g: int, global_size: int, rank: int, size: int) -> np.ndarray:
    """Row indices of rank's slice of global micro-batch g (deterministic, see module doc)."""
    start = g * global_size + rank * size
    out = np.empty(size, np.int64)
    for j in range(size):  # batches may straddle an epoch boundary
        pos = start + j
        epoch, off = divmod(pos, n)
        if j == 0 or off == 0:
            perm = epoch_perm(n, seed, epoch)
        out[j] = perm[off]
    return out


def _list_values(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, offsets) of a list column."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False)
    return values, offsets


def collate(table: pa.Table, rows: np.ndarray, pad_id: int, valid: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """Rows of `table` -> right-padded tensors, padded to the longest row of the batch.

    input_ids (B, T) int64, loss_mask (B, T) float32 (0 on padding and on rows where
    `valid` is False), label (B,) int64 when present, topk_ids (B, T, k) int64 and
    topk_logprobs (B, T, k) float32 (padding: all mass on slot 0) when present.
    """
    sub = table.take(pa.array(rows, pa.int64()))
    ids, off = _list_values(sub.column("input_ids"))
    mask, moff = _list_values(sub.column("loss_mask"))
    lens = np.diff(off)
    b, t = len(rows), max(int(lens.max()), 2)
    out_ids = np.full((b, t), pad_id, np.int64)
    out_mask = np.zeros((b, t), np.float32)
    for i in range(b):
        out_ids[i, : lens[i]] = ids[off[i] : off[i + 1]]
        out_mask[i, : lens[i] - 1] = mask[moff[i] : moff[i + 1] - 1]  # a row's last token predicts nothing
    if valid is not None:
        out_mask[~valid] = 0.0
    batch = {"input_ids": torch.from_numpy(out_ids), "loss_mask": torch.from_numpy(out_mask)}
    if "label" in sub.column_names:
        labels = sub.column("label").to_numpy().astype(np.int64)
        if valid is not None:
            labels[~valid] = -1
        batch["label"] = torch.from_numpy(labels)
    if "topk_ids" in sub.column_names:
        batch.update(_collate_topk(sub, lens, t))
    return batch


def _collate_topk(sub: pa.Table, lens: np.ndarray, t: int) -> dict[str, torch.Tensor]:
    col_ids = sub.column("topk_ids").combine_chunks()
    col_lp = sub.column("topk_logprobs").combine_chunks()
    k = col_ids.type.value_type.list_size
    flat_ids = col_ids.values.values.to_numpy(zero_copy_only=False).astype(np.int64).reshape(-1, k)
    flat_lp = col_lp.values.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, k)
    off = col_ids.offsets.to_numpy()
    b = len(lens)
    out_ids = np.zeros((b, t, k), np.int64)
    out_lp = np.full((b, t, k), -np.inf, np.float32)
    out_lp[:, :, 0] = 0.0
    for i in range(b):
        n = off[i + 1] - off[i]
        out_ids[i, :n] = flat_ids[off[i] : off[i + 1]]
        out_lp[i, :n] = flat_lp[off[i] : off[i + 1]]
    return {"topk_ids": torch.from_numpy(out_ids), "topk_logprobs": torch.from_numpy(out_lp)}


def val_batches(n: int, global_size: int, rank: int, size: int) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """Sequential validation batches; every rank yields the same number (FSDP needs it).

    Yields (rows, valid): a short last slice is padded with row 0 marked invalid.
    """
    for start in range(0, n, global_size):
        lo = start + rank * size
        idx = np.arange(lo, lo + size)
        valid = idx < n
        yield np.where(valid, idx, 0), valid
