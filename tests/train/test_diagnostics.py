"""Bias diagnostics of the stored teacher signal (raydapt.train.diagnostics), against dense
references: the student's mass on the stored ids read off the full softmax, the teacher's head
mass off its full distribution. Every loss path that feeds a Probe is checked: whole logits,
chunked with and without gradients, from hidden states, and the sampled kinds.
"""

from __future__ import annotations

import pytest
import torch

from raydapt.teach.draws import draw_samples, topk_plus_samples
from raydapt.train.diagnostics import Probe, masked_mean, mass_on, signal_parts
from raydapt.train.losses import KD, chunked_distill_from_hidden, topk_kd_loss
from raydapt.train.sampled_kd import sampled_kd_loss, topk_sampled_kd_loss

B, T, V, K = 3, 13, 41, 6


def setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s_logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    t_logp = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3, -1)
    mask = (torch.rand(B, T, generator=g) < 0.7).double()
    mask[:, -1] = 0
    lp, ids = t_logp.topk(K, -1)
    lp[0, 2, -2:] = float("-inf")  # padded slots: not outcomes, no mass on either side
    ids[0, 2, -2:] = -1
    return s_logits, t_logp, mask, ids, lp


def dense_mass(s_logits, ids, valid, mask):
    """The reference: softmax over the whole vocabulary, summed over the valid ids, by loop."""
    q = torch.softmax(s_logits, -1)
    per_pos = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            per_pos[b, t] = sum(q[b, t, int(i)] for i, ok in zip(ids[b, t], valid[b, t]) if ok)
    return float((per_pos * mask).sum() / mask.sum())


@pytest.mark.parametrize("chunk", [None, 4, 128])
@pytest.mark.parametrize("grad", [True, False])
def test_topk_student_mass_matches_the_dense_softmax(chunk, grad):
    s_logits, _, mask, ids, lp = setup()
    x = s_logits.clone().requires_grad_(grad)
    probe = Probe()
    loss = topk_kd_loss(x, ids, lp, mask, KD("forward_kl", 2.0, 0.5, chunk), probe)
    want = dense_mass(s_logits, ids, lp > float("-inf"), mask)
    assert float(probe.mean(mask)) == pytest.approx(want, rel=1e-12)
    if grad:  # the probe reads detached values: the loss's gradient is untouched
        loss.backward()
        ref = s_logits.clone().requires_grad_()
        topk_kd_loss(ref, ids, lp, mask, KD("forward_kl", 2.0, 0.5, chunk)).backward()
        torch.testing.assert_close(x.grad, ref.grad, rtol=0, atol=0)


def test_teacher_and_tail_mass_match_the_full_distribution():
    s_logits, t_logp, mask, ids, lp = setup(1)
    probe = Probe()
    topk_kd_loss(s_logits, ids, lp, mask, KD(chunk=5), probe)
    parts = signal_parts(probe, mask, lp)
    valid = lp > float("-inf")
    head = torch.where(valid, t_logp.gather(-1, ids.clamp_min(0)).exp(), 0.0).sum(-1)
    want = float((head * mask).sum() / mask.sum())
    assert float(parts["teacher_mass"]) == pytest.approx(want, rel=1e-12)
    assert float(parts["tail_mass"]) == pytest.approx(1 - want, rel=1e-12)
    assert 0 < want < 1  # top-6 of 41 covers some, not all, of a peaked distribution
    # k = V: the stored ids are the whole vocabulary, nothing is left to the tail
    full_lp, full_ids = t_logp.topk(V, -1)
    probe = Probe()
    topk_kd_loss(s_logits, full_ids, full_lp, mask, KD(chunk=4), probe)
    parts = signal_parts(probe, mask, full_lp)
    assert float(parts["teacher_mass"]) == pytest.approx(1.0, abs=1e-12)
    assert float(parts["tail_mass"]) == pytest.approx(0.0, abs=1e-12)
    assert float(parts["student_mass"]) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("tied", [False, True])
