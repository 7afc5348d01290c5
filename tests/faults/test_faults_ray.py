"""Faults on a simulated 3-node cluster: lose a Train worker, a teacher actor, a Serve replica
or a whole node, and lose no data.

    .venv/bin/python -m pytest tests/faults/test_faults_ray.py -x -q --timeout=900

The cluster is `ray.cluster_utils.Cluster`: a head node without CPUs (driver, Train
controller, Serve controller and proxy) and two worker nodes with 2 CPUs and 200 MiB of
object store each, all real raylets on this machine. The shared session cluster of
conftest.py is shut down first and started again by the next test that needs it.

Faults are real: SIGKILL of a Train worker or teacher actor process (found through the pid
file it writes at a fault-injection point, see `loop.hold_for_kill` and
`pool.hold_for_kill`), `ray.kill` of a Serve replica actor, and `Cluster.remove_node`. Each
test asserts the data outcome: losses within 1e-5 of an uninterrupted run, each target id
exactly once, HTTP status codes and the replica count.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from builders import run_train, train_metrics

from raydapt import layout

WORKER_NODE = {"num_cpus": 2, "object_store_memory": 200 * 2**20, "resources": {"worker_node": 1}}
ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


# ----------------------------------------------------------------------------- storage

WRITER = r"""
import sys, time
from pathlib import Path
import numpy as np, pyarrow as pa
from raydapt.storage import atomic_dir, finish_manifest
from raydapt.targets import PartStore
root = Path(sys.argv[1])
store = PartStore(root / "targets")
parts = [pa.table({"id": [f"p{p}-{i:05d}" for i in range(PART_ROWS)],
                   "input_ids": [list(range(i % 50 + 1)) for i in range(PART_ROWS)]})
         for p in range(PARTS)]
print("go", flush=True)
for t in parts:
    store.write(t)
store.finalize({"kind": "score", "versions": {}}, rows_per_file=FILE_ROWS)
with atomic_dir(root / "train" / "checkpoints" / "checkpoint_000002") as tmp:
    for i in range(TENSORS):
        np.save(tmp / f"t{i}.npy", np.full((256, 256), float(i)))
    finish_manifest(tmp, {"step": 2, "tensors": TENSORS, "versions": {}})
print("done", flush=True)
"""
PARTS, PART_ROWS, FILE_ROWS, TENSORS = 6, 2000, 250, 40


def start_writer(root: Path):
    import subprocess
    import sys

    code = (
        WRITER.replace("PART_ROWS", str(PART_ROWS))
        .replace("PARTS", str(PARTS))
        .replace("FILE_ROWS", str(FILE_ROWS))
        .replace("TENSORS", str(TENSORS))
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "go"
    return proc


def check_outputs(root: Path) -> str:
    """What a later stage would read: whole parts only, and complete folders or nothing."""
    import numpy as np
    import pyarrow.parquet as pq

    from raydapt.errors import UserError
    from raydapt.targets import PartStore, read_targets
    from raydapt.train.checkpoint import latest_local

    done = PartStore(root / "targets").done_ids()
    assert len(done) % PART_ROWS == 0, len(done)  # a part is there whole or not at all
    state = f"{len(done) // PART_ROWS} parts"
    try:
        manifest, files = read_targets(root / "targets")
    except UserError:
        pass
    else:
        ids = [x for f in files for x in pq.read_table(f, columns=["id"]).column("id").to_pylist()]
        assert len(ids) == len(set(ids)) == manifest["rows"] == PARTS * PART_ROWS
        state = "targets complete"
    ckpt = latest_local(root / "train")
    if ckpt is not None:
        assert ckpt.name == "checkpoint_000002"
        for i in range(TENSORS):
            assert np.load(ckpt / f"t{i}.npy")[-1, -1] == i
        state = "checkpoint complete"
    return state


def test_killed_writer_never_leaves_output_that_reads_complete(tmp_path):
    """SIGKILL a real writer process (targets parts, targets finalize, a checkpoint folder) at
    eight moments spread over its run: each time, a reader sees whole parts and complete folders
    or nothing; a rerun of the write then completes over the debris."""
    full = start_writer(tmp_path / "full")
    t0 = time.monotonic()
    assert full.wait(120) == 0
    span = time.monotonic() - t0
    assert check_outputs(tmp_path / "full") == "checkpoint complete"
    seen = set()
    for i in range(8):
        root = tmp_path / f"k{i}"
        proc = start_writer(root)
        time.sleep(span * (i + 0.5) / 8)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        seen.add(check_outputs(root))
        rerun = start_writer(root)
        assert rerun.wait(120) == 0
        assert check_outputs(root) == "checkpoint complete"
        assert not list(root.rglob("*.tmp-*")) and not list(root.rglob(".*.tmp"))
    assert len(seen) >= 2, seen  # the kills landed in different phases of the write


# ----------------------------------------------------------------------------- cluster


class Nodes:
    """The simulated cluster and the node ids of its worker nodes."""

    def __init__(self, cluster):
        self.cluster = cluster

    def worker_ids(self) -> set[str]:
        return {n.node_id for n in self.cluster.worker_nodes}

    def remove(self, node_id: str) -> None:
        """Kill every process of the node (raylet, object store, its workers), as a lost machine."""
        node = next(n for n in self.cluster.worker_nodes if n.node_id == node_id)
        self.cluster.remove_node(node, allow_graceful=False)

    def replace(self) -> str:
        """Add a fresh worker node, so later tests find the cluster at full size again."""
        return self.cluster.add_node(**WORKER_NODE).node_id

    def alive_worker_ids(self) -> set[str]:
        import ray

        return {
            n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("worker_node")
        }


@pytest.fixture(scope="module")
def nodes(ray_session):
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # the shared single-node cluster; the next test that needs it restarts it
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "object_store_memory": 300 * 2**20,
            "include_dashboard": False,
        },
    )
    try:
        for _ in range(2):
            cluster.add_node(**WORKER_NODE)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env={"env_vars": ENV})
        yield Nodes(cluster)
    finally:
        ray.shutdown()
        cluster.shutdown()


def wait_for(path: Path, timeout: float = 240) -> dict:
    """The JSON a held worker wrote at a fault-injection point."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"nothing reached the fault-injection point ({path}) in {timeout:.0f} s"
            )
        time.sleep(0.2)
    return json.loads(path.read_text())


