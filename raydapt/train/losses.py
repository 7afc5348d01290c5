"""Language-model and distillation losses: pure tensor functions (no Ray).

Why: the train loop mixes a next-token cross-entropy with a knowledge-distillation (KD) term
computed either from a live teacher (full vocabulary) or from stored teacher top-k log-probs
(the targets dataset, raydapt.targets). Everything here is a plain function of tensors so it can be
tested against dense references (tests/train/test_losses.py) and benchmarked (bench/kd_memory.py).

Conventions shared by every function:

- Alignment: ``logits[:, t]`` predicts ``input_ids[:, t + 1]``. ``loss_mask`` (B, T), float or
  uint8, is aligned with the logits: ``loss_mask[:, t] == 1`` means the prediction made at
  position t counts. The last position has no next token, so CE ignores ``loss_mask[:, -1]``;
  the KD losses use every masked position (the teacher has a distribution there too), and by
  the data contract ``loss_mask[:, -1]`` is 0 anyway.
- Reduction: the sum over masked positions divided by the number of masked positions. An
  all-masked batch gives exactly 0.0, still attached to the graph, so every FSDP rank can call
  ``backward()`` and join the gradient all-reduce.
- Divergences (``KD.kind``), p = teacher, q = student, both at temperature tau:
  ``"forward_kl"`` KL(p || q); ``"reverse_kl"`` KL(q || p); ``"jsd"`` the generalized
  Jensen-Shannon divergence of TRL's GKD: m = beta p + (1 - beta) q,
  JSD = beta KL(p || m) + (1 - beta) KL(q || m); as in TRL, beta = 0 is defined as forward KL
  and beta = 1 as reverse KL.
- Temperature: both student and teacher logits are divided by tau, and the divergence is
  multiplied by tau**2 (Hinton et al.), so the KD gradient keeps its scale as tau changes and
  alpha means the same thing at every tau. tau = 1 is the plain divergence.
- Outcomes with zero probability under the first argument of a KL contribute 0 (0 log 0 = 0).
- Half-precision logits are upcast to float32 per chunk; float64 stays float64.

Memory: ``full_kd_loss`` and ``topk_kd_loss`` work on chunks of ``KD.chunk`` positions and take
each chunk's gradient inside forward (``_EagerChunkedSum``, the fused-loss trick of Liger's
linear cross-entropy; it does what per-chunk ``torch.utils.checkpoint`` would, without the
recompute), so neither forward nor backward keeps (B, T, V) temporaries beyond the logits and
one gradient buffer. The ``*_from_hidden`` variants also apply the LM heads per
chunk, so the (B, T, V) logits never exist at once.

Top-k with a tail bucket (``topk_kd_loss``): the teacher stored log p_i (temperature 1) for k
ids; its tail is 1 - sum_i p_i. The student's tail is 1 - sum_i q_i over the same ids, from its
temperature-1 softmax. The divergence is exact over these k + 1 outcomes. Temperature only
reshapes the mass inside the top k: at tau, each side keeps its temperature-1 tail mass and
spreads its head mass (1 - tail) as softmax(log p_i / tau) over the k ids. This needs nothing
the store lacks, never amplifies a rounding-level tail (raising a 1e-7 tail to 1/tau would), and
equals the full-vocabulary loss at every tau when k = V. Padded slots (logprob -inf) are not
outcomes: they contribute 0 and do not count toward either head mass.

Run the tests: ``.venv/bin/python -m pytest tests/train/test_losses.py -q``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from raydapt.rows import next_token_targets
from raydapt.train.diagnostics import Probe

KINDS = ("forward_kl", "reverse_kl", "jsd")

# Finite stand-in for log(0) on padded top-k slots: exp(-1e4) is exactly 0 in fp32 and fp64,
# and unlike -inf it keeps logsumexp's backward finite when every slot is padded.
_NEG = -1e4
# Smallest tail mass we take a log of; a rounding-level tail contributes ~1e-30 * 69.
_TINY_TAIL = 1e-30


# ----------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class KD:
    """How the KD term compares student and teacher: the divergence ``kind`` (one of KINDS),
    its temperature tau, the JSD's beta and the sequence ``chunk`` that bounds memory
    (None: one piece, through plain autograd). Checked when built."""

    kind: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    chunk: int | None = 128

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown KD kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")


def _compute_dtype(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _kl(logp_a: Tensor, logp_b: Tensor, valid: Tensor | None) -> Tensor:
    """sum_v a_v (log a_v - log b_v) over the last dim, skipping outcomes where ``valid`` is 0.

    logp_a, logp_b: (..., N) log-probs; valid: (..., N) bool or None. Returns (...,).
    Invalid entries are replaced by 0 *before* any arithmetic so no NaN reaches backward.
    """
    if valid is None:
        return (logp_a.exp() * (logp_a - logp_b)).sum(-1)
    a = torch.where(valid, logp_a, 0.0)
    b = torch.where(valid, logp_b, 0.0)
    return torch.where(valid, a.exp() * (a - b), 0.0).sum(-1)


def _divergence(
    s_logp: Tensor, t_logp: Tensor, kind: str, beta: float, valid: Tensor | None = None
) -> Tensor:
    """Per-position divergence between student q and teacher p over the last dim.

    s_logp, t_logp: (..., N) log-probs; valid: (..., N) bool or None. Returns (...,).
    """
    if valid is not None:  # sanitize once so the mixture below never sees -inf
        s_logp = torch.where(valid, s_logp, 0.0)
        t_logp = torch.where(valid, t_logp, 0.0)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(t_logp, s_logp, valid)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl(s_logp, t_logp, valid)
    mix = torch.logaddexp(t_logp + math.log(beta), s_logp + math.log(1.0 - beta))  # (..., N)
    return beta * _kl(t_logp, mix, valid) + (1.0 - beta) * _kl(s_logp, mix, valid)


def _full_valid(s_logp: Tensor, t_logp: Tensor) -> Tensor | None:
    """Outcomes to keep when full-vocab logits may hold -inf (e.g. masked vocab padding)."""
    if torch.isfinite(s_logp).all() and torch.isfinite(t_logp).all():
        return None
    return torch.isfinite(s_logp) & torch.isfinite(t_logp)


def _masked_sum(fn: Callable[..., Tensor], mask: Tensor, *args: Tensor) -> Tensor:
    """sum over masked positions of fn(*args). fn -> (..., B, c); mask (..., B, c) -> (...,)."""
    per_pos = fn(*args)
    return torch.where(mask > 0, per_pos, 0.0).sum(dim=(-2, -1))


class _EagerChunkedSum(torch.autograd.Function):
    """Sum over chunks whose gradients are taken inside forward, chunk by chunk.

    Forward runs each chunk's loss under autograd and immediately takes its gradient into
    full-size buffers, one per input (and per output component), then frees the chunk's graph.
    Backward only scales the buffers. So nothing of a chunk outlives its iteration, the chunk is
    computed once (no checkpoint recompute), and slicing a (B, T, V) input adds no per-chunk
    full-size zero gradients the way autograd's slice backward would.
    """

    @staticmethod
    def forward(ctx, fn, mask, chunk, n_seq, *tensors):  # type: ignore[override]
        wants = list(ctx.needs_input_grad[4:])
        idx = [i for i, w in enumerate(wants) if w]
        out_shape = mask.shape[:-2]
        n_out = max(1, math.prod(out_shape))
        grads = [[_grad_buffer(tensors[i]) for i in idx] for _ in range(n_out)]
        consts = [
            c.detach().requires_grad_(w)
            for c, w in zip(tensors[n_seq:], wants[n_seq:], strict=True)
        ]
        total: Tensor | None = None
        for start in range(0, mask.shape[-1], chunk):
            sl = slice(start, start + chunk)
            xs = [
                x[:, sl].detach().requires_grad_(w)
                for x, w in zip(tensors[:n_seq], wants[:n_seq], strict=True)
            ]
            with torch.enable_grad():
                part = _masked_sum(fn, mask[..., sl], *xs, *consts).reshape(n_out)
                parts = [part[j] for j in range(n_out)]
            leaves = [(xs + consts)[i] for i in idx]
            for j in range(n_out):
                gs = torch.autograd.grad(
                    parts[j], leaves, retain_graph=j + 1 < n_out, allow_unused=True
                )
                for buf, i, g in zip(grads[j], idx, gs, strict=True):
                    if g is not None:
                        (buf[:, sl] if i < n_seq else buf).add_(g)
            total = part.detach() if total is None else total + part.detach()
        assert total is not None
        ctx.idx, ctx.n_out, ctx.n_inputs = idx, n_out, len(tensors)
        ctx.dtypes = [tensors[i].dtype for i in idx]
        ctx.save_for_backward(*[g for row in grads for g in row])
        return total.reshape(out_shape)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        saved, n = ctx.saved_tensors, len(ctx.idx)
        go = grad_out.reshape(ctx.n_out)
        result: list[Tensor | None] = [None] * ctx.n_inputs
        for pos, (i, dtype) in enumerate(zip(ctx.idx, ctx.dtypes, strict=True)):
            g = sum(
                go[j].to(saved[j * n + pos].dtype) * saved[j * n + pos] for j in range(ctx.n_out)
            )
            result[i] = g.to(dtype)
        return (None, None, None, None, *result)


def _grad_buffer(x: Tensor) -> Tensor:
    # Accumulate half-precision gradients (e.g. a bf16 head weight summed over chunks) in fp32.
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return torch.zeros_like(x, dtype=dtype)


def _chunked_sum(
    fn: Callable[..., Tensor],
    seq_args: Sequence[Tensor],
    const_args: Sequence[Tensor],
    mask: Tensor,
    chunk: int | None,
) -> Tensor:
    """Sum of ``fn`` over masked positions, in chunks of ``chunk`` positions along T.

    seq_args: tensors shaped (B, T, ...) sliced per chunk; const_args: passed whole (e.g. head
    weights); mask: (..., B, T). fn(*seq_chunks, *const_args) -> (..., B, c). Returns (...,).
    With gradients on, ``_EagerChunkedSum`` takes each chunk's gradient as it goes, so only
    one chunk's (B, c, V) temporaries exist at a time, in forward and in backward.
    chunk=None computes everything in one piece through plain autograd (the reference path).
    """
    T = mask.shape[-1]
    if chunk is None:
        return _masked_sum(fn, mask, *seq_args, *const_args)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    tensors = (*seq_args, *const_args)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _EagerChunkedSum.apply(fn, mask, chunk, len(seq_args), *tensors)
    total = _masked_sum(fn, mask[..., :chunk], *[x[:, :chunk] for x in seq_args], *const_args)
    for start in range(chunk, T, chunk):
        xs = [x[:, start : start + chunk] for x in seq_args]
        total = total + _masked_sum(fn, mask[..., start : start + chunk], *xs, *const_args)
    return total


def _count(mask: Tensor) -> Tensor:
    """Number of masked positions, at least 1 so an all-masked batch divides 0 by 1."""
    return (mask > 0).sum(dim=(-2, -1)).clamp_min(1)


def _ce_per_pos(logits: Tensor, targets: Tensor) -> Tensor:
    """logits (B, c, V), targets (B, c) int64 -> per-position CE (B, c)."""
    logits = _compute_dtype(logits)
    B, c, V = logits.shape
    return F.cross_entropy(logits.reshape(B * c, V), targets.reshape(B * c), reduction="none").view(
        B, c
    )


# ----------------------------------------------------------------------------- CE


def ce_loss(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> Tensor:
    """Masked next-token cross-entropy.

    logits (B, T, V); input_ids (B, T) int; loss_mask (B, T) aligned with logits.
    Returns a scalar: mean over masked positions t < T - 1 of -log softmax(logits[t])[ids[t+1]].
    """
    targets, mask = next_token_targets(input_ids, loss_mask)
    return _masked_sum(_ce_per_pos, mask, logits, targets) / _count(mask)


def chunked_ce_from_hidden(
    hidden: Tensor, head_weight: Tensor, input_ids: Tensor, loss_mask: Tensor, chunk: int = 128
) -> Tensor:
    """``ce_loss(hidden @ head_weight.T, ...)`` without materializing the (B, T, V) logits.

    hidden (B, T, H); head_weight (V, H); input_ids (B, T); loss_mask (B, T). Returns a scalar.
    """
    targets, mask = next_token_targets(input_ids, loss_mask)

    def fn(h: Tensor, tgt: Tensor, w: Tensor) -> Tensor:
        return _ce_per_pos(h @ w.T, tgt)  # (B, c)

    return _chunked_sum(fn, [hidden, targets], [head_weight], mask, chunk) / _count(mask)


# ----------------------------------------------------------------------------- full-vocab KD


def _full_kd_per_pos(s_logits: Tensor, t_logits: Tensor, kd: KD) -> Tensor:
    """s_logits, t_logits (B, c, V) -> tau^2-scaled divergence per position (B, c)."""
    tau = kd.temperature
    s_logp = F.log_softmax(_compute_dtype(s_logits) / tau, dim=-1)
    t_logp = F.log_softmax(_compute_dtype(t_logits).to(s_logp.dtype) / tau, dim=-1)
    div = _divergence(s_logp, t_logp, kd.kind, kd.beta, _full_valid(s_logp, t_logp))
    return div * tau**2


def full_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    loss_mask: Tensor,
    kd: KD,
) -> Tensor:
    """Full-vocabulary KD, chunked along the sequence (``kd.chunk`` positions at a time).

    student_logits (B, T, V); teacher_logits (B, T, V) (no grad needed); loss_mask (B, T).
    Returns a scalar: tau^2 * mean over masked positions of the ``kd.kind`` divergence.
    """

    def fn(s: Tensor, t: Tensor) -> Tensor:
        return _full_kd_per_pos(s, t, kd)

    total = _chunked_sum(fn, [student_logits, teacher_logits], [], loss_mask, kd.chunk)
    return total / _count(loss_mask)


def chunked_kd_from_hidden(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_head_weight: Tensor,
    loss_mask: Tensor,
    kd: KD,
) -> Tensor:
    """``full_kd_loss`` of the two heads' logits, applying the heads per chunk.

    student_hidden (B, T, H); student_head_weight (V, H); teacher_hidden (B, T, Ht);
    teacher_head_weight (V, Ht); loss_mask (B, T). Returns a scalar. Peak extra memory is a few
    (B, kd.chunk, V) tensors in forward and in backward.
    """

    def fn(sh: Tensor, th: Tensor, sw: Tensor, tw: Tensor) -> Tensor:
        return _full_kd_per_pos(sh @ sw.T, th @ tw.T, kd)  # (B, c)

    seq, const = [student_hidden, teacher_hidden], [student_head_weight, teacher_head_weight]
    return _chunked_sum(fn, seq, const, loss_mask, kd.chunk) / _count(loss_mask)


# ----------------------------------------------------------------------------- top-k KD


def _head_and_tail(logp_k: Tensor, valid: Tensor, temperature: float) -> Tensor:
    """k stored log-probs -> log-probs over k + 1 outcomes (k ids, then the tail) at tau.

    logp_k (..., k) temperature-1 log-probs of the k ids; valid (..., k) bool. Returns
    (..., k + 1): log(head) + log_softmax_k(logp_k / tau) for the ids, log(tail) last.
    """
    logp_k = torch.where(valid, logp_k, _NEG)
    log_head = torch.logsumexp(logp_k, dim=-1, keepdim=True).clamp(max=0.0)  # (..., 1)
    log_tail = torch.log((-torch.expm1(log_head)).clamp(min=_TINY_TAIL))  # (..., 1)
    inner = F.log_softmax(torch.where(valid, logp_k / temperature, _NEG), dim=-1)  # (..., k)
    return torch.cat([log_head + inner, log_tail], dim=-1)


def _topk_kd_per_pos(
    s_logits: Tensor, ids: Tensor, t_logp: Tensor, kd: KD, probe: Probe | None = None
) -> Tensor:
    """s_logits (B, c, V); ids (B, c, k); t_logp (B, c, k) -> tau^2 * divergence (B, c)."""
    s_all = F.log_softmax(_compute_dtype(s_logits), dim=-1)  # (B, c, V), temperature 1
    return _topk_kd_from_logp(s_all, ids, t_logp, kd, probe)


def _topk_kd_from_logp(
    s_all: Tensor, ids: Tensor, t_logp: Tensor, kd: KD, probe: Probe | None = None
) -> Tensor:
    """Like ``_topk_kd_per_pos`` from the student's temperature-1 log-probs s_all (B, c, V).
    ``probe``: receives the student's mass on the stored ids (raydapt.train.diagnostics)."""
    t_logp = t_logp.to(s_all.dtype)
    valid = t_logp > float("-inf")  # (B, c, k); padded slots are -inf
    ids = torch.where(valid, ids.long(), 0)  # padded ids may be anything, e.g. -1
    s_k = s_all.gather(-1, ids)  # (B, c, k)
    if probe is not None:
        probe.add(torch.where(valid, s_k.detach().exp(), 0.0).sum(-1))
    s_out = _head_and_tail(s_k, valid, kd.temperature)  # (B, c, k + 1)
    t_out = _head_and_tail(t_logp, valid, kd.temperature)  # (B, c, k + 1)
    valid_out = torch.cat([valid, torch.ones_like(valid[..., :1])], dim=-1)
    return _divergence(s_out, t_out, kd.kind, kd.beta, valid_out) * kd.temperature**2


