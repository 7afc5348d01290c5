"""The train function every Ray Train worker runs, written out in full (torchtune style).

    build the student (mode: full | lora | transfer | distill) -> fully_shard -> AdamW + schedule
    build the objective once (objective.py) -> load rows from the Ray Data shards
    resume from the latest checkpoint if any
    for each step: grad_accum micro-batches -> backward -> clip -> step -> log / eval / report
    export the final model (HF format) from rank 0

Loss normalisation: each micro-batch's mean loss is scaled by its token count times the
world size over the step's global token count (one all_reduce before the forwards). FSDP
averages gradients over ranks, so the update is the gradient of the mean over every
token of the global batch, the same for any worker count or padding (tests check parity).

Reporting policy (what Ray Train, and through it Ray Tune, sees): the loop reports at every
eval step (`train.eval_every`), every checkpoint step (`train.checkpoint_every`) and the
last step, and nowhere else. It evaluates at each of those steps, so every report carries
`step`, `loss`, the objective's parts and, when a validation split exists, `val_loss`
(`val_acc` for classification): `reported_metrics(plan)` lists them, and tune checks its
metric against it before any trial starts. Checkpoint steps report with the checkpoint. The
console progress and metrics.jsonl are separate (metrics.py).

The driver (stage.py) builds the `TrainPlan` this function receives as `config["plan"]` and
checks the inputs first; errors found here (no labelled rows, an incompatible checkpoint)
are UserErrors too and reach the CLI as exit code 2.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from torch import nn

from raydapt.config import TrainConfig
from raydapt.errors import UserError
from raydapt.faults import park_until_killed
from raydapt.rows import collate
from raydapt.train import checkpoint as ckpt
from raydapt.train import data
from raydapt.train.fsdp import (
    all_reduce_sum,
    autocast_for,
    barrier,
    clip_grad_norm,
    device_for,
    mixed_precision,
    shard_model,
    world,
)
from raydapt.train.heads import prepare_hidden_losses
from raydapt.train.metrics import MetricsLog
from raydapt.train.modes import build_student, is_classification, load_teacher, trainable
from raydapt.train.objective import Objective, build_objective, objective_class
from raydapt.train.spec import Hold, TrainPlan

FAIL_ENV = "RAYDAPT_FAIL_AT_STEP"  # failure injection for resume tests: raise after this step
HOLD_STEP_ENV = "RAYDAPT_HOLD_AT_STEP"  # fault tests: after this step, wait to be killed ...
HOLD_FILE_ENV = "RAYDAPT_HOLD_FILE"  # ... having written {pid, node} to <this path>.rank<r>
# what every report carries besides the objective's parts and the validation metrics
STEP_METRICS = ("step", "loss", "lr", "grad_norm", "tokens", "step_time_s", "tokens_per_s", "epoch")


def hold_for_kill(hold: Hold | None, step: int, rank: int) -> None:
    """Fault-injection point: park this worker after each of `hold.steps` until killed.

    Each rank writes `<file>.s<step>.rank<r>` (pid, node id), then waits, so a test or
    bench/chaos.py can SIGKILL a real worker process (or remove its node) at a known step.
    A rank holds once per file: the restarted worker group, which redoes the steps after
    the last checkpoint, finds its file and runs on.
    """
    if hold is None or step not in hold.steps:
        return
    path = Path(f"{hold.file}.s{step}.rank{rank}")
    if not path.exists():
        park_until_killed(path, {"rank": rank, "step": step})


def is_report_step(step: int, tc: TrainConfig) -> bool:
    """The reporting policy (module docstring): eval steps, checkpoint steps, the last step."""
    return (
        step == tc.max_steps
        or (tc.eval_every > 0 and step % tc.eval_every == 0)
        or is_checkpoint_step(step, tc)
    )


def is_checkpoint_step(step: int, tc: TrainConfig) -> bool:
    return step == tc.max_steps or (tc.checkpoint_every > 0 and step % tc.checkpoint_every == 0)


def reported_metrics(plan: TrainPlan) -> set[str]:
    """The metrics every report of this run carries (the reporting policy)."""
    tc = plan.job.train
    online = plan.teacher_path is not None
    cls = objective_class(tc, online, plan.has_topk, plan.job.teach.signal)
    out = {*STEP_METRICS, *cls.parts}
    if plan.val_files:
        out |= {
            "val_loss",
            *(f"val_{p}" for p in objective_class(tc, False, False).parts if p != "ce"),
        }
    return out


def lr_factor(step: int, tc: TrainConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): warmup, then decay."""
    if step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    if tc.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
    lo = tc.min_lr_ratio
    if tc.schedule == "linear":
        return 1.0 - (1.0 - lo) * progress
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_step(
    model: nn.Module,
    objective: Objective,
    optim,
    sched,
    batches: list[dict],
    tc: TrainConfig,
    params: list[nn.Parameter],
    device: torch.device,
) -> dict[str, float]:
    """One optimizer step over `batches` (this rank's micro-batches)."""
    _, ws = world()
    counts = [objective.count(b) for b in batches]
    n_global = all_reduce_sum(torch.tensor(float(sum(counts)), device=device))
    scale = ws / n_global.clamp_min(1.0)
    sums: dict[str, torch.Tensor] = {}
    for b, n in zip(batches, counts, strict=True):
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        with autocast_for(model, mixed_precision(tc.precision, tc.use_gpu), device):
            loss, parts = objective(model, b)
        (loss * (n * scale)).backward()
        for k, v in {"loss": loss.detach(), **parts}.items():
            sums[k] = sums.get(k, torch.zeros((), device=device)) + v.float() * n
    grad_norm = clip_grad_norm(params, tc.grad_clip)
    lr = optim.param_groups[0]["lr"]
    optim.step()
    sched.step()
    optim.zero_grad(set_to_none=True)
    keys = sorted(sums)
    flat = all_reduce_sum(torch.stack([sums[k] for k in keys]))
    out = {k: float(v / n_global.clamp_min(1.0)) for k, v in zip(keys, flat, strict=True)}
    return {**out, "lr": lr, "grad_norm": grad_norm, "tokens": float(n_global)}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    table,
    objective: Objective,
    tc: TrainConfig,
    pad_id: int,
    device: torch.device,
) -> dict[str, float]:
    """Held-out mean loss (and the objective's other parts, e.g. val_acc) over the whole
    validation table, weighted like training by the objective's counts."""
    if table is None or table.num_rows == 0:
        return {}
    rank, ws = world()
    names = ["loss", *(p for p in objective.parts if p != "ce")]
    was_training = model.training
    model.eval()
    tot = torch.zeros(len(names) + 1, device=device)  # sum of each name x count, then the count
    with autocast_for(model, mixed_precision(tc.precision, tc.use_gpu), device):
        for rows, valid in data.val_batches(
            table.num_rows, tc.batch_size * ws, rank, tc.batch_size
        ):
            b = {k: v.to(device) for k, v in collate(table, rows, pad_id, valid).items()}
            loss, parts = objective(model, b)
            n = float(objective.count(b))
            vals = [loss.detach().float(), *(parts[p].float() for p in names[1:])]
            tot += torch.stack([*(v * n for v in vals), torch.tensor(n, device=device)])
    model.train(was_training)
    tot = all_reduce_sum(tot)
    return {f"val_{k}": float(tot[i] / tot[-1].clamp_min(1)) for i, k in enumerate(names)}


