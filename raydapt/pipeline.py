"""`raydapt run JOB`: the stage graph, and `raydapt demo`: the embedded world end to end.

    raydapt run jobs/distill-offline.yaml
    raydapt demo                              # = make demo

Each stage reads only what the stage before it wrote. A stage is skipped when its output's
manifest records the fingerprint of its current inputs and config (prepare and teach check
their own; train and eval are stamped here), so a rerun after a crash redoes only what is
missing, and training itself resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raydapt import layout
from raydapt.config import JobConfig
from raydapt.errors import UserError
from raydapt.storage import hash_json, read_manifest, write_json_atomic

log = logging.getLogger(__name__)

PRODUCERS = {"prepared": "prepare", "targets": "teach", "export": "train"}


def _stamp_path(cfg: JobConfig, stage: str) -> Path:
    return cfg.out / ".stages" / f"{stage}.json"


def _manifest_fp(folder: Path) -> str | None:
    m = read_manifest(folder)
    return None if m is None else m.get("fingerprint") or m.get("created_at")


def stage_fingerprint(cfg: JobConfig, stage: str) -> str:
    """Inputs and config that decide a stage's output."""
    parts: dict[str, Any] = {"stage": stage}
    if stage == "train":
        parts |= {"train": dataclasses.asdict(cfg.train), "student": dataclasses.asdict(cfg.student),
                  "prepared": _manifest_fp(layout.prepared_dir(cfg))}
        if cfg.train.mode == "distill":
            parts["teacher"] = dataclasses.asdict(cfg.teacher)
            parts["targets"] = _manifest_fp(layout.targets_dir(cfg)) if cfg.train.teacher == "offline" else None
    elif stage == "eval":
        parts |= {"eval": dataclasses.asdict(cfg.eval), "export": _manifest_fp(layout.export_dir(cfg))}
    elif stage == "tune":
        parts |= {"tune": dataclasses.asdict(cfg.tune), "train": dataclasses.asdict(cfg.train),
                  "prepared": _manifest_fp(layout.prepared_dir(cfg))}
    return hash_json(parts)


def _output_present(cfg: JobConfig, stage: str) -> bool:
    """A stamp alone is not enough: the stage's output may have been deleted since."""
    if stage == "train":
        return read_manifest(layout.export_dir(cfg)) is not None
    if stage == "eval":
        return cfg.eval.endpoint != "" or (layout.eval_dir(cfg) / "student.json").is_file()
    if stage == "tune":
        return (layout.tune_dir(cfg) / "results.csv").is_file()
    return True


def _stamped(cfg: JobConfig, stage: str) -> bool:
    p = _stamp_path(cfg, stage)
    if not p.is_file() or not _output_present(cfg, stage):
        return False
    import json

    return json.loads(p.read_text()).get("fingerprint") == stage_fingerprint(cfg, stage)


def _stamp(cfg: JobConfig, stage: str) -> None:
    p = _stamp_path(cfg, stage)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(p, {"fingerprint": stage_fingerprint(cfg, stage), "at": time.time()})


def _check_inputs(cfg: JobConfig, stage: str, planned: list[str]) -> None:
    """A stage whose inputs are missing names the stage that would produce them."""
    needs: list[tuple[str, Path]] = []
    if stage in ("teach", "train", "tune"):
        needs.append(("prepared", layout.prepared_dir(cfg)))
    if stage in ("train", "tune") and cfg.train.mode == "distill" and cfg.train.teacher == "offline":
        needs.append(("targets", layout.targets_dir(cfg)))
    if stage in ("eval", "serve") and not cfg.serve.model and not cfg.eval.endpoint:
        needs.append(("export", layout.export_dir(cfg)))
    for what, folder in needs:
        producer = PRODUCERS[what]
        if producer in planned:
            continue  # it will exist by then
        if read_manifest(folder) is None:
            raise UserError(
                f"stage `{stage}` needs {what} at {folder}, which is missing; the `{producer}` stage "
                f"produces it: add it to `stages:` or run `raydapt {producer} JOB` first"
            )


def _stage_fn(stage: str) -> Callable[[JobConfig], Any]:
    if stage == "prepare":
        from raydapt.corpus import run as fn
    elif stage == "teach":
        from raydapt.teacher import run as fn
    elif stage == "train":
        from raydapt.train.launch import run as fn
    elif stage == "tune":
        from raydapt.tune import run as fn
    elif stage == "eval":
        from raydapt.evaluate import run as fn
    elif stage == "serve":
        from raydapt.serve import run as fn
    else:  # validated by config; kept for direct callers
        raise UserError(f"unknown stage {stage!r}")
    return fn


def run(cfg: JobConfig, serve_block: bool = True) -> dict:
    """Run the job's stages in order; print what ran, what was skipped and where outputs are."""
    summary: list[dict] = []
    order = [s for s in ("prepare", "teach", "train", "tune", "eval", "serve") if s in cfg.stages]
    for i, stage in enumerate(order):
        _check_inputs(cfg, stage, order[:i])
    for stage in order:
        t0 = time.perf_counter()
        if stage in ("train", "eval", "tune") and _stamped(cfg, stage):
            print(f"[run] {stage}: up to date")
            summary.append({"stage": stage, "status": "skipped (up to date)", "seconds": 0.0})
            continue
        print(f"[run] {stage}: starting")
        fn = _stage_fn(stage)
        result = fn(cfg, block=serve_block) if stage == "serve" else fn(cfg)
        status = "skipped (up to date)" if isinstance(result, dict) and result.get("skipped") else "ran"
        if stage in ("train", "eval", "tune"):
            _stamp(cfg, stage)
        summary.append({"stage": stage, "status": status, "seconds": round(time.perf_counter() - t0, 1),
                        "result": result if isinstance(result, dict) else None})
    _print_summary(cfg, summary)
    return {"stages": summary}


def _print_summary(cfg: JobConfig, summary: list[dict]) -> None:
    from raydapt.report import table

    outputs = {"prepare": layout.prepared_dir(cfg), "teach": layout.targets_dir(cfg), "train": layout.export_dir(cfg),
               "tune": layout.tune_dir(cfg), "eval": layout.eval_dir(cfg), "serve": "(HTTP)"}
    rows = [{**s, "output": str(outputs[s["stage"]])} for s in summary]
    print("\n" + table(rows, ["stage", "status", "seconds", "output"]))


def derived(cfg: JobConfig, name: str, **sections: dict) -> JobConfig:
    """A copy of `cfg` writing under <out>/<name>, sharing the parent's prepared data."""
    from raydapt.config import job_from_dict

    data = cfg.to_dict()
    data["output_dir"] = str(cfg.out / name)
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    child = job_from_dict(data, f"{cfg.name}:{name}")
    link = layout.prepared_dir(child)
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(layout.prepared_dir(cfg).resolve(), link)
    return child


def demo(cfg: JobConfig) -> dict:
    from raydapt.demo import run_demo

    return run_demo(cfg)
