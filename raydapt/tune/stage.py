"""`raydapt tune JOB`: a Ray Tune sweep of train.* hyperparameters over the same prepared data.

    raydapt tune jobs/tune.yaml tune.num_samples=8 tune.max_concurrent_trials=2
    pipeline.run_stage("tune", job)           # what the CLI and `raydapt run` call

Each trial is a Tune function that plans its run with `raydapt.train.plan` (on the trial's
own folders) and fits one Train V2 TorchTrainer with `TuneReportCallback`, the pattern Ray
recommends now that `Tuner(trainer)` is deprecated. Every trial reads the job's prepared
shards and teacher targets in place: nothing is re-tokenized and no teacher runs during a
sweep (each trial records its inputs in `trial.json`). A trial differs from `raydapt train`
only in its train.* values and in where it writes: `<out>/tune/trials/<trial_id>/`
(metrics.jsonl, Train storage `run/`, export `final/`).

Every report of a trial carries the tune metric (the train loop's reporting policy, checked
by `plan` against `raydapt.train.loop.reported_metrics`), so schedulers and searchers take
Ray's defaults.

Output in layout.tune_dir: results.csv and results.md (one row per trial), curves.png, best/
(the best trial's HF export), serve_command.txt, and manifest.json with the fingerprint,
written only when the sweep succeeded. The Tune experiment lives in `sweep-<fingerprint>/`:
running the same command again restores it (finished trials are kept, errored and unfinished
ones resume from their last checkpoint); a changed train/tune config starts a new one.

RAYDAPT_TUNE_FAIL=<trial index>:<step> makes that trial's workers raise after that step,
once (the driver reads it; a rerun without it resumes). The resume test uses it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from raydapt import layout
from raydapt import train as train_stage
from raydapt.checks import ON_POLICY_TUNE
from raydapt.config import JobConfig, job_from_dict
from raydapt.errors import UserError
from raydapt.sources import model_path
from raydapt.storage import MANIFEST, finish_manifest, hash_json
from raydapt.train.checkpoint import latest_ray
from raydapt.train.loop import cores_per, reported_metrics
from raydapt.train.spec import TrainPlan
from raydapt.train.trainer import build_trainer
from raydapt.tune.pbt import fit_reporting_checkpoints, restore_path
from raydapt.tune.results import write_outputs
from raydapt.tune.space import check_space, make_scheduler, make_search, tune_space

FAIL_ENV = "RAYDAPT_TUNE_FAIL"


@dataclass(frozen=True)
class TunePlan:
    """A checked sweep: the trials' common job and the trainer's checks, run once here."""

    job: JobConfig
    output: Path  # the tune folder; its manifest.json records the fingerprint of a finished sweep
    base: dict  # the job every trial starts from (absolute paths, threads per trial)
    probe: TrainPlan  # `raydapt.train.plan` of the base trial job: inputs checked before any trial
    fail: str  # RAYDAPT_TUNE_FAIL, handed to the trials


def trial_job(job: dict, params: dict, trial_id: str) -> JobConfig:
    """The job a trial trains: the sweep's job with the sampled train.* values applied."""
    data = copy.deepcopy(job)
    data["train"] = {**data["train"], **params.get("train", {}), "resume": True}
    data["name"] = f"{job['name']}-tune-{trial_id}"  # never touches `raydapt train`'s run folder
    return job_from_dict(data, f"tune trial {trial_id}")


def _base_job(cfg: JobConfig) -> dict:
    """The job every trial starts from, with absolute paths (trials run in other processes)."""
    job = cfg.to_dict()
    job["output_dir"] = str(cfg.out.resolve())
    student = model_path(cfg, "student")
    job["student"]["path"] = str(student.resolve() if student.is_dir() else student)
    if not cfg.train.torch_threads:  # concurrent trials share the node's cores
        job["train"]["torch_threads"] = cores_per(
            max(1, cfg.tune.max_concurrent_trials) * max(1, cfg.train.num_workers)
        )
    return job


def plan(job: JobConfig) -> TunePlan:
    """The space first (it needs no data), then the trainer's own checks on a probe trial job,
    then the metric: every trial report must carry it. Reads only."""
    check_space(job)
    if job.train.teacher == "on_policy":
        raise UserError(ON_POLICY_TUNE)
    out = layout.tune_dir(job).resolve()
    base = _base_job(job)
    probe_dir = out / "trials" / "probe"  # never created: the probe trial only runs the checks
    probe = train_stage.plan(
        trial_job(base, {}, "probe"), train_dir=probe_dir, export_dir=probe_dir / "final"
    )
    reported = reported_metrics(probe)
    if job.tune.metric not in reported:
        raise UserError(
            f"tune.metric: the trials of this job do not report {job.tune.metric!r} (no validation "
            f"split, or not this mode's metric); they report {', '.join(sorted(reported))}"
        )
    return TunePlan(job, out, base, probe, os.environ.get(FAIL_ENV, ""))


