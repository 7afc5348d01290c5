"""The command line: help, exit codes and messages, run as a real subprocess."""

import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}


def raydapt(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "raydapt", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def test_help_lists_every_command():
    r = raydapt("--help")
    assert r.returncode == 0
    for cmd in ("prepare", "teach", "train", "tune", "eval", "serve", "run", "init-model", "demo"):
        assert cmd in r.stdout


@pytest.mark.parametrize("cmd", ["prepare", "train", "serve", "init-model"])
def test_subcommand_help(cmd):
    r = raydapt(cmd, "--help")
    assert r.returncode == 0 and "usage: raydapt " + cmd in r.stdout


def test_bad_config_exits_2_before_any_cluster(tmp_path):
    job = tmp_path / "j.yaml"
    job.write_text("train:\n  lr: -1\n  colour: red\n")
    r = raydapt("prepare", str(job))
    assert r.returncode == 2
    assert "train.lr: must be > 0" in r.stderr and "train.colour: unknown key" in r.stderr
    assert "Started a local Ray instance" not in r.stderr + r.stdout


def test_missing_job_file_exits_2(tmp_path):
    r = raydapt("train", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "job file not found" in r.stderr


def test_bad_override_exits_2():
    r = raydapt("config", "jobs/prepare-only.yaml", "train.lr")
    assert r.returncode == 2 and "expected section.key=value" in r.stderr


def test_init_model_missing_corpus_exits_2(tmp_path):
    r = raydapt(
        "init-model",
        "--preset",
        "tiny",
        "--corpus",
        str(tmp_path / "none.jsonl"),
        "--out",
        str(tmp_path / "m"),
    )
    assert r.returncode == 2 and "none.jsonl" in r.stderr
    assert not (tmp_path / "m").exists()


def test_unreachable_address_fails_fast(tmp_path):
    r = raydapt(
        "prepare",
        "jobs/prepare-only.yaml",
        f"output_dir={tmp_path}",
        "cluster.connect_timeout_s=3",
        "--address",
        "127.0.0.1:1",
        timeout=60,
    )
    assert r.returncode == 2 and "no Ray cluster answers at 127.0.0.1:1" in r.stderr
