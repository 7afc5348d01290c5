"""The stage contract, and the one registry of stages that the CLI, `raydapt run`, the
config checks and the README table iterate.

Every stage is a package named after its CLI verb that exports three functions:

    plan(job, **overrides) -> Plan     # a frozen dataclass; every driver-side check, no writes
    fingerprint(plan) -> str | None    # what decides the output; None: always runs (serve)
    run(plan) -> dict                  # does the work; returns the output's manifest

A Plan has an `output` path: the folder (or record file) whose manifest records the
fingerprint it was made from. `raydapt.pipeline.run_stage` is the only caller of `run`: it
holds the output's lock and skips the stage when the manifest records the same fingerprint
(`storage.up_to_date`), whether the stage is called alone or by `raydapt run`.

Adding a stage: a package with those three functions, one `Stage` entry below, and the
artifact it produces in `layout.ARTIFACTS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

# A job is a raydapt.config.JobConfig; config imports this registry (stage names, help), so
# this module names the type only in words and stays free of an import cycle.
JobConfig = Any


@dataclass(frozen=True)
class Stage:
    """One stage of the data flow, by name; its code loads only when it runs."""

    name: str
    help: str
    module: str
    produces: str | None
    needs: Callable[[JobConfig], tuple[str, ...]]

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


def _distill_offline(job: JobConfig) -> bool:
    return job.train.mode == "distill" and job.train.teacher == "offline"


def _train_needs(job: JobConfig) -> tuple[str, ...]:
    return ("prepared", "targets") if _distill_offline(job) else ("prepared",)


def _eval_needs(job: JobConfig) -> tuple[str, ...]:
    return () if job.eval.endpoint else ("export",)


def _serve_needs(job: JobConfig) -> tuple[str, ...]:
    return () if job.serve.model else ("export",)


STAGES: tuple[Stage, ...] = (
    Stage(
        "prepare",
        "Ray Data: read, validate, dedupe, tokenize, pack and split the corpus.",
        "raydapt.prepare",
        "prepared",
        lambda job: (),
    ),
    Stage(
        "teach",
        "Teacher actor pool (vLLM): generations and/or top-k logprobs as targets.",
        "raydapt.teach",
        "targets",
        lambda job: ("prepared",),
    ),
    Stage(
        "train",
        "Ray Train + FSDP2: full, lora, transfer or distill training; exports HF format.",
        "raydapt.train",
        "export",
        _train_needs,
    ),
    Stage(
        "tune",
        "Ray Tune: sweep train.* hyperparameters over the same prepared data and targets.",
        "raydapt.tune",
        "sweep",
        _train_needs,
    ),
    Stage(
        "eval",
        "Held-out loss, perplexity and exact-match on a model folder or endpoint.",
        "raydapt.eval",
        "metrics",
        _eval_needs,
    ),
    Stage(
        "serve",
        "Ray Serve: OpenAI-compatible HTTP API on vLLM, with multi-LoRA.",
        "raydapt.serve",
        None,
        _serve_needs,
    ),
)

NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
PRODUCER: dict[str, str] = {s.produces: s.name for s in STAGES if s.produces}


def get(name: str) -> Stage:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; stages are {', '.join(NAMES)}") from None


def plan(name: str, job: JobConfig, **overrides: Any) -> Any:
    """Plan one stage by name (no side effects)."""
    return get(name).load().plan(job, **overrides)
