"""Chaos: a scripted series of faults injected into `raydapt run` of the demo job on a 3-node
simulated cluster, against the same run without faults.

    .venv/bin/python bench/chaos.py            # demo job shrunk by QUICK (a few minutes per run)
    .venv/bin/python bench/chaos.py --full     # the demo job's own sizes (long on 2 cores)

The cluster is `ray.cluster_utils.Cluster` in this process: a head node without CPUs and two
worker nodes with 2 CPUs each. `python -m raydapt run jobs/demo.yaml` runs as a subprocess
attached to it through RAY_ADDRESS, stages prepare, teach, train, with 2 teacher actors and 2
SPREAD Train workers (train.max_failures=3). The script, all real faults:

  1. teach: SIGKILL the teacher actor that has written a part but not yet returned its batch;
  2. train: SIGKILL rank 1 after step HOLD[0];
  3. train: remove the node of rank 0 after step HOLD[1] (both ranks finish on the other node).

The workers park at those points through the fault-injection hooks (RAYDAPT_TEACH_HOLD_FILE,
RAYDAPT_HOLD_AT_STEP / RAYDAPT_HOLD_FILE), so each fault lands where it is meant to. Prints
faults injected and survived, target rows lost or duplicated (each prepared id must be a
target exactly once), the final loss against the baseline, and the extra wall time.

`--on-policy` runs `jobs/distill-on-policy.yaml` (prepare, train; 1 Train worker,
train.max_failures=3) instead, with three faults:

  1. SIGKILL the rollout engine in its ON_POLICY_HOLD[0]-th generate call;
  2. SIGKILL the teacher engine in its ON_POLICY_HOLD[1]-th score call;
  3. SIGKILL the Train worker after step ON_POLICY_HOLD[2].

Each must cost a redo, not a result: every step trained once, and the losses of every step
equal to the baseline's (the same samples from the same weights).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

JOB = ROOT / "jobs" / "demo.yaml"
HOLD = (8, 20)  # train steps after which rank 1 is killed, then rank 0's node removed
FAULT_TOLERANT = [
    "stages=[prepare,teach,train]",
    "teach.min_actors=1",
    "teach.max_actors=2",
    "train.num_workers=2",
    "train.cpus_per_worker=1",
    "train.placement_strategy=SPREAD",
    "train.max_failures=3",
    "train.checkpoint_every=5",
]
QUICK = [
    "corpus.world_train=400",
    "corpus.world_heldout=20",
    "corpus.world_markov_docs=100",
    "teach.batch_size=16",
    "train.max_steps=30",
    "train.warmup_steps=5",
    "train.eval_every=15",
]
ON_POLICY_JOB = ROOT / "jobs" / "distill-on-policy.yaml"
ON_POLICY_HOLD = (3, 6, 9)  # rollout call, teacher call, Train step
ON_POLICY = [
    "stages=[prepare,train]",
    "train.max_steps=14",
    "train.checkpoint_every=3",
    "train.eval_every=7",
    "train.max_failures=3",
    "corpus.world_train=200",
]
WORKER_NODE = {"num_cpus": 2, "object_store_memory": 300 * 2**20, "resources": {"worker_node": 1}}


def start_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "object_store_memory": 400 * 2**20,
            "include_dashboard": False,
        },
    )
    for _ in range(2):
        cluster.add_node(**WORKER_NODE)
    cluster.wait_for_nodes()
    return cluster


def wait_json(path: Path, proc: subprocess.Popen, timeout: float = 900) -> dict | None:
    """A held worker's {pid, node_id}; None if the run ended first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            return None
        time.sleep(0.2)
    return json.loads(path.read_text())


def inject(cluster, hold: Path, proc: subprocess.Popen, log: list[str]) -> None:
    """The fault script; each fault is logged when injected."""
    teacher = wait_json(hold / "teach", proc)
    if teacher:
        os.kill(teacher["pid"], signal.SIGKILL)
        log.append(
            f"teach: SIGKILL teacher actor pid {teacher['pid']} after it wrote "
            f"{Path(teacher['part']).name}"
        )
    ranks = [wait_json(hold / f"train.s{HOLD[0]}.rank{r}", proc) for r in (0, 1)]
    if all(ranks):
        os.kill(ranks[1]["pid"], signal.SIGKILL)
        log.append(f"train: SIGKILL rank 1 (pid {ranks[1]['pid']}) after step {HOLD[0]}")
    ranks = [wait_json(hold / f"train.s{HOLD[1]}.rank{r}", proc) for r in (0, 1)]
    if all(ranks):
        node = next((n for n in cluster.worker_nodes if n.node_id == ranks[0]["node_id"]), None)
        if node is not None:
            cluster.remove_node(node, allow_graceful=False)
            # the run finishes on the node left (no node is added back: Ray's Node must be
            # built in the main thread)
            log.append(
                f"train: removed node {ranks[0]['node_id'][:8]} (rank 0) after step {HOLD[1]}"
            )


