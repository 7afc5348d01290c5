"""Tests for raydapt.train.losses against plain dense references written out below.

Run: .venv/bin/python -m pytest tests/train/test_losses.py -q   (pure torch, no Ray, a few seconds)
"""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raydapt.train import losses as L

torch.set_num_threads(1)
F64 = torch.float64
SETTINGS = settings(max_examples=25, deadline=None)
TEMPS = st.sampled_from([0.5, 1.0, 2.0, 3.0])
BETAS = st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0])
KINDS = st.sampled_from(list(L.KINDS))


# ----------------------------------------------------------------------------- references


def ref_ce(logits, ids, mask):
    """Loop over positions: -log softmax(logits[b, t])[ids[b, t + 1]], mean over masked."""
    B, T, _ = logits.shape
    total, n = 0.0, 0
    for b in range(B):
        for t in range(T - 1):
            if mask[b, t]:
                total = total - torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]]
                n += 1
    return total / max(n, 1)


def ref_div(p, q, kind, beta):
    """Divergence between two probability vectors p (teacher) and q (student), plainly."""

    def kl(a, b):
        return sum(
            float(a[i]) * math.log(float(a[i]) / float(b[i])) for i in range(len(a)) if a[i] > 0
        )

    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return kl(p, q)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return kl(q, p)
    m = [beta * float(p[i]) + (1 - beta) * float(q[i]) for i in range(len(p))]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def ref_full_kd(s, t, mask, kind, tau, beta):
    B, T, _ = s.shape
    total, n = 0.0, 0
    for b in range(B):
        for i in range(T):
            if mask[b, i]:
                p = torch.softmax(t[b, i] / tau, -1)
                q = torch.softmax(s[b, i] / tau, -1)
                total += ref_div(p, q, kind, beta) * tau**2
                n += 1
    return total / max(n, 1)


def tempered_k_plus_1(head_logp, tau):
    """Documented convention: keep the tail mass, spread the head mass as softmax(log p / tau)."""
    head = sum(math.exp(x) for x in head_logp)
    tail = max(1.0 - head, 1e-30)  # the documented floor: a rounding-level tail stays finite
    inner = torch.softmax(torch.tensor(head_logp, dtype=F64) / tau, -1) if head_logp else []
    return [head * float(x) for x in inner] + [tail]


def ref_topk_kd(s, ids, lp, mask, kind, tau, beta):
    B, T, k = ids.shape
    total, n = 0.0, 0
    for b in range(B):
        for i in range(T):
            if not mask[b, i]:
                continue
            slots = [j for j in range(k) if lp[b, i, j] > float("-inf")]
            q_all = torch.softmax(s[b, i], -1)
            p = tempered_k_plus_1([float(lp[b, i, j]) for j in slots], tau)
            q = tempered_k_plus_1([math.log(float(q_all[ids[b, i, j]])) for j in slots], tau)
            total += ref_div(p, q, kind, beta) * tau**2
            n += 1
    return total / max(n, 1)


# ----------------------------------------------------------------------------- data


def make(seed, B, T, V, dtype=F64, scale=3.0, p_mask=0.6):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, T, V, generator=g, dtype=dtype) * scale).requires_grad_()
    t = torch.randn(B, T, V, generator=g, dtype=dtype) * scale
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) < p_mask).to(torch.uint8)
    return s, t, ids, mask


def topk_of(t, k):
    lp = torch.log_softmax(t, -1)
    vals, idx = lp.topk(k, dim=-1)
    return idx, vals


shapes = dict(
    seed=st.integers(0, 10_000), B=st.integers(1, 3), T=st.integers(1, 6), V=st.integers(2, 9)
)


# ----------------------------------------------------------------------------- vs references


@SETTINGS
@given(**shapes)
def test_ce_matches_reference(seed, B, T, V):
    s, _, ids, mask = make(seed, B, T, V)
    got = L.ce_loss(s, ids, mask)
    assert torch.allclose(got, torch.as_tensor(ref_ce(s, ids, mask), dtype=F64), atol=1e-10)


@SETTINGS
@given(kind=KINDS, tau=TEMPS, beta=BETAS, **shapes)
def test_full_kd_matches_reference(kind, tau, beta, seed, B, T, V):
    s, t, _, mask = make(seed, B, T, V)
    got = L.full_kd_loss(s, t, mask, L.KD(kind, tau, beta, chunk=2))
    want = ref_full_kd(s.detach(), t, mask, kind, tau, beta)
    assert abs(float(got.detach()) - want) < 1e-8


