"""Rollouts -> training rows (pure numpy and Arrow; no Ray, no vLLM).

A row is a prompt the student continued: `input_ids` = prompt + its sampled response (ending
in EOS when it stopped there), `loss_mask` on the positions that predict response tokens,
the teacher's top-k and tail there (`topk_ids`, `topk_logprobs`, as in the targets schema)
and the teacher's log-prob of each next token (`teacher_token_logprob`, for the k1 loss).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from raydapt.targets import make_table
from raydapt.teach.convert import response_loss_mask

Scored = tuple[np.ndarray, np.ndarray, np.ndarray]  # (T, k) ids, (T, k) logprobs, (T,) token lp


def step_seed(base: int, step: int, row: int) -> int:
    """The sampling seed of row `row` of step `step`: a redone step draws the same samples
    (as long as the weights are the same)."""
    h = hashlib.sha256(f"{base}\x00{step}\x00{row}".encode()).hexdigest()
    return int(h[:8], 16) & 0x7FFFFFFF


def on_policy_step(seed: int, step: int, fraction: float) -> bool:
    """GKD's coin: whether step `step` trains on the student's own samples (probability
    `fraction`, GKD's lambda) or on the reference responses; the same for a redone step."""
    if fraction >= 1:
        return True
    return bool(np.random.default_rng(step_seed(seed, step, -2)).random() < fraction)


def rollout_rows(
    step: int,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    scores: Sequence[Scored],
    k: int,
    unlearn_last: Sequence[bool] | None = None,
) -> pa.Table:
    """One step's rows, in the targets schema plus `teacher_token_logprob`.

    `unlearn_last[i]`: row i's last response token (its EOS) leaves the loss (the EOS guard).
    """
    ids, seqs, masks = [], [], []
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids.append(f"s{step:07d}-{i:04d}")
        seqs.append(np.asarray([*p, *r], np.int32))
        mask = response_loss_mask(len(p), len(r))
        if unlearn_last is not None and unlearn_last[i] and len(r):
            mask[len(p) + len(r) - 2] = 0  # the position that predicts the last token
        masks.append(mask)
    table = make_table(ids, seqs, masks, [s[0] for s in scores], [s[1] for s in scores], k, "int32")
    tok = pa.array([np.asarray(s[2], np.float32) for s in scores], pa.list_(pa.float32()))
    return table.append_column("teacher_token_logprob", tok)


def length_stats(
    responses: Sequence[Sequence[int]], ended: Sequence[bool], max_tokens: int
) -> dict:
    """Response lengths of one step: a collapse (EOS right away) or a runaway (never EOS)
    shows here first (the failure GKD-style losses can drive when the teacher's and the
    student's end-of-sequence habits differ)."""
    n = np.asarray([len(r) for r in responses], np.float64)
    return {
        "response_len_mean": float(n.mean()) if len(n) else 0.0,
        "response_len_min": float(n.min()) if len(n) else 0.0,
        "response_len_max": float(n.max()) if len(n) else 0.0,
        "ended_fraction": float(np.mean(ended)) if len(ended) else 0.0,
        "truncated_fraction": float(np.mean(n >= max_tokens)) if len(n) else 0.0,
    }
