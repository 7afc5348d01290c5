"""What distillation buys on a real LLM: KD against CE for students pruned from SmolLM2.

The teacher (SmolLM2-135M-Instruct) answers and scores the job's prompts once; then, for
each number of kept layers and each seed, the same pruned student is healed twice on the
same rows for the same steps, with pure KD (top-k + tail forward KL, `kd_alpha` 1) and with
CE on the teacher's answers (`kd_alpha` 0, i.e. sequence-level KD), and both are scored on
the teacher's answers to held-out prompts. Seeds are paired: a KD and a CE run of one seed
see the same batches in the same order, so the per-seed difference is the figure to read.

    .venv/bin/python bench/real_models.py                          # keep_every 3, seeds 0 1 2
    .venv/bin/python bench/real_models.py --keep-every 6 3 2 --seeds 0
    .venv/bin/python bench/real_models.py --out runs/bench-real    # reuses what is up to date
    .venv/bin/python bench/real_models.py --lora    # exact match before and after LoRA

Prints one row per run and the paired KD - CE differences (negative nll and kl: KD better).
About 5 minutes per student run on 2 cores, plus 5 minutes of teacher work once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METRICS = ("teacher_nll", "teacher_kl", "top1_agreement")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--job", default=str(ROOT / "jobs" / "smollm2-distill.yaml"))
    ap.add_argument("--out", default="runs/bench-real", help="output folder (reused)")
    ap.add_argument("--keep-every", type=int, nargs="+", default=[3])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--lora",
        action="store_true",
        help="instead: jobs/smollm2-lora.yaml, exact match of SmolLM2 before and after LoRA",
    )
    ap.add_argument("overrides", nargs="*", help="job overrides, e.g. train.max_steps=120")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.lora:
        return lora(args)

    from raydapt import layout
    from raydapt.cluster import connect
    from raydapt.config import load_job
    from raydapt.pipeline import derived, run_stage
    from raydapt.report import table

    job = load_job(args.job, [f"output_dir={Path(args.out).absolute()}", *args.overrides])
    connect(job.cluster, None)
    t0 = time.perf_counter()
    run_stage("prepare", job)
    run_stage("teach", job)
    heldout = derived(job, "heldout", teach={"split": "validation"})
    run_stage("teach", heldout)
    targets = str(layout.targets_dir(heldout))
    teacher_seconds = time.perf_counter() - t0
    rows = []
    for keep in args.keep_every:
        for seed in args.seeds:
            for method, alpha in (("kd", 1.0), ("ce", 0.0)):
                child = derived(
                    job,
                    f"keep{keep}-seed{seed}-{method}",
                    share=("prepared", "targets"),
                    student={"keep_every": keep},
                    train={"seed": seed, "kd_alpha": alpha},
                    eval={"teacher_targets": targets},
                )
                t = time.perf_counter()
                run_stage("train", child)
                train_s = time.perf_counter() - t
                record = run_stage("eval", child, name=method)
                kept = json.loads(
                    (layout.models_dir(child) / "student" / "pruned.json").read_text()
                )
                rows.append(
                    {
                        "layers": len(kept["kept_layers"]),
                        "params": kept["params"],
                        "seed": seed,
                        "method": method,
                        **{m: record[m] for m in METRICS},
                        "train_s": round(train_s),
                    }
                )
    print(f"\nteacher answers + scores: {teacher_seconds:.0f} s (cached on a rerun)")
    print(table(rows, ["layers", "params", "seed", "method", *METRICS, "train_s"]))
    print("\npaired KD - CE (median over seeds; negative nll/kl and positive top1 favour KD):")
    diffs = []
    for keep in sorted({r["layers"] for r in rows}):
        by = {(r["seed"], r["method"]): r for r in rows if r["layers"] == keep}
        d = {m: [by[s, "kd"][m] - by[s, "ce"][m] for s in args.seeds] for m in METRICS}
        diffs.append(
            {
                "layers": keep,
                **{f"d_{m}": statistics.median(v) for m, v in d.items()},
                "per_seed_d_nll": " ".join(f"{x:+.3f}" for x in d["teacher_nll"]),
            }
        )
    print(table(diffs, ["layers", *(f"d_{m}" for m in METRICS), "per_seed_d_nll"]))
    return 0


def lora(args: argparse.Namespace) -> int:
    """Exact match on held-out problems of one world task: SmolLM2 as imported, then with the
    LoRA adapter the job trains (merged), each through its chat template, greedy."""
    from raydapt import layout
    from raydapt.cluster import connect
    from raydapt.config import load_job
    from raydapt.pipeline import run_stage
    from raydapt.report import table
    from raydapt.sources import build_model

    job = load_job(
        ROOT / "jobs" / "smollm2-lora.yaml",
        [f"output_dir={Path(args.out).absolute()}-lora", *args.overrides],
    )
    connect(job.cluster, None)
    run_stage("prepare", job)
    base = run_stage("eval", job, model_dir=build_model(job, "student"), name="before")
    t = time.perf_counter()
    run_stage("train", job)
    train_s = time.perf_counter() - t
    after = run_stage("eval", job, model_dir=layout.export_dir(job), name="after")
    cols = ["model", "exact_match", "heldout_loss", "problems"]
    rows = [{**base, "model": "SmolLM2 as imported"}, {**after, "model": "+ LoRA (merged)"}]
    print(f"\nLoRA train: {train_s:.0f} s for {job.train.max_steps} steps")
    print(table(rows, cols))
    for r in (base, after):
        print(r["samples"][0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