def setup(plan: TrainPlan, tc: TrainConfig, device: torch.device):
    """Student (sharded), the objective (with the online teacher, if any), optimizer, schedule."""
    precision = mixed_precision(tc.precision, tc.use_gpu)
    model = build_student(plan.student_path, tc, tc.seed).to(device)
    teacher = None
    if plan.teacher_path is not None:
        teacher = load_teacher(plan.teacher_path, model.config.vocab_size).to(device)
        shard_model(teacher, precision)
    shard_model(model, precision)
    prepare_hidden_losses(model)  # after sharding: registered as an FSDP forward method
    params = trainable(model)
    optim = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: lr_factor(s, tc))
    objective = build_objective(tc, teacher, plan.has_topk, plan.job.teach.signal)
    return model, objective, optim, sched, params


def load_tables(plan: TrainPlan, tc: TrainConfig):
    """Train and validation rows from the Ray Data shards (classification: labelled rows).
    On-policy runs train on rows the source makes each step: train is None."""
    val = data.load_shard("validation", list(plan.val_columns)) if plan.val_files else None
    if plan.on_policy is not None:
        return None, val
    train = data.load_shard("train", list(plan.train_columns))
    if is_classification(tc):
        train = train.filter(pc.greater_equal(train.column("label"), 0))
        val = val.filter(pc.greater_equal(val.column("label"), 0)) if val is not None else None
        if train.num_rows == 0:
            raise UserError("train.new_head=classification: no prepared train row has a label >= 0")
    if train.num_rows == 0:
        raise UserError("the training split is empty; check `raydapt prepare` output")
    return train, val


