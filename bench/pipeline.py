"""Wall time of each stage of the demo, and how much of the teacher stage is overhead.

Runs `raydapt demo` from scratch into a fresh output folder (corpus, teacher training, vLLM
teacher pool, KD and CE students, eval, serve) and reads the `timings.json` it writes.
Overhead of the teacher stage = 1 - (time inside the actors' batches) / (stage wall time):
engine start-up, reading and handing rows through Ray Data, and the final parquet commit.
Time inside batches also holds the conversion to dense arrays and the part writes, so the
share outside the vLLM engine itself is at least this.

    .venv/bin/python bench/pipeline.py                 # about 15 minutes on 2 cores
    .venv/bin/python bench/pipeline.py --out runs/p   # keep the outputs there
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import record  # bench/ is the script's folder

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="", help="output folder (default: a new temporary one)")
    ap.add_argument("overrides", nargs="*", help="job overrides passed to `raydapt demo`")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="raydapt-bench-pipeline-"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "raydapt", "demo", f"output_dir={out}", *args.overrides]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return proc.returncode
    t = json.loads((out / "timings.json").read_text())
    pool = t.pop("teach_pool", None) or {}
    total = t.pop("total", wall)
    print(f"raydapt demo stages, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, output {out}")
    print(f"{'stage':<16} {'seconds':>8} {'share':>7}")
    order = ["prepare", "teacher train", "teach", "kd train", "ce train", "eval", "serve + ask"]
    for stage, sec in sorted(
        t.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99
    ):
        print(f"{stage:<16} {sec:>8.1f} {sec / total:>7.1%}")
    print(f"{'total':<16} {total:>8.1f}   (process wall {wall:.1f} s, Ray start-up included)")
    record(
        "pipeline",
        [("raydapt demo, total seconds", total, "")]
        + [(f"{k} seconds", v, "") for k, v in t.items()],
        {"overrides": args.overrides},
    )
    busy = (pool.get("pool") or {}).get("busy_s")
    if busy and pool.get("seconds"):
        share = 1 - busy / pool["seconds"]
        print(
            f"teacher stage: {pool['computed_rows']} rows in {pool['seconds']:.1f} s, "
            f"{busy:.1f} s inside "
            f"actor batches; overhead outside the engine's batches {share:.1%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