@SETTINGS
@given(kind=KINDS, tau=TEMPS, beta=BETAS, **shapes)
def test_full_kd_fp32_matches_reference(kind, tau, beta, seed, B, T, V):
    s, t, _, mask = make(seed, B, T, V, dtype=torch.float32)
    got = L.full_kd_loss(s, t, mask, L.KD(kind, tau, beta))
    want = ref_full_kd(s.detach().double(), t.double(), mask, kind, tau, beta)
    assert abs(float(got.detach()) - want) < 1e-4 * max(1.0, abs(want))


@SETTINGS
@given(kind=KINDS, tau=TEMPS, beta=BETAS, **shapes)
def test_topk_with_k_equal_v_is_full_kd(kind, tau, beta, seed, B, T, V):
    s, t, _, mask = make(seed, B, T, V)
    ids, lp = topk_of(t, V)
    got = L.topk_kd_loss(s, ids, lp, mask, L.KD(kind, tau, beta, chunk=4))
    want = L.full_kd_loss(s, t, mask, L.KD(kind, tau, beta))
    assert abs(float(got.detach()) - float(want.detach())) < 1e-8
    (g1,) = torch.autograd.grad(got, s)
    (g2,) = torch.autograd.grad(want, s)
    assert torch.allclose(g1, g2, atol=1e-7)


@SETTINGS
@given(kind=KINDS, tau=TEMPS, beta=BETAS, k=st.integers(1, 5), n_pad=st.integers(0, 2), **shapes)
def test_topk_matches_k_plus_1_reference(kind, tau, beta, k, n_pad, seed, B, T, V):
    k = min(k, V)
    s, t, _, mask = make(seed, B, T, V)
    ids, lp = topk_of(t, k)
    if n_pad:  # pad the last slots like a short top-k row: logprob -inf, id -1
        lp[..., k - min(n_pad, k) :] = float("-inf")
        ids[..., k - min(n_pad, k) :] = -1
    got = L.topk_kd_loss(s, ids, lp, mask, L.KD(kind, tau, beta))
    want = ref_topk_kd(s.detach(), ids, lp, mask, kind, tau, beta)
    assert abs(float(got.detach()) - want) < 1e-8
    (g,) = torch.autograd.grad(got, s)
    assert torch.isfinite(g).all()


def test_padded_slots_equal_dropped_slots():
    s, t, _, mask = make(1, 2, 5, 11)
    ids, lp = topk_of(t, 4)
    pad_ids = torch.cat([ids, torch.full_like(ids[..., :3], 7)], -1)  # pads reuse a real id
    pad_lp = torch.cat([lp, torch.full_like(lp[..., :3], float("-inf"))], -1)
    for kind in L.KINDS:
        a = L.topk_kd_loss(s, ids, lp, mask, L.KD(kind, temperature=2.0))
        b = L.topk_kd_loss(s, pad_ids, pad_lp, mask, L.KD(kind, temperature=2.0))
        assert torch.allclose(a, b, atol=1e-12), kind


def test_all_slots_padded_gives_zero_with_finite_grad():
    s, _, _, _ = make(2, 2, 3, 6)
    ids = torch.full((2, 3, 4), -1)
    lp = torch.full((2, 3, 4), float("-inf"))
    mask = torch.ones(2, 3)
    for kind in L.KINDS:
        loss = L.topk_kd_loss(s, ids, lp, mask, L.KD(kind))
        (g,) = torch.autograd.grad(loss, s)
        assert abs(float(loss.detach())) < 1e-12 and torch.isfinite(g).all(), kind


# ----------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_chunked_equals_unchunked_values_and_grads(kind, beta):
    s, t, ids, mask = make(3, 2, 13, 17)
    tk_ids, tk_lp = topk_of(t, 5)
    ref_full = L.full_kd_loss(s, t, mask, L.KD(kind, 2.0, beta, chunk=None))
    ref_topk = L.topk_kd_loss(s, tk_ids, tk_lp, mask, L.KD(kind, 2.0, beta, chunk=None))
    (g_full,) = torch.autograd.grad(ref_full, s)
    (g_topk,) = torch.autograd.grad(ref_topk, s)
    for chunk in (1, 3, 4, 5, 13, 64):
        full = L.full_kd_loss(s, t, mask, L.KD(kind, 2.0, beta, chunk))
        topk = L.topk_kd_loss(s, tk_ids, tk_lp, mask, L.KD(kind, 2.0, beta, chunk))
        assert torch.allclose(full, ref_full, atol=1e-12) and torch.allclose(topk, ref_topk)
        assert torch.allclose(torch.autograd.grad(full, s)[0], g_full, atol=1e-12)
        assert torch.allclose(torch.autograd.grad(topk, s)[0], g_topk, atol=1e-12)
        with torch.no_grad():  # the evaluation path, without gradient buffers
            no_grad = L.full_kd_loss(s, t, mask, L.KD(kind, 2.0, beta, chunk))
        assert torch.allclose(no_grad, ref_full, atol=1e-12) and no_grad.grad_fn is None


