"""The on-policy k1 loss against the exact reverse KL: Monte Carlo over the student's samples."""

from __future__ import annotations

import torch

from raydapt.train import losses as L


def test_k1_surrogate_gradient_is_the_reverse_kl_gradient_in_expectation():
    """Draw N tokens from q at one position; the surrogate's gradient w.r.t. the student's
    logits must approach grad KL(q || p), and the k1 estimate must approach KL(q || p)."""
    g = torch.Generator().manual_seed(0)
    V, N = 7, 400_000
    z = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    t_logp = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64) * 2, -1)

    exact = (torch.softmax(z, -1) * (torch.log_softmax(z, -1) - t_logp)).sum()
    (g_exact,) = torch.autograd.grad(exact, z)

    q_logp = torch.log_softmax(z, -1)
    x = torch.multinomial(q_logp.detach().exp(), N, replacement=True, generator=g)
    s_tok, t_tok = q_logp[x].view(1, N), t_logp[x].view(1, N)
    mask = torch.ones(1, N, dtype=torch.float64)
    (g_mc,) = torch.autograd.grad(L.sampled_reverse_kl(s_tok, t_tok, mask), z)

    assert torch.allclose(g_mc, g_exact, atol=0.01), (g_mc, g_exact)
    est = L.sampled_kl_estimate(s_tok, t_tok, mask)
    assert abs(float(est) - float(exact)) < 0.01 * max(1.0, float(exact))
    # not a tautology: the plain value of the surrogate is far from the KL
    assert abs(float(L.sampled_reverse_kl(s_tok, t_tok, mask)) - float(exact)) > 0.05


def test_k1_respects_the_mask_and_an_empty_mask_gives_zero_with_grad():
    s = torch.randn(2, 5, requires_grad=True)
    t = torch.randn(2, 5)
    mask = torch.zeros(2, 5)
    mask[0, 1] = 1
    loss = L.sampled_reverse_kl(s, t, mask)
    ref = (s[0, 1] - t[0, 1]).detach() * s[0, 1]
    assert torch.allclose(loss, ref)
    loss.backward()
    assert s.grad.count_nonzero() == 1
    empty = L.sampled_reverse_kl(s, t, torch.zeros(2, 5))
    assert float(empty) == 0.0 and empty.requires_grad