def run_job(cluster, out: Path, overrides: list[str], faults: bool) -> dict:
    """`raydapt run` on the cluster; with `faults`, the script above runs beside it."""
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    hold = out / "hold"
    if faults:
        hold.mkdir(parents=True, exist_ok=True)
        env |= {
            "RAYDAPT_TEACH_HOLD_FILE": str(hold / "teach"),
            "RAYDAPT_HOLD_AT_STEP": ",".join(map(str, HOLD)),
            "RAYDAPT_HOLD_FILE": str(hold / "train"),
        }
    cmd = [sys.executable, "-m", "raydapt", "run", str(JOB), f"output_dir={out}", *overrides]
    script = (lambda proc, log: inject(cluster, hold, proc, log)) if faults else None
    rc, seconds, log = launch(cmd, env, out, script)
    return {"rc": rc, "seconds": seconds, "faults": log, **outcome(out, overrides)}


def launch(cmd: list[str], env: dict, out: Path, script) -> tuple[int, float, list[str]]:
    """Run `cmd` (a `raydapt run`) to its end, its output in <out>.log, with the fault
    `script(proc, log)` in a thread beside it (None: no faults); (exit code, seconds, the
    faults the script logged)."""
    t0 = time.perf_counter()
    log: list[str] = []
    with open(out.with_suffix(".log"), "w") as logf:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT)
        injector = threading.Thread(target=script, args=(proc, log), daemon=True)
        if script is not None:
            injector.start()
        rc = proc.wait()
    if script is not None:
        injector.join(5)
    return rc, time.perf_counter() - t0, log


def outcome(out: Path, overrides: list[str]) -> dict:
    """Target ids against the prepared ids, and the run's final training loss."""
    import pyarrow.parquet as pq

    from raydapt import layout
    from raydapt.config import load_job
    from raydapt.targets import read_targets

    cfg = load_job(JOB, [f"output_dir={out}", *overrides])
    want = (
        pq.read_table(layout.prepared_dir(cfg) / "train", columns=["id"]).column("id").to_pylist()
    )
    try:
        _, files = read_targets(layout.targets_dir(cfg))
        got = [x for f in files for x in pq.read_table(f, columns=["id"]).column("id").to_pylist()]
    except Exception:  # noqa: BLE001 - a failed run reports everything as lost
        got = []
    metrics = layout.train_dir(cfg) / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    final = {x["step"]: x for x in lines}.get(cfg.train.max_steps, {})
    return {
        "rows": len(want),
        "lost": len(set(want) - set(got)),
        "duplicated": len(got) - len(set(got)),
        "loss": final.get("loss"),
        "val_loss": final.get("val_loss"),
    }


def on_policy_inject(hold: Path, proc: subprocess.Popen, log: list[str]) -> None:
    """The on-policy fault script: the rollout engine, the teacher engine, the Train worker."""
    r, t, step = ON_POLICY_HOLD
    for role, call in (("rollout", r), ("teacher", t)):
        info = wait_json(hold / f"train.{role}.{call}", proc)  # <RAYDAPT_HOLD_FILE>.<role>.<call>
        if info:
            os.kill(info["pid"], signal.SIGKILL)
            log.append(f"on-policy: SIGKILL the {role} engine (pid {info['pid']}) in call {call}")
    info = wait_json(hold / f"train.s{step}.rank0", proc)
    if info:
        os.kill(info["pid"], signal.SIGKILL)
        log.append(f"on-policy: SIGKILL the Train worker (pid {info['pid']}) after step {step}")