class Background:
    """Run `fn` in a thread; `result()` re-raises its exception in the test."""

    def __init__(self, fn):
        self.value, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            self.value = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            self.error = e

    def result(self, timeout: float = 600):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"still running after {timeout:.0f} s"
        if self.error is not None:
            raise self.error
        return self.value


# ----------------------------------------------------------------------------- training

TRAIN_KW = dict(
    max_steps=8,
    checkpoint_every=3,
    eval_every=4,
    batch_size=4,
    num_workers=2,
    cpus_per_worker=1,
    placement_strategy="SPREAD",
    max_failures=2,
)


@pytest.fixture(scope="module")
def train_setup(nodes, tmp_path_factory, world_dir, tiny_model_dir):
    """A job factory and one uninterrupted 2-worker run to compare against."""
    from builders import train_job, train_rows, write_train_prepared

    rows = train_rows(world_dir, tiny_model_dir)
    root = tmp_path_factory.mktemp("faults_train")

    def job(sub: str):
        cfg = train_job(root / sub, tiny_model_dir, **TRAIN_KW)
        write_train_prepared(layout.prepared_dir(cfg), tiny_model_dir, rows)
        return cfg

    straight = job("straight")
    return job, straight, run_train(straight)


def held_train_run(cfg, hold: Path, step: int) -> tuple[Background, list[dict]]:
    """Start a run whose workers park after `step`; returns it and the workers' pid files."""
    os.environ["RAYDAPT_HOLD_AT_STEP"], os.environ["RAYDAPT_HOLD_FILE"] = str(step), str(hold)
    try:
        bg = Background(lambda: run_train(cfg))
        infos = [wait_for(Path(f"{hold}.s{step}.rank{r}")) for r in range(2)]
    finally:
        del os.environ["RAYDAPT_HOLD_AT_STEP"], os.environ["RAYDAPT_HOLD_FILE"]
    return bg, infos


def assert_same_model(straight, faulty, summary: dict, start: int) -> None:
    """The faulty run restarted from checkpoint `start` and ended where the straight one did."""
    from safetensors.torch import load_file

    assert summary["start_step"] == start
    a, b = train_metrics(straight), train_metrics(faulty)
    # the restarted group redid the steps after the checkpoint: every step is logged, some twice
    assert sorted({x["step"] for x in b}) == list(range(1, 9))
    last = {x["step"]: x for x in b}  # the surviving attempt's line for each step
    for x in a:
        assert abs(x["loss"] - last[x["step"]]["loss"]) < 1e-5, (
            x["step"],
            x["loss"],
            last[x["step"]]["loss"],
        )
    assert abs(a[-1]["val_loss"] - b[-1]["val_loss"]) < 1e-5
    wa = load_file(layout.export_dir(straight) / "model.safetensors")
    wb = load_file(layout.export_dir(faulty) / "model.safetensors")
    assert sorted(wa) == sorted(wb)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


