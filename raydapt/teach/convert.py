"""Pure numpy helpers of the teacher stage: logprob outputs -> dense (T, k) arrays, ids, seeds.

No Ray and no vLLM here, so the trainer-facing conventions are testable on their own; the
next-token shift itself is raydapt.rows.loss_mask_of, shared with prepare.

Alignment (raydapt.rows): row position t holds the teacher's distribution over token t+1 given
tokens 0..t, i.e. vLLM's `prompt_logprobs[t + 1]` and transformers' `logits[t]`.

Padding convention: a position with no next token (the last one, T-1) holds id 0 with
logprob 0.0 in slot 0 and -inf in slots 1..k-1 ("all mass on slot 0", the same convention
as `rows.collate` uses past a row's end). Its loss_mask is always 0, so the loss never
reads it; the convention only keeps the arrays finite-shaped and the tail bucket at zero.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from raydapt.rows import loss_mask_of

MAX_K = 128  # hard cap on teach.k: the engine's max_logprobs is set to k, and memory grows with it


def pad_row(ids: np.ndarray, lps: np.ndarray, t: int) -> None:
    """Write the padding convention into position t of (T, k) arrays, in place."""
    ids[t] = 0
    lps[t] = -np.inf
    lps[t, 0] = 0.0


def dense_from_flat(flat: Any, n_tokens: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """vLLM FlatLogprobs of one prompt (n_tokens positions) -> (T, k) ids and logprobs.

    Position p of `flat` is the distribution over prompt token p (p=0 is empty); each holds
    the actual token and then the top k by rank (the actual token twice when it is in the
    top k). We keep exactly the distinct entries with rank 1..k, in rank order, and shift by one
    so that row t = position t+1.
    """
    fast = _dense_from_full_flat(flat, n_tokens, k)
    if fast is not None:
        return fast
    ids = np.zeros((n_tokens, k), np.int64)  # (T, k)
    lps = np.full((n_tokens, k), -np.inf, np.float32)  # (T, k)
    tok = np.asarray(flat.token_ids, np.int64)
    lp = np.asarray(flat.logprobs, np.float32)
    rank = np.asarray([r if r is not None else 1 << 30 for r in flat.ranks], np.int64)
    starts, ends = flat.start_indices, flat.end_indices
    for t in range(n_tokens - 1):
        s, e = starts[t + 1], ends[t + 1]
        _fill(ids, lps, t, tok[s:e], lp[s:e], rank[s:e], k)
    pad_row(ids, lps, n_tokens - 1)
    return ids, lps


def _dense_from_full_flat(flat: Any, n_tokens: int, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The usual layout in one reshape: positions 1..n-1 each hold the actual token and then
    the top k with ranks 1..k. None when the layout differs; the caller then sorts each
    position by rank."""
    starts, ends = flat.start_indices, flat.end_indices
    if n_tokens < 2 or len(starts) < n_tokens:
        return None
    s0, e_last = starts[1], ends[n_tokens - 1]
    if e_last - s0 != (n_tokens - 1) * (k + 1) or (np.diff(starts[1:n_tokens]) != k + 1).any():
        return None
    try:
        rank = np.asarray(flat.ranks[s0:e_last], np.int64).reshape(n_tokens - 1, k + 1)
    except (TypeError, ValueError):  # a None rank
        return None
    if not (rank[:, 1:] == np.arange(1, k + 1)).all():
        return None
    tok = np.asarray(flat.token_ids[s0:e_last], np.int64).reshape(n_tokens - 1, k + 1)
    lp = np.asarray(flat.logprobs[s0:e_last], np.float32).reshape(n_tokens - 1, k + 1)
    ids = np.zeros((n_tokens, k), np.int64)  # (T, k)
    lps = np.full((n_tokens, k), -np.inf, np.float32)  # (T, k)
    ids[:-1], lps[:-1] = tok[:, 1:], lp[:, 1:]
    pad_row(ids, lps, n_tokens - 1)
    return ids, lps


def dense_from_dicts(
    positions: Sequence[dict | None], n_tokens: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The same as `dense_from_flat` for the classic `list[dict[int, Logprob] | None]` form."""
    ids = np.zeros((n_tokens, k), np.int64)  # (T, k)
    lps = np.full((n_tokens, k), -np.inf, np.float32)  # (T, k)
    for t in range(n_tokens - 1):
        d = positions[t + 1] or {}
        tok = np.fromiter(d.keys(), np.int64, len(d))
        lp = np.fromiter((v.logprob for v in d.values()), np.float32, len(d))
        rank = np.fromiter(
            (v.rank if v.rank is not None else 1 << 30 for v in d.values()), np.int64, len(d)
        )
        _fill(ids, lps, t, tok, lp, rank, k)
    pad_row(ids, lps, n_tokens - 1)
    return ids, lps


def _fill(
    ids: np.ndarray,
    lps: np.ndarray,
    t: int,
    tok: np.ndarray,
    lp: np.ndarray,
    rank: np.ndarray,
    k: int,
) -> None:
    """Top k of one position by rank. The flat form lists the actual token first and then the
    top k, so a token that is both appears twice: keep each id once."""
    _, first = np.unique(tok, return_index=True)
    first.sort()
    tok, lp, rank = tok[first], lp[first], rank[first]
    keep = rank <= k
    order = np.argsort(rank[keep], kind="stable")[:k]
    n = len(order)
    ids[t, :n] = tok[keep][order]
    lps[t, :n] = lp[keep][order]


def dense_from_logprobs(logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Full (T, V) log-softmax of one row (the HF backend) -> (T, k) top-k, same convention."""
    n_tokens = logprobs.shape[0]
    idx = np.argsort(-logprobs, axis=-1, kind="stable")[:, :k]  # (T, k)
    ids = idx.astype(np.int64)
    lps = np.take_along_axis(logprobs, idx, axis=-1).astype(np.float32)
    pad_row(ids, lps, n_tokens - 1)
    return ids, lps


def response_loss_mask(n_prompt: int, n_response: int) -> np.ndarray:
    """Aligned with logits: 1 at positions n_prompt-1 .. T-2, which predict the response tokens."""
    learned = np.r_[np.zeros(n_prompt, np.uint8), np.ones(n_response, np.uint8)]  # token-aligned
    return loss_mask_of(learned)


def sample_id(prompt_id: str, sample_index: int) -> str:
    """Stable id of one generated sample: a hash of its prompt id and sample index."""
    return hashlib.sha256(f"{prompt_id}\x00{sample_index}".encode()).hexdigest()[:24]


def row_seed(base_seed: int, row_id: str) -> int:
    """Per-row sampling seed from teach.seed and the row id: reruns draw the same samples."""
    return int(hashlib.sha256(f"{base_seed}\x00{row_id}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text before the first stop string (the HF backend; vLLM does this itself)."""
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
