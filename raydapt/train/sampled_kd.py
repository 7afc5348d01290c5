"""Sampled teacher signals for offline KD, ``sampled`` and ``topk+sampled``: pure tensor code.

Why: a top-k store (raydapt.targets) keeps the teacher's head exactly but lumps the rest into
one tail bucket, so the student is never told *which* tail tokens the teacher likes. Random
Sampling KD (RS-KD; Anshumann et al., ACL 2025, arXiv 2503.16870) stores draws instead: s tokens
drawn with replacement from the teacher p, kept as unique ids and counts. Since
E[count_v / s] = p_v and the cross-entropy is linear in its target,

    loss = -sum_j (count_j / s) log q(id_j)

has expectation H(p, q), and its gradient w.r.t. the student's logits (q - count/s) is an
unbiased estimate of the forward-KL gradient (q - p). The paper's main method draws from the
teacher itself, so its importance weights p / proposal are all 1 and it stores only the
sampled frequencies count / N ("save sampled freqs, use them as soft labels for the KLD"), which
is what this module does; no proposal correction is applied.

Kinds (the per-position teacher signal, aligned with the logits as in raydapt.rows):

- ``sampled``: ``ids`` (B, T, m) int and ``counts`` (B, T, m) int, m unique ids of s draws.
  s is read per position as ``counts.sum(-1)``; slots with count 0 are padding (any id). A
  masked position with no draws at all contributes 0 but still counts in the mean. Counts may
  be real-valued (only their ratios count/s enter), e.g. their expectation, s * p, in tests.
- ``topk+sampled``: the exact top-k' temperature-1 log-probs (``topk_ids``, ``topk_logprobs``,
  -inf on padded slots, as the targets schema stores them) plus ``ids``/``counts`` drawn from p
  restricted to outside the top k'. With tail mass T_p = 1 - sum_i p_i,
  loss = -sum_{i in top-k'} p_i log q_i - T_p sum_j (count_j / s_tail) log q(id_j).
  Tail ids must lie outside the top-k' ids (``topk_plus_samples`` guarantees it). A position
  with no tail draws (s_tail = 0, e.g. k' = V) has no tail term.

Temperature (``KD.temperature`` = tau; only ``KD.kind == "forward_kl"`` is accepted: the draws
estimate expectations under p, which reverse KL and JSD are not). As in
``losses.topk_kd_loss``, each side keeps its temperature-1 head and tail masses and tau
reshapes the distribution *within* each part: inside the head as softmax(log p_i / tau), inside
the tail as p restricted to the tail at tau. So the target at tau is
``p'_i = H_p softmax_head(log p / tau)_i`` in the head and ``T_p softmax_tail(log p / tau)_i`` in
the tail, the student likewise, and the loss is tau^2 * H(p', q') (Hinton's scaling, so the
gradient keeps its scale). With k' = 0 this is the plain softmax(log p / tau) and ``sampled``
equals ``topk+sampled``; with k' = V it is ``losses.full_kd_loss`` at tau exactly; in between,
with a single tail bucket, it would be ``losses.topk_kd_loss``. The draws must come from the
teacher at that same tau (the ``temperature`` of ``draw_samples``/``topk_plus_samples``); the
loss cannot check this, and draws at another temperature bias it.

The reported KL (``KDTerms.kl``) is the loss minus tau^2 times a teacher entropy:

- with ``teacher_entropy`` (B, T) given, the exact H(p') that the scorer computed from its
  logits (``target_entropy``), ``kl`` is an unbiased estimate of tau^2 KL(p' || q');
- without it, the plug-in entropy of the stored sparse target (head exact, tail T_p count/s),
  so ``kl`` is exactly KL(stored target || q') >= 0: what RS-KD's loss reads. It is consistent
  (exact when k' = V) but biased upward at small s, by roughly T_p (u - 1) / (2 s) for u
  distinct tail tokens (Miller-Madow), because a few draws look less uncertain than p.

Memory: like ``losses.topk_kd_loss``, the loss runs in ``KD.chunk``-position chunks through the
same eager-gradient helper, so no (B, T, V) temporaries beyond one chunk's outlive it.

Storage: ``bytes_per_token`` gives the fixed-width bytes per token of each kind, to plan a
bytes-per-token frontier. Tests: ``.venv/bin/python -m pytest tests/train/test_sampled_kd.py -q``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from raydapt.teach.draws import draw_samples, tempered, topk_plus_samples
from raydapt.train.diagnostics import Probe, mass_on
from raydapt.train.losses import KD, _chunked_sum, _compute_dtype, _count, _head_and_tail

__all__ = ["draw_samples", "topk_plus_samples"]  # the teacher side, re-exported for tests

SIGNAL_KINDS = ("topk", "sampled", "topk+sampled")

_DTYPE_BYTES = {
    "uint8": 1,
    "int16": 2,
    "uint16": 2,
    "int32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
}
_INT_MAX = {"uint8": 2**8 - 1, "int16": 2**15 - 1, "uint16": 2**16 - 1, "int32": 2**31 - 1}


class KDTerms(NamedTuple):
    """``loss``: differentiable scalar, tau^2 * mean over masked positions of the estimated
    cross-entropy H(p', q'); its gradient is the forward-KL gradient's unbiased estimate.
    ``kl``: detached scalar, loss minus tau^2 * the mean teacher entropy (module docstring)."""

    loss: Tensor
    kl: Tensor


# ----------------------------------------------------------------------------- losses


def _check(kd: KD, ids: Tensor, counts: Tensor) -> None:
    if kd.kind != "forward_kl":
        raise ValueError(
            f"sampled teacher signals estimate the forward KL only, got KD kind {kd.kind!r}"
        )
    if ids.shape != counts.shape:
        raise ValueError(f"sample ids {tuple(ids.shape)} != counts {tuple(counts.shape)}")


def _float_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _weights(counts: Tensor, dtype: torch.dtype) -> Tensor:
    """counts (..., m) -> count / s per slot, s = the position's total; 0 where s = 0."""
    c = counts.to(dtype)
    return c / c.sum(-1, keepdim=True).clamp_min(1.0)


