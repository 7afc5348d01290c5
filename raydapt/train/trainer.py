"""The Ray Train V2 TorchTrainer of a TrainPlan: datasets, scaling, storage, failure policy.

Used by `raydapt.train.run` (one run) and by each Ray Tune trial (raydapt.tune.stage), which
adds its callbacks. The driver builds the Ray datasets; workers only read their shards
(see data.py for why unsplit).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pyarrow.parquet as pq

from raydapt.errors import UserError
from raydapt.train.loop import train_func
from raydapt.train.spec import TrainPlan


def dataset(files: Sequence[str], columns: Sequence[str]) -> Any:
    """A materialized Ray dataset of `files`: workers then stream blocks from the object store
    and run no read tasks of their own (seen on 2 busy cores: 30-70 s per worker and dataset).

    Small inputs (under RAYDAPT_INLINE_DATA_MB, 64 by default) are read here with pyarrow and
    put in the object store whole (`from_arrow`), which skips Ray Data's task start-up;
    larger ones go through the distributed `read_parquet`.
    """
    import ray.data  # slow to import (about 1 s)

    limit = float(os.environ.get("RAYDAPT_INLINE_DATA_MB", "64")) * 2**20
    if sum(os.path.getsize(f) for f in files) <= limit:
        ds = ray.data.from_arrow([pq.read_table(f, columns=list(columns)) for f in files])
    else:
        ds = ray.data.read_parquet(list(files), columns=list(columns)).materialize()
    # each worker reads its shard once; a bar per worker would only repaint over the
    # trainer's own progress lines
    ds.context.enable_progress_bars = False
    return ds


def build_trainer(plan: TrainPlan, callbacks: Sequence[Any] = (), source: Any = None) -> Any:
    """The TorchTrainer (Train V2) of a checked plan; its run folder is
    `<plan.train_dir>/<plan.run_name>`, so a rerun resumes its checkpoints."""
    from ray.train import (  # slow to import (about 1 s)
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchConfig, TorchTrainer

    tc = plan.job.train
    # on-policy runs make their rows each step; a prompt-only corpus has no train rows at all
    datasets = {"train": dataset(plan.train_files, plan.train_columns)} if plan.train_files else {}
    if plan.val_files:
        datasets["validation"] = dataset(plan.val_files, plan.val_columns)
    resources = {"CPU": tc.cpus_per_worker} | ({"GPU": 1} if tc.use_gpu else {})
    scaling = ScalingConfig(
        num_workers=tc.num_workers,
        use_gpu=tc.use_gpu,
        resources_per_worker=resources,
        placement_strategy=tc.placement_strategy,
    )
    run_config = RunConfig(
        name=plan.run_name,
        storage_path=str(plan.train_dir),
        # a dead worker or node restarts the whole worker group, which resumes from the
        # latest registered checkpoint (loop.resume_step); the data position is the step
        failure_config=FailureConfig(max_failures=tc.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints or None),
        # Train's INFO lines (one per report) would bury the trainer's own progress line
        logging_config=LoggingConfig(log_level="WARNING"),
        callbacks=list(callbacks),
    )
    return TorchTrainer(
        train_func,
        train_loop_config={"plan": plan, "source": source},
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=run_config,
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),
    )


def unwrap_user_error(err: BaseException) -> None:
    """Re-raise a worker's UserError as-is, so the CLI exits with code 2."""
    failures = getattr(err, "worker_failures", None) or {}
    for e in list(failures.values()) + [getattr(err, "controller_failure", None), err.__cause__]:
        seen = e
        while seen is not None:
            if isinstance(seen, UserError):
                raise UserError(str(seen)) from None
            cause = getattr(seen, "cause", None)
            seen = (
                cause if isinstance(cause, BaseException) and cause is not seen else seen.__cause__
            )