@pytest.mark.slow
def test_train_worker_killed_resumes_from_checkpoint(train_setup, tmp_path):
    """SIGKILL of rank 1 after step 4: the group restarts from checkpoint 3 and ends exactly."""
    job, straight, _ = train_setup
    cfg = job("killed")
    bg, infos = held_train_run(cfg, tmp_path / "hold", step=4)
    assert len({i["node_id"] for i in infos}) == 2  # SPREAD: one worker per node
    os.kill(infos[1]["pid"], signal.SIGKILL)
    summary = bg.result()
    assert_same_model(straight, cfg, summary, start=3)


# ----------------------------------------------------------------------------- teacher pool


@pytest.fixture(scope="module")
def teach_job(nodes, tmp_path_factory, tiny_model_dir, world_dir):
    """Factory: a 2-actor HF-backend score job over 16 prepared rows, 2 rows per batch."""
    from builders import teach_job as job
    from builders import write_teach_prepared as write_prepared

    root = tmp_path_factory.mktemp("faults_teach")

    def make(sub: str, **teach):
        write_prepared(root / sub, tiny_model_dir, world_dir, n_rows=16, n_prompts=1)
        kw = dict(backend="hf", min_actors=2, max_actors=2, batch_size=2, cpus_per_actor=1) | teach
        return job(root / sub, tiny_model_dir, **kw)

    return make


def held_teach_run(cfg, hold: Path) -> tuple[Background, dict]:
    """Start the teach stage; one actor parks after writing a part. Returns it and that actor."""
    from builders import run_teach

    from raydapt.teach.pool import HOLD_ENV

    os.environ[HOLD_ENV] = str(hold)
    try:
        bg = Background(lambda: run_teach(cfg))
        info = wait_for(hold)
    finally:
        del os.environ[HOLD_ENV]
    return bg, info


def assert_each_id_once(cfg, result: dict, held: dict) -> None:
    """Every prepared row is a target exactly once, including the rows of the lost batch."""
    import pyarrow.parquet as pq
    from builders import final_table

    want = pq.read_table(layout.prepared_dir(cfg) / "train").column("id").to_pylist()
    manifest, table = final_table(cfg)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(want) == manifest["rows"]
    assert set(ids) == set(want) and set(held["ids"]) <= set(ids)
    assert result["computed_rows"] == len(want)


@pytest.mark.slow
def test_teacher_actor_killed_mid_batch_rows_retried(teach_job, tmp_path):
    """SIGKILL of an actor that wrote its part but never returned the batch: the batch is
    retried by a new actor process, its ids are written twice and kept once."""
    cfg = teach_job("killed")
    bg, held = held_teach_run(cfg, tmp_path / "hold")
    assert Path(held["part"]).is_file()  # the lost batch's part is already staged
    os.kill(held["pid"], signal.SIGKILL)
    result = bg.result()
    # the parked actor never returned its batch, yet the driver got every row back once:
    # the held rows came back from another (restarted) actor process
    assert_each_id_once(cfg, result, held)


# ----------------------------------------------------------------------------- serve

REPLICA = "SERVE_REPLICA::raydapt#OpenAIServer#"


def replicas() -> dict[str, dict]:
    """Alive replica actors of the app (GCS actor table: name -> pid, node), no dashboard needed."""
    import ray

    return {
        a["Name"]: {"pid": a["Pid"], "node_id": a["Address"]["NodeID"]}
        for a in ray._private.state.actors().values()
        if a["State"] == "ALIVE" and (a.get("Name") or "").startswith(REPLICA)
    }


def running_replicas() -> int:
    from ray import serve

    from raydapt.serve import APP_NAME

    app = serve.status().applications.get(APP_NAME)
    return app.deployments["OpenAIServer"].replica_states.get("RUNNING", 0) if app else 0


def wait_until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen in {timeout:.0f} s")
        time.sleep(0.5)


class Load:
    """`n` clients sending the same greedy completion in a loop; records (sent, done, status,
    text)."""

    BODY = {"model": "tiny", "prompt": "12+34=", "max_tokens": 8, "temperature": 0}

    def __init__(self, url: str, n: int = 2):
        self.url, self.log, self.stop = url, [], threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()

    def _client(self) -> None:
        import httpx

        with httpx.Client(timeout=120) as c:
            while not self.stop.is_set():
                t0 = time.time()
                time.sleep(0.25)  # light load: the replacement engine needs the same 2 cores
                try:
                    r = c.post(self.url + "/v1/completions", json=self.BODY)
                    text = r.json()["choices"][0]["text"] if r.status_code == 200 else None
                    self.log.append((t0, time.time(), r.status_code, text))
                except httpx.TransportError as e:  # a dropped connection counts as a 5xx here
                    self.log.append((t0, time.time(), 599, type(e).__name__))

    def finish(self) -> list[tuple]:
        self.stop.set()
        for t in self.threads:
            t.join(150)
        return list(self.log)