def _sampled_ce(
    s_logits: Tensor, ids: Tensor, counts: Tensor, tau: float, probe: Probe | None = None
) -> Tensor:
    """(B, c, V), (B, c, m), (B, c, m) -> tau^2 * -sum_j (count_j / s) log q_tau(id_j), (B, c).
    ``probe``: gets the student's temperature-1 mass on the drawn ids per position."""
    s_logp = F.log_softmax(_compute_dtype(s_logits) / tau, dim=-1)
    drawn = counts > 0
    if probe is not None:
        s1 = s_logp if tau == 1.0 else F.log_softmax(_compute_dtype(s_logits), dim=-1)
        probe.add(mass_on(s1, ids, drawn))
    picked = s_logp.gather(-1, torch.where(drawn, ids.long(), 0))  # padded ids may be anything
    w = _weights(counts, s_logp.dtype)
    return -torch.where(drawn, w * picked, 0.0).sum(-1) * tau**2


def _topk_sampled_ce(
    s_logits: Tensor,
    topk_ids: Tensor,
    topk_lp: Tensor,
    ids: Tensor,
    counts: Tensor,
    tau: float,
    probe: Probe | None = None,
) -> Tensor:
    """Per-position tau^2 * H(p', q') estimate (B, c): exact head, sampled tail.
    ``probe``: gets the student's mass on the head ids and the drawn tail ids per position."""
    s_all = F.log_softmax(_compute_dtype(s_logits), dim=-1)  # (B, c, V), temperature 1
    t_lp = topk_lp.to(s_all.dtype)
    valid = t_lp > float("-inf")  # (B, c, k)
    if probe is not None:  # the drawn ids lie outside the head: the two sets are disjoint
        probe.add(mass_on(s_all, topk_ids, valid) + mass_on(s_all, ids, counts > 0))
    kid = torch.where(valid, topk_ids.long(), 0)
    k = kid.shape[-1]
    s_out = _head_and_tail(s_all.gather(-1, kid), valid, tau)  # (B, c, k + 1), as losses.py
    t_out = _head_and_tail(t_lp, valid, tau)
    head = torch.where(valid, t_out[..., :k].exp() * s_out[..., :k], 0.0).sum(-1)

    # The student inside its tail at tau: log_softmax over the ids outside the head. -inf (not
    # a finite stand-in) keeps head ids out whatever the logits' range; a row whose tail is
    # empty (k' = V) gets finite dummies, and has no draws to read them.
    in_head = torch.zeros_like(s_all).scatter_add(-1, kid, valid.to(s_all.dtype)) > 0
    tail_x = torch.where(in_head, float("-inf"), s_all / tau)
    tail_x = torch.where(in_head.all(-1, keepdim=True), 0.0, tail_x)
    tail_logp = F.log_softmax(tail_x, dim=-1)
    drawn = counts > 0
    picked = tail_logp.gather(-1, torch.where(drawn, ids.long(), 0))  # (B, c, m)
    w = _weights(counts, s_all.dtype)
    log_tail_q = s_out[..., k : k + 1]  # the student's temperature-1 tail mass, (B, c, 1)
    tail = t_out[..., k].exp() * torch.where(drawn, w * (log_tail_q + picked), 0.0).sum(-1)
    return -(head + tail) * tau**2


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask > 0, x, 0.0).sum(dim=(-2, -1)) / _count(mask)


