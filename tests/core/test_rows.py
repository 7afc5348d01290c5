"""Token rows (raydapt.rows) and the split rule: pure functions, no Ray."""

import numpy as np
import torch

from raydapt.prepare.stage import split_of
from raydapt.rows import loss_mask_of, next_token_targets, pack


def test_pack_hand_computed():
    docs = [
        (np.array([1, 2, 3]), np.array([0, 1, 1])),
        (np.array([4, 5]), np.array([0, 1])),
        (np.array([6, 7, 8, 9]), np.array([0, 0, 1, 1])),
    ]
    rows = pack(docs, seq_len=5)
    assert [r[2] for r in rows] == [[0, 1], [2]]
    ids, mask, _ = rows[0]
    assert ids.tolist() == [1, 2, 3, 4, 5]
    # mask[t] = target[t+1]: predicting 2, 3 and 5 counts; 3->4 crosses documents and does not
    assert mask.tolist() == [1, 1, 0, 1, 0]
    assert rows[1][1].tolist() == [0, 1, 1, 0]


def test_split_is_deterministic_by_content():
    hashes = [f"{i:08x}" + "0" * 12 for i in range(0, 2**32, 2**22)]
    a = [split_of(h, 0.1) for h in hashes]
    assert a == [split_of(h, 0.1) for h in hashes]
    assert 0 < a.count("validation") < len(a)


def test_loss_mask_and_next_token_targets_agree():
    # a token-aligned target marks tokens 2 and 3 of [5, 6, 7, 8] as learned
    target = np.array([0, 0, 1, 1], np.uint8)
    mask = loss_mask_of(target)
    assert mask.tolist() == [0, 1, 1, 0]
    ids = torch.tensor([[5, 6, 7, 8]])
    tgt, m = next_token_targets(ids, torch.as_tensor(mask, dtype=torch.float32)[None])
    # the positions that count predict exactly the learned tokens 7 and 8
    assert tgt[m > 0].tolist() == [7, 8]
