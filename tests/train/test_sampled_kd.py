"""Tests for raydapt.train.sampled_kd against plain dense references written out below.

Run: .venv/bin/python -m pytest tests/train/test_sampled_kd.py -q   (pure torch, no Ray)

Statistical tests use fixed generators, and tolerances derived from the estimator's variance:
Bernstein's inequality where the variance is known (many draws), the replicates' standard error
with a Bonferroni-corrected normal quantile where it is estimated (many small draws). Each is
set for a family-wise false-alarm probability of at most 1e-4 per test.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

from raydapt.train import losses as L
from raydapt.train import sampled_kd as S

torch.set_num_threads(1)
F64 = torch.float64
FAMILY_ALPHA = 1e-4  # false-alarm probability per statistical test, over all its elements


# ----------------------------------------------------------------------------- references


def ref_target(logp, head, tau):
    """The documented target at tau: head ids and the rest each keep their temperature-1 mass,
    which is spread inside the part as softmax(log p / tau). logp (V,) temperature-1 log-probs."""
    V = logp.shape[0]
    out = [None] * V
    tail = [v for v in range(V) if v not in head]
    for part in (list(head), tail):
        if part:
            idx = torch.tensor(part)
            inner = torch.softmax(logp[idx] / tau, -1)
            for j, v in enumerate(part):
                out[v] = logp[idx].exp().sum() * inner[j]
    return torch.stack(out)


def ref_kd(z, t_logits, heads, mask, tau):
    """tau^2 * mean over masked positions of (H(p', q'), KL(p' || q')), position by position.

    heads[b][t]: the teacher's head ids there ([] for ``sampled``, all V for dense)."""
    B, T, _ = z.shape
    ce, kl, n = 0.0, 0.0, 0
    for b in range(B):
        for i in range(T):
            if not mask[b, i]:
                continue
            p = ref_target(torch.log_softmax(t_logits[b, i], -1), heads[b][i], tau)
            q = ref_target(torch.log_softmax(z[b, i], -1), heads[b][i], tau)
            keep = p > 0
            ce = ce - (p[keep] * q[keep].log()).sum() * tau**2
            kl = kl + (p[keep] * (p[keep].log() - q[keep].log())).sum() * tau**2
            n += 1
    return ce / max(n, 1), kl / max(n, 1)


def tail_target(t_logits, heads, tau):
    """(pi, a): the distribution the draws come from (B, T, V), and the mass they stand for
    (B, T): pi = p' restricted to the tail and renormalised, a = the teacher's tail mass."""
    B, T, V = t_logits.shape
    pi = torch.zeros(B, T, V, dtype=F64)
    a = torch.zeros(B, T, dtype=F64)
    for b in range(B):
        for i in range(T):
            p = ref_target(torch.log_softmax(t_logits[b, i], -1), heads[b][i], tau)
            tail = torch.ones(V, dtype=torch.bool)
            tail[list(heads[b][i])] = False
            a[b, i] = p[tail].sum()
            pi[b, i, tail] = p[tail] / a[b, i]
    return pi, a


# ----------------------------------------------------------------------------- data


def make(seed, B, T, V, scale=1.5, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, T, V, generator=g, dtype=dtype) * scale).requires_grad_()
    t = torch.randn(B, T, V, generator=g, dtype=dtype) * scale
    mask = (torch.rand(B, T, generator=g) < 0.7).to(torch.uint8)
    mask[0, 0] = 1
    return z, t, mask, g


def heads_of(topk_ids, topk_lp):
    B, T, _ = topk_ids.shape
    return [
        [
            [int(x) for x, lp in zip(topk_ids[b, i], topk_lp[b, i]) if lp > -math.inf]
            for i in range(T)
        ]
        for b in range(B)
    ]


def multinomial_counts(pi, s, g):
    """Counts of s draws from each row of pi (..., V), without materialising the draws: one
    binomial per id, conditional on the draws left (the chain rule of the multinomial)."""
    rest = pi.flip(-1).cumsum(-1).flip(-1)  # mass of ids v.. V-1; equals pi_v at the last one
    prob = torch.where(rest > 0, pi / rest, 0.0).clamp(0.0, 1.0)
    left = torch.full(pi.shape[:-1], float(s), dtype=F64)
    counts = torch.zeros_like(pi)
    for v in range(pi.shape[-1]):
        counts[..., v] = torch.binomial(left, prob[..., v].contiguous(), generator=g)
        left = left - counts[..., v]
    assert float(left.abs().max()) == 0.0
    return counts.long()


def grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


def bernstein(var, bound, delta):
    """Deviation a sum of independent centred terms (each |.| <= bound, total variance var)
    exceeds with probability at most delta: sqrt(2 var L) + 2 bound L / 3, L = log(2/delta)."""
    lg = math.log(2.0 / delta)
    return (2.0 * var * lg) ** 0.5 + 2.0 * bound * lg / 3.0


def call(kind, z, topk, ids, counts, mask, kd, entropy=None):
    if kind == "sampled":
        return S.sampled_kd_loss(z, ids, counts, mask, kd, entropy)
    return S.topk_sampled_kd_loss(z, *topk, ids, counts, mask, kd, entropy)


# ----------------------------------------------------------------------------- (1) s -> inf


@pytest.mark.parametrize(
    "kind,k,tau",
    [("sampled", 0, 1.0), ("sampled", 0, 2.0), ("topk+sampled", 4, 1.0), ("topk+sampled", 4, 0.5)],
)
def test_many_draws_approach_the_dense_loss_and_gradient(kind, k, tau):
    """s = 200k draws (as counts): loss, exact-entropy kl and gradient are within the
    Bernstein deviation of the dense reference at failure probability FAMILY_ALPHA."""
    s = 200_000
    z, t, mask, g = make(1, 2, 4, 24)
    topk_ids, topk_lp, _, _ = S.topk_plus_samples(t, k, 1, g, tau)
    heads = heads_of(topk_ids, topk_lp)
    pi, a = tail_target(t, heads, tau)
    counts = multinomial_counts(pi, s, g)
    ids = torch.arange(24).expand_as(counts)
    kd = L.KD("forward_kl", tau, chunk=3)
    ent = S.target_entropy(t, k, tau)
    got = call(kind, z, (topk_ids, topk_lp), ids, counts, mask, kd, ent)
    ce, kl = ref_kd(z, t, heads, mask, tau)
    if kind == "sampled":  # the reference is the repo's own dense forward KL here
        assert abs(float((kl - L.full_kd_loss(z, t, mask, kd)).detach())) < 1e-12

    n = int(mask.sum())
    m = mask.bool()
    delta = FAMILY_ALPHA / (z.numel() + 2)
    # gradient: per element, (a tau / n) (pi_v - count_v / s), a mean of s bounded draws
    coef = (a * tau / n * m)[..., None]
    g_tol = bernstein(coef**2 * pi * (1 - pi) / s, coef / s, delta) + 1e-12
    diff = (grad(got.loss, z) - grad(ce, z)).abs()
    assert bool((diff <= g_tol).all()), float((diff / g_tol).max())
    # value: (a tau^2 / n) sum_v (count_v / s - pi_v) ell_v, ell = -log q' on the draws' support
    q = torch.stack(
        [
            ref_target(torch.log_softmax(z.detach()[b, i], -1), heads[b][i], tau)
            for b in range(2)
            for i in range(4)
        ]
    ).view_as(pi)
    ell = torch.where(pi > 0, -q.clamp_min(1e-300).log(), 0.0)
    centred = torch.where(pi > 0, ell - (pi * ell).sum(-1, keepdim=True), 0.0)
    scale = a * tau**2 / n * m
    var = float((scale**2 * (pi * centred**2).sum(-1) / s).sum())
    bound = float((scale * centred.abs().amax(-1) / s).max())
    v_tol = bernstein(var, bound, delta) + 1e-12
    assert abs(float((got.loss - ce).detach())) <= v_tol
    assert abs(float((got.kl - kl).detach())) <= v_tol  # the exact entropy is subtracted from both


# ----------------------------------------------------------------------------- (2) unbiased


