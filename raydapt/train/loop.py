"""The train function every Ray Train worker runs, written out in full (torchtune style).

    build the student (mode: full | lora | transfer | distill) -> fully_shard -> AdamW + schedule
    load rows from the Ray Data shards -> resume from the latest checkpoint if any
    for each step: grad_accum micro-batches -> backward -> clip -> step -> log / eval / checkpoint
    export the final model (HF format) from rank 0

Loss normalisation: each micro-batch's mean loss is scaled by its token count times the
world size over the step's global token count (one all_reduce before the forwards). FSDP
averages gradients over ranks, so the update is the gradient of the mean over every
token of the global batch, the same for any worker count or padding (tests check parity).

`launch.run` builds the config dict this function receives; see launch.py. The driver
checks inputs first; errors found here (no labelled rows, an incompatible checkpoint) are
UserErrors too and reach the CLI as exit code 2.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raydapt.config import TrainConfig, job_from_dict
from raydapt.errors import UserError
from raydapt.faults import park_until_killed
from raydapt.train import checkpoint as ckpt
from raydapt.train import data
from raydapt.train.fsdp import (
    all_reduce_sum,
    autocast_for,
    clip_grad_norm,
    device_for,
    mixed_precision,
    shard_model,
    world,
)
from raydapt.train.losses import ce_loss, distill_loss, full_kd_loss, topk_kd_loss
from raydapt.train.modes import build_student, is_classification, load_teacher, trainable

FAIL_ENV = "RAYDAPT_FAIL_AT_STEP"  # failure injection for resume tests: raise after this step
HOLD_STEP_ENV = "RAYDAPT_HOLD_AT_STEP"  # fault tests: after this step, wait to be killed ...
HOLD_FILE_ENV = "RAYDAPT_HOLD_FILE"  # ... having written {pid, node} to <this path>.rank<r>


def hold_for_kill(hold: dict | None, step: int, rank: int) -> None:
    """Fault-injection point: park this worker after each of `hold["steps"]` until killed.

    Each rank writes `<file>.s<step>.rank<r>` (pid, node id), then waits, so a test or
    bench/chaos.py can SIGKILL a real worker process (or remove its node) at a known step.
    A rank holds once per file: the restarted worker group, which redoes the steps after
    the last checkpoint, finds its file and runs on.
    """
    if not hold or step not in hold["steps"]:
        return
    path = Path(f"{hold['file']}.s{step}.rank{rank}")
    if not path.exists():
        park_until_killed(path, {"rank": rank, "step": step})


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


def batch_tokens(batch: dict[str, torch.Tensor], clf: bool) -> int:
    """Positions the loss counts: labelled rows (classification) or CE positions."""
    if clf:
        return int((batch["label"] >= 0).sum())
    return int((batch["loss_mask"][:, :-1] > 0).sum())


def micro_loss(
    model: nn.Module, teacher: nn.Module | None, batch: dict[str, torch.Tensor], tc: TrainConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss of one micro-batch and its detached parts."""
    ids, mask = batch["input_ids"], batch["loss_mask"]  # (B, T)
    if is_classification(tc):
        logits = model(input_ids=ids).logits  # (B, C)
        labels = batch["label"]
        n = (labels >= 0).sum().clamp_min(1)
        loss = F.cross_entropy(logits.float(), labels.clamp_min(0), reduction="none")
        loss = torch.where(labels >= 0, loss, 0.0).sum() / n
        return loss, {"ce": loss.detach()}
    logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
    ce = ce_loss(logits, ids, mask)
    if tc.mode != "distill":
        return ce, {"ce": ce.detach()}
    if teacher is not None:
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, use_cache=False).logits  # (B, T, V)
        kd = full_kd_loss(logits, t_logits, mask, tc.kd_loss, tc.kd_temperature, tc.jsd_beta, tc.kd_chunk)
    elif "topk_ids" in batch:
        kd = topk_kd_loss(
            logits, batch["topk_ids"], batch["topk_logprobs"], mask, tc.kd_loss, tc.kd_temperature, tc.jsd_beta, tc.kd_chunk
        )
    else:  # generation targets: sequence-level KD is CE on the teacher's traces
        return ce, {"ce": ce.detach()}
    return distill_loss(kd, ce, tc.kd_alpha)


