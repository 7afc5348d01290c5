"""Real TorchTrainer runs with 2 FSDP2 workers (gloo processes) on the shared local cluster.

    .venv/bin/python -m pytest tests/train/test_train_workers_ray.py -x -q

- 2 workers x batch 4 match local mode x batch 8 step by step (same global batches);
- sharded DCP checkpoints hold both ranks' shards in one Ray checkpoint folder;
- a run killed after step 5 and rerun (Ray's get_checkpoint) continues exactly;
- the export loads in transformers.
"""

from __future__ import annotations

import json

import pytest
from builders import (
    assert_resumed_exactly,
    run_train,
    train_job,
    train_metrics,
    train_rows,
    write_train_prepared,
)

from raydapt import layout

pytestmark = pytest.mark.slow

KW = dict(max_steps=8, checkpoint_every=4, eval_every=4, batch_size=4, num_workers=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, world_dir, tiny_model_dir, ray_session):
    ray_session()
    rows = train_rows(world_dir, tiny_model_dir)
    root = tmp_path_factory.mktemp("slow")

    def job(sub: str, **kw):
        cfg = train_job(root / sub, tiny_model_dir, **{**KW, **kw})
        if not layout.prepared_dir(cfg).exists():
            write_train_prepared(layout.prepared_dir(cfg), tiny_model_dir, rows)
        return cfg

    straight = job("straight")
    return job, straight, run_train(straight)


def test_two_workers_match_local_mode_and_export(setup):
    from transformers import AutoModelForCausalLM

    job, straight, summary = setup
    local = job("local", num_workers=0, batch_size=8)
    run_train(local)
    a, b = train_metrics(straight), train_metrics(local)
    assert [x["step"] for x in a] == list(range(1, 9))
    for x, y in zip(a, b, strict=True):
        assert x["tokens"] == y["tokens"]
        assert abs(x["loss"] - y["loss"]) < 1e-4, (x["step"], x["loss"], y["loss"])
    assert (
        a[-1]["val_loss"] < a[3]["val_loss"] + 1e-6
        and abs(a[-1]["val_loss"] - b[-1]["val_loss"]) < 1e-4
    )
    ckpt = layout.train_dir(straight) / straight.name / "checkpoint_000008"
    names = {p.name for p in ckpt.iterdir()}
    assert {
        "__0_0.distcp",
        "__1_0.distcp",
        ".metadata",
        "meta.json",
        "rng_0.pt",
        "rng_1.pt",
    } <= names
    assert json.loads((ckpt / "meta.json").read_text())["world_size"] == 2
    assert summary["world_size"] == 2
    model = AutoModelForCausalLM.from_pretrained(summary["export_dir"])
    assert model.config.num_hidden_layers == 2


def test_resume_two_workers_continues_exactly(setup, monkeypatch):
    job, straight, _ = setup
    killed = job("killed")
    monkeypatch.setenv("RAYDAPT_FAIL_AT_STEP", "4")
    with pytest.raises(Exception, match="injected failure"):
        run_train(killed)
    monkeypatch.delenv("RAYDAPT_FAIL_AT_STEP")
    assert [x["step"] for x in train_metrics(killed)] == [1, 2, 3, 4]
    assert_resumed_exactly(straight, killed, 4, 8, run_train(killed))