def _replicated_grads(kind, z, t, mask, k, s, tau, R, g, biased=False):
    """R independent signals of s draws each, batched: (R, B, T, V) gradients of the loss."""
    B, T, V = z.shape
    reps = z.detach().expand(R, B, T, V).clone().requires_grad_()
    t_rep = t.expand(R, B, T, V).reshape(R * B, T, V)
    topk_ids, topk_lp, ids, counts = S.topk_plus_samples(t_rep, k, s, g, tau)
    if kind == "sampled":
        ids, counts = S.draw_samples(t_rep, s, g, tau)
    if biased:  # unique draws weighted equally: what a deduplicating store would do
        counts = counts.clamp(max=1)
    kd = L.KD("forward_kl", tau)
    res = call(
        kind, reps.view(R * B, T, V), (topk_ids, topk_lp), ids, counts, mask.repeat(R, 1), kd
    )
    # the batched loss is (1/R) sum_r loss_r, so each replicate's gradient is R * its slice
    return grad(res.loss, reps) * R, heads_of(topk_ids[:B], topk_lp[:B])


def _z_bonferroni(n_tests):
    return NormalDist().inv_cdf(1.0 - FAMILY_ALPHA / (2 * max(n_tests, 1)))


@pytest.mark.parametrize(
    "kind,k,tau",
    [("sampled", 0, 1.0), ("sampled", 0, 2.0), ("topk+sampled", 3, 1.0), ("topk+sampled", 3, 2.0)],
)
def test_small_draws_give_the_dense_gradient_in_expectation(kind, k, tau):
    """s = 12 draws, R = 4000 replicates: the mean gradient is within z * standard error of the
    dense gradient, element by element (Bonferroni z over the elements that vary; elements
    that do not vary, masked positions and the exact head, must match to rounding)."""
    R, s = 4000, 12
    z, t, mask, g = make(2, 2, 3, 10, scale=1.0)
    grads, heads = _replicated_grads(kind, z, t, mask, k, s, tau, R, g)
    dense = grad(ref_kd(z, t, heads, mask, tau)[0], z)
    mean, se = grads.mean(0), grads.std(0) / R**0.5
    zq = _z_bonferroni(int((se > 0).sum()))
    assert bool(((mean - dense).abs() <= zq * se + 1e-12).all()), float(
        ((mean - dense).abs() / (zq * se + 1e-12)).max()
    )
    if kind == "sampled" and tau == 1.0:  # the test has power: a biased estimator fails it
        bad, _ = _replicated_grads(kind, z, t, mask, k, s, tau, R, g, biased=True)
        bad_se = bad.std(0) / R**0.5
        assert bool(((bad.mean(0) - dense).abs() > zq * bad_se + 1e-12).any())


# ----------------------------------------------------------------------------- (3) limits


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 1e-6)])
def test_topk_equal_v_is_the_dense_loss(tau, dtype, tol):
    """k' = V: no tail, so the loss is the dense CE and kl the dense forward KL (tol relative)."""
    z, t, mask, g = make(3, 2, 5, 9, dtype=dtype)
    topk_ids, topk_lp, ids, counts = S.topk_plus_samples(t, 9, 6, g, tau)
    assert int(counts.sum()) == 0  # no tail left to draw from
    kd = L.KD("forward_kl", tau, chunk=2)
    got = S.topk_sampled_kd_loss(z, topk_ids, topk_lp, ids, counts, mask, kd)
    full = L.full_kd_loss(z, t, mask, kd)
    ent = S.target_entropy(t, 0, tau)
    dense_ce = full + tau**2 * (ent * mask).sum() / mask.sum()
    # relative: the kl is CE - H, so float32 carries the rounding of the larger CE
    scale = max(1.0, float(dense_ce.detach()))
    assert abs(float((got.kl - full).detach())) < tol * scale
    assert abs(float((got.loss - dense_ce).detach())) < tol * scale
    assert (grad(got.loss, z) - grad(full, z)).abs().max() < tol


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_topk_zero_is_sampled(tau):
    z, t, mask, g = make(4, 3, 4, 11)
    ids, counts = S.draw_samples(t, 12, g, tau)
    empty_ids = torch.empty(3, 4, 0, dtype=torch.long)
    empty_lp = torch.empty(3, 4, 0, dtype=F64)
    for chunk in (None, 3):
        kd = L.KD("forward_kl", tau, chunk=chunk)
        a = S.sampled_kd_loss(z, ids, counts, mask, kd)
        b = S.topk_sampled_kd_loss(z, empty_ids, empty_lp, ids, counts, mask, kd)
        assert abs(float((a.loss - b.loss).detach())) < 1e-12 and abs(float(a.kl - b.kl)) < 1e-12
        assert (grad(a.loss, z) - grad(b.loss, z)).abs().max() < 1e-12
    # and topk_plus_samples with k = 0 draws from the whole distribution
    _, _, ids0, counts0 = S.topk_plus_samples(t, 0, 12, torch.Generator().manual_seed(7), tau)
    ids1, counts1 = S.draw_samples(t, 12, torch.Generator().manual_seed(7), tau)
    assert torch.equal(ids0, ids1) and torch.equal(counts0, counts1)


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_expected_counts_give_the_reference_exactly(k, tau):
    """The loss is linear in count / s, so feeding the draws' expectation (real-valued counts
    proportional to the tail target) must give the dense reference H(p', q') at any k'."""
    z, t, mask, g = make(5, 2, 4, 9)
    topk_ids, topk_lp, _, _ = S.topk_plus_samples(t, k, 1, g, tau)
    topk_lp = topk_lp.clone()
    topk_lp[0, 1, -1] = -math.inf  # a padded top-k slot: that id joins the tail
    heads = heads_of(topk_ids, topk_lp)
    pi, _ = tail_target(t, heads, tau)
    ids = torch.arange(9).expand_as(pi)
    kd = L.KD("forward_kl", tau)
    got = S.topk_sampled_kd_loss(z, topk_ids, topk_lp, ids, pi * 1000.0, mask, kd)
    ce, kl = ref_kd(z, t, heads, mask, tau)
    assert abs(float((got.loss - ce).detach())) < 1e-10
    assert abs(float((got.kl - kl).detach())) < 1e-10  # the plug-in entropy is exact here
    assert (grad(got.loss, z) - grad(ce, z)).abs().max() < 1e-10


