"""On-policy distillation end to end on a real Ray cluster: a vLLM rollout engine holding the
student's weights samples, a vLLM teacher engine scores, a Ray Train worker trains, and the
trainer's weights go back to the rollout engine every `rollout.sync_every` steps."""

from __future__ import annotations

import math

import pytest
from builders import run_train, train_job, train_metrics

from raydapt import layout
from raydapt.errors import UserError
from raydapt.models import init_model
from raydapt.pipeline import run_stage
from raydapt.train import plan as train_plan

TEXT = "the quick brown fox jumps over lazy dogs while seven wizards quietly hum " * 20
ON_POLICY = {
    "mode": "distill",
    "teacher": "on_policy",
    "kd_alpha": 1.0,
    "batch_size": 4,
    "max_steps": 4,
    "checkpoint_every": 4,
    "eval_every": 4,
    "num_workers": 1,
    "cpus_per_worker": 1,
}


@pytest.fixture(scope="module")
def student_dir(tiny_model_dir, world_dir, tmp_path_factory):
    """A second tiny model on the teacher's tokenizer: the student to distill."""
    out = tmp_path_factory.mktemp("onpolicy") / "student"
    return init_model("tiny", world_dir / "train.jsonl", out, seed=1, tokenizer_from=tiny_model_dir)


def _job(tmp_path, teacher, student, **train):
    cfg = train_job(
        tmp_path,
        teacher,
        student={"path": str(student)},
        teacher_model={"path": str(teacher)},
        **{**ON_POLICY, **train},
    )
    cfg.rollout.max_tokens = 12
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize(("kd_loss", "sync_every"), [("reverse_kl", 2), ("reverse_kl_sampled", 1)])
def test_on_policy_trains_and_syncs_the_rollout_engine(
    kd_loss, sync_every, tmp_path, tiny_model_dir, student_dir, ray_session
):
    ray_session()
    cfg = _job(tmp_path, tiny_model_dir, student_dir, kd_loss=kd_loss)
    cfg.rollout.sync_every = sync_every
    run_stage("prepare", cfg)
    summary = run_train(cfg)
    rows = train_metrics(cfg)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # the weights each step sampled from: synced after every `sync_every` steps
    want_version = [(s - 1) // sync_every * sync_every for s in range(1, 5)]
    assert [r["weight_version"] for r in rows] == want_version
    assert [r["lag"] for r in rows] == [s - 1 - v for s, v in zip(range(1, 5), want_version)]
    synced = [r["step"] for r in rows if "sync_s" in r]
    assert synced == [s for s in (1, 2, 3) if s % sync_every == 0]  # never after the last step
    for r in rows:
        assert math.isfinite(r["loss"]) and r["wait_s"] > 0
        assert 0 < r["response_len_mean"] <= 12 and 0 <= r["ended_fraction"] <= 1
        assert r["tokens"] > 0  # loss on the sampled response tokens only
    if kd_loss == "reverse_kl_sampled":
        assert all(math.isfinite(r["kl_estimate"]) for r in rows)
    else:
        assert all(r["kd"] > 0 for r in rows)  # exact top-k + tail reverse KL: positive
    assert (layout.export_dir(cfg) / "config.json").is_file() and summary["metrics"]["step"] == 4


def test_on_policy_refuses_a_teacher_with_another_tokenizer(
    tmp_path, tiny_model_dir, world_dir, ray_session
):
    ray_session()
    corpus = tmp_path / "other.jsonl"  # another corpus: another BPE vocabulary
    corpus.write_text("".join(f'{{"text": "{w} {w[::-1]} {w}{w}"}}\n' for w in TEXT.split()))
    other = init_model("tiny", corpus, tmp_path / "other")
    cfg = _job(tmp_path, tiny_model_dir, other)
    cfg.student.path = str(tiny_model_dir)
    cfg.teacher.path = str(other)
    run_stage("prepare", cfg)
    with pytest.raises(UserError, match="another tokenizer than the student"):
        train_plan(cfg)


def test_on_policy_settings_are_checked_up_front(tmp_path, tiny_model_dir):
    from raydapt.config import job_from_dict

    with pytest.raises(UserError) as e:
        job_from_dict(
            {
                "output_dir": str(tmp_path),
                "train": {"mode": "full", "teacher": "on_policy", "kd_alpha": 0.5},
                "rollout": {"sync_every": 0},
            }
        )
    msg = str(e.value)
    assert "set train.mode: distill" in msg and "train.kd_alpha: on_policy" in msg
    assert "rollout.sync_every: must be > 0" in msg
    with pytest.raises(UserError, match="reverse_kl_sampled needs the student's own samples"):
        job_from_dict({"train": {"mode": "distill", "kd_loss": "reverse_kl_sampled"}})


@pytest.mark.slow
def test_async_rollouts_run_ahead_within_the_staleness_bound(
    tmp_path, tiny_model_dir, student_dir, ray_session
):
    """rollout.max_staleness = 1: step t + 1's rollouts start while step t trains, from the
    weights before step t's push; every batch after the first is prefetched, one step old."""
    ray_session()
    cfg = _job(tmp_path, tiny_model_dir, student_dir, kd_loss="reverse_kl")
    cfg.rollout.max_staleness = 1
    run_stage("prepare", cfg)
    run_train(cfg)
    rows = train_metrics(cfg)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["prefetched"] for r in rows] == [0, 1, 1, 1]
    for r in rows:
        assert 0 <= r["lag"] <= 1 and r["weight_version"] == r["step"] - 1 - r["lag"]
        assert math.isfinite(r["loss"]) and r["kd"] > 0
    assert sum(r["lag"] for r in rows) >= 1  # the run really went ahead of its weights


