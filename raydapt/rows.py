"""Token rows: the one owner of token alignment, packing, masks and collate.

Alignment, once: a prepared row holds `input_ids` (T,) and `loss_mask` (T,) aligned with
the logits, so `loss_mask[t] = 1` when predicting token t+1 from tokens 0..t counts. The
teacher targets use the same alignment (`topk_*[t]` is the distribution over token t+1),
and so do `losses.ce_loss` and every KD loss. Tokenizing produces the other view, a
token-aligned `target` (1 where token t is one the model should learn to produce);
`loss_mask_of` is the only place the two are converted.

Pure numpy, pyarrow and torch: no Ray.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch


def loss_mask_of(target: np.ndarray) -> np.ndarray:
    """Token-aligned target (T,) -> logits-aligned loss mask (T,): mask[t] = target[t+1].

    A row's last position predicts nothing, so its mask is 0; so is the position before a
    document's first token, whose target is 0.
    """
    mask = np.zeros_like(target)
    mask[:-1] = target[1:]
    return mask


def next_token_targets(
    input_ids: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shift in tensors: targets (B, T) int64 with targets[:, t] = input_ids[:, t+1], and
    the mask (B, T) with the last position off (it has no next token)."""
    targets = torch.zeros_like(input_ids, dtype=torch.long)
    targets[:, :-1] = input_ids[:, 1:]
    mask = loss_mask.clone()
    mask[:, -1] = 0
    return targets, mask


def pack_starts(lens: list[int], seq_len: int) -> list[int]:
    """The greedy packing rule on lengths alone: the index of each row's first document. A
    row closes when the next document would take it past seq_len (prepare's bulk writer and
    `pack` share it)."""
    starts: list[int] = []
    length = 0
    for i, n in enumerate(lens):
        if not starts or length + n > seq_len:
            starts.append(i)
            length = 0
        length += n
    return starts


def pack(
    docs: list[tuple[np.ndarray, np.ndarray]], seq_len: int
) -> list[tuple[np.ndarray, np.ndarray, list[int]]]:
    """Greedy packing of (ids, target) docs into rows of at most seq_len tokens.

    Returns (input_ids, loss_mask, doc_indices) per row, loss_mask logits-aligned.
    """
    starts = pack_starts([len(ids) for ids, _ in docs], seq_len)
    rows = [list(range(a, b)) for a, b in zip(starts, [*starts[1:], len(docs)])]
    out = []
    for members in rows:
        ids = np.concatenate([docs[i][0] for i in members]).astype(np.int32)
        target = np.concatenate([docs[i][1] for i in members]).astype(np.uint8)
        out.append((ids, loss_mask_of(target), members))
    return out


def padded(rows: list[tuple[list[int], list[int]]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """(input_ids, loss_mask) lists -> right-padded input_ids (B, T) int64, loss_mask (B, T)."""
    t = max(max(len(ids) for ids, _ in rows), 2)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), t)
    for i, (a, m) in enumerate(rows):
        ids[i, : len(a)] = torch.as_tensor(a, dtype=torch.long)
        mask[i, : len(m)] = torch.as_tensor(m, dtype=torch.float32)
    return {"input_ids": ids, "loss_mask": mask}


def _list_values(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, offsets) of a list column."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False)
    return values, offsets


def collate(
    table: pa.Table, rows: np.ndarray, pad_id: int, valid: np.ndarray | None = None
) -> dict[str, torch.Tensor]:
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
        out_mask[i, : lens[i] - 1] = mask[
            moff[i] : moff[i + 1] - 1
        ]  # a row's last token predicts nothing
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
    if "sample_ids" in sub.column_names:
        batch.update(_collate_draws(sub, lens, t))
    if "teacher_token_logprob" in sub.column_names:  # on-policy rows: log p of each next token
        lp, loff = _list_values(sub.column("teacher_token_logprob"))
        out_lp = np.zeros((b, t), np.float32)
        for i in range(b):
            out_lp[i, : lens[i]] = lp[loff[i] : loff[i + 1]]
        batch["teacher_token_logprob"] = torch.from_numpy(out_lp)
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


def _collate_draws(sub: pa.Table, lens: np.ndarray, t: int) -> dict[str, torch.Tensor]:
    """sample_ids / sample_counts (list<list<>> per row) -> (B, T, m) int64 each, m the most
    distinct draws at any position of the batch; unused slots have count 0 (and id 0)."""
    ids_col = sub.column("sample_ids").combine_chunks()
    cnt_col = sub.column("sample_counts").combine_chunks()
    rows = ids_col.offsets.to_numpy()  # row i: positions rows[i]..rows[i+1]
    pos = ids_col.values.offsets.to_numpy()  # position j: values pos[j]..pos[j+1]
    ids = ids_col.values.values.to_numpy(zero_copy_only=False).astype(np.int64)
    cnt = cnt_col.values.values.to_numpy(zero_copy_only=False).astype(np.int64)
    per = np.diff(pos)
    b, m = len(lens), max(int(per.max()) if len(per) else 0, 1)
    out_ids = np.zeros((b, t, m), np.int64)
    out_cnt = np.zeros((b, t, m), np.int64)
    # every stored draw's (row, position in its row, slot), in one scatter; the offsets are
    # absolute (a taken or sliced column's children may hold more than its rows)
    p_abs = np.arange(rows[0], rows[-1])  # the batch's positions
    row_of = np.repeat(np.arange(b), np.diff(rows))
    j_of = p_abs - rows[:-1][row_of]
    n_of = per[p_abs]
    d_pos = np.repeat(np.arange(len(p_abs)), n_of)  # each draw's position, batch-relative
    slot = np.arange(len(d_pos)) - np.repeat(np.cumsum(n_of) - n_of, n_of)
    v_abs = np.repeat(pos[p_abs], n_of) + slot  # each draw's index in the flat values
    out_ids[row_of[d_pos], j_of[d_pos], slot] = ids[v_abs]
    out_cnt[row_of[d_pos], j_of[d_pos], slot] = cnt[v_abs]
    return {"sample_ids": torch.from_numpy(out_ids), "sample_counts": torch.from_numpy(out_cnt)}