@pytest.mark.parametrize("k", [0, 3, 9])
@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
def test_target_entropy_matches_reference(k, tau):
    _, t, _, g = make(6, 2, 3, 9)
    got = S.target_entropy(t, k, tau)
    topk_ids, topk_lp, _, _ = S.topk_plus_samples(t, k, 1, g)
    heads = heads_of(topk_ids, topk_lp)
    for b in range(2):
        for i in range(3):
            p = ref_target(torch.log_softmax(t[b, i], -1), heads[b][i], tau)
            assert abs(float(got[b, i] + (p * p.log()).sum())) < 1e-10


def test_plugin_kl_is_the_kl_of_the_stored_target():
    """Without teacher_entropy, kl = KL(stored sparse target || q') exactly, hence >= 0."""
    tau = 2.0
    z, t, mask, g = make(7, 2, 4, 10)
    topk_ids, topk_lp, ids, counts = S.topk_plus_samples(t, 3, 12, g, tau)
    got = S.topk_sampled_kd_loss(z, topk_ids, topk_lp, ids, counts, mask, L.KD("forward_kl", tau))
    heads = heads_of(topk_ids, topk_lp)
    want, n = 0.0, 0
    for b in range(2):
        for i in range(4):
            if not mask[b, i]:
                continue
            p = ref_target(torch.log_softmax(t[b, i], -1), heads[b][i], tau)
            q = ref_target(torch.log_softmax(z.detach()[b, i], -1), heads[b][i], tau)
            tail_mass = 1.0 - float(p[heads[b][i]].sum())
            stored = torch.zeros(10, dtype=F64)
            stored[heads[b][i]] = p[heads[b][i]]
            c = counts[b, i].double()
            stored.index_add_(0, ids[b, i], tail_mass * c / c.sum())
            keep = stored > 0
            want += float((stored[keep] * (stored[keep] / q[keep]).log()).sum()) * tau**2
            n += 1
    assert abs(float(got.kl) - want / n) < 1e-10 and float(got.kl) >= 0.0


# ----------------------------------------------------------------------------- (4) mask, pad


