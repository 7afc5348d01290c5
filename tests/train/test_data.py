"""The batch of a step is a pure function of the step (raydapt.train.data): every row once per
epoch, ranks splitting one global batch, epochs straddled, and the epoch order drawn once."""

from __future__ import annotations

import numpy as np
import pytest

from raydapt.train.data import epoch_perm, micro_batch_rows


def test_each_epoch_visits_every_row_once_and_ranks_split_the_global_batch():
    n, gsize = 10, 4  # 4 rows a global micro-batch: 2.5 per epoch, so batches straddle epochs
    seq = np.concatenate([micro_batch_rows(n, 7, g, gsize, 0, gsize) for g in range(5)])
    assert sorted(seq[:10]) == list(range(10)) and sorted(seq[10:20]) == list(range(10))
    assert list(seq[:10]) == list(epoch_perm(n, 7, 0)) and list(seq[10:]) == list(
        epoch_perm(n, 7, 1)
    )
    assert list(epoch_perm(n, 7, 0)) != list(epoch_perm(n, 7, 1))  # a new order each epoch
    for g in range(5):  # 2 ranks x 2 rows == 1 rank x 4 rows: the global batch is the same
        halves = [micro_batch_rows(n, 7, g, gsize, r, 2) for r in (0, 1)]
        assert list(np.concatenate(halves)) == list(micro_batch_rows(n, 7, g, gsize, 0, gsize))


def test_epoch_order_is_drawn_once_and_cannot_be_changed():
    a = epoch_perm(1000, 3, 2)
    assert epoch_perm(1000, 3, 2) is a  # cached: micro-batches of a step reuse it
    with pytest.raises(ValueError, match="read-only"):
        a[0] = a[1]
    assert epoch_perm(1000, 4, 2) is not a and list(epoch_perm(1000, 4, 2)) != list(a)
