"""Population Based Training for `tune.scheduler: pbt`: Train checkpoints become Tune checkpoints.

PBT copies a strong trial's checkpoint into a weak one and goes on with a mutated config.
For that Tune must hold each trial's checkpoints, but Train V2's `TuneReportCallback` only
forwards metrics (and a checkpoint *path* as a metric). So here a Train callback hands every
report, with its checkpoint, to the trial function through a Ray queue, and the trial function
reports it to Tune with `tune.report(metrics, checkpoint=...)`, while `trainer.fit()` runs in
a thread. When PBT (or Tune's own failure handling) restarts a trial, `tune.get_checkpoint()`
is the checkpoint to continue from; the trial starts a fresh Train run that restores it
(`TrainPlan.resume_from`), and the loop applies the trial's new lr and weight decay over the
restored optimizer state (raydapt.train.loop.apply_hparams).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from ray import tune
from ray.train.v2.api.callback import UserCallback
from ray.tune.schedulers import PopulationBasedTraining
from ray.util.queue import Empty, Queue


class FinalStepPBT(PopulationBasedTraining):
    """PBT that leaves a trial alone at its last step.

    Tune's PBT perturbs whenever `perturbation_interval` steps have passed, the final report
    included: a weak trial would then restart a whole Train run from the donor's final
    checkpoint only to train zero steps and report the donor's score as its own.
    """

    def __init__(self, final_step: int, **kw: Any):
        super().__init__(**kw)
        self.final_step = final_step

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get(self._time_attr, 0) >= self.final_step:
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


class CheckpointBridge(UserCallback):
    """Runs in the Train controller: forwards each report, checkpoint included, to the trial."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
        self.queue.put(
            {"metrics": dict(metrics[0]), "checkpoint": checkpoint.path if checkpoint else None}
        )


def restore_path(tdir: Path) -> str | None:
    """The checkpoint Tune gives this (re)start of the trial, as a local folder; None if fresh."""
    ck = tune.get_checkpoint()
    if ck is None:
        return None
    if Path(ck.path).is_dir():
        return ck.path
    return ck.to_directory(str(tdir / "pbt-restore"))


def fit_reporting_checkpoints(build_trainer: Any) -> Any:
    """`build_trainer(callbacks)` -> TorchTrainer; fit it, reporting each result to Tune."""
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    trainer = build_trainer([CheckpointBridge(queue)])
    box: dict[str, Any] = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial's thread below
            box["error"] = e

    thread = threading.Thread(target=fit, name="raydapt-pbt-fit", daemon=True)
    thread.start()
    while True:
        try:
            item = queue.get(timeout=1.0)
        except Empty:
            if not thread.is_alive() and queue.empty():
                break
            continue
        path = item["checkpoint"]
        tune.report(
            item["metrics"], checkpoint=tune.Checkpoint.from_directory(path) if path else None
        )
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
