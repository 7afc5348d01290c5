"""Running stages: `raydapt <stage> JOB` and `raydapt run JOB` both go through `run_stage`.

    raydapt run jobs/distill-offline.yaml

`run_stage` is the one place a stage runs: it builds what planning reads (the world corpus,
preset models), plans the stage (every check, no writes), then, holding the output's lock,
skips the stage if the output's manifest records the plan's fingerprint, or runs it. So a
rerun after a crash redoes only what is missing, and training resumes from its last
checkpoint. `run` chains the job's `stages` after checking that each one's inputs exist or
will be produced by an earlier stage of the same run.
"""

from __future__ import annotations

import os
import time
from typing import Any

from raydapt import layout, sources
from raydapt import stage as stages
from raydapt.config import JobConfig, job_from_dict
from raydapt.errors import UserError
from raydapt.report import table
from raydapt.storage import output_lock, read_record, up_to_date


def _roles(job: JobConfig, names: list[str]) -> tuple[str, ...]:
    """Preset models the given stages read."""
    if not set(names) & {"prepare", "teach", "train", "tune"}:
        return ()
    distill = job.train.mode == "distill" and set(names) & {"train", "tune"}
    return ("student", "teacher") if "teach" in names or distill else ("student",)


def materialize(job: JobConfig, names: list[str]) -> None:
    """Build the world corpus and the preset models that planning `names` reads."""
    sources.materialize(job, _roles(job, names))


def check_needs(job: JobConfig, names: list[str]) -> None:
    """Every stage's inputs exist, or an earlier stage of `names` produces them."""
    for i, name in enumerate(names):
        for artifact in stages.get(name).needs(job):
            producer = stages.PRODUCER[artifact]
            if producer in names[:i]:
                continue
            folder = layout.ARTIFACTS[artifact](job)
            if read_record(folder) is None:
                raise UserError(
                    f"stage `{name}` needs {artifact} at {folder}, which is missing; "
                    f"the `{producer}` "
                    f"stage produces it: add it to `stages:` or run `raydapt {producer} JOB` first"
                )


def run_stage(name: str, job: JobConfig, /, **overrides: Any) -> dict:
    """Plan and run one stage, unless its output is up to date. Returns its manifest, with
    `skipped: True` when nothing ran."""
    module = stages.get(name).load()
    materialize(job, [name])
    plan = module.plan(job, **overrides)
    fp = module.fingerprint(plan)
    if fp is None:
        return module.run(plan)
    with output_lock(plan.output):
        if up_to_date(plan.output, fp):
            print(f"[{name}] up to date ({plan.output})", flush=True)
            return {**(read_record(plan.output) or {}), "skipped": True}
        return module.run(plan)


def run(job: JobConfig, serve_block: bool = True, quiet: bool = False) -> dict:
    """Run the job's stages in order; print what ran, what was skipped and where outputs are
    (not with `quiet`: the demo prints its own summary)."""
    names = [s for s in stages.NAMES if s in job.stages]
    check_needs(job, names)
    summary: list[dict] = []
    for name in names:
        t0 = time.perf_counter()
        if not quiet:
            print(f"[run] {name}: starting", flush=True)
        result = run_stage(name, job, **({"block": serve_block} if name == "serve" else {}))
        status = (
            "failed"
            if result.get("failed")
            else "skipped (up to date)"
            if result.get("skipped")
            else "ran"
        )
        summary.append(
            {
                "stage": name,
                "status": status,
                "seconds": round(time.perf_counter() - t0, 1),
                "result": result,
            }
        )
        if status == "failed":  # a failed sweep: the stages after it would read no output
            break
    if not quiet:
        rows = [{**s, "output": _output_name(job, s["stage"])} for s in summary]
        print("\n" + table(rows, ["stage", "status", "seconds", "output"]), flush=True)
    return {"stages": summary, "failed": any(s["status"] == "failed" for s in summary)}


def _output_name(job: JobConfig, name: str) -> str:
    artifact = stages.get(name).produces
    return str(layout.ARTIFACTS[artifact](job)) if artifact else "(HTTP)"


def derived(
    job: JobConfig, name: str, share: tuple[str, ...] = ("prepared",), **sections: dict
) -> JobConfig:
    """A copy of `job` writing under <out>/<name>, sharing the parent's `share` artifacts
    (prepared data; also `targets` for a second student trained on the same targets)."""
    data = job.to_dict()
    data["output_dir"] = str(job.out / name)
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    child = job_from_dict(data, f"{job.name}:{name}")
    for artifact in share:
        link = layout.ARTIFACTS[artifact](child)
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(layout.ARTIFACTS[artifact](job).resolve(), link)
    return child
