"""Config: typed sections, overrides, all errors at once, and every shipped job validates."""

from pathlib import Path

import pytest

from raydapt.config import ConfigError, JobConfig, explain, job_from_dict, load_job
from raydapt.errors import UserError

JOBS = sorted(Path(__file__).resolve().parents[2].joinpath("jobs").glob("*.yaml"))


def test_defaults_are_valid():
    cfg = job_from_dict({})
    assert isinstance(cfg, JobConfig)
    assert cfg.train.mode == "full" and cfg.student.preset == "tiny"


def test_overrides_coerce_types(tmp_path):
    job = tmp_path / "j.yaml"
    job.write_text("train:\n  lr: 1.0e-3\n")
    cfg = load_job(
        job,
        [
            "train.lr=3e-4",
            "train.mode=lora",
            "train.max_steps=7",
            "train.lora_targets=[q_proj,k_proj]",
            "train.use_gpu=false",
            "name=x",
        ],
    )
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.mode == "lora" and cfg.train.max_steps == 7
    assert cfg.train.lora_targets == ["q_proj", "k_proj"]
    assert cfg.name == "x" and cfg.out == Path("runs/x").absolute()


def test_all_errors_reported_together(tmp_path):
    job = tmp_path / "bad.yaml"
    job.write_text(
        "trian: {}\n"  # unknown section
        "train:\n  lr: fast\n  mdoe: lora\n  max_steps: -1\n"
        "teach:\n  kind: sample\n"
        "stages: [prepare, bake]\n"
    )
    with pytest.raises(ConfigError) as e:
        load_job(job)
    msg = str(e.value)
    assert str(job) in msg
    for needle in (
        "trian: unknown section (did you mean `train`?)",
        "train.lr: expected float",
        "train.mdoe: unknown key (did you mean `mode`?)",
        "train.max_steps: must be > 0",
        "teach.kind: 'sample' is not one of",
        "stages: 'bake' is not a stage",
    ):
        assert needle in msg, needle
    assert len(e.value.problems) == 6


def test_cross_field_checks():
    with pytest.raises(ConfigError) as e:
        job_from_dict(
            {
                "corpus": {"source": "files"},
                "teach": {"min_actors": 3, "max_actors": 1},
                "train": {"mode": "distill", "kd_k": 8, "jsd_beta": 1.5, "keep_checkpoints": -1},
                "tune": {
                    "space": {
                        "train.lr": {"loguniform": [0, 1]},
                        "train.nope": {"choice": [1]},
                        "lr": {"choice": [1]},
                    }
                },
            }
        )
    msg = str(e.value)
    assert "corpus.paths" in msg and "teach.max_actors" in msg
    # a removed key names its replacement; ranges match the losses' ([0, 1] for jsd_beta)
    assert "train.kd_k: removed; use teach.k" in msg
    assert "train.jsd_beta: must be in [0, 1], got 1.5" in msg
    assert "train.keep_checkpoints: must be >= 0 (0 keeps all), got -1" in msg
    assert "tune.space.train.lr.loguniform: bounds must be > 0" in msg
    assert "tune.space.train.nope: train has no key `nope`" in msg
    assert "tune.space.lr: only train.* keys" in msg


def test_yaml_typo_and_missing_file(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML syntax"):
        load_job(bad)
    with pytest.raises(UserError, match="job file not found"):
        load_job(tmp_path / "nope.yaml")


def test_explain_lists_every_key():
    text = explain()
    for key in ("seq_len", "kd_alpha", "lora_r", "max_ongoing_requests", "num_cpus"):
        assert key in text


@pytest.mark.parametrize("job", JOBS, ids=[j.name for j in JOBS])
def test_every_shipped_job_validates(job):
    cfg = load_job(job)
    assert cfg.stages, job


def test_jsd_beta_accepts_the_losses_whole_range():
    for beta in (0.0, 1.0):
        assert job_from_dict({"train": {"jsd_beta": beta}}).train.jsd_beta == beta


def test_removed_key_on_the_command_line_exits_2():
    from raydapt.cli import main

    assert main(["config", str(JOBS[0].parent / "demo.yaml"), "train.kd_k=64"]) == 2
