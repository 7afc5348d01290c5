"""teach.signal sampled | topk+sampled end to end: the HF teacher draws from its whole
distribution (seeded per row), the targets store distinct ids and counts, and the trainer
distills with the RS-KD forward-KL estimate; a trainer set for another signal refuses."""

from __future__ import annotations

import math

import numpy as np
import pytest
from builders import final_table, run_train, train_job, train_metrics

from raydapt import layout
from raydapt.config import TrainConfig
from raydapt.errors import UserError
from raydapt.models import load_tokenizer
from raydapt.pipeline import run_stage
from raydapt.rows import collate
from raydapt.teach.hf_backend import HFBackend
from raydapt.teach.spec import ActorSpec
from raydapt.teach.work import scored_table
from raydapt.train import plan as train_plan
from raydapt.train.objective import SampledDistill, TopKSampledDistill, build_objective


@pytest.mark.parametrize("signal", ["topk", "sampled", "topk+sampled"])
def test_signal_of_rebuilds_what_score_returns(signal, tiny_model_dir):
    """HFBackend.signal_of on a row's own log-probs gives score's result for that row, so a
    study that holds the log-probs (bench/signal_frontier.py) stores exactly what teach would."""
    import torch

    spec = ActorSpec(model=str(tiny_model_dir), k=4, backend="hf", signal=signal, samples=16)
    backend = HFBackend(spec)
    tok = load_tokenizer(tiny_model_dir)
    seqs = [
        np.asarray(tok(t, add_special_tokens=False)["input_ids"], np.int32)
        for t in ("add 12 30 #### 42", "reverse a b c d #### d c b a")
    ]
    scored = backend.score(seqs)
    for seq, want in zip(seqs, scored):
        with torch.inference_mode():
            x = torch.as_tensor(seq.astype(np.int64))[None]
            logp = torch.log_softmax(backend.model(input_ids=x).logits.float(), -1)[0]
            got = backend.signal_of(logp, seq)
        assert len(got) == len(want) == (2 if signal == "topk" else 4)
        for g, w in zip(got, want):
            if w is None:
                assert g is None
            elif np.issubdtype(w.dtype, np.floating):
                np.testing.assert_allclose(g, w, atol=1e-5)
            else:
                assert np.array_equal(g, w)


@pytest.mark.parametrize("signal", ["sampled", "topk+sampled"])
def test_draws_are_seeded_per_row_and_stored_compactly(signal, tiny_model_dir):
    s, k = 16, 4
    spec = ActorSpec(model=str(tiny_model_dir), k=k, backend="hf", signal=signal, samples=s)
    backend = HFBackend(spec)
    tok = load_tokenizer(tiny_model_dir)
    seqs = [
        np.asarray(tok(t, add_special_tokens=False)["input_ids"], np.int32)
        for t in ("add 12 30 #### 42", "reverse a b c #### c b a", "sort 3 1 2")
    ]
    out = backend.score(seqs)
    alone = backend.score(seqs[1:2])[0]  # the same row in another batch draws the same
    assert np.array_equal(alone[2], out[1][2]) and np.array_equal(alone[3], out[1][3])
    vocab = len(tok)
    for seq, (top_ids, _, ids, counts) in zip(seqs, out):
        n = len(seq)
        assert ids.shape == counts.shape == (n, s)
        assert (counts[:-1].sum(1) == s).all() and counts[-1].sum() == 0  # last: no next token
        assert ((ids < vocab) | (counts == 0)).all()
        if signal == "sampled":
            assert top_ids is None
        else:  # the tail draws never repeat a top-k id
            assert top_ids.shape == (n, k)
            for t in range(n - 1):
                assert not set(ids[t][counts[t] > 0]) & set(top_ids[t])
    masks = [np.r_[np.zeros(2, np.uint8), np.ones(len(x) - 3, np.uint8), 0] for x in seqs]
    table = scored_table(["a", "b", "c"], seqs, masks, out, spec)
    assert ("topk_ids" in table.column_names) == (signal == "topk+sampled")
    stored = table.column("sample_counts").to_pylist()
    assert all(sum(pos) in (0, s) for row in stored for pos in row) and all(
        min(pos, default=1) > 0 for row in stored for pos in row
    )  # only slots drawn at least once are stored
    batch = collate(table, np.arange(3), 0)
    assert batch["sample_ids"].shape[:2] == batch["input_ids"].shape
    model = backend.model.train()
    tc = TrainConfig(mode="distill", teacher="offline", kd_loss="forward_kl", kd_alpha=1.0)
    objective = build_objective(tc, has_topk=True, signal=signal)
    assert type(objective) is (SampledDistill if signal == "sampled" else TopKSampledDistill)
    loss, parts = objective(model, batch)
    loss.backward()
    assert math.isfinite(loss.item()) and parts["kd"] > 0
    assert 0 < parts["student_mass"] < 1  # the diagnostics ride along (diagnostics.py)
    assert ("teacher_mass" in parts) == (signal == "topk+sampled")
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.slow
def test_teach_then_train_on_sampled_targets(tmp_path, tiny_model_dir, ray_session):
    ray_session()
    cfg = train_job(
        tmp_path,
        tiny_model_dir,
        mode="distill",
        teacher="offline",
        kd_loss="forward_kl",
        kd_alpha=1.0,
        max_steps=4,
        eval_every=4,
        checkpoint_every=4,
        num_workers=1,
        cpus_per_worker=1,
    )
    cfg.teach.backend, cfg.teach.signal, cfg.teach.samples = "hf", "sampled", 24
    run_stage("prepare", cfg)
    run_stage("teach", cfg)
    manifest, table = final_table(cfg)
    assert manifest["signal"] == "sampled" and manifest["samples"] == 24
    assert "sample_ids" in table.column_names and "topk_ids" not in table.column_names
    run_train(cfg)
    rows = train_metrics(cfg)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["kd"]) and r["kd"] > 0 for r in rows)
    assert all(0 < r["student_mass"] < 1 and "teacher_mass" not in r for r in rows)
    assert (layout.export_dir(cfg) / "config.json").is_file()
    cfg.teach.signal = "topk"  # a trainer set for another signal than the targets hold
    with pytest.raises(UserError) as e:
        train_plan(cfg)
    assert "hold the 'sampled' signal but teach.signal='topk'" in str(e.value)
