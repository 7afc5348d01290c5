"""`raydapt eval`: held-out loss against a naive reference, records, the up-to-date rule and
bad input. No Ray: eval runs in the driver on a tiny local model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from raydapt import layout
from raydapt.config import job_from_dict
from raydapt.errors import UserError
from raydapt.eval.stage import token_loss
from raydapt.models import load_model
from raydapt.pipeline import run_stage


def eval_job(tmp_path, **eval_keys):
    return job_from_dict(
        {
            "name": "e",
            "output_dir": str(tmp_path / "out"),
            "corpus": {"world_train": 40, "world_heldout": 30, "world_markov_docs": 6},
            "eval": {"max_problems": 6, "max_new_tokens": 12, "batch_size": 4, **eval_keys},
        }
    )


def test_token_loss_matches_a_naive_reference(tiny_model_dir):
    model = load_model(tiny_model_dir).eval()
    rng = np.random.default_rng(0)
    rows = []
    for n in (5, 9, 3):
        ids = rng.integers(3, 200, n).tolist()
        mask = rng.integers(0, 2, n).astype(np.uint8)
        mask[-1] = 0
        rows.append((ids, mask))
    got = token_loss(model, rows, batch_size=2)
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in rows:  # one row at a time, no padding: -log p(ids[t+1] | ids[:t+1])
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            for t in range(len(ids) - 1):
                if mask[t]:
                    nll -= float(logp[t, ids[t + 1]])
                    count += 1
    assert count > 0 and got == pytest.approx(nll / count, rel=1e-5)


def test_eval_writes_a_record_and_skips_when_up_to_date(tmp_path, tiny_model_dir, capsys):
    job = eval_job(tmp_path)
    first = run_stage("eval", job, model_dir=tiny_model_dir, name="tiny")
    record = layout.eval_dir(job) / "tiny.json"
    saved = json.loads(record.read_text())
    assert saved["complete"] is True and saved["fingerprint"] == first["fingerprint"]
    assert saved["problems"] == 6 and 0.0 <= saved["exact_match"] <= 1.0
    # a random model is far from the world's procedure: near-uniform loss, above the floor
    assert saved["heldout_loss"] > 2.0 and saved["markov_loss"] > saved["markov_entropy_floor"]
    assert "skipped" not in first
    again = run_stage("eval", job, model_dir=tiny_model_dir, name="tiny")
    assert again["skipped"] is True and again["heldout_loss"] == saved["heldout_loss"]
    assert "[eval] up to date" in capsys.readouterr().out
    changed = run_stage(
        "eval", eval_job(tmp_path, max_problems=4), model_dir=tiny_model_dir, name="tiny"
    )
    assert "skipped" not in changed and changed["problems"] == 4


def test_missing_model_names_the_stage_that_makes_it(tmp_path):
    with pytest.raises(UserError, match="run `raydapt train` first"):
        run_stage("eval", eval_job(tmp_path))
