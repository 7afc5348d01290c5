"""Bias diagnostics of a stored teacher signal, logged every step beside the KD loss.

Why: a top-k target is exact over the k stored ids plus one tail bucket, so how much it
leaves out is the teacher mass *outside* those ids; a sampled target is unbiased, but only
the drawn ids carry a gradient in one step. Three numbers per step say how much of the
distributions the stored ids actually cover (issue 15, item 4):

- ``teacher_mass``: the teacher's probability mass on its stored top-k ids (k ids plus the
  tail bucket; for ``topk+sampled`` the exact head of k' ids);
- ``tail_mass``: 1 - teacher_mass, what the tail bucket (or the draws) has to stand for;
- ``student_mass``: the student's probability mass on every stored id (top-k ids, and for
  the sampled kinds the distinct drawn ids too). Far below ``teacher_mass``, the student
  still spends its mass where the signal has no shape.

All three are means over the KD term's masked positions at temperature 1, so they read the
same at every ``kd_temperature``. Pure tensor code (no Ray): the losses call ``Probe.add``
from inside their chunked functions, where the student's log-probs already exist, so the
student mass costs one gather per chunk and no extra head matmul.
"""

from __future__ import annotations

import torch
from torch import Tensor

DIAGNOSTICS = ("teacher_mass", "tail_mass", "student_mass")


def _wide(x: Tensor) -> Tensor:
    """float64 stays float64 (the reference tests); anything narrower becomes float32."""
    return x if x.dtype == torch.float64 else x.float()


def mass_on(logp: Tensor, ids: Tensor, valid: Tensor) -> Tensor:
    """Probability mass of `logp` on the valid ids: (..., V), (..., m), (..., m) -> (...,).

    The ids at one position must be distinct (top-k ids are; draws are stored compacted to
    distinct ids with counts), so the sum is the mass of their set.
    """
    picked = logp.detach().gather(-1, torch.where(valid, ids.long(), 0))
    return torch.where(valid, picked.exp(), 0.0).sum(-1)


def teacher_head_mass(topk_logprobs: Tensor) -> Tensor:
    """Teacher mass on its stored ids per position: (B, T, k) log-probs (-inf padding) -> (B, T).

    Capped at 1: stored log-probs are rounded, so k = V may sum a hair above it."""
    lp = _wide(topk_logprobs.detach())
    return torch.where(lp > float("-inf"), lp.exp(), 0.0).sum(-1).clamp(max=1.0)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of (B, T) `x` over positions where `mask` > 0; 0 when none is."""
    on = mask > 0
    return torch.where(on, _wide(x), 0.0).sum() / on.sum().clamp_min(1)


class Probe:
    """Collects a per-position quantity from a loss's chunks, in order along T.

    The chunked losses (``raydapt.train.losses._chunked_sum``) call their function once per
    chunk of positions, left to right, in forward; each call adds its (B, c) piece here. The
    pieces then join into (B, T) and average over the loss mask.
    """

    def __init__(self) -> None:
        self.pieces: list[Tensor] = []

    def add(self, piece: Tensor) -> None:
        self.pieces.append(_wide(piece.detach()))

    def mean(self, mask: Tensor) -> Tensor:
        if not self.pieces:
            raise RuntimeError("Probe.mean: no loss chunk added a value (was the loss run?)")
        values = torch.cat(self.pieces, dim=1)
        if values.shape != mask.shape:
            raise RuntimeError(
                f"Probe.mean: pieces make {tuple(values.shape)}, mask is "
                f"{tuple(mask.shape)}; a chunk was added twice or skipped"
            )
        return masked_mean(values, mask)


def signal_parts(
    student: Probe, loss_mask: Tensor, topk_logprobs: Tensor | None
) -> dict[str, Tensor]:
    """The diagnostics as an objective's detached parts; teacher mass only where stored."""
    parts = {"student_mass": student.mean(loss_mask)}
    if topk_logprobs is not None:
        head = masked_mean(teacher_head_mass(topk_logprobs), loss_mask)
        parts |= {"teacher_mass": head, "tail_mass": 1.0 - head}
    return parts
