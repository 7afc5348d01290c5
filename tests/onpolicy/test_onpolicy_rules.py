"""The on-policy source's rules without engines: the EOS guard, GKD's coin and reference rows,
the rows' loss mask, and the settings checks. Pure numpy/Arrow."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydapt.config import RolloutConfig, job_from_dict
from raydapt.errors import UserError
from raydapt.onpolicy.rows import on_policy_step, rollout_rows
from raydapt.onpolicy.source import eos_check, references


def _scores(n: int, k: int = 2):
    return (np.zeros((n, k), np.int32), np.full((n, k), -1.0, np.float32), np.zeros(n, np.float32))


def test_unlearned_eos_leaves_exactly_its_position():
    prompts, responses = [[1, 2, 3], [4, 5]], [[7, 8, 0], [9, 0]]
    scores = [_scores(6), _scores(4)]
    full = rollout_rows(1, prompts, responses, scores, 2)
    cut = rollout_rows(1, prompts, responses, scores, 2, [True, False])
    a, b = full.column("loss_mask").to_pylist(), cut.column("loss_mask").to_pylist()
    assert a[0] == [0, 0, 1, 1, 1, 0]  # positions 2..4 predict 7, 8 and the EOS
    assert b[0] == [0, 0, 1, 1, 0, 0]  # the EOS prediction (position 4) is out
    assert b[1] == a[1] == [0, 1, 1, 0]


def test_eos_guard_stops_masks_or_lets_pass():
    cfg = RolloutConfig(eos_min_logprob=-9.2)
    never = 0.0  # the teacher's own samples never ended
    assert eos_check(3, [-1.0, -2.0, -30.0], 8, cfg, never) is False  # median -2: they agree
    assert eos_check(3, [], 8, cfg, never) is False  # nothing ended: nothing to judge
    # a teacher that ends its own answers: a low log-prob is the student's early stop
    assert eos_check(3, [-20.0, -15.0, -1.0], 8, cfg, 0.5) is False
    with pytest.raises(UserError) as e:
        eos_check(3, [-20.0, -15.0, -1.0], 8, cfg, never)
    msg = str(e.value)
    assert "step 3" in msg and "3 of 8 responses" in msg and "-15.0" in msg
    assert "never end within rollout.max_tokens" in msg and "rollout.eos_guard: mask" in msg
    cfg.eos_guard = "mask"
    assert eos_check(3, [-20.0, -15.0, -1.0], 8, cfg, never) is True
    cfg.eos_guard = "off"
    assert eos_check(3, [-20.0, -15.0, -1.0], 8, cfg, never) is False


def test_gkd_coin_is_seeded_per_step_with_share_lambda():
    steps = range(1, 4001)
    for lam in (0.0, 0.25, 0.7):
        picks = [on_policy_step(5, s, lam) for s in steps]
        assert picks == [on_policy_step(5, s, lam) for s in steps]  # a redone step: same coin
        # binomial: 4 standard deviations
        assert abs(np.mean(picks) - lam) <= 4 * np.sqrt(lam * (1 - lam) / len(picks)) + 1e-9
    assert all(on_policy_step(5, s, 1.0) for s in steps)


def test_reference_rows_split_at_the_first_learned_position(tmp_path):
    rows = {
        "input_ids": [[1, 2, 3, 4, 5, 0], [6, 7, 8], [9, 9, 9, 9, 9, 9, 9, 9, 9, 9]],
        "loss_mask": [[0, 0, 1, 1, 1, 0], [0, 0, 0], [1] * 9 + [0]],
    }
    f = tmp_path / "part-00000.parquet"
    pq.write_table(
        pa.table(
            {
                "input_ids": pa.array(rows["input_ids"], pa.list_(pa.int32())),
                "loss_mask": pa.array(rows["loss_mask"], pa.list_(pa.uint8())),
            }
        ),
        f,
    )
    # mask[2] = 1: token 3 is the first learned one; the row with nothing learned is skipped
    assert references((str(f),), max_len=7, max_tokens=8) == [([1, 2, 3], [4, 5, 0])]
    got = references((str(f),), max_len=64, max_tokens=2)  # responses cut to max_tokens
    assert got == [([1, 2, 3], [4, 5]), ([9], [9, 9])]


def test_gkd_mix_tune_and_guard_settings_are_checked(tmp_path):
    def problems(**sections):
        with pytest.raises(UserError) as e:
            job_from_dict(
                {
                    "output_dir": str(tmp_path),
                    "train": {"mode": "distill", "teacher": "on_policy", "kd_alpha": 1.0},
                    **sections,
                }
            )
        return str(e.value)

    assert "set prepare.pack: false" in problems(rollout={"on_policy_fraction": 0.5})
    assert "must be in [0, 1], got 1.5" in problems(rollout={"on_policy_fraction": 1.5})
    assert "'sometimes' is not one of 'stop', 'mask', 'off'" in problems(
        rollout={"eos_guard": "sometimes"}
    )
    assert "not in tune sweeps" in problems(stages=["prepare", "train", "tune"])
    ok = job_from_dict(
        {
            "output_dir": str(tmp_path),
            "prepare": {"pack": False},
            "train": {"mode": "distill", "teacher": "on_policy", "kd_alpha": 1.0},
            "rollout": {"on_policy_fraction": 0.5, "eos_guard": "mask"},
        }
    )
    assert ok.rollout.on_policy_fraction == 0.5
