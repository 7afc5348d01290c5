"""Storage: the one up-to-date rule and the per-output lock (pure; no Ray)."""

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from raydapt.errors import UserError
from raydapt.storage import finish_manifest, finish_record, output_lock, up_to_date


def test_up_to_date_needs_a_complete_output_with_the_same_fingerprint(tmp_path):
    folder = tmp_path / "prepared"
    assert not up_to_date(folder, "abc")
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"fingerprint": "abc"}))  # not complete
    assert not up_to_date(folder, "abc")
    finish_manifest(folder, {"fingerprint": "abc", "versions": {}})
    assert up_to_date(folder, "abc") and not up_to_date(folder, "abd")
    record = tmp_path / "eval" / "student.json"  # a one-file output follows the same rule
    finish_record(record, {"fingerprint": "f1", "loss": 1.0})
    assert up_to_date(record, "f1") and not up_to_date(record, "f2")


def test_a_second_run_on_the_same_output_names_the_holder(tmp_path):
    out = tmp_path / "train" / "final"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / "train" / "final.lock"
        lock.parent.mkdir(parents=True)
        lock.write_text(
            json.dumps(
                {"pid": holder.pid, "host": socket.gethostname(), "started": "2026-12-01T10:00:00Z"}
            )
        )
        with pytest.raises(UserError) as e, output_lock(out):
            pass
        assert f"pid {holder.pid}" in str(e.value) and "2026-12-01T10:00:00Z" in str(e.value)
        assert lock.exists()  # the holder's lock is left alone
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_lock_is_taken_over_and_logged(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "targets"
    lock = tmp_path / "targets.lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "then"}))
    with caplog.at_level(logging.WARNING, logger="raydapt.storage"), output_lock(out) as held:
        assert json.loads(held.read_text())["pid"] == os.getpid()
    assert f"of pid {dead.pid}" in caplog.text
    assert not lock.exists()  # released on exit


def test_the_lock_is_released_when_the_stage_raises(tmp_path):
    with pytest.raises(RuntimeError), output_lock(tmp_path / "x"):
        raise RuntimeError("boom")
    with output_lock(tmp_path / "x"):
        pass