def topk_kd_loss(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    loss_mask: Tensor,
    kd: KD,
    probe: Probe | None = None,
) -> Tensor:
    """KD against stored teacher top-k log-probs, exact over k ids + a tail bucket.

    student_logits (B, T, V); topk_ids (B, T, k) int; topk_logprobs (B, T, k) float (teacher
    log-probs at temperature 1, -inf on padded slots); loss_mask (B, T). Returns a scalar.
    Equals ``full_kd_loss`` when k = V. See the module docstring for how tau applies.
    ``probe``: gets the student's mass on the stored ids per position.
    """

    def fn(s: Tensor, ids: Tensor, lp: Tensor) -> Tensor:
        return _topk_kd_per_pos(s, ids, lp, kd, probe)

    total = _chunked_sum(fn, [student_logits, topk_ids, topk_logprobs], [], loss_mask, kd.chunk)
    return total / _count(loss_mask)


def chunked_distill_from_hidden(
    hidden: Tensor,
    head_weight: Tensor,
    input_ids: Tensor,
    loss_mask: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    kd: KD,
    probe: Probe | None = None,
) -> tuple[Tensor, Tensor]:
    """(top-k KD, CE) from the student's hidden states, one head matmul per chunk for both.

    hidden (B, T, H); head_weight (V, H); input_ids (B, T); loss_mask (B, T); topk_ids and
    topk_logprobs (B, T, k). Returns (kd, ce) scalars equal to ``topk_kd_loss`` and ``ce_loss``
    of ``hidden @ head_weight.T``, without the (B, T, V) logits. ``probe`` as in topk_kd_loss.
    """
    targets, ce_mask = next_token_targets(input_ids, loss_mask)
    masks = torch.stack([loss_mask.to(ce_mask.dtype), ce_mask])  # (2, B, T)

    def fn(h: Tensor, tgt: Tensor, ids: Tensor, lp: Tensor, w: Tensor) -> Tensor:
        s_all = F.log_softmax(_compute_dtype(h @ w.T), dim=-1)  # (B, c, V), shared by both
        kd_pos = _topk_kd_from_logp(s_all, ids, lp, kd, probe)
        ce = -s_all.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # (B, c)
        return torch.stack([kd_pos, ce])  # (2, B, c)

    seq = [hidden, targets, topk_ids, topk_logprobs]
    sums = _chunked_sum(fn, seq, [head_weight], masks, kd.chunk) / _count(masks)  # (2,)
    return sums[0], sums[1]