def _hidden_case(seed=4, B=2, T=11, H=6, Ht=9, V=23):
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(B, T, H, generator=g, dtype=F64, requires_grad=True)
    sw = torch.randn(V, H, generator=g, dtype=F64, requires_grad=True)
    th = torch.randn(B, T, Ht, generator=g, dtype=F64)
    tw = torch.randn(V, Ht, generator=g, dtype=F64)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) < 0.7).float()
    return sh, sw, th, tw, ids, mask


@pytest.mark.parametrize("chunk", [1, 4, 5, 64])
def test_hidden_variants_equal_head_then_loss(chunk):
    sh, sw, th, tw, ids, mask = _hidden_case()
    s_logits, t_logits = sh @ sw.T, th @ tw.T
    tk_ids, tk_lp = topk_of(t_logits, 4)
    pairs = [
        (
            L.chunked_kd_from_hidden(sh, sw, th, tw, mask, L.KD("jsd", 1.5, 0.4, chunk)),
            L.full_kd_loss(s_logits, t_logits, mask, L.KD("jsd", 1.5, 0.4, chunk=None)),
        ),
        (L.chunked_ce_from_hidden(sh, sw, ids, mask, chunk=chunk), L.ce_loss(s_logits, ids, mask)),
    ]
    kd, ce = L.chunked_distill_from_hidden(
        sh, sw, ids, mask, tk_ids, tk_lp, L.KD("reverse_kl", 2.0, chunk=chunk)
    )
    pairs += [
        (kd, L.topk_kd_loss(s_logits, tk_ids, tk_lp, mask, L.KD("reverse_kl", 2.0))),
        (ce, pairs[1][1]),
    ]
    for got, want in pairs:
        assert torch.allclose(got, want, atol=1e-12)
        g_got = torch.autograd.grad(got, (sh, sw), retain_graph=True)
        g_want = torch.autograd.grad(want, (sh, sw), retain_graph=True)
        for a, b in zip(g_got, g_want, strict=True):
            assert torch.allclose(a, b, atol=1e-10)


def _saved_bytes(fn) -> int:
    """Bytes of distinct storages that the graph of ``fn()`` still holds for backward."""
    refs = []

    def pack(x):
        refs.append(weakref.ref(x))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()  # kept alive while counting: its graph owns what backward will need
    gc.collect()
    storages = {}
    for r in refs:
        if (x := r()) is not None:
            storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
    del out
    return sum(storages.values())


def test_hidden_variant_keeps_no_full_logits_for_backward():
    B, T, H, V = 2, 64, 8, 512
    g = torch.Generator().manual_seed(0)
    sh = torch.randn(B, T, H, generator=g, requires_grad=True)
    sw = torch.randn(V, H, generator=g, requires_grad=True)
    th, tw = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g)
    mask = torch.ones(B, T)
    logits_bytes = B * T * V * 4
    naive = _saved_bytes(
        lambda: L.full_kd_loss(sh @ sw.T, th @ tw.T, mask, L.KD("forward_kl", chunk=None))
    )
    chunked = _saved_bytes(
        lambda: L.chunked_kd_from_hidden(sh, sw, th, tw, mask, L.KD("forward_kl", chunk=8))
    )
    assert naive >= 2 * logits_bytes  # the dense graph keeps (B, T, V) tensors
    assert chunked < logits_bytes / 4  # only hidden states, weights and small per-chunk tensors


# ----------------------------------------------------------------------------- edge cases


