"""`raydapt tune JOB`: a Ray Tune sweep of train.* hyperparameters over the same prepared data.

    raydapt tune jobs/tune.yaml tune.num_samples=8 tune.max_concurrent_trials=2
    from raydapt.tune import run; connect(cfg.cluster); summary = run(cfg)

Each trial is a Tune function that builds one Train V2 TorchTrainer (raydapt.train.launch)
with `TuneReportCallback`, the pattern Ray recommends now that `Tuner(trainer)` is deprecated.
Every trial reads the job's prepared shards and teacher targets in place: nothing is
re-tokenized and no teacher runs during a sweep (each trial records its inputs in
`inputs.json`). A trial differs from `raydapt train` only in its train.* values and in where
it writes: `<out>/tune/trials/<trial_id>/` (metrics.jsonl, Train storage `run/`, export `final/`).

Output in layout.tune_dir: results.csv and results.md (one row per trial), curves.png (the
metric against step, best trial highlighted), best/ (the best trial's HF export) and
serve_command.txt. The Tune experiment lives in `sweep-<fingerprint>/`: running the same
command again restores it (finished trials are kept, errored and unfinished ones resume
from their last checkpoint); a changed train/tune config starts a new experiment folder.

RAYDAPT_TUNE_FAIL=<trial index>:<step> makes that trial's workers raise after that step,
once (the driver reads it; a rerun without it resumes). The resume test uses it.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

from raydapt import layout
from raydapt.config import JobConfig, job_from_dict
from raydapt.storage import hash_json, read_manifest
from raydapt.tune.space import check_space, make_scheduler, make_search, tune_space

FAIL_ENV = "RAYDAPT_TUNE_FAIL"


def trial_job(job: dict, params: dict, trial_id: str) -> JobConfig:
    """The job a trial trains: the sweep's job with the sampled train.* values applied."""
    data = copy.deepcopy(job)
    data["train"] = {**data["train"], **params.get("train", {}), "resume": True}
    data["name"] = f"{job['name']}-tune-{trial_id}"  # never touches `raydapt train`'s run folder
    return job_from_dict(data, f"tune trial {trial_id}")


def _trial(config: dict, job: dict, sweep_dir: str, fail: str, pbt: bool) -> None:
    """One Tune trial: one TorchTrainer; Train reports flow to Tune through the callback."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raydapt.train.launch import build_trainer, make_plan

    trial_id = tune.get_context().get_trial_id()
    tdir = Path(sweep_dir) / "trials" / trial_id
    tdir.mkdir(parents=True, exist_ok=True)
    cfg = trial_job(job, config, trial_id)
    plan, files = make_plan(cfg)
    fail_at = 0
    index = trial_id.rsplit("_", 1)[-1]  # `ab12c_00003` -> trial 3 (ids of search algorithms have no index)
    if fail and index.isdigit() and int(fail.split(":")[0]) == int(index):
        fail_at = int(fail.split(":")[1])
    plan.update(train_dir=str(tdir), export_dir=str(tdir / "final"), resume=True, fail_at_step=fail_at)
    inputs = {"files": files, "prepared_fingerprint": plan["manifest"]["prepared_fingerprint"],
              "student": plan["student_path"], "train": config.get("train", {})}
    (tdir / "inputs.json").write_text(json.dumps(inputs, indent=2, sort_keys=True))
    from raydapt.train.checkpoint import latest_ray

    starts = tdir / "starts.jsonl"  # one line per time this trial (re)started
    n_start = len(starts.read_text().splitlines()) if starts.is_file() else 0
    if pbt:  # each start is a fresh Train run from the checkpoint Tune hands over
        from raydapt.tune.pbt import fit_reporting_checkpoints, restore_path

        run_name, resume_from = f"run-{n_start}", restore_path(tdir)
        plan["resume_from"] = resume_from
        origin = resume_from
    else:  # Train resumes its own run folder
        latest = latest_ray(tdir / "run")
        run_name, origin = "run", latest.name if latest else None
    with open(starts, "a") as f:
        f.write(json.dumps({"time": time.time(), "fail_at_step": fail_at, "checkpoint": origin,
                            "lr": cfg.train.lr}) + "\n")
    run_kw = {"name": run_name, "storage_path": str(tdir)}
    if pbt:
        result = fit_reporting_checkpoints(lambda cbs: build_trainer(cfg, plan, files, {**run_kw, "callbacks": cbs}))
    else:
        result = build_trainer(cfg, plan, files, {**run_kw, "callbacks": [TuneReportCallback()]}).fit()
    rv = result.return_value or {}
    (tdir / "done.json").write_text(json.dumps({"start_step": rv.get("start_step"), "metrics": result.metrics}))


def _base_job(cfg: JobConfig) -> dict:
    """The job every trial starts from, with absolute paths (trials run in other processes)."""
    from raydapt.models import resolve_model

    job = cfg.to_dict()
    job["output_dir"] = str(cfg.out.resolve())
    job["student"]["path"] = str(resolve_model(cfg, "student").resolve())
    if not cfg.train.torch_threads:  # concurrent trials share the node's cores
        from raydapt.train.loop import cores_per

        job["train"]["torch_threads"] = cores_per(max(1, cfg.tune.max_concurrent_trials) * max(1, cfg.train.num_workers))
    return job


def _check_inputs(cfg: JobConfig, job: dict) -> dict:
    """Run the trainer's own checks once in the driver, before Tune reserves anything."""
    from raydapt.train.launch import make_plan

    plan, _ = make_plan(trial_job(job, {}, "check"))
    return plan