# ----------------------------------------------------------------------------- the mix


def distill_loss(
    kd: Tensor | None, ce: Tensor | None, alpha: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """loss = alpha * kd + (1 - alpha) * ce, and detached parts for logging.

    kd, ce: scalars (either may be None when its weight is 0). alpha = 0 is pure CE and
    alpha = 1 pure KD exactly: the zero-weight term is left out, so a non-finite one cannot
    leak in as 0 * inf.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    parts: dict[str, Tensor] = {}
    terms: list[Tensor] = []
    if kd is not None:
        parts["kd"] = kd.detach()
    if ce is not None:
        parts["ce"] = ce.detach()
    if alpha > 0.0:
        if kd is None:
            raise ValueError(f"alpha={alpha} needs a KD loss, got kd=None")
        terms.append(kd if alpha == 1.0 else alpha * kd)
    if alpha < 1.0:
        if ce is None:
            raise ValueError(f"alpha={alpha} needs a CE loss, got ce=None")
        terms.append(ce if alpha == 0.0 else (1.0 - alpha) * ce)
    loss = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    return loss, parts


# ----------------------------------------------------------------------------- on-policy


def sampled_reverse_kl(s_token_logp: Tensor, t_token_logp: Tensor, loss_mask: Tensor) -> Tensor:
    """Per-token reverse KL on the student's own samples: the k1 estimator, as a loss.

    s_token_logp, t_token_logp (B, T): log q and log p of the token the student sampled next
    (position t: the token at t + 1); loss_mask (B, T) as everywhere here.

    Why a surrogate: at a position where the student drew x ~ q, log q(x) - log p(x) is an
    unbiased estimate of KL(q || p), and since E_q[grad log q] = 0,
    grad KL(q || p) = E_q[(log q(x) - log p(x)) grad log q(x)]. So the loss is the mean over
    masked positions of stopgrad(log q(x) - log p(x)) * log q(x): its gradient is the
    estimator (unbiased only while the samples come from the current student at temperature
    1; stale or tempered samples bias it). Its value is not the KL: log the mean of
    log q - log p (`sampled_kl_estimate`) for that. Needs only one teacher log-prob per
    token, so it works with any k, but its variance is what the exact top-k form avoids.
    """
    s = _compute_dtype(s_token_logp)
    adv = (s - _compute_dtype(t_token_logp)).detach()
    mask = loss_mask > 0
    return torch.where(mask, adv * s, 0.0).sum() / mask.sum().clamp_min(1)


def sampled_kl_estimate(s_token_logp: Tensor, t_token_logp: Tensor, loss_mask: Tensor) -> Tensor:
    """Mean over masked positions of log q(x) - log p(x): the k1 estimate of KL(q || p)."""
    mask = loss_mask > 0
    d = (_compute_dtype(s_token_logp) - _compute_dtype(t_token_logp)).detach()
    return torch.where(mask, d, 0.0).sum() / mask.sum().clamp_min(1)