def resume_step(plan: TrainPlan, model, optim, sched, tc: TrainConfig) -> int:
    """Restore the latest checkpoint; 0 when none.

    Where from: the local-mode folder; else this Train run's own latest checkpoint (a rerun,
    or a worker-group restart); else `plan.resume_from`, a checkpoint of another run (a Tune
    PBT exploit or a Tune-restored trial: Train V2 takes it through the loop config).
    Checkpoints a run must not resume (train.resume=false, changed data) are deleted by
    `stage.run` before the workers start, so whatever is found here belongs to this run.
    """
    import ray.train  # slow to import (about 1 s); the driver imports this module without it

    if plan.local_mode:
        folder = ckpt.latest_local(plan.train_dir)
        step = ckpt.restore(folder, model, optim, sched, plan.ckpt_key) if folder else 0
    elif (checkpoint := ray.train.get_checkpoint()) is not None:
        with checkpoint.as_directory() as d:
            step = ckpt.restore(Path(d), model, optim, sched, plan.ckpt_key)
    elif plan.resume_from is not None:
        step = ckpt.restore(plan.resume_from, model, optim, sched, plan.ckpt_key)
    else:
        return 0
    apply_hparams(optim, sched, tc)
    return step


def apply_hparams(optim, sched, tc: TrainConfig) -> None:
    """Make the job's optimizer settings win over the ones restored with the checkpoint.

    The optimizer and scheduler state dicts carry the lr, betas and weight decay of the run
    that saved them. A resume with a changed `train.lr` (or a PBT exploit, which resumes
    another trial's checkpoint with a mutated config) must train with the new values, not
    silently with the old ones. The moments (exp_avg, exp_avg_sq) are kept.
    """
    sched.base_lrs = [tc.lr] * len(optim.param_groups)
    for g in optim.param_groups:
        g.update(
            initial_lr=tc.lr,
            lr=tc.lr * lr_factor(sched.last_epoch, tc),
            betas=tuple(tc.betas),
            weight_decay=tc.weight_decay,
        )
    sched._last_lr = [g["lr"] for g in optim.param_groups]


def _threads(tc: TrainConfig) -> int:
    """Ray sets OMP_NUM_THREADS to a worker's CPU reservation, which on a small machine whose
    Ray cluster declares more CPUs than it has cores leaves cores idle; share the node's
    cores among its workers instead."""
    if tc.torch_threads > 0:
        return tc.torch_threads
    try:
        import ray.train  # slow to import (about 1 s); the driver imports this module without it

        local = ray.train.get_context().get_local_world_size()
    except Exception:  # noqa: BLE001 - local mode has no Train context
        local = 1
    return cores_per(local)