def test_from_hidden_probe_equals_the_logits_path(tied):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(B, T, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, 8, generator=g, dtype=torch.float64, requires_grad=True)
    _, _, mask, ids, lp = setup(2)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    probe = Probe()
    chunked_distill_from_hidden(hidden, w, input_ids, mask, ids, lp, KD(chunk=5), probe)
    want = dense_mass((hidden @ w.T).detach(), ids, lp > float("-inf"), mask)
    assert float(probe.mean(mask)) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("signal", ["sampled", "topk+sampled"])
@pytest.mark.parametrize("chunk", [None, 5])
def test_sampled_kinds_student_mass_on_every_stored_id(signal, chunk):
    s_logits, t_logp, mask, _, _ = setup(4)
    gen = torch.Generator().manual_seed(9)
    x = s_logits.clone().requires_grad_()
    probe = Probe()
    kd = KD("forward_kl", 1.5, 0.5, chunk)  # the mass is read at temperature 1 all the same
    if signal == "sampled":
        ids, counts = draw_samples(t_logp, 8, generator=gen)
        sampled_kd_loss(x, ids, counts, mask, kd, probe=probe).loss.backward()
        want = dense_mass(s_logits, ids, counts > 0, mask)
    else:
        top_ids, top_lp, ids, counts = topk_plus_samples(t_logp, 3, 8, generator=gen)
        loss = topk_sampled_kd_loss(x, top_ids, top_lp, ids, counts, mask, kd, probe=probe)
        loss.loss.backward()
        all_ids = torch.cat([top_ids, ids], -1)
        valid = torch.cat([top_lp > float("-inf"), counts > 0], -1)
        want = dense_mass(s_logits, all_ids, valid, mask)
    assert float(probe.mean(mask)) == pytest.approx(want, rel=1e-12)


def test_probe_refuses_pieces_that_do_not_tile_the_mask():
    s_logits, _, mask, ids, lp = setup()
    probe = Probe()
    with pytest.raises(RuntimeError, match="no loss chunk"):
        probe.mean(mask)
    topk_kd_loss(s_logits, ids, lp, mask, KD(chunk=4), probe)
    topk_kd_loss(s_logits, ids, lp, mask, KD(chunk=4), probe)  # the same batch twice
    with pytest.raises(RuntimeError, match="added twice or skipped"):
        probe.mean(mask)


def test_mass_on_and_masked_mean_edge_cases():
    logp = torch.log_softmax(torch.zeros(1, 1, 4), -1)
    ids = torch.tensor([[[0, 3, -1]]])
    assert float(mass_on(logp, ids, ids >= 0)) == pytest.approx(0.5)
    assert float(masked_mean(torch.ones(2, 3), torch.zeros(2, 3))) == 0.0  # no position: 0


def test_objectives_report_the_diagnostics_as_parts():
    """TopKDistill reports all three; the parts equal the dense references through a model."""
    from test_objective_hidden import batch, tiny_llama  # tests/train is on the path

    from raydapt.train.objective import TopKDistill

    model, b = tiny_llama(tied=True), batch(seed=5)
    _, parts = TopKDistill(KD(chunk=4), 0.5)(model, b)
    assert (
        set(TopKDistill.parts)
        == set(parts)
        == {"kd", "ce", "teacher_mass", "tail_mass", "student_mass"}
    )
    logits = model(input_ids=b["input_ids"]).logits.detach()
    valid = b["topk_logprobs"] > float("-inf")
    q = torch.softmax(logits, -1).gather(-1, b["topk_ids"]).sum(-1)
    p = b["topk_logprobs"].exp().sum(-1)
    assert torch.all(valid)
    m = b["loss_mask"]
    assert float(parts["student_mass"]) == pytest.approx(float((q * m).sum() / m.sum()), rel=1e-9)
    assert float(parts["teacher_mass"]) == pytest.approx(float((p * m).sum() / m.sum()), rel=1e-9)