@pytest.mark.parametrize("kind", ["sampled", "topk+sampled"])
def test_masked_positions_and_padding_slots_contribute_nothing(kind):
    z, t, mask, g = make(8, 2, 5, 12)
    mask[1, 2] = 0
    topk_ids, topk_lp, ids, counts = S.topk_plus_samples(t, 2, 6, g)
    if kind == "sampled":
        ids, counts = S.draw_samples(t, 6, g)
    kd = L.KD("forward_kl", chunk=2)
    base = call(kind, z, (topk_ids, topk_lp), ids, counts, mask, kd)
    g_base = grad(base.loss, z)
    assert float(g_base[1, 2].abs().max()) == 0.0  # a masked position gets no gradient

    # anything at a masked position: logits, ids, counts, top-k
    z2 = z.detach().clone()
    z2[1, 2] = torch.randn(12, dtype=F64) * 50
    z2.requires_grad_()
    ids2, counts2, tk_lp2 = ids.clone(), counts.clone(), topk_lp.clone()
    ids2[1, 2], counts2[1, 2], tk_lp2[1, 2] = 7, 3, -0.1
    other = call(kind, z2, (topk_ids, tk_lp2), ids2, counts2, mask, kd)
    assert float(other.loss.detach()) == float(base.loss.detach()) and float(other.kl) == float(
        base.kl
    )
    assert torch.equal(grad(other.loss, z2), g_base)

    # extra count-0 slots with any ids (-1, out of range, a real id) change nothing
    pad_ids = torch.tensor([-1, 10**6, 3]).expand(2, 5, 3)
    ids3 = torch.cat([ids, pad_ids], -1)
    counts3 = torch.cat([counts, torch.zeros(2, 5, 3, dtype=counts.dtype)], -1)
    padded = call(kind, z, (topk_ids, topk_lp), ids3, counts3, mask, kd)
    assert abs(float((padded.loss - base.loss).detach())) < 1e-12
    assert abs(float(padded.kl - base.kl)) < 1e-12
    assert (grad(padded.loss, z) - g_base).abs().max() < 1e-12


@pytest.mark.parametrize("kind", ["sampled", "topk+sampled"])
def test_chunked_equals_unchunked(kind):
    z, t, mask, g = make(9, 2, 7, 10)
    topk_ids, topk_lp, ids, counts = S.topk_plus_samples(t, 3, 8, g, 2.0)
    if kind == "sampled":
        ids, counts = S.draw_samples(t, 8, g, 2.0)
    ref = call(kind, z, (topk_ids, topk_lp), ids, counts, mask, L.KD("forward_kl", 2.0, chunk=None))
    g_ref = grad(ref.loss, z)
    for chunk in (1, 3, 128):
        kd = L.KD("forward_kl", 2.0, chunk=chunk)
        got = call(kind, z, (topk_ids, topk_lp), ids, counts, mask, kd)
        assert (
            abs(float((got.loss - ref.loss).detach())) < 1e-12
            and abs(float(got.kl - ref.kl)) < 1e-12
        )
        assert (grad(got.loss, z) - g_ref).abs().max() < 1e-12


@pytest.mark.parametrize("kind", ["sampled", "topk+sampled"])
def test_all_masked_is_zero_with_grad_fn_and_finite_grads(kind):
    z, t, _, g = make(10, 2, 3, 8)
    topk_ids, topk_lp, ids, counts = S.topk_plus_samples(t, 2, 4, g)
    zero = torch.zeros(2, 3, dtype=torch.uint8)
    got = call(kind, z, (topk_ids, topk_lp), ids, counts, zero, L.KD())
    assert float(got.loss.detach()) == 0.0 and float(got.kl) == 0.0 and got.loss.grad_fn is not None
    gz = grad(got.loss, z)
    assert torch.isfinite(gz).all() and float(gz.abs().max()) == 0.0


def test_extreme_and_half_precision_inputs_stay_finite():
    V, k = 40, 4
    z = torch.zeros(1, 3, V)
    z[0, 0, :k] = 80.0  # student ~all mass on the head: student tail ~0
    z[0, 1, k:] = 80.0  # ~all mass in the tail
    z = z.bfloat16().requires_grad_()
    t = torch.zeros(1, 3, V)
    t[0, 2, 0] = 200.0  # one-hot teacher: a tail of ~0 with draws still stored
    topk_ids, topk_lp, ids, counts = S.topk_plus_samples(t, k, 5, torch.Generator().manual_seed(0))
    for tau in (0.5, 1.0, 4.0):
        kd = L.KD("forward_kl", tau)
        got = S.topk_sampled_kd_loss(z, topk_ids, topk_lp.half(), ids, counts, torch.ones(1, 3), kd)
        assert torch.isfinite(got.loss) and torch.isfinite(got.kl)
        assert torch.isfinite(grad(got.loss, z).float()).all()