def train_step(model, teacher, optim, sched, batches, tc, params, device) -> dict[str, float]:
    """One optimizer step over `batches` (this rank's micro-batches)."""
    clf = is_classification(tc)
    _, ws = world()
    counts = [batch_tokens(b, clf) for b in batches]
    n_global = all_reduce_sum(torch.tensor(float(sum(counts)), device=device))
    scale = ws / n_global.clamp_min(1.0)
    sums: dict[str, torch.Tensor] = {}
    for b, n in zip(batches, counts, strict=True):
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        with autocast_for(model, mixed_precision(tc.precision, tc.use_gpu), device):
            loss, parts = micro_loss(model, teacher, b, tc)
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
def evaluate(model, table, tc: TrainConfig, pad_id: int, device) -> dict[str, float]:
    """Held-out loss (CE; classification: CE and accuracy) over the whole validation table."""
    if table is None or table.num_rows == 0:
        return {}
    clf = is_classification(tc)
    rank, ws = world()
    was_training = model.training
    model.eval()
    tot = torch.zeros(3, device=device)  # loss sum, count, correct
    with autocast_for(model, mixed_precision(tc.precision, tc.use_gpu), device):
        for rows, valid in data.val_batches(table.num_rows, tc.batch_size * ws, rank, tc.batch_size):
            b = {k: v.to(device) for k, v in data.collate(table, rows, pad_id, valid).items()}
            tot += _eval_batch(model, b, clf)
    model.train(was_training)
    tot = all_reduce_sum(tot)
    out = {"val_loss": float(tot[0] / tot[1].clamp_min(1))}
    if clf:
        out["val_acc"] = float(tot[2] / tot[1].clamp_min(1))
    return out


def _eval_batch(model, b: dict[str, torch.Tensor], clf: bool) -> torch.Tensor:
    """(loss sum, count, correct) of one validation batch."""
    if clf:
        logits = model(input_ids=b["input_ids"]).logits.float()  # (B, C)
        ok = b["label"] >= 0
        loss = torch.where(ok, F.cross_entropy(logits, b["label"].clamp_min(0), reduction="none"), 0.0).sum()
        return torch.stack([loss, ok.sum().float(), ((logits.argmax(-1) == b["label"]) & ok).sum().float()])
    n = batch_tokens(b, clf)
    logits = model(input_ids=b["input_ids"], use_cache=False).logits  # (B, T, V)
    loss = ce_loss(logits, b["input_ids"], b["loss_mask"]).float() * n
    return torch.stack([loss, torch.tensor(float(n), device=loss.device), torch.zeros((), device=loss.device)])


class MetricsLog:
    """metrics.jsonl (rank 0, append; a resume drops lines past the restored step),
    TensorBoard when importable, and a console progress line with ETA."""

    def __init__(self, train_dir: Path, start_step: int, max_steps: int, log_every: int):
        self.rank, _ = world()
        self.path = train_dir / "metrics.jsonl"
        self.max_steps, self.log_every, self.start_step = max_steps, log_every, start_step
        self.t0 = time.perf_counter()
        self.tb = None
        if self.rank != 0:
            return
        train_dir.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= start_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(train_dir / "tensorboard"))
        except Exception:  # noqa: BLE001 - tensorboard is optional
            self.tb = None

    def write(self, m: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(m) + "\n")
        if self.tb is not None:
            for k, v in m.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, m["step"])
        step = m["step"]
        if step % self.log_every == 0 or step == self.max_steps or "val_loss" in m:
            done = step - self.start_step
            eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.max_steps - step)
            val = f" val_loss {m['val_loss']:.4f}" if "val_loss" in m else ""
            print(
                f"[train] step {step}/{self.max_steps} loss {m['loss']:.4f}{val} lr {m['lr']:.2e} "
                f"gnorm {m['grad_norm']:.3f} {m['tokens_per_s']:.0f} tok/s eta {eta:.0f}s",
                flush=True,
            )

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def setup(plan: dict, tc: TrainConfig, device: torch.device):
    """Student (sharded), teacher (online distill), optimizer and schedule."""
    precision = mixed_precision(tc.precision, tc.use_gpu)
    model = build_student(plan["student_path"], tc, tc.seed).to(device)
    teacher = None
    if tc.mode == "distill" and tc.teacher == "online":
        teacher = load_teacher(plan["teacher_path"], model.config.vocab_size).to(device)
        shard_model(teacher, precision)
    shard_model(model, precision)
    params = trainable(model)
    optim = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: lr_factor(s, tc))
    return model, teacher, optim, sched, params