def run_on_policy(cluster, out: Path, faults: bool) -> dict:
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    hold = out / "hold"
    if faults:
        hold.mkdir(parents=True, exist_ok=True)
        r, t, step = ON_POLICY_HOLD
        env |= {
            "RAYDAPT_HOLD_ENGINE": f"rollout:{r},teacher:{t}",
            "RAYDAPT_HOLD_AT_STEP": str(step),
            "RAYDAPT_HOLD_FILE": str(hold / "train"),
        }
    cmd = [sys.executable, "-m", "raydapt", "run", str(ON_POLICY_JOB), f"output_dir={out}"]
    script = (lambda proc, log: on_policy_inject(hold, proc, log)) if faults else None
    rc, seconds, log = launch([*cmd, *ON_POLICY], env, out, script)
    from raydapt import layout
    from raydapt.config import load_job

    metrics = layout.train_dir(load_job(ON_POLICY_JOB, [f"output_dir={out}", *ON_POLICY]))
    metrics = metrics / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    return {"rc": rc, "seconds": seconds, "faults": log, "rows": rows}


def report_on_policy(base: dict, chaos: dict) -> None:
    steps = [r["step"] for r in chaos["rows"]]
    want = list(range(1, len(base["rows"]) + 1))
    same = [
        abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(b["loss"]))
        for a, b in zip(chaos["rows"], base["rows"])
    ]
    ok = chaos["rc"] == 0 and steps == want and all(same)
    print("\nfaults injected:")
    for f in chaos["faults"]:
        print(f"  - {f}")
    print(
        f"faults injected: {len(chaos['faults'])}; faults survived: "
        f"{len(chaos['faults']) if ok else 0}"
    )
    print(
        f"steps trained: {steps == want and 'each once' or steps}; steps redone by the source: "
        f"{sum(r.get('redone', 0) for r in chaos['rows'])}; "
        f"losses equal to the baseline's at {sum(same)} of {len(base['rows'])} steps"
    )
    print(
        f"wall time: {chaos['seconds']:.0f} s with faults vs {base['seconds']:.0f} s without "
        f"(x{chaos['seconds'] / base['seconds']:.2f}); exit codes {chaos['rc']} / {base['rc']}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="the demo job's own corpus and steps")
    ap.add_argument("--on-policy", action="store_true", help="on-policy distillation's faults")
    ap.add_argument("--out", default=str(ROOT / "runs" / "chaos"), help="scratch folder")
    args = ap.parse_args()
    if args.on_policy:
        import shutil

        out = Path(args.out) / "on-policy"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        cluster = start_cluster()
        try:
            base = run_on_policy(cluster, out / "baseline", faults=False)
            chaos = run_on_policy(cluster, out / "chaos", faults=True)
        finally:
            cluster.shutdown()
        report_on_policy(base, chaos)
        return
    overrides = FAULT_TOLERANT + ([] if args.full else QUICK)
    out = Path(args.out)
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cluster = start_cluster()
    try:
        base = run_job(cluster, out / "baseline", overrides, faults=False)
        chaos = run_job(cluster, out / "chaos", overrides, faults=True)
    finally:
        cluster.shutdown()
    report(base, chaos)


def report(base: dict, chaos: dict) -> None:
    ok = chaos["rc"] == 0 and chaos["lost"] == 0 and chaos["duplicated"] == 0
    dloss = (
        abs(chaos["loss"] - base["loss"])
        if chaos["loss"] is not None and base["loss"] is not None
        else float("nan")
    )
    print("\nfaults injected:")
    for f in chaos["faults"]:
        print(f"  - {f}")
    print(
        f"faults injected: {len(chaos['faults'])}; "
        f"faults survived: {len(chaos['faults']) if ok else 0}"
    )
    print(
        f"target rows: {chaos['rows']}; lost {chaos['lost']}, duplicated {chaos['duplicated']} "
        f"(baseline: lost {base['lost']}, duplicated {base['duplicated']})"
    )
    print(
        f"final train loss: {chaos['loss']} vs baseline {base['loss']} (|diff| {dloss:.2e}); "
        f"val_loss {chaos['val_loss']} vs {base['val_loss']}"
    )
    print(
        f"wall time: {chaos['seconds']:.0f} s with faults vs {base['seconds']:.0f} s without "
        f"(+{chaos['seconds'] - base['seconds']:.0f} s, "
        f"x{chaos['seconds'] / base['seconds']:.2f}); "
        f"exit codes {chaos['rc']} / {base['rc']}"
    )


if __name__ == "__main__":
    main()