def _experiment(cfg: JobConfig, job: dict, plan: dict) -> str:
    """Experiment folder name: same train/tune config and inputs -> same folder -> resume."""
    key = {"train": job["train"], "tune": job["tune"], "student": job["student"]["path"],
           "prepared": plan["manifest"]["prepared_fingerprint"], "targets": plan["manifest"]["targets_lineage"]}
    return "sweep-" + hash_json(key)[:12]


def _tuner(cfg: JobConfig, job: dict, sweep_dir: Path, name: str):
    from ray import tune

    fn = tune.with_parameters(_trial, job=job, sweep_dir=str(sweep_dir), fail=os.environ.get(FAIL_ENV, ""),
                              pbt=cfg.tune.scheduler == "pbt")
    trainable = tune.with_resources(fn, {"CPU": cfg.tune.cpus_per_trial})
    path = sweep_dir / name
    if path.is_dir() and tune.Tuner.can_restore(str(path)):
        print(f"tune: resuming {path} (finished trials are kept)", flush=True)
        return tune.Tuner.restore(str(path), trainable, resume_errored=True)
    tc = cfg.tune
    return tune.Tuner(
        trainable,
        param_space=tune_space(tc),
        tune_config=tune.TuneConfig(
            metric=tc.metric, mode=tc.mode, search_alg=make_search(cfg), scheduler=make_scheduler(cfg),
            num_samples=tc.num_samples, max_concurrent_trials=tc.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(name=name, storage_path=str(sweep_dir), verbose=1),
    )


def run(cfg: JobConfig) -> dict[str, Any]:
    """Sweep, then write the results table, the curves and best/; returns a summary."""
    check_space(cfg)
    job = _base_job(cfg)
    plan = _check_inputs(cfg, job)
    sweep_dir = layout.tune_dir(cfg).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    name = _experiment(cfg, job, plan)
    # The loop reports at log/checkpoint steps too, where `val_loss` is absent; Tune's strict
    # check would fail the sweep on the first such report. ASHA skips reports without it.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    results = _tuner(cfg, job, sweep_dir, name).fit()
    return write_outputs(cfg, results, sweep_dir)


# ----------------------------------------------------------------------------- outputs


def _trial_rows(cfg: JobConfig, results, sweep_dir: Path) -> tuple[list[dict], dict[str, list]]:
    """One row per trial and each trial's (step, metric) curve as Tune saw it."""
    metric, rows, curves = cfg.tune.metric, [], {}
    for r in results:
        m = dict(r.metrics or {})
        tid = _trial_id(m, Path(r.path), sweep_dir)
        df = r.metrics_dataframe
        pts: list = []
        if df is not None and metric in df.columns and "step" in df.columns:
            sub = df[["step", metric]].dropna()
            pts = [(int(s), float(v)) for s, v in zip(sub["step"], sub[metric], strict=True)]
        steps = int(df["step"].max()) if df is not None and "step" in df.columns and len(df) else 0
        export = sweep_dir / "trials" / tid / "final"
        status = "error" if r.error else ("done" if steps >= cfg.train.max_steps else "stopped early")
        params = {f"train.{k}": v for k, v in (r.config or {}).get("train", {}).items()}
        rows.append({"trial": tid, **params, metric: pts[-1][1] if pts else float("nan"), "steps": steps,
                     "status": status, "export": str(export) if read_manifest(export) else ""})
        curves[tid] = pts
    rows.sort(key=lambda row: row["trial"])
    return rows, curves


def _trial_id(metrics: dict, path: Path, sweep_dir: Path) -> str:
    """The id `_trial` used for its folder: from the result, else from Tune's folder name.

    Ids look like `ab12c_00000` (random/grid) or `ef5800e1` (search algorithms such as
    Optuna); a trial that errored before its first report has no metrics, only its folder.
    """
    if metrics.get("trial_id"):
        return str(metrics["trial_id"])
    known = [p.name for p in (sweep_dir / "trials").glob("*")]
    for tid in sorted(known, key=len, reverse=True):
        if f"_{tid}_" in f"{path.name}_":
            return tid
    return path.name


def _best(rows: list[dict], metric: str, mode: str) -> dict | None:
    ok = [r for r in rows if r["export"] and not math.isnan(r[metric])]
    if not ok:
        return None
    return (min if mode == "min" else max)(ok, key=lambda r: r[metric])


def _copy_best(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def plot_trials(curves: dict[str, list], best: str | None, metric: str, out: Path) -> Path | None:
    """The metric against step, one line per trial, the best one thick and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(curves.values()):
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for tid, pts in sorted(curves.items()):
        if pts:
            xs, ys = zip(*pts, strict=True)
            is_best = tid == best
            ax.plot(xs, ys, marker="o", ms=3, lw=2.8 if is_best else 1.0, alpha=1.0 if is_best else 0.6,
                    color="#c44e52" if is_best else None, label=f"{tid} (best)" if is_best else tid, zorder=3 if is_best else 2)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"tune: {metric} per trial")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_outputs(cfg: JobConfig, results, sweep_dir: Path) -> dict[str, Any]:
    """results.csv, results.md, curves.png, best/ and serve_command.txt in the sweep folder."""
    from raydapt.report import table

    metric, mode = cfg.tune.metric, cfg.tune.mode
    rows, curves = _trial_rows(cfg, results, sweep_dir)
    cols = ["trial", *sorted({k for r in rows for k in r if k.startswith("train.")}), metric, "steps", "status"]
    with open(sweep_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols + ["export"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    text = table([{**r, **{k: f"{v:g}" for k, v in r.items() if k.startswith("train.") and isinstance(v, float)}}
                  for r in rows], cols)
    best = _best(rows, metric, mode)
    plot = plot_trials(curves, best["trial"] if best else None, metric, sweep_dir / "curves.png")
    summary: dict[str, Any] = {"sweep_dir": str(sweep_dir), "rows": rows, "plot": str(plot) if plot else None}
    lines = [f"# tune: {len(rows)} trials, {metric} ({mode})", "", text, ""]
    if best:
        dst = sweep_dir / "best"
        _copy_best(Path(best["export"]), dst)
        command = f"raydapt serve {shlex.quote(str(dst.resolve()))}"
        (sweep_dir / "serve_command.txt").write_text(command + "\n")
        lines += [f"best: trial {best['trial']}, {metric} {best[metric]:.4f}", "", f"    {command}", ""]
        summary.update(best=str(dst), best_trial=best["trial"], best_metric=best[metric], serve_command=command)
    errored = [r["trial"] for r in rows if r["status"] == "error"]
    if errored:
        lines.append(f"errored trials {errored}: rerun the same command to resume them from their checkpoints")
    (sweep_dir / "results.md").write_text("\n".join(lines))
    print(text, flush=True)
    print("\n".join(lines[4:]), flush=True)
    summary["failed"] = bool(errored) or best is None
    return summary