def cores_per(consumers: int) -> int:
    """This node's cores shared evenly among `consumers` processes (at least one each)."""
    return max(1, (os.cpu_count() or 1) // max(1, consumers))


def _quiet_report_lines() -> None:
    """Ray Train V2 logs each report at INFO ("Reporting training result N: ...") through a
    logger named by its file path, outside `ray.train`, so LoggingConfig(log_level) misses it
    and the console gets a second, unreadable line per log step."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: keep its lines rather than fail the run
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _batches(plan: TrainPlan, rows, step: int) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of optimizer step `step` (1-based): a pure function of it."""
    tc = plan.job.train
    rank, ws = world()
    g0 = (step - 1) * tc.grad_accum
    return [
        collate(
            rows,
            data.micro_batch_rows(
                rows.num_rows, tc.seed, g, tc.batch_size * ws, rank, tc.batch_size
            ),
            plan.pad_id,
        )
        for g in range(g0, g0 + tc.grad_accum)
    ]


def _on_policy_batches(plan: TrainPlan, source: Any, step: int) -> tuple[list[dict], dict]:
    """This rank's micro-batches of step `step` from the rollout source, and the step's
    rollout statistics (the same rows reach every rank; each takes its own slice)."""
    import ray

    tc = plan.job.train
    rank, ws = world()
    table, stats = ray.get(source.batch.remote(step))
    bs = tc.batch_size
    out = []
    for g in range(tc.grad_accum):
        lo = (g * ws + rank) * bs
        out.append(collate(table, np.arange(lo, lo + bs), plan.pad_id))
    return out, stats


def sync_rollouts(model: nn.Module, source: Any, version: int) -> float:
    """Push the model's weights to the rollout engines (all ranks call: the gather is a
    collective); rank 0 returns the seconds the push took, others 0. Every rank leaves only
    after the engines hold the new weights, so no rank asks for the next batch too early."""
    import ray

    from raydapt.teach.weights import to_payload

    t0 = time.perf_counter()
    sd = ckpt.full_state_dict(model)
    rank, _ = world()
    if rank == 0:
        ray.get(source.sync.remote([ray.put(to_payload(sd))], version))
    del sd
    barrier()
    return time.perf_counter() - t0 if rank == 0 else 0.0


def train_func(config: dict[str, Any]) -> dict:
    """Ray Train per-worker entry point; `config["plan"]` is the driver's TrainPlan."""
    import ray.train  # slow to import (about 1 s); the driver imports this module without it

    _quiet_report_lines()
    plan: TrainPlan = config["plan"]
    tc = plan.job.train
    rank, ws = world()
    torch.set_num_threads(_threads(tc))
    device = device_for(tc.use_gpu)
    model, objective, optim, sched, params = setup(plan, tc, device)
    val_objective = build_objective(tc)
    train_rows, val_rows = load_tables(plan, tc)
    start = resume_step(plan, model, optim, sched, tc)
    source = config.get("source")
    if plan.on_policy is not None and source is None:
        raise UserError(
            "train.teacher=on_policy runs through `raydapt train`/`run`, not in "
            "tune sweeps (no rollout source was started for this trial)"
        )
    if source is not None and start > 0:  # resumed: the engines must sample from these weights
        sync_rollouts(model, source, start)
    log = MetricsLog(plan.train_dir, start, tc.max_steps)
    model.train()
    last: dict[str, Any] = {}
    for step in range(start + 1, tc.max_steps + 1):
        t0 = time.perf_counter()
        rollout: dict[str, float] = {}
        if source is not None:
            batches, rollout = _on_policy_batches(plan, source, step)
        else:
            batches = _batches(plan, train_rows, step)
        t_data = time.perf_counter() - t0
        m = train_step(model, objective, optim, sched, batches, tc, params, device)
        dt = time.perf_counter() - t0
        if source is not None:
            epoch = rollout.pop("prompt_epoch")
            m.update(rollout, wait_s=t_data)
            if step % plan.job.rollout.sync_every == 0 and step < tc.max_steps:
                m["sync_s"] = sync_rollouts(model, source, step)
        else:
            epoch = (step - 1) * tc.grad_accum * tc.batch_size * ws / train_rows.num_rows
        m.update(step=step, step_time_s=dt, tokens_per_s=m["tokens"] / dt, epoch=epoch)
        if is_report_step(step, tc):
            m.update(evaluate(model, val_rows, val_objective, tc, plan.pad_id, device))
        log.write(m)
        last = m
        if is_checkpoint_step(step, tc):
            ckpt.save(
                model,
                optim,
                sched,
                step,
                plan.ckpt_key,
                m,
                plan.train_dir,
                plan.local_mode,
                tc.keep_checkpoints,
            )
        elif is_report_step(step, tc):
            ray.train.report(m)
        hold_for_kill(plan.hold, step, rank)
        if plan.fail_at_step and step == plan.fail_at_step:
            raise RuntimeError(
                f"{FAIL_ENV}={plan.fail_at_step}: injected failure after step {step}"
            )
    log.close()
    if last or start == tc.max_steps:
        manifest = {**plan.lineage, "steps": tc.max_steps, "final_metrics": last}
        ckpt.export(model, tc, plan.student_path, plan.output, manifest)
    return {"rank": rank, "world_size": ws, "start_step": start, "last": last}
