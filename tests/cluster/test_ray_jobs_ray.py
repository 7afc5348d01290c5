"""Ray Jobs: `ray job submit ... -- python -m raydapt run JOB` against a real 2-node local cluster.

The head and a second node are real `ray start` processes with their own resources and a
private temp dir, so no other test's `ray.init` can attach to them.

The cluster runs with token authentication on, as README "Running on a real cluster" sets it
up: RAY_AUTH_MODE=token on every node and the token handed over in a file. The token is made
here and kept in the cluster's temp dir (RAY_AUTH_TOKEN_PATH), so the test needs no
~/.ray/auth_token and never writes or reads one. Processes that must go without a token get
an environment with every RAY_AUTH_* variable removed (an earlier local `ray.init` in this
pytest process sets RAY_AUTH_MODE=token in os.environ).
"""

import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import pytest
from builders import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def two_node_cluster():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    tmp = Path(f"/tmp/rdj-{uuid.uuid4().hex[:6]}")
    port, dash = free_port(), free_port()
    tmp.mkdir(parents=True)
    token = secrets.token_hex(32)
    token_file = tmp / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    # every node: token auth on, the token from a file in the temp dir (never ~/.ray/auth_token)
    env = {**_no_auth_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    ray_cli = str(BIN / "ray")
    head = [
        ray_cli,
        "start",
        "--head",
        f"--port={port}",
        f"--dashboard-port={dash}",
        "--dashboard-host=127.0.0.1",
        "--num-cpus=4",
        f"--temp-dir={tmp}",
        "--include-dashboard=true",
        "--disable-usage-stats",
        f"--ray-client-server-port={free_port()}",
        *_node_ports(),
    ]
    # its own temp dir: nodes sharing one would unpack the job's working_dir into the same
    # folder, and the second node's unpacking deletes the driver's current directory
    second = [
        ray_cli,
        "start",
        f"--address=127.0.0.1:{port}",
        "--num-cpus=4",
        f"--temp-dir={tmp}-2",
        '--resources={"second_node": 1}',
        *_node_ports(),
    ]
    before = _pids()
    try:
        subprocess.run(head, check=True, env=env, capture_output=True, timeout=180)
        subprocess.run(second, check=True, env=env, capture_output=True, timeout=180)
        yield Cluster(f"http://127.0.0.1:{dash}", f"127.0.0.1:{port}", token, tmp)
    finally:
        # `ray stop` would kill every Ray on the machine; end only the processes started here
        # (agents rename themselves `ray::...`, so their command lines no longer name the cluster)
        _kill_new_ray_processes(before)
        for d in (tmp, f"{tmp}-2", f"{tmp}-3"):
            shutil.rmtree(d, ignore_errors=True)


class Cluster(NamedTuple):
    dashboard: str
    gcs: str
    token: str
    tmp: Path


def _no_auth_env() -> dict[str, str]:
    """The environment of a process on this machine that was given no Ray token."""
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)
    return env


def _node_ports() -> list[str]:
    """Two nodes on one machine must not share the per-node agent ports (defaults collide)."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


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

    cluster = two_node_cluster
    # the submitter hands the cluster's token over (README: RAY_AUTH_MODE=token + RAY_AUTH_TOKEN)
    client = JobSubmissionClient(
        cluster.dashboard, headers={"Authorization": f"Bearer {cluster.token}"}
    )
    out = tmp_path / "run"
    entry = (
        f"python -m raydapt run jobs/prepare-only.yaml output_dir={out} "
        "corpus.world_train=300 corpus.world_heldout=20 corpus.world_markov_docs=20 "
        "prepare.seq_len=128"
    )
    runtime_env = {
        "working_dir": str(ROOT),
        "excludes": [".venv", ".git", "runs", "*.egg-info", ".pytest_cache", "bench/out"],
        "env_vars": {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"},
    }
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
    while (
        status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
        and time.time() < deadline
    ):
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


def _ray_cli(
    args: list[str], env: dict[str, str], timeout: int = 180
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.mark.slow
def test_job_submission_needs_the_token(two_node_cluster):
    """`ray job submit` as the README writes it: refused without the token or with a wrong one."""
    cluster = two_node_cluster
    submit = [
        "job",
        "submit",
        "--address",
        cluster.dashboard,
        "--no-wait",
        "--working-dir",
        ".",
        "--",
        "python",
        "-m",
        "raydapt",
        "run",
        "jobs/prepare-only.yaml",
    ]
    r = _ray_cli(submit, _no_auth_env())
    assert r.returncode != 0 and "Missing authentication token" in r.stdout + r.stderr, (
        r.stdout + r.stderr
    )
    r = _ray_cli(submit, {**_no_auth_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64})
    assert r.returncode != 0 and "Invalid authentication token" in r.stdout + r.stderr, (
        r.stdout + r.stderr
    )
    # a token without RAY_AUTH_MODE=token is never sent
    r = _ray_cli(
        ["job", "list", "--address", cluster.dashboard],
        {**_no_auth_env(), "RAY_AUTH_TOKEN": cluster.token},
    )
    assert r.returncode != 0, r.stdout + r.stderr
    r = _ray_cli(
        ["job", "list", "--address", cluster.dashboard],
        {**_no_auth_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": cluster.token},
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_node_without_the_token_cannot_join(two_node_cluster):
    cluster = two_node_cluster
    third = [
        "start",
        f"--address={cluster.gcs}",
        "--num-cpus=1",
        f"--temp-dir={cluster.tmp}-3",
        *_node_ports(),
    ]
    r = _ray_cli(third, _no_auth_env())
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "InvalidAuthToken" in out, out[-3000:]


@pytest.mark.slow
def test_raydapt_without_the_token_says_what_to_set(two_node_cluster, tmp_path):
    """raydapt's own CLI attaching with --address: exit 2 and the variables to set, no traceback."""
    cluster = two_node_cluster
    cmd = [
        sys.executable,
        "-m",
        "raydapt",
        "prepare",
        "jobs/prepare-only.yaml",
        f"output_dir={tmp_path / 'run'}",
        "--address",
        cluster.gcs,
    ]
    t0 = time.monotonic()
    r = subprocess.run(
        cmd, env=_no_auth_env(), capture_output=True, text=True, timeout=180, cwd=ROOT
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert "raydapt: error:" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    for var in ("RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        assert var in r.stderr, (var, r.stderr[-3000:])
    assert time.monotonic() - t0 < 60  # asked the cluster once, not ray.init's 20 s of retries
    # a wrong token: refused, and said so
    r = subprocess.run(
        cmd,
        env={**_no_auth_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert r.returncode == 2 and "refused this process's token" in r.stderr, r.stderr[-3000:]
    # no stage output: only the log folder, whose console.log holds Ray's own messages
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["logs"]
