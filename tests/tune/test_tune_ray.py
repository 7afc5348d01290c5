"""`raydapt tune`: a real Ray Tune sweep of real Train V2 trials on a tiny world.

One module-scoped sweep (4 trials, ASHA, 20 steps each) is run through
`pipeline.run_stage("tune", job)` twice: first with trial 0 made to fail after step 4
(RAYDAPT_TUNE_FAIL), which must leave no manifest, then again, which must restore the
experiment, resume only that trial from its step-4 checkpoint, leave the others alone and
write the manifest; a third call is then skipped as up to date.

    .venv/bin/python -m pytest tests/tune/test_tune_ray.py -x -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raydapt import layout, pipeline
from raydapt.config import ConfigError, job_from_dict
from raydapt.errors import UserError

TRAIN = {
    "max_steps": 20,
    "eval_every": 5,
    "checkpoint_every": 2,
    "batch_size": 4,
    "warmup_steps": 1,
    "num_workers": 1,
    "cpus_per_worker": 0.5,
}
# lr 1e-6 barely moves the loss, so ASHA must stop those trials at the first rung (step 5).
TUNE = {
    "search": "grid",
    "scheduler": "asha",
    "num_samples": 1,
    "max_concurrent_trials": 2,
    "grace_period": 1,
    "reduction_factor": 2,
    "space": {"train.lr": {"grid": [1e-2, 3e-3, 1e-6, 1e-6]}},
}


def _job(out, **tune) -> dict:
    return {
        "output_dir": str(out),
        "corpus": {"source": "world", "world_train": 300, "world_heldout": 20},
        "teacher": {"preset": ""},
        "student": {"preset": "tiny"},
        "prepare": {"seq_len": 128},
        "train": dict(TRAIN),
        "tune": {**TUNE, **tune},
    }


def _snapshot(root: Path, skip: str) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and not p.relative_to(root).parts[0] == skip
    }


def _trial_files(tune_dir: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(tune_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in (tune_dir / "trials").rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, ray_session):
    import raydapt.tune

    ray_session()
    out = tmp_path_factory.mktemp("tune")
    cfg = job_from_dict(_job(out))
    pipeline.run_stage("prepare", cfg)
    before = _snapshot(out, "tune")
    os.environ[raydapt.tune.FAIL_ENV] = "0:4"
    try:
        first = pipeline.run_stage("tune", cfg)
    finally:
        del os.environ[raydapt.tune.FAIL_ENV]
    manifest_first = (layout.tune_dir(cfg) / "manifest.json").exists()
    files_first = _trial_files(layout.tune_dir(cfg))
    second = pipeline.run_stage("tune", cfg)
    files_second = _trial_files(layout.tune_dir(cfg))
    third = pipeline.run_stage("tune", cfg)
    return {
        "cfg": cfg,
        "out": out,
        "before": before,
        "first": first,
        "second": second,
        "third": third,
        "manifest_first": manifest_first,
        "files_first": files_first,
        "files_second": files_second,
    }


@pytest.mark.slow
def test_asha_sweep_outputs(sweep):
    s, tdir = sweep["second"], layout.tune_dir(sweep["cfg"])
    rows = {r["trial"]: r for r in s["rows"]}
    assert len(rows) == 4 and not s["failed"]
    status = sorted(r["status"] for r in rows.values())
    assert "stopped early" in status and "done" in status, status
    for r in rows.values():
        if r["train.lr"] == 1e-6:
            assert r["status"] == "stopped early" and r["steps"] < 20
    best = min((r for r in rows.values() if r["status"] == "done"), key=lambda r: r["val_loss"])
    assert s["best_trial"] == best["trial"] and s["best_metric"] == pytest.approx(best["val_loss"])
    csv_lines = (tdir / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("trial,train.lr,val_loss,steps,status")
    assert best["trial"] in (tdir / "results.md").read_text()
    assert (tdir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    cmd = (tdir / "serve_command.txt").read_text().strip()
    assert cmd == f"raydapt serve {(tdir / 'best').resolve()}"
    # a failed sweep leaves no manifest; a finished one records the fingerprint, and is skipped
    import raydapt.tune

    assert sweep["first"]["failed"] and not sweep["manifest_first"]
    manifest = json.loads((tdir / "manifest.json").read_text())
    assert manifest["complete"] and manifest["fingerprint"] == raydapt.tune.fingerprint(
        raydapt.tune.plan(sweep["cfg"])
    )
    assert s["fingerprint"] == manifest["fingerprint"] and (tdir / manifest["experiment"]).is_dir()
    assert sweep["third"]["skipped"] and sweep["third"]["best_trial"] == s["best_trial"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tdir / "best")
    tok = AutoTokenizer.from_pretrained(tdir / "best")
    assert model.config.vocab_size == len(tok)


@pytest.mark.slow
def test_resume_keeps_finished_trials(sweep):
    first, tdir = sweep["first"], layout.tune_dir(sweep["cfg"])
    failed = [r for r in first["rows"] if r["status"] == "error"]
    assert first["failed"] and len(failed) == 1 and failed[0]["trial"].endswith("_00000")
    resumed = tdir / "trials" / failed[0]["trial"]
    starts = [json.loads(line) for line in (resumed / "starts.jsonl").read_text().splitlines()]
    assert [s["checkpoint"] for s in starts] == [
        None,
        "checkpoint_000004",
    ]  # resumed, not restarted
    second = {r["trial"]: r for r in sweep["second"]["rows"]}[failed[0]["trial"]]
    assert second["status"] != "error" and second["steps"] > 4
    if (resumed / "done.json").is_file():  # ASHA may stop it at a later rung instead
        assert json.loads((resumed / "done.json").read_text())["start_step"] == 4
    others = [r["trial"] for r in first["rows"] if r["status"] != "error"]
    assert len(others) == 3
    for tid in others:  # not rerun: every file of theirs is byte-for-byte where it was
        assert len((tdir / "trials" / tid / "starts.jsonl").read_text().splitlines()) == 1
        mine = {k: v for k, v in sweep["files_first"].items() if k.startswith(f"trials/{tid}/")}
        assert mine and all(sweep["files_second"].get(k) == v for k, v in mine.items())


@pytest.mark.slow
def test_trials_share_prepared_inputs(sweep):
    out, cfg = sweep["out"], sweep["cfg"]
    assert _snapshot(out, "tune") == sweep["before"]  # nothing outside tune/ was written
    tdir = layout.tune_dir(cfg)
    names = {p.name for p in tdir.rglob("*") if p.is_dir()}
    assert not names & {"prepared", "targets", "corpus", "models"}
    inputs = [json.loads(p.read_text()) for p in sorted(tdir.glob("trials/*/trial.json"))]
    assert len(inputs) == 4
    prepared = str(layout.prepared_dir(cfg).resolve())
    assert all(i["files"] == inputs[0]["files"] for i in inputs)
    assert all(f.startswith(prepared) for f in inputs[0]["files"]["train"])
    assert {i["train"]["lr"] for i in inputs} == {1e-2, 3e-3, 1e-6}


def test_invalid_space_key_cli_exit_2(tmp_path):
    job = _job(tmp_path / "out")
    job["tune"]["space"] = {"train.lrr": {"loguniform": [1e-4, 1e-2]}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.run(
        [sys.executable, "-m", "raydapt", "tune", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    assert "tune.space.train.lrr" in p.stderr and "lr" in p.stderr
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_invalid_space_value_named_before_any_trial(tmp_path):
    import raydapt.tune

    cfg = job_from_dict(
        _job(
            tmp_path,
            space={
                "train.mode": {"choice": ["full", "bogus"]},
                "train.batch_size": {"randint": [0, 4]},
            },
        )
    )
    with pytest.raises(ConfigError) as e:
        raydapt.tune.plan(cfg)  # no prepared data here: the space error must come first
    msg = str(e.value)
    assert (
        "tune.space.train.mode: value 'bogus'" in msg
        and "tune.space.train.batch_size: value 0" in msg
    )
    assert not layout.tune_dir(cfg).exists()


def test_pbt_refuses_shape_keys_clearly(tmp_path):
    import raydapt.tune

    cfg = job_from_dict(
        _job(
            tmp_path,
            scheduler="pbt",
            space={"train.lora_r": {"choice": [4, 8]}, "train.lr": {"loguniform": [1e-4, 1e-2]}},
        )
    )
    with pytest.raises(ConfigError) as e:
        raydapt.tune.plan(cfg)
    msg = str(e.value)
    assert "tune.space.train.lora_r: PBT" in msg and "train.lr" not in msg.split("lora_r", 1)[0]
    assert not layout.tune_dir(cfg).exists()


@pytest.mark.slow
def test_pbt_exploit_continues_with_the_new_lr(tmp_path, ray_session):
    """Real PBT (Ray's defaults: every report must carry step and val_loss): the weak trial
    (lr 1e-6) must continue from the strong trial's checkpoint, with a mutated lr that the loop
    really trains with (not the checkpoint's old schedule)."""
    from raydapt.train.loop import lr_factor

    ray_session()
    # 8 steps, checkpoints every 4: one perturbation (synchronous: both trials pause at step 4)
    train = {**TRAIN, "max_steps": 8, "eval_every": 4, "checkpoint_every": 4, "warmup_steps": 1}
    job = {
        **_job(
            tmp_path,
            search="grid",
            scheduler="pbt",
            num_samples=1,
            space={"train.lr": {"grid": [1e-2, 1e-6]}},
        ),
        "train": train,
    }
    cfg = job_from_dict(job)
    pipeline.run_stage("prepare", cfg)
    s = pipeline.run_stage("tune", cfg)
    tdir = layout.tune_dir(cfg) / "trials"
    starts = {
        p.parent.name: [json.loads(x) for x in p.read_text().splitlines()]
        for p in tdir.glob("*/starts.jsonl")
    }
    assert len(starts) == 2, starts
    weak = next(t for t, st in starts.items() if st[0]["lr"] == 1e-6)
    strong = next(t for t in starts if t != weak)
    exploits = [
        st for st in starts[weak][1:] if st["checkpoint"] and f"_{strong}_" in st["checkpoint"]
    ]
    assert exploits, f"PBT never exploited: {starts}"
    last = exploits[-1]  # metrics.jsonl past a restore point is rewritten by that restart
    restored = json.loads((Path(last["checkpoint"]) / "meta.json").read_text())["step"]
    assert restored < 8, (
        f"PBT perturbed at the final step (raydapt.tune.pbt.FinalStepPBT): {starts}"
    )
    metrics = {
        m["step"]: m
        for m in map(json.loads, (tdir / weak / "metrics.jsonl").read_text().splitlines())
    }
    # the first step after the restore trains with the trial's lr on the schedule, whatever
    # PBT chose (the checkpoint's own scheduler state would give the strong trial's lr)
    assert metrics[restored + 1]["lr"] == pytest.approx(
        last["lr"] * lr_factor(restored, cfg.train), rel=1e-6
    )
    rows = {r["trial"]: r for r in s["rows"]}
    assert not s["failed"] and rows[weak]["steps"] == 8, rows
    # at lr 1e-6 the weak trial had barely moved by step 4; after the exploit it learned
    assert rows[weak]["val_loss"] < metrics[4]["val_loss"] - 0.3, (rows, metrics[4])


def test_space_forms():
    from ray import tune

    from raydapt.tune.space import tune_space

    cfg = job_from_dict(
        _job(
            "/tmp/x",
            search="random",
            space={
                "train.lr": {"loguniform": [1e-4, 1e-2]},
                "train.weight_decay": {"uniform": [0.0, 0.1]},
                "train.batch_size": {"choice": [2, 4]},
                "train.lora_r": {"randint": [4, 9]},
                "train.seed": {"grid": [0, 1]},
            },
        )
    )
    sp = tune_space(cfg.tune)["train"]
    assert isinstance(sp["lr"], tune.search.sample.Float) and sp["lr"].lower == 1e-4
    assert isinstance(sp["lr"].get_sampler(), tune.search.sample.LogUniform)
    assert isinstance(sp["weight_decay"].get_sampler(), tune.search.sample.Uniform)
    assert isinstance(sp["batch_size"], tune.search.sample.Categorical)
    assert isinstance(sp["lora_r"], tune.search.sample.Integer) and sp["lora_r"].upper == 9
    assert sp["seed"] == {"grid_search": [0, 1]}
    grid = tune_space(
        job_from_dict(
            _job("/tmp/x", search="grid", space={"train.batch_size": {"choice": [2, 4]}})
        ).tune
    )
    assert grid["train"]["batch_size"] == {"grid_search": [2, 4]}


@pytest.mark.slow
def test_optuna_tpe_sweep(tmp_path, ray_session):
    """A real sweep with Ray's plain OptunaSearch, which reads the metric from every report:
    with checkpoints at other steps than evaluations, each report still carries val_loss."""
    ray_session()
    train = {**TRAIN, "max_steps": 6, "eval_every": 3, "checkpoint_every": 2}
    job = {
        **_job(
            tmp_path,
            search="optuna",
            scheduler="fifo",
            num_samples=2,
            space={"train.lr": {"loguniform": [1e-3, 1e-2]}},
        ),
        "train": train,
    }
    cfg = job_from_dict(job)
    pipeline.run_stage("prepare", cfg)
    s = pipeline.run_stage("tune", cfg)
    rows = s["rows"]
    assert not s["failed"] and len(rows) == 2, rows
    assert all(r["status"] == "done" and r["steps"] == 6 for r in rows), rows
    lrs = [r["train.lr"] for r in rows]
    assert len(set(lrs)) == 2 and all(
        1e-3 <= lr <= 1e-2 for lr in lrs
    )  # sampled by TPE, not a grid
    assert s["best_metric"] == pytest.approx(min(r["val_loss"] for r in rows))
    # the searcher's state (the Optuna study) is saved with the experiment, for resume
    assert list(layout.tune_dir(cfg).glob("sweep-*/searcher-state-*.pkl"))


@pytest.mark.slow
def test_metric_the_trials_do_not_report_is_refused(sweep):
    """tune.plan checks tune.metric against what every trial report carries (val_acc: only a
    classification head reports it), before any trial starts."""
    import dataclasses

    import raydapt.tune

    cfg = sweep["cfg"]
    bad = dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, metric="val_acc"))
    with pytest.raises(UserError, match="do not report 'val_acc'.*val_loss"):
        raydapt.tune.plan(bad)
