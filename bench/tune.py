"""Sweep vs sequential: the same 4 train configs as one `raydapt tune` sweep (2 trials at a
time, FIFO so every trial runs all its steps) and as 4 sequential `raydapt train` runs.

    PYTHONPATH=. .venv/bin/python bench/tune.py [--steps 20] [--out runs/raydapt-bench-tune]

Prints the wall time of each and the ratio sequential / sweep, measured in the same process
on one local Ray cluster (prepare runs once first and is not timed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

from _results import record  # bench/ is the script's folder

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYDAPT_PROGRESS", "0")

LRS = [1e-2, 3e-3, 1e-3, 3e-4]


def job(out: str, steps: int) -> dict:
    return {
        "output_dir": out,
        "corpus": {"source": "world", "world_train": 300, "world_heldout": 20},
        "teacher": {"preset": ""},
        "student": {"preset": "tiny"},
        "prepare": {"seq_len": 128},
        "train": {
            "max_steps": steps,
            "eval_every": 5,
            "checkpoint_every": steps,
            "batch_size": 4,
            "warmup_steps": 1,
            "num_workers": 1,
            "cpus_per_worker": 0.5,
        },
        "tune": {
            "search": "grid",
            "scheduler": "fifo",
            "num_samples": 1,
            "max_concurrent_trials": 2,
            "space": {"train.lr": {"grid": LRS}},
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="runs/raydapt-bench-tune")
    args = ap.parse_args()
    from raydapt import pipeline, train
    from raydapt.cluster import connect
    from raydapt.config import job_from_dict

    shutil.rmtree(args.out, ignore_errors=True)
    data = job(args.out, args.steps)
    cfg = job_from_dict(data)
    connect(cfg.cluster)
    pipeline.run_stage("prepare", cfg)
    t0 = time.perf_counter()
    summary = pipeline.run_stage("tune", cfg)
    sweep_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    seq_loss = []
    for i, lr in enumerate(LRS):
        c = job_from_dict({**data, "name": f"seq{i}", "train": {**data["train"], "lr": lr}})
        seq_loss.append(train.run(train.plan(c))["metrics"].get("val_loss"))
    seq_s = time.perf_counter() - t0
    sweep_loss = [r["val_loss"] for r in summary["rows"]]
    print(
        f"\nbench/tune: 4 trials x {args.steps} steps (tiny Llama, batch 4, seq 128, 1 worker each)"
    )
    print(
        f"  sweep (2 concurrent): {sweep_s:7.1f} s   val_loss {[round(v, 4) for v in sweep_loss]}"
    )
    print(f"  4 sequential trains:  {seq_s:7.1f} s   val_loss {[round(v, 4) for v in seq_loss]}")
    print(f"  ratio sequential/sweep: {seq_s / sweep_s:.2f}x")
    record(
        "tune",
        [("4 sequential trains / sweep of 4 (2 concurrent), wall", seq_s / sweep_s, ">= 1.0")],
        {"steps": args.steps, "trials": len(LRS), "max_concurrent_trials": 2},
    )


if __name__ == "__main__":
    main()