@pytest.fixture
def served(nodes, tiny_model_dir, tmp_path):
    """The raydapt app with 2 replicas; the proxy on the head node only (one port per machine)."""
    from builders import free_port
    from ray import serve

    from raydapt.config import job_from_dict
    from raydapt.pipeline import run_stage

    port = free_port()
    cfg = job_from_dict(
        {
            "output_dir": str(tmp_path),
            "serve": {
                "name": "tiny",
                "port": port,
                "proxy_location": "HeadOnly",
                "max_model_len": 128,
                "dtype": "float32",
                "min_replicas": 2,
                "max_replicas": 2,
                "cpus_per_replica": 1.0,
                "api_keys_env": "RAYDAPT_NO_KEYS_IN_THIS_TEST",
            },
        }
    )
    try:
        yield run_stage("serve", cfg, model_dir=str(tiny_model_dir), block=False)["url"]
    finally:
        serve.shutdown()


@pytest.mark.slow
def test_serve_replica_killed_under_load_recovers(served):
    """ray.kill of one of 2 replicas while clients send requests: only 5xx may fail, the other
    replica keeps answering, the app returns to 2 running replicas and later requests all
    succeed."""
    import httpx
    import ray

    before = replicas()
    assert running_replicas() == 2 and len(before) == 2
    assert len({r["node_id"] for r in before.values()}) == 2  # one replica per worker node
    load = Load(served)
    wait_until(
        lambda: sum(1 for x in load.log if x[2] == 200) >= 4, 120, "4 answers before the kill"
    )
    victim = sorted(before)[0]
    t_kill = time.time()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    wait_until(
        lambda: victim not in replicas() and len(replicas()) == 2 and running_replicas() == 2,
        300,
        "a replacement replica",
    )
    t_back = time.time()
    log = load.finish()
    print(
        f"serve fault: replacement running {t_back - t_kill:.1f} s after the kill; "
        f"{len(log)} requests under load, codes {sorted(set(c for *_, c, _ in log))}"
    )
    after = replicas()
    assert victim not in after and len(after) == 2 and running_replicas() == 2
    codes = [c for *_, c, _ in log]
    assert all(c == 200 or c >= 500 for c in codes), (
        codes
    )  # in-flight requests may fail with 5xx only
    # the surviving replica answered while the replacement started
    assert any(c == 200 and t0 > t_kill + 1 and t1 < t_back for t0, t1, c, _ in log)
    # later requests all succeed, on both replicas, with the same greedy text as before the kill
    with httpx.Client(timeout=120) as c:
        later = [c.post(served + "/v1/completions", json=Load.BODY) for _ in range(8)]
    assert [r.status_code for r in later] == [200] * 8
    texts = {r.json()["choices"][0]["text"] for r in later} | {x[3] for x in log if x[2] == 200}
    assert len(texts) == 1, texts


# ----------------------------------------------------------------------------- node loss


@pytest.mark.slow
def test_train_node_removed_workers_rescheduled(nodes, train_setup, tmp_path):
    """Remove the node of rank 1 after step 4: both ranks restart on the surviving node from
    checkpoint 3, and the run ends where the uninterrupted run did."""
    job, straight, _ = train_setup
    cfg = job("node_lost")
    bg, infos = held_train_run(cfg, tmp_path / "hold", step=4)
    lost = infos[1]["node_id"]
    assert infos[0]["node_id"] != lost
    try:
        nodes.remove(lost)
        summary = bg.result()
        assert lost not in nodes.alive_worker_ids() and len(nodes.alive_worker_ids()) == 1
    finally:
        nodes.replace()
    assert_same_model(straight, cfg, summary, start=3)


@pytest.mark.slow
def test_teacher_node_removed_pool_shrinks(nodes, teach_job, tmp_path):
    """Two actors, one per node (2 CPUs each). Remove the node of the actor that holds a
    written but unreturned batch: the pool goes on with the actor left, each id once."""
    cfg = teach_job("node_lost", cpus_per_actor=2, min_actors=1, max_actors=2)
    bg, held = held_teach_run(cfg, tmp_path / "hold")
    try:
        nodes.remove(held["node_id"])
        result = bg.result(timeout=400)
        assert len(nodes.alive_worker_ids()) == 1
    finally:
        nodes.replace()
    assert_each_id_once(cfg, result, held)