def test_all_masked_is_zero_with_grad_fn_and_finite_grads():
    sh, sw, th, tw, ids, _ = _hidden_case()
    s_logits = (sh @ sw.T).detach().requires_grad_()
    t_logits = th @ tw.T
    tk_ids, tk_lp = topk_of(t_logits, 3)
    zero = torch.zeros(ids.shape, dtype=torch.uint8)
    results = [
        (L.ce_loss(s_logits, ids, zero), s_logits),
        (L.full_kd_loss(s_logits, t_logits, zero, L.KD("jsd", 2.0)), s_logits),
        (L.topk_kd_loss(s_logits, tk_ids, tk_lp, zero, L.KD("reverse_kl", 2.0)), s_logits),
        (L.chunked_ce_from_hidden(sh, sw, ids, zero, chunk=3), sh),
        (L.chunked_kd_from_hidden(sh, sw, th, tw, zero, L.KD("forward_kl", chunk=3)), sh),
        *[
            (x, sh)
            for x in L.chunked_distill_from_hidden(sh, sw, ids, zero, tk_ids, tk_lp, L.KD("jsd"))
        ],
    ]
    for loss, leaf in results:
        assert float(loss.detach()) == 0.0 and loss.grad_fn is not None
        (g,) = torch.autograd.grad(loss, leaf, retain_graph=True)  # kd and ce share a graph
        assert torch.isfinite(g).all() and float(g.abs().max()) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_tails_give_finite_loss_and_grads(dtype):
    V, k = 50, 5
    s = torch.zeros(1, 4, V, dtype=dtype)
    s[0, 0, :k] = 80.0  # student puts ~all mass on the top k: student tail ~0
    s[0, 1, k:] = 80.0  # student puts ~all mass in the tail
    s.requires_grad_()
    ids = torch.arange(k).expand(1, 4, k).clone()
    lp = torch.full((1, 4, k), math.log(0.999999 / k), dtype=dtype)
    lp[0, 2] = math.log(1.0 / k) + 1e-3  # fp16-style rounding: the top k sum above 1
    lp[0, 3] = torch.tensor([0.0, -200.0, -200.0, -200.0, float("-inf")])  # one-hot teacher
    mask = torch.ones(1, 4)
    for kind in L.KINDS:
        for tau in (0.5, 1.0, 4.0):
            loss = L.topk_kd_loss(
                s, ids, lp.half().to(dtype) if dtype != F64 else lp, mask, L.KD(kind, tau)
            )
            (g,) = torch.autograd.grad(loss, s)
            assert torch.isfinite(loss) and torch.isfinite(g).all(), (kind, tau)


def test_full_kd_with_neg_inf_logits_is_finite():
    s, t, _, mask = make(5, 2, 4, 8)
    t = t.clone()
    t[..., -2:] = float("-inf")  # masked vocab padding in the teacher
    loss = L.full_kd_loss(s, t, torch.ones(2, 4), L.KD("forward_kl"))
    (g,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    want = ref_full_kd(s.detach(), t, torch.ones(2, 4), "forward_kl", 1.0, 0.5)
    assert abs(float(loss.detach()) - want) < 1e-8


def test_distill_loss_mix():
    ce, kd = torch.tensor(2.0, requires_grad=True), torch.tensor(5.0, requires_grad=True)
    loss, parts = L.distill_loss(kd, ce, alpha=0.0)
    assert float(loss.detach()) == 2.0 and set(parts) == {"kd", "ce"}
    loss, _ = L.distill_loss(kd, ce, alpha=1.0)
    assert float(loss.detach()) == 5.0
    loss, parts = L.distill_loss(kd, ce, alpha=0.25)
    assert (
        float(loss.detach()) == pytest.approx(0.25 * 5 + 0.75 * 2) and not parts["kd"].requires_grad
    )
    loss.backward()
    assert float(kd.grad) == 0.25 and float(ce.grad) == 0.75
    # a non-finite zero-weight term does not leak in as 0 * inf
    loss, _ = L.distill_loss(torch.tensor(float("inf")), ce, alpha=0.0)
    assert float(loss.detach()) == 2.0
    loss, _ = L.distill_loss(None, ce, alpha=0.0)
    assert float(loss.detach()) == 2.0


def test_distill_loss_alpha_ends_with_real_losses():
    s, t, ids, mask = make(6, 2, 6, 9)
    ce = L.ce_loss(s, ids, mask)
    kd = L.full_kd_loss(s, t, mask, L.KD("forward_kl", 2.0))
    assert torch.equal(L.distill_loss(kd, ce, 0.0)[0], ce)
    assert torch.equal(L.distill_loss(kd, ce, 1.0)[0], kd)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="kind"):
        L.KD("kl")
    with pytest.raises(ValueError, match="temperature"):
        L.KD("jsd", temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        L.KD("jsd", beta=1.5)
    with pytest.raises(ValueError, match="alpha"):
        L.distill_loss(None, None, alpha=2.0)