# ----------------------------------------------------------------------------- teacher side


def test_draw_samples_layout():
    _, t, _, g = make(11, 2, 3, 6)
    ids, counts = S.draw_samples(t, 10, g)
    assert ids.shape == counts.shape == (2, 3, 10)
    assert bool((counts.sum(-1) == 10).all())
    for b in range(2):
        for i in range(3):
            used = counts[b, i] > 0
            u = int(used.sum())
            assert bool(used[:u].all()) and not bool(used[u:].any())  # padding at the end
            assert bool((ids[b, i, : u - 1] < ids[b, i, 1:u]).all())  # unique, ascending
            assert bool((ids[b, i, u:] == 0).all())


def test_topk_plus_samples_draws_only_outside_the_head():
    _, t, _, g = make(12, 2, 3, 7)
    topk_ids, topk_lp, ids, counts = S.topk_plus_samples(t, 3, 20, g)
    want_lp, want_ids = torch.log_softmax(t, -1).topk(3, -1)
    assert torch.equal(topk_ids, want_ids) and torch.allclose(topk_lp, want_lp)
    assert bool((counts.sum(-1) == 20).all())
    drawn = counts > 0
    in_head = (ids.unsqueeze(-1) == topk_ids.unsqueeze(-2)).any(-1)
    assert not bool((drawn & in_head).any())
    with pytest.raises(ValueError):
        S.topk_plus_samples(t, 8, 4, g)


def test_only_forward_kl_is_accepted():
    z, t, mask, g = make(13, 1, 2, 5)
    ids, counts = S.draw_samples(t, 4, g)
    for kind in ("reverse_kl", "jsd"):
        with pytest.raises(ValueError, match="forward KL"):
            S.sampled_kd_loss(z, ids, counts, mask, L.KD(kind))


# ----------------------------------------------------------------------------- (5) storage


def test_count_dtype_is_the_one_the_targets_store():
    from raydapt.targets import count_type

    for s in (1, 255, 256, 32767):
        assert S.count_dtype_for(s) == str(count_type(s))


def test_bytes_per_token():
    assert S.bytes_per_token("topk", 64) == 64 * (4 + 2)
    assert S.bytes_per_token("sampled", s=12) == 12 * (4 + 1)  # uint8 counts
    assert S.bytes_per_token("sampled", s=300) == 300 * (4 + 2)  # uint16 counts
    assert S.bytes_per_token("topk+sampled", 8, 16) == 8 * 6 + 16 * 5
    assert S.bytes_per_token("topk+sampled", 8, 16, entropy=True) == 8 * 6 + 16 * 5 + 2
    assert S.bytes_per_token("topk", 8, id_dtype="uint16", logprob_dtype="float32") == 8 * 6
    assert S.bytes_per_token("sampled", s=12, count_dtype="int32") == 12 * 8
    for bad in [
        dict(kind="topk", k=4, s=2),
        dict(kind="sampled", k=2, s=4),
        dict(kind="full", k=4),
        dict(kind="sampled", s=300, count_dtype="uint8"),
        dict(kind="topk", k=4, id_dtype="int8"),
    ]:
        with pytest.raises(ValueError):
            S.bytes_per_token(**bad)


@pytest.mark.parametrize("kind,k,s", [("topk", 5, 0), ("sampled", 0, 12), ("topk+sampled", 3, 9)])
def test_bytes_per_token_matches_the_helpers_arrays(kind, k, s):
    """The documented layout, built from the helpers' outputs in the documented dtypes."""
    _, t, _, g = make(14, 2, 3, 50)
    topk_ids, topk_lp, ids, counts = S.topk_plus_samples(t, k, s, g)
    arrays = []
    if kind != "sampled":
        arrays += [topk_ids.to(torch.int32), topk_lp.to(torch.float16)]
    if kind != "topk":
        arrays += [ids.to(torch.int32), counts.to(torch.uint8)]
    nbytes = sum(a.numel() * a.element_size() for a in arrays)
    assert nbytes / 6 == S.bytes_per_token(kind, k, s)
