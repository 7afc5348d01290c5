"""On-policy distillation: rollout speed against raw vLLM, the trainer's wait, and sync cost.

Runs `jobs/distill-on-policy.yaml` (or `--job`) for `--steps` steps on a local Ray cluster and
reads its metrics.jsonl, then, in the same run, the baselines:

- rollout tokens/s: the source's sampled tokens per second of generation (`rollout_s`),
  median over steps, against raw `LLM.generate` on the same student folder, the same prompts,
  sampling settings and batch size, built by the same VLLMBackend with the env and thread
  count a rollout actor gets (OMP_NUM_THREADS=1 for a 1-CPU actor);
- the trainer's wait: the share of step wall time spent waiting for rows (`wait_s`:
  rollout + teacher score + transfer), median over steps;
- sync: seconds to push the trainer's weights into the live engine (`sync_s`), median,
  against starting a fresh engine on the same folder (what a restart per sync would cost);
- asynchronous rollouts: the same run again with `rollout.max_staleness: 1` (the next step's
  rollouts run while the trainer trains), its median step time against the synchronous one.

    .venv/bin/python bench/onpolicy.py                     # demo student, 12 steps
    .venv/bin/python bench/onpolicy.py --steps 6 student.init=prune ...   # overrides
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _results import record  # bench/ is the script's folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAYDAPT_PROGRESS", "0")


def raw_baseline(
    spec, prompts: list[list[int]], max_tokens: int, temperature: float, cpus: float
) -> dict:
    """Raw vLLM on the rollout engine's folder and settings, in a 1-CPU Ray actor."""
    import ray

    from raydapt.onpolicy.source import engine_env

    @ray.remote(num_cpus=cpus, runtime_env={"env_vars": engine_env(1.0, 0)})
    class Raw:
        def run(self, spec, prompts, max_tokens, temperature) -> dict:
            from vllm import SamplingParams
            from vllm.inputs import TokensPrompt

            from raydapt.teach.vllm_backend import VLLMBackend

            t0 = time.perf_counter()
            llm = VLLMBackend(spec).llm
            start_s = time.perf_counter() - t0
            sp = [
                SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=i)
                for i in range(len(prompts))
            ]
            reqs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
            llm.generate(reqs[:2], sp[:2], use_tqdm=False)  # warm-up
            rates = []
            for _ in range(3):
                t0 = time.perf_counter()
                outs = llm.generate(reqs, sp, use_tqdm=False)
                dt = time.perf_counter() - t0
                rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / dt)
            return {"tok_s": statistics.median(rates), "engine_start_s": start_s}

    actor = Raw.remote()
    try:
        return ray.get(actor.run.remote(spec, prompts, max_tokens, temperature))
    finally:
        ray.kill(actor)


def job_overrides(out: Path, steps: int) -> list[str]:
    return [
        f"output_dir={out}",
        f"train.max_steps={steps}",
        f"train.eval_every={steps}",
        f"train.checkpoint_every={steps}",
        "train.resume=false",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--job", default=str(ROOT / "jobs" / "distill-on-policy.yaml"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default="", help="output folder (default: a new temporary one)")
    ap.add_argument("overrides", nargs="*", help="job overrides, e.g. rollout.max_tokens=32")
    a = ap.parse_args()

    import pyarrow.parquet as pq

    from raydapt import layout
    from raydapt.cluster import connect
    from raydapt.config import load_job
    from raydapt.pipeline import run_stage
    from raydapt.train import plan as train_plan

    out = Path(a.out or tempfile.mkdtemp(prefix="raydapt-bench-onpolicy-"))
    steps = a.steps
    job = load_job(a.job, [*job_overrides(out, steps), *a.overrides])
    connect(job.cluster, None)
    run_stage("prepare", job)

    def train(j) -> tuple[list[dict], float]:
        t0 = time.perf_counter()
        run_stage("train", j)
        wall = time.perf_counter() - t0
        lines = (layout.train_dir(j) / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines], wall

    rows, wall = train(job)
    # the same run with asynchronous rollouts (one step of staleness), in its own folder
    ajob = load_job(a.job, [*job_overrides(out / "async", steps), *a.overrides])
    ajob.rollout.max_staleness = 1
    run_stage("prepare", ajob)
    arows, awall = train(ajob)
    spec = train_plan(job).on_policy
    n = spec.rows_per_step
    gen_rates = [r["response_len_mean"] * n / r["rollout_s"] for r in rows[1:]]  # skip warm-up
    wait_share = [r["wait_s"] / r["step_time_s"] for r in rows[1:]]
    syncs = [r["sync_s"] for r in rows if "sync_s" in r]
    table = pq.read_table(spec.prompts_file, columns=["prompt_ids", "split"]).to_pylist()
    prompts = [r["prompt_ids"] for r in table if r["split"] == "train"][:n]
    c = spec.cfg
    raw = raw_baseline(spec.rollout, prompts, c.max_tokens, c.temperature, c.cpus_per_actor)
    ours = statistics.median(gen_rates)
    sync = statistics.median(syncs) if syncs else float("nan")
    print(f"\non-policy, {steps} steps of {n} rows, train wall {wall:.0f} s ({out})")
    print(
        f"rollout engine: {spec.rollout.model} ({spec.rollout.dtype}), "
        f"{spec.cfg.cpus_per_actor} CPU actor, batch {n}, max_tokens {spec.cfg.max_tokens}, "
        f"temperature {spec.cfg.temperature}; raw vLLM: the same, in a same-sized actor"
    )
    print(
        f"rollout tok/s: raydapt {ours:.0f} | raw LLM.generate {raw['tok_s']:.0f} "
        f"({ours / raw['tok_s']:.2f}x)"
    )
    print(
        f"trainer waits for rows: {statistics.median(wait_share):.1%} of step wall time "
        f"(median; rollout + teacher score)"
    )
    step_s = statistics.median(r["step_time_s"] for r in rows[1:])
    astep_s = statistics.median(r["step_time_s"] for r in arows[1:])
    await_share = statistics.median(r["wait_s"] / r["step_time_s"] for r in arows[1:])
    lags = [r["lag"] for r in arows]
    print(
        f"async rollouts (max_staleness 1): step {astep_s:.2f} s against {step_s:.2f} s "
        f"synchronous ({step_s / astep_s:.2f}x), wait share {await_share:.1%}, "
        f"lag per step {lags}, train wall {awall:.0f} s against {wall:.0f} s"
    )
    print(
        f"sync: {sync:.3f} s per push (median of {len(syncs)}) | fresh engine start "
        f"{raw['engine_start_s']:.1f} s ({raw['engine_start_s'] / sync:.0f}x the sync)"
    )
    record(
        "onpolicy",
        [
            ("rollout tok/s / raw LLM.generate", ours / raw["tok_s"], ">= 0.9"),
            ("trainer wait share of step time", statistics.median(wait_share), ""),
            ("sync seconds (median)", sync, ""),
            ("fresh engine start / sync", raw["engine_start_s"] / sync, ""),
            ("synchronous / async step time (staleness 1)", step_s / astep_s, ">= 1.2"),
            ("async trainer wait share of step time", await_share, ""),
        ],
        {"steps": steps, "rows_per_step": n, "model": spec.rollout.model, "overrides": a.overrides},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
