"""Ray Jobs: `ray job submit ... -- python -m raydapt run JOB` against a real 2-node local cluster.

The head and a second node are real `ray start` processes with their own resources and a
private temp dir, so no other test's `ray.init` can attach to them.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_node_cluster():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    tmp = Path(f"/tmp/rdj-{uuid.uuid4().hex[:6]}")
    port, dash = free_port(), free_port()
    # Token auth is off on this loopback-only test cluster, so the second node can join
    # without distributing a token.
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    ray_cli = str(BIN / "ray")
    head = [ray_cli, "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1", "--num-cpus=4", f"--temp-dir={tmp}",
            "--include-dashboard=true", "--disable-usage-stats", f"--ray-client-server-port={free_port()}",
            *_node_ports()]
    # its own temp dir: nodes sharing one would unpack the job's working_dir into the same
    # folder, and the second node's unpacking deletes the driver's current directory
    second = [ray_cli, "start", f"--address=127.0.0.1:{port}", "--num-cpus=4", f"--temp-dir={tmp}-2",
              '--resources={"second_node": 1}', *_node_ports()]
    before = _pids()
    try:
        subprocess.run(head, check=True, env=env, capture_output=True, timeout=180)
        subprocess.run(second, check=True, env=env, capture_output=True, timeout=180)
        yield f"http://127.0.0.1:{dash}", f"127.0.0.1:{port}"
    finally:
        # `ray stop` would kill every Ray on the machine; end only the processes started here
        # (agents rename themselves `ray::...`, so their command lines no longer name the cluster)
        _kill_new_ray_processes(before)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(f"{tmp}-2", ignore_errors=True)


def _node_ports() -> list[str]:
    """Two nodes on one machine must not share the per-node agent ports (defaults collide)."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


def _pids() -> set[int]:
    return {int(p) for p in os.listdir("/proc") if p.isdigit()}


def _kill_new_ray_processes(before: set[int]) -> None:
    import signal

    for _ in range(5):
        found = False
        for pid in _pids() - before - {os.getpid()}:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="ignore")
            except OSError:
                continue
            if "ray" in cmd:
                found = True
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if not found:
            return
        time.sleep(1)


@pytest.mark.slow
def test_job_submission_runs_a_job_on_two_nodes(two_node_cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    dashboard, gcs = two_node_cluster
    client = JobSubmissionClient(dashboard)
    out = tmp_path / "run"
    entry = (f"python -m raydapt run jobs/prepare-only.yaml output_dir={out} "
             "corpus.world_train=300 corpus.world_heldout=20 corpus.world_markov_docs=20 prepare.seq_len=128")
    runtime_env = {"working_dir": str(ROOT),
                   "excludes": [".venv", ".git", "runs", "*.egg-info", ".pytest_cache", "bench/out"],
                   "env_vars": {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}}
    for attempt in range(60):  # the dashboard agent needs a moment after `ray start`
        try:
            job_id = client.submit_job(entrypoint=entry, runtime_env=runtime_env)
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or attempt == 59:
                raise
            time.sleep(2)
    deadline = time.time() + 400
    status = client.get_job_status(job_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.time() < deadline:
        time.sleep(2)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "[run] prepare: starting" in logs and "prepare:" in logs
    manifest = out / "prepared" / "manifest.json"
    assert manifest.is_file()
    import json
    m = json.loads(manifest.read_text())
    assert m["complete"] is True and m["rows"]["train"] > 0
    # the job's driver attached to this cluster, not to a new local one
    assert "connecting to Ray at" in logs and "starting a local Ray cluster" not in logs
