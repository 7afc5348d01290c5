"""What a train run is told: the checked plan the driver hands every worker.

`raydapt.train.plan` builds a `TrainPlan` (every check, no writes); the driver passes it to
Ray Train as `train_loop_config={"plan": plan}` and each worker reads its typed fields. It
holds only plain values (paths, ids, the job config), so it pickles to any worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from raydapt.config import JobConfig
from raydapt.onpolicy.source import SourceSpec


@dataclass(frozen=True)
class Hold:
    """Fault injection: after each step in `steps`, every rank writes `<file>.s<step>.rank<r>`
    (its pid and node) and waits to be killed (tests/faults, bench/chaos.py)."""

    steps: tuple[int, ...]
    file: str


@dataclass(frozen=True)
class TrainPlan:
    """The checked inputs and outputs of one train run (a `raydapt train`, or one tune trial)."""

    job: JobConfig
    output: Path  # the HF export folder; its manifest.json records the stage fingerprint
    train_dir: Path  # Ray Train storage, local-mode checkpoints, metrics.jsonl, inputs.json
    run_name: str  # the Ray Train run: its checkpoints live in <train_dir>/<run_name>/
    student_path: str
    teacher_path: str | None  # the online teacher; None unless train.teacher=online distill
    pad_id: int
    ckpt_key: str  # what a checkpoint must share with the run that resumes it (model and mode)
    local_mode: bool  # train.num_workers=0: the train function runs in the driver process
    # keep this run's checkpoints; False: `run` deletes them first (resume=false, new data)
    resume: bool
    resume_from: (
        Path | None
    )  # a checkpoint of another run to start from (Tune PBT, restored trials)
    fail_at_step: int  # fault injection: raise right after this step (0: never)
    hold: Hold | None
    train_files: tuple[str, ...]  # prepared train split, or the teacher targets (offline distill)
    val_files: tuple[str, ...]  # prepared validation split; empty when there is none
    train_columns: tuple[str, ...]
    val_columns: tuple[str, ...]
    prepared: dict = field(repr=False)  # the prepared manifest
    targets: dict | None = field(repr=False)  # the targets manifest (offline distill)
    data_inputs: dict = field(repr=False)  # the data identity checkpoints are tied to (inputs.json)
    lineage: dict = field(repr=False)  # goes into the export manifest
    on_policy: SourceSpec | None = None  # train.teacher=on_policy: where each step's rows come from

    @property
    def export_dir(self) -> Path:
        return self.output

    @property
    def has_topk(self) -> bool:
        """The training rows carry the teacher's targets (top-k and/or draws)."""
        cols = self.train_columns
        return "topk_ids" in cols or "sample_ids" in cols or self.on_policy is not None

    @property
    def checkpoint_dirs(self) -> tuple[Path, Path]:
        """Where this run's checkpoints live: Ray Train's run folder, and local mode's folder."""
        return self.train_dir / self.run_name, self.train_dir / "checkpoints"