@pytest.mark.slow
def test_gkd_mix_trains_on_samples_and_references(
    tmp_path, tiny_model_dir, student_dir, ray_session
):
    """rollout.on_policy_fraction = 0.5 (GKD's lambda): a seeded coin per step picks the
    student's samples or the prepared reference responses; the teacher scores both."""
    from raydapt.onpolicy.rows import on_policy_step

    ray_session()
    cfg = _job(tmp_path, tiny_model_dir, student_dir, kd_loss="jsd")
    cfg.prepare.pack = False
    cfg.rollout.on_policy_fraction = 0.5
    coins = [on_policy_step(cfg.rollout.seed, s, 0.5) for s in range(1, 5)]
    assert 0 < sum(coins) < 4  # this seed draws both kinds within 4 steps
    run_stage("prepare", cfg)
    run_train(cfg)
    rows = train_metrics(cfg)
    assert [bool(r["on_policy"]) for r in rows] == coins
    for r, coin in zip(rows, coins):
        assert math.isfinite(r["loss"]) and r["kd"] > 0 and r["tokens"] > 0
        if not coin:  # references: nothing generated
            assert r["rollout_s"] < 0.05 and r["response_len_max"] <= cfg.rollout.max_tokens


def test_on_policy_plans_on_a_corpus_of_open_instructions(tmp_path, tiny_model_dir, ray_session):
    """Prompt-only rows (no responses) make no training rows, only prompts: that is all
    on-policy distillation needs; GKD's reference share, which needs responses, refuses."""
    ray_session()
    corpus = tmp_path / "prompts.jsonl"
    corpus.write_text("".join(f'{{"prompt": "say {w} twice"}}\n' for w in TEXT.split()[:20]))
    cfg = _job(tmp_path, tiny_model_dir, tiny_model_dir)
    cfg.corpus.source, cfg.corpus.paths = "files", [str(corpus)]
    cfg.prepare.pack = False
    run_stage("prepare", cfg)
    p = train_plan(cfg)
    assert p.train_files == () and p.on_policy is not None
    cfg.rollout.on_policy_fraction = 0.5
    with pytest.raises(UserError, match="has no 'train' rows"):
        train_plan(cfg)