def _plugin_entropy(counts: Tensor, dtype: torch.dtype) -> Tensor:
    """Entropy of count / s per position (B, T): the sparse target's own entropy."""
    w = _weights(counts, dtype)
    return -torch.special.xlogy(w, w).sum(-1)  # 0 log 0 = 0 on padding


def _kl(loss: Tensor, entropy: Tensor, loss_mask: Tensor, tau: float) -> Tensor:
    return loss.detach() - tau**2 * _masked_mean(entropy.to(loss.dtype), loss_mask)


def sampled_kd_loss(
    student_logits: Tensor,
    ids: Tensor,
    counts: Tensor,
    loss_mask: Tensor,
    kd: KD,
    teacher_entropy: Tensor | None = None,
    probe: Probe | None = None,
) -> KDTerms:
    """RS-KD: forward KL against s teacher draws per position, unbiased in value and gradient.

    student_logits (B, T, V) (log-probs work too: log_softmax leaves them unchanged); ids and
    counts (B, T, m) int, count 0 on padding (from ``draw_samples`` at ``kd.temperature``);
    loss_mask (B, T); teacher_entropy (B, T) or None: H(softmax(log p / tau)) per position.
    Returns ``KDTerms``: E[loss] = tau^2 H(p_tau, q_tau); kl as in the module docstring.
    ``probe`` (raydapt.train.diagnostics): gets the student's mass on the drawn ids.
    """
    _check(kd, ids, counts)
    tau = kd.temperature

    def fn(s: Tensor, i: Tensor, c: Tensor) -> Tensor:
        return _sampled_ce(s, i, c, tau, probe)

    loss = _chunked_sum(fn, [student_logits, ids, counts], [], loss_mask, kd.chunk)
    loss = loss / _count(loss_mask)
    if teacher_entropy is None:
        teacher_entropy = _plugin_entropy(counts, _float_dtype(student_logits))
    return KDTerms(loss, _kl(loss, teacher_entropy, loss_mask, tau))


def topk_sampled_kd_loss(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    ids: Tensor,
    counts: Tensor,
    loss_mask: Tensor,
    kd: KD,
    teacher_entropy: Tensor | None = None,
    probe: Probe | None = None,
) -> KDTerms:
    """Exact top-k' head plus a tail estimated from draws outside the head.

    student_logits (B, T, V); topk_ids, topk_logprobs (B, T, k') (teacher log-probs at
    temperature 1, -inf on padded slots); ids, counts (B, T, m) tail draws (count 0 on padding;
    from ``topk_plus_samples`` at ``kd.temperature``); loss_mask (B, T); teacher_entropy (B, T)
    or None: the exact H(p') from ``target_entropy(..., k', tau)``. Returns ``KDTerms``.
    k' = V is ``losses.full_kd_loss`` (forward KL) exactly; k' = 0 is ``sampled_kd_loss``.
    ``probe``: gets the student's mass on the head ids and the drawn ids.
    """
    _check(kd, ids, counts)
    if topk_ids.shape != topk_logprobs.shape:
        raise ValueError(f"top-k ids {tuple(topk_ids.shape)} != {tuple(topk_logprobs.shape)}")
    tau = kd.temperature

    def fn(s: Tensor, ti: Tensor, tl: Tensor, i: Tensor, c: Tensor) -> Tensor:
        return _topk_sampled_ce(s, ti, tl, i, c, tau, probe)

    seq = [student_logits, topk_ids, topk_logprobs, ids, counts]
    loss = _chunked_sum(fn, seq, [], loss_mask, kd.chunk) / _count(loss_mask)
    if teacher_entropy is None:
        dtype = _float_dtype(student_logits)
        t_lp = topk_logprobs.to(dtype)
        valid = t_lp > float("-inf")
        t_out = _head_and_tail(t_lp, valid, tau)  # (B, T, k' + 1)
        k = t_lp.shape[-1]
        head = -torch.where(valid, t_out[..., :k].exp() * t_out[..., :k], 0.0).sum(-1)
        log_tail, drawn = t_out[..., k], (counts.sum(-1) > 0).to(dtype)
        tail_p = log_tail.exp()
        teacher_entropy = head + tail_p * (_plugin_entropy(counts, dtype) - drawn * log_tail)
    return KDTerms(loss, _kl(loss, teacher_entropy, loss_mask, tau))