def load_tables(plan: dict, tc: TrainConfig):
    """Train and validation rows from the Ray Data shards (classification: labelled rows)."""
    import pyarrow.compute as pc

    train = data.load_shard("train", plan["train_columns"])
    val = data.load_shard("validation", plan["val_columns"]) if plan.get("has_validation") else None
    if is_classification(tc):
        train = train.filter(pc.greater_equal(train.column("label"), 0))
        val = val.filter(pc.greater_equal(val.column("label"), 0)) if val is not None else None
        if train.num_rows == 0:
            raise UserError("train.new_head=classification: no prepared train row has a label >= 0")
    if train.num_rows == 0:
        raise UserError("the training split is empty; check `raydapt prepare` output")
    return train, val


def resume_step(plan: dict, model, optim, sched, tc: TrainConfig) -> int:
    """Restore the latest checkpoint; 0 when none.

    Where from: the local-mode folder; else this Train run's own latest checkpoint (a
    worker-group restart); else `plan["resume_from"]`, a checkpoint of another run (a Tune
    PBT exploit or a Tune-restored trial: Train V2 takes it through the loop config).
    """
    import ray.train

    if not plan["resume"]:
        return 0
    if plan["local_mode"]:
        folder = ckpt.latest_local(Path(plan["train_dir"]))
        step = ckpt.restore(folder, model, optim, sched, plan["fingerprint"]) if folder else 0
    elif (checkpoint := ray.train.get_checkpoint()) is not None:
        with checkpoint.as_directory() as d:
            step = ckpt.restore(Path(d), model, optim, sched, plan["fingerprint"])
    elif plan.get("resume_from"):
        step = ckpt.restore(Path(plan["resume_from"]), model, optim, sched, plan["fingerprint"])
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
        g.update(initial_lr=tc.lr, lr=tc.lr * lr_factor(sched.last_epoch, tc), betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    sched._last_lr = [g["lr"] for g in optim.param_groups]


def _threads(tc: TrainConfig) -> int:
    """Ray sets OMP_NUM_THREADS to a worker's CPU reservation, which on an oversubscribed small
    machine (PLATFORM.md) leaves cores idle; share the node's cores among its workers instead."""
    if tc.torch_threads > 0:
        return tc.torch_threads
    try:
        import ray.train

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
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: keep its lines rather than fail the run
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_func(plan: dict) -> dict:
    """Ray Train per-worker entry point. `plan` comes from launch.make_plan."""
    import ray.train

    _quiet_report_lines()
    cfg = job_from_dict(plan["job"])
    tc = cfg.train
    rank, ws = world()
    torch.set_num_threads(_threads(tc))
    device = device_for(tc.use_gpu)
    model, teacher, optim, sched, params = setup(plan, tc, device)
    train_rows, val_rows = load_tables(plan, tc)
    start = resume_step(plan, model, optim, sched, tc)
    train_dir = Path(plan["train_dir"])
    log = MetricsLog(train_dir, start, tc.max_steps, tc.log_every)
    fail_at = int(plan.get("fail_at_step") or 0)
    model.train()
    last: dict[str, Any] = {}
    for step in range(start + 1, tc.max_steps + 1):
        t0 = time.perf_counter()
        g0 = (step - 1) * tc.grad_accum
        batches = [
            data.collate(
                train_rows,
                data.micro_batch_rows(train_rows.num_rows, tc.seed, g, tc.batch_size * ws, rank, tc.batch_size),
                plan["pad_id"],
            )
            for g in range(g0, g0 + tc.grad_accum)
        ]
        m = train_step(model, teacher, optim, sched, batches, tc, params, device)
        dt = time.perf_counter() - t0
        m.update(step=step, step_time_s=dt, tokens_per_s=m["tokens"] / dt, epoch=g0 * tc.batch_size * ws / train_rows.num_rows)
        final = step == tc.max_steps
        if final or (tc.eval_every and step % tc.eval_every == 0):
            m.update(evaluate(model, val_rows, tc, plan["pad_id"], device))
        log.write(m)
        last = m
        if final or (tc.checkpoint_every and step % tc.checkpoint_every == 0):
            ckpt.save(model, optim, sched, step, plan["fingerprint"], m, train_dir, plan["local_mode"])
        elif step % tc.log_every == 0 or "val_loss" in m:
            ray.train.report(m)
        hold_for_kill(plan.get("hold"), step, rank)
        if fail_at and step == fail_at:
            raise RuntimeError(f"{FAIL_ENV}={fail_at}: injected failure after step {step}")
    log.close()
    if plan.get("export", True) and (last or start == tc.max_steps):
        manifest = {**plan["manifest"], "steps": tc.max_steps, "final_metrics": last}
        ckpt.export(model, tc, plan["student_path"], Path(plan["export_dir"]), manifest)
    return {"rank": rank, "world_size": ws, "start_step": start, "last": last}
