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

import functools
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch


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
    import ray.train  # slow to import (about 1 s); only workers read shards

    shard = ray.train.get_dataset_shard(name)
    return load_rows(shard.iter_batches(batch_format="pyarrow", batch_size=1024), columns)


@functools.lru_cache(maxsize=4)
def epoch_perm(n: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of `epoch`, read-only. Cached: every micro-batch reads it, and drawing a
    permutation of 2M rows takes about 0.25 s, which uncached cost every step that much."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    perm = torch.randperm(n, generator=g).numpy()
    perm.flags.writeable = False
    return perm


def micro_batch_rows(
    n: int, seed: int, g: int, global_size: int, rank: int, size: int
) -> np.ndarray:
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


def val_batches(
    n: int, global_size: int, rank: int, size: int
) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """Sequential validation batches; every rank yields the same number (FSDP needs it).

    Yields (rows, valid): a short last slice is padded with row 0 marked invalid.
    """
    for start in range(0, n, global_size):
        lo = start + rank * size
        idx = np.arange(lo, lo + size)
        valid = idx < n
        yield np.where(valid, idx, 0), valid