def fingerprint(p: TunePlan) -> str:
    """The tune section and the train stage's fingerprint of the base trial (train section,
    student, prepared data, targets or teacher)."""
    return hash_json(
        {"tune": dataclasses.asdict(p.job.tune), "train": train_stage.fingerprint(p.probe), "v": 1}
    )


def experiment_name(p: TunePlan) -> str:
    """Tune's experiment folder: the same sweep config and inputs restore the same experiment."""
    return "sweep-" + fingerprint(p)[:12]


def _fail_step(fail: str, trial_id: str) -> int:
    """The step RAYDAPT_TUNE_FAIL=<index>:<step> makes this trial fail after; 0: none."""
    index = trial_id.rsplit("_", 1)[
        -1
    ]  # `ab12c_00003` -> trial 3 (ids of search algorithms have no index)
    if fail and index.isdigit() and int(fail.split(":")[0]) == int(index):
        return int(fail.split(":")[1])
    return 0


def _trial(config: dict, job: dict, sweep_dir: str, fail: str, pbt: bool) -> None:
    """One Tune trial: one TorchTrainer; Train reports flow to Tune through a callback."""
    trial_id = tune.get_context().get_trial_id()
    tdir = Path(sweep_dir) / "trials" / trial_id
    cfg, fail_at = trial_job(job, config, trial_id), _fail_step(fail, trial_id)
    starts = tdir / "starts.jsonl"  # one line per time this trial (re)started
    n_start = len(starts.read_text().splitlines()) if starts.is_file() else 0
    if pbt:  # each start is a fresh Train run from the checkpoint Tune hands over
        run_name, resume_from = f"run-{n_start}", restore_path(tdir)
        origin = resume_from
    else:  # Train resumes its own run folder
        latest = latest_ray(tdir / "run")
        run_name, resume_from, origin = "run", None, latest.name if latest else None
    p = train_stage.plan(
        cfg,
        train_dir=tdir,
        export_dir=tdir / "final",
        resume_from=resume_from,
        run_name=run_name,
        fail_at_step=fail_at,
    )
    tdir.mkdir(parents=True, exist_ok=True)
    record = {
        "files": {"train": list(p.train_files), "validation": list(p.val_files)},
        "prepared_fingerprint": p.lineage["prepared_fingerprint"],
        "student": p.student_path,
        "train": config.get("train", {}),
    }
    (tdir / "trial.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    with open(starts, "a") as f:
        f.write(
            json.dumps(
                {
                    "time": time.time(),
                    "fail_at_step": fail_at,
                    "checkpoint": origin,
                    "lr": cfg.train.lr,
                }
            )
            + "\n"
        )
    if pbt:
        result = fit_reporting_checkpoints(lambda callbacks: build_trainer(p, callbacks))
    else:
        result = build_trainer(p, [TuneReportCallback()]).fit()
    rv = result.return_value or {}
    (tdir / "done.json").write_text(
        json.dumps({"start_step": rv.get("start_step"), "metrics": result.metrics})
    )


def _tuner(p: TunePlan) -> tune.Tuner:
    fn = tune.with_parameters(
        _trial, job=p.base, sweep_dir=str(p.output), fail=p.fail, pbt=p.job.tune.scheduler == "pbt"
    )
    trainable = tune.with_resources(fn, {"CPU": p.job.tune.cpus_per_trial})
    name = experiment_name(p)
    path = p.output / name
    if path.is_dir() and tune.Tuner.can_restore(str(path)):
        print(f"tune: resuming {path} (finished trials are kept)", flush=True)
        return tune.Tuner.restore(str(path), trainable, resume_errored=True)
    tc = p.job.tune
    return tune.Tuner(
        trainable,
        param_space=tune_space(tc),
        tune_config=tune.TuneConfig(
            metric=tc.metric,
            mode=tc.mode,
            search_alg=make_search(p.job),
            scheduler=make_scheduler(p.job),
            num_samples=tc.num_samples,
            max_concurrent_trials=tc.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(name=name, storage_path=str(p.output), verbose=1),
    )


def run(p: TunePlan) -> dict[str, Any]:
    """Sweep, then write the results table, the curves and best/. Returns the manifest (the
    summary plus the fingerprint); a sweep with an errored trial or no best trial returns its
    summary with `failed: True` and leaves no manifest, so it is never read as complete."""
    p.output.mkdir(parents=True, exist_ok=True)
    (p.output / MANIFEST).unlink(missing_ok=True)
    results = _tuner(p).fit()
    summary = write_outputs(p.job, results, p.output)
    if summary["failed"]:
        return summary
    return finish_manifest(
        p.output, {**summary, "fingerprint": fingerprint(p), "experiment": experiment_name(p)}
    )
