"""The teacher side of the sampled signals (teach.signal sampled | topk+sampled): draws from
the teacher's distribution, compacted to distinct ids and counts. Pure torch.

A scorer with the full logits (`teach.hf_backend`) calls these; the trainer's losses that
read the draws are in `raydapt.train.sampled_kd`, whose docstring says why the estimate is
unbiased and how temperature enters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _float(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _compact(draws: Tensor) -> tuple[Tensor, Tensor]:
    """(N, s) drawn ids -> (N, s) unique ids ascending and their counts; unused slots 0, 0."""
    srt = draws.sort(dim=-1).values
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    slot = new.long().cumsum(-1) - 1  # (N, s): the unique slot of each draw
    counts = torch.zeros_like(srt).scatter_add_(-1, slot, torch.ones_like(srt))
    ids = torch.zeros_like(srt).scatter_(-1, slot, srt)  # all draws in a slot share one id
    return ids, counts


def tempered(teacher_logprobs: Tensor, temperature: float) -> Tensor:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _float(teacher_logprobs.detach()) / temperature


def draw_samples(
    teacher_logprobs: Tensor,
    s: int,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """s draws with replacement per position from softmax(teacher_logprobs / temperature).

    teacher_logprobs (..., V): log-probs or logits (-inf allowed). Returns (ids, counts), both
    (..., s) int64: the unique ids ascending, then padding slots (id 0, count 0). Fixed width s
    (at most s ids are distinct) so batches stack and store as fixed-size lists.
    """
    if s < 1:
        raise ValueError(f"s must be >= 1, got {s}")
    *lead, V = teacher_logprobs.shape
    probs = torch.softmax(tempered(teacher_logprobs, temperature).reshape(-1, V), dim=-1)
    draws = torch.multinomial(probs, s, replacement=True, generator=generator)
    ids, counts = _compact(draws)
    return ids.reshape(*lead, s), counts.reshape(*lead, s)


def topk_plus_samples(
    teacher_logprobs: Tensor,
    k: int,
    s: int,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The exact top k plus s draws from the teacher restricted to outside the top k.

    teacher_logprobs (..., V) log-probs or logits. Returns (topk_ids (..., k) int64,
    topk_logprobs (..., k) at temperature 1 as the targets schema stores them, ids (..., s)
    int64, counts (..., s) int64). The tail draws come from softmax(log p / temperature) over
    the ids outside the top k; a position with no tail (k = V, or only -inf outside the top k)
    gets count 0 everywhere.
    """
    *lead, V = teacher_logprobs.shape
    if not 0 <= k <= V:
        raise ValueError(f"k must be in [0, {V}], got {k}")
    if s < 0:
        raise ValueError(f"s must be >= 0, got {s}")
    lp = F.log_softmax(_float(teacher_logprobs.detach()), dim=-1)
    topk_lp, topk_ids = lp.topk(k, dim=-1)
    n = lp.numel() // max(V, 1)
    tail = tempered(lp, temperature).reshape(n, V).scatter(-1, topk_ids.reshape(n, k), -torch.inf)
    has_tail = tail.amax(-1, keepdim=True) > float("-inf")  # (N, 1)
    zeros = torch.zeros((*lead, s), dtype=torch.long, device=lp.device)
    if s == 0 or not bool(has_tail.any()):
        return topk_ids, topk_lp, zeros, zeros.clone()
    probs = torch.softmax(torch.where(has_tail, tail, 0.0), dim=-1)
    ids, counts = _compact(torch.multinomial(probs, s, replacement=True, generator=generator))
    ids, counts = torch.where(has_tail, ids, 0), torch.where(has_tail, counts, 0)
    return topk_ids, topk_lp, ids.reshape(*lead, s), counts.reshape(*lead, s)
