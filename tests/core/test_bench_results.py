"""bench/results.json: one current row per (bench, figure), goals judged, never half-written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "bench_results", Path(__file__).resolve().parents[2] / "bench" / "_results.py"
)
results = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(results)


def test_goals_are_judged_by_their_operator():
    assert results.goal_met(0.95, ">= 0.9") is True
    assert results.goal_met(0.85, ">= 0.9") is False
    assert results.goal_met(1.3, "<= 1.2") is False
    assert results.goal_met(1.2, "<= 1.2") is True
    assert results.goal_met(7.0, "") is None
    with pytest.raises(ValueError, match="goal 'about 1'"):
        results.goal_met(1.0, "about 1")


def test_a_rerun_replaces_its_own_figures_and_keeps_the_others(tmp_path, capsys):
    path = tmp_path / "results.json"
    results.record("prepare", [("ratio", 0.99, ">= 1.5"), ("tok/s", 4e5, "")], path=path)
    results.record("train", [("ratio", 0.93, ">= 0.9")], {"batch": 8}, path=path)
    results.record("prepare", [("ratio", 1.61, ">= 1.5")], path=path)
    rows = json.loads(path.read_text())
    got = {(r["bench"], r["figure"]): (r["value"], r["met"]) for r in rows}
    assert got == {
        ("prepare", "ratio"): (1.61, True),
        ("prepare", "tok/s"): (400000.0, None),
        ("train", "ratio"): (0.93, True),
    }
    train = next(r for r in rows if r["bench"] == "train")
    assert train["settings"] == {"batch": 8} and "cores" in train["machine"]
    assert not list(tmp_path.glob("*.tmp"))  # written beside, then renamed over
    assert "prepare: ratio = 1.61 (>= 1.5: met)" in capsys.readouterr().out