# ----------------------------------------------------------------------------- teacher side


def target_entropy(teacher_logprobs: Tensor, k: int = 0, temperature: float = 1.0) -> Tensor:
    """Exact entropy H(p') of the target at tau with a top-k head (module docstring), (...,).

    k = 0: H(softmax(log p / tau)), the ``sampled`` target. A scorer with the full logits can
    store it (one float per token) so the trainer's ``kl`` is unbiased instead of plug-in.
    """
    lp = F.log_softmax(_compute_dtype(teacher_logprobs.detach()), dim=-1)
    vals, idx = lp.topk(k, dim=-1)
    valid = vals > float("-inf")
    out = _head_and_tail(vals, valid, temperature)  # (..., k + 1)
    head = -torch.where(valid, out[..., :k].exp() * out[..., :k], 0.0).sum(-1)
    tail_x = tempered(lp, temperature).scatter(-1, idx, float("-inf"))
    has_tail = tail_x.amax(-1) > float("-inf")
    inner = F.log_softmax(torch.where(has_tail.unsqueeze(-1), tail_x, 0.0), dim=-1)
    inner_h = -torch.where(tail_x > float("-inf"), inner.exp() * inner, 0.0).sum(-1)
    log_tail = out[..., k]
    tail = log_tail.exp() * (inner_h - log_tail)
    return head + torch.where(has_tail, tail, 0.0)


# ----------------------------------------------------------------------------- storage


def count_dtype_for(s: int) -> str:
    """The narrowest count type that holds any count of s draws: the type the targets store
    (``raydapt.targets.count_type``: uint8 up to 255 draws, uint16 above)."""
    return "uint8" if s <= 255 else "uint16" if s <= 65535 else "int32"


def bytes_per_token(
    kind: str,
    k: int = 0,
    s: int = 0,
    *,
    id_dtype: str = "int32",
    logprob_dtype: str = "float16",
    count_dtype: str | None = None,
    entropy: bool = False,
) -> int:
    """Fixed-width bytes per token of one teacher-signal kind, before compression.

    ``topk``: k * (id + logprob); ``sampled``: s * (id + count), s slots since at most s of the
    draws are distinct; ``topk+sampled``: both. Counts default to ``count_dtype_for(s)``
    (uint8 up to 255 draws); ids int32 (``uint16`` fits vocabularies up to 65536, as
    ``targets.id_dtype_for``); logprobs float16 as the targets schema stores them. ``entropy``
    adds one logprob-typed value (``target_entropy``) for an unbiased ``kl``. Not counted:
    input_ids and loss_mask (the same for every kind) and parquet's compression, which a
    variable-length layout (only the distinct draws, plus a 4-byte list offset) would beat.
    """
    if kind not in SIGNAL_KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(SIGNAL_KINDS)}")
    if k < 0 or s < 0:
        raise ValueError(f"k and s must be >= 0, got k={k}, s={s}")
    if kind == "topk" and s:
        raise ValueError("kind 'topk' stores no draws; use 'topk+sampled'")
    if kind == "sampled" and k:
        raise ValueError("kind 'sampled' stores no top-k; use 'topk+sampled'")
    c_dtype = count_dtype or count_dtype_for(s)
    for name in (id_dtype, logprob_dtype, c_dtype):
        if name not in _DTYPE_BYTES:
            raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(_DTYPE_BYTES)}")
    if _INT_MAX.get(c_dtype, 0) < s:
        raise ValueError(f"count dtype {c_dtype} cannot hold counts of {s} draws")
    ids, lps, counts = (_DTYPE_BYTES[x] for x in (id_dtype, logprob_dtype, c_dtype))
    head = k * (ids + lps)
    draws = s * (ids + counts) if kind != "topk" else 0
    return head + draws + (lps if entropy else 0)
