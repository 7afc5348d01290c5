"""`raydapt train JOB`: validate inputs in the driver, then run a Ray Train V2 TorchTrainer.

    from raydapt.cluster import connect
    from raydapt.train.launch import run
    connect(cfg.cluster); summary = run(cfg)

Everything that can be checked without a worker is checked here, before any worker or GPU
is reserved: prepared data and targets exist (naming the stage that makes them), tokenizer
and k compatibility of targets, seq_len against the student's positions, LoRA targets,
the online teacher's vocabulary, and the latest checkpoint's compatibility. The driver
builds the Ray datasets; workers only read their shards (see data.py for why unsplit).

`train.num_workers=0` runs the train function in this process (Train local mode): no
sharding, checkpoints in <train_dir>/checkpoints/. Set RAYDAPT_FAIL_AT_STEP=N to make the
workers raise right after step N (the resume tests use it). RAYDAPT_HOLD_AT_STEP=N[,M...]
with RAYDAPT_HOLD_FILE=PATH makes every worker, once per step, write its pid to
PATH.s<N>.rank<r> after step N and wait to be killed from outside (tests/test_faults.py,
bench/chaos.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from raydapt import layout
from raydapt.config import JobConfig
from raydapt.errors import UserError
from raydapt.storage import hash_json, read_manifest, require_manifest, write_json_atomic
from raydapt.train import checkpoint as ckpt
from raydapt.train.loop import FAIL_ENV, HOLD_FILE_ENV, HOLD_STEP_ENV, train_func
from raydapt.train.modes import check_lora_targets, check_seq_len, is_classification, meta_model

BASE_COLUMNS = ["id", "input_ids", "loss_mask"]


def _split_files(prepared: Path, split: str) -> list[str]:
    from raydapt.prepare.stage import split_files

    return split_files(prepared, split)


def fingerprint(cfg: JobConfig, student_path: str) -> str:
    """What a checkpoint must share with the run that resumes it (not lr, steps or data)."""
    tc = cfg.train
    cfg_json = (Path(student_path) / "config.json").read_text() if Path(student_path, "config.json").is_file() else ""
    keys = {"student": str(Path(student_path).resolve()), "config": cfg_json, "mode": tc.mode}
    if tc.mode == "lora":
        keys["lora"] = [tc.lora_r, tc.lora_alpha, sorted(tc.lora_targets)]
    if tc.mode == "transfer":
        keys["head"] = [tc.new_head, tc.num_labels]
    return hash_json(keys)


def _train_source(cfg: JobConfig, tok_hash: str) -> tuple[list[str], dict]:
    """Files of the training rows: prepared train split, or teacher targets (offline distill)."""
    tc = cfg.train
    if tc.mode == "distill" and tc.teacher == "offline":
        from raydapt.targets import check_compatible, read_targets

        m, files = read_targets(layout.targets_dir(cfg))
        if not files:
            raise UserError(f"targets at {layout.targets_dir(cfg)} hold no parquet files; rerun `raydapt teach JOB`")
        check_compatible(m, tok_hash, tc.kd_k, str(layout.targets_dir(cfg)))
        return [str(f) for f in files], m
    return _split_files(layout.prepared_dir(cfg), "train"), {}


def _checkpoint_dirs(cfg: JobConfig) -> tuple[Path, Path]:
    """Where a run's checkpoints live: Ray Train's run folder, and local mode's folder."""
    tdir = layout.train_dir(cfg).resolve()
    return tdir / cfg.name, tdir / "checkpoints"


def _check_checkpoints(cfg: JobConfig, fp: str, local_mode: bool) -> None:
    """Start over (resume=false) or make sure the latest checkpoint fits this run."""
    tdir = layout.train_dir(cfg).resolve()
    run_dir, local_dir = _checkpoint_dirs(cfg)
    if not cfg.train.resume:
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(local_dir, ignore_errors=True)
        return
    folder = ckpt.latest_local(tdir) if local_mode else ckpt.latest_ray(run_dir)
    if folder is not None:
        ckpt.check_folder(folder, fp)


def make_plan(cfg: JobConfig) -> tuple[dict, dict[str, list[str]]]:
    """Validate everything a worker will need; return the worker plan and dataset files."""
    from raydapt.models import load_tokenizer, resolve_model, tokenizer_hash

    tc = cfg.train
    prepared = require_manifest(layout.prepared_dir(cfg), "prepared data", "prepare JOB")
    student = str(resolve_model(cfg, "student"))
    tok = load_tokenizer(student)
    tok_hash = tokenizer_hash(tok)
    if prepared.get("tokenizer_hash") not in (None, tok_hash):
        raise UserError(
            f"prepared data at {layout.prepared_dir(cfg)} was tokenized with tokenizer "
            f"{prepared.get('tokenizer_hash')} ({prepared.get('tokenizer_path')}) but the student's is "
            f"{tok_hash}; rerun `raydapt prepare JOB` with the student's tokenizer"
        )
    meta = meta_model(student, tc)
    check_seq_len(meta.config, int(prepared.get("seq_len", 0)), f"{layout.prepared_dir(cfg)}/manifest.json")
    if tc.mode == "lora":
        check_lora_targets(meta, list(tc.lora_targets))
    train_files, targets_manifest = _train_source(cfg, tok_hash)
    if targets_manifest.get("seq_len"):
        check_seq_len(meta.config, int(targets_manifest["seq_len"]), f"{layout.targets_dir(cfg)}/manifest.json")
    teacher = _check_teacher(cfg, meta.config.vocab_size) if tc.mode == "distill" and tc.teacher == "online" else ""
    try:
        val_files = _split_files(layout.prepared_dir(cfg), "validation")
    except UserError:
        val_files = []
    fp = fingerprint(cfg, student)
    local_mode = tc.num_workers == 0
    _check_checkpoints(cfg, fp, local_mode)
    extra = ["label"] if is_classification(tc) else []
    if extra:
        _check_labels(train_files, tc.num_labels)
    topk = ["topk_ids", "topk_logprobs"] if "topk_ids" in pq.read_schema(train_files[0]).names else []
    tdir = layout.train_dir(cfg).resolve()
    plan = {
        "job": cfg.to_dict(),
        "student_path": student,
        "teacher_path": teacher,
        "pad_id": int(prepared.get("pad_id", tok.pad_token_id or 0)),
        "train_dir": str(tdir),
        "export_dir": str(layout.export_dir(cfg).resolve()),
        "fingerprint": fp,
        "local_mode": local_mode,
        "resume": tc.resume,
        "fail_at_step": int(os.environ.get(FAIL_ENV, "0") or 0),
        "hold": hold_spec(),
        "train_columns": BASE_COLUMNS + extra + (topk if tc.mode == "distill" else []),
        "val_columns": BASE_COLUMNS + extra,
        "has_validation": bool(val_files),
        "manifest": {
            "mode": tc.mode,
            "student": student,
            "teacher": teacher,
            "tokenizer_hash": tok_hash,
            "prepared_fingerprint": prepared.get("fingerprint"),
            "targets_lineage": {k: targets_manifest.get(k) for k in ("teacher_path", "weights_hash", "k", "kind")},
            "train": dict(cfg.to_dict()["train"]),
        },
    }
    return plan, {"train": train_files, "validation": val_files}


def hold_spec() -> dict | None:
    """Fault-injection point for the fault tests and bench/chaos.py (see loop.hold_for_kill)."""
    raw = os.environ.get(HOLD_STEP_ENV, "")
    path = os.environ.get(HOLD_FILE_ENV, "")
    if not raw:
        return None
    try:
        steps = [int(s) for s in raw.split(",")]
    except ValueError:
        raise UserError(f"{HOLD_STEP_ENV}={raw!r}: give step numbers separated by commas, e.g. 4,9") from None
    if not path:
        raise UserError(f"{HOLD_STEP_ENV}={raw} needs {HOLD_FILE_ENV}=<path> (where the held workers write their pids)")
    return {"steps": steps, "file": str(Path(path).resolve())}


def _check_labels(files: list[str], num_labels: int) -> None:
    """Classification needs labelled rows, each label < num_labels (reads one column)."""
    import pyarrow.compute as pc

    labels = pq.ParquetDataset(files).read(columns=["label"]).column("label")
    labelled = pc.filter(labels, pc.greater_equal(labels, 0))
    if len(labelled) == 0:
        raise UserError(f"train.new_head=classification: no row of {files[0]} ... has a label >= 0; "
                        "give the corpus rows a `label` and rerun `raydapt prepare JOB`")
    top = pc.max(labelled).as_py()
    if top >= num_labels:
        raise UserError(f"train.num_labels={num_labels} but the prepared rows hold label {top}; "
                        f"set train.num_labels>={top + 1}")


def _check_teacher(cfg: JobConfig, student_vocab: int) -> str:
    from transformers import AutoConfig

    from raydapt.models import resolve_model

    teacher = str(resolve_model(cfg, "teacher"))
    vocab = AutoConfig.from_pretrained(teacher).vocab_size
    if vocab != student_vocab:
        raise UserError(
            f"train.teacher=online: teacher {teacher} has vocab_size={vocab} but the student has "
            f"vocab_size={student_vocab}; logit distillation needs one vocabulary (teacher.path / student.path)"
        )
    return teacher


def _dataset(files: list[str], columns: list[str]):
    """A materialized Ray dataset of `files`: workers then stream blocks from the object store
    and run no read tasks of their own (seen on 2 busy cores: 30-70 s per worker and dataset).

    Small inputs (under RAYDAPT_INLINE_DATA_MB, 64 by default) are read here with pyarrow and
    put in the object store whole (`from_arrow`), which skips Ray Data's task start-up;
    larger ones go through the distributed `read_parquet`.
    """
    import ray.data

    limit = float(os.environ.get("RAYDAPT_INLINE_DATA_MB", "64")) * 2**20
    if sum(os.path.getsize(f) for f in files) <= limit:
        ds = ray.data.from_arrow([pq.read_table(f, columns=columns) for f in files])
    else:
        ds = ray.data.read_parquet(files, columns=columns).materialize()
    # each worker reads its shard once; a bar per worker would only repaint over the
    # trainer's own progress lines
    ds.context.enable_progress_bars = False
    return ds


def build_trainer(cfg: JobConfig, plan: dict, files: dict[str, list[str]], run_config_kw: dict | None = None):
    """The TorchTrainer (Train V2) for a validated plan."""
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchConfig, TorchTrainer

    tc = cfg.train
    datasets = {"train": _dataset(files["train"], plan["train_columns"])}
    if files["validation"]:
        datasets["validation"] = _dataset(files["validation"], plan["val_columns"])
    resources = {"CPU": tc.cpus_per_worker} | ({"GPU": 1} if tc.use_gpu else {})
    scaling = ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources,
                            placement_strategy=tc.placement_strategy)
    kw = {
        "name": cfg.name,
        "storage_path": plan["train_dir"],
        # a dead worker or node restarts the whole worker group, which resumes from the
        # latest registered checkpoint (loop.resume_step); the data position is the step
        "failure_config": FailureConfig(max_failures=tc.max_failures),
        "checkpoint_config": CheckpointConfig(num_to_keep=2),
        # Train's INFO lines (one per report) would bury the trainer's own progress line
        "logging_config": LoggingConfig(log_level="WARNING"),
        **(run_config_kw or {}),
    }
    return TorchTrainer(
        train_func,
        train_loop_config=plan,
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=RunConfig(**kw),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),
    )


def _unwrap_user_error(err: BaseException) -> None:
    """Re-raise a worker's UserError as-is, so the CLI exits with code 2."""
    failures = getattr(err, "worker_failures", None) or {}
    for e in list(failures.values()) + [getattr(err, "controller_failure", None), err.__cause__]:
        seen = e
        while seen is not None:
            if isinstance(seen, UserError):
                raise UserError(str(seen)) from None
            cause = getattr(seen, "cause", None)
            seen = cause if isinstance(cause, BaseException) and cause is not seen else seen.__cause__


INPUTS_FILE = "inputs.json"  # in the train folder: the data its checkpoints were trained on


def _data_inputs(cfg: JobConfig) -> dict:
    """Hashes of the manifests of the data a run trains on (prepared rows; offline targets)."""
    out = {"prepared": hash_json(read_manifest(layout.prepared_dir(cfg)) or {})}
    if cfg.train.mode == "distill" and cfg.train.teacher == "offline":
        out["targets"] = hash_json(read_manifest(layout.targets_dir(cfg)) or {})
    return out


def start_over_on_new_data(cfg: JobConfig) -> None:
    """Checkpoints of a run on other data are not resumed.

    The checkpoint fingerprint covers the model and mode only, since a resume may change lr or
    max_steps. Without this check a train stage rerun because `raydapt teach` rewrote the
    targets restored the old run's last step and exported the old model unchanged.
    """
    if read_manifest(layout.prepared_dir(cfg)) is None:
        return  # make_plan then names what is missing
    tdir = layout.train_dir(cfg).resolve()
    record, now = tdir / INPUTS_FILE, _data_inputs(cfg)
    if cfg.train.resume and record.is_file() and json.loads(record.read_text()) != now:
        stale = [p for p in _checkpoint_dirs(cfg) if p.exists()]
        if stale:
            print(f"train: the prepared data or teacher targets changed since the checkpoints in {tdir} "
                  "were written; starting over", flush=True)
            for p in stale:
                shutil.rmtree(p)
    tdir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, now)


def run(cfg: JobConfig, run_config_kw: dict | None = None) -> dict[str, Any]:
    """Train and export; returns a summary (final metrics, export folder, steps)."""
    import ray.train

    start_over_on_new_data(cfg)
    plan, files = make_plan(cfg)
    trainer = build_trainer(cfg, plan, files, run_config_kw)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        _unwrap_user_error(e)
        raise
    except UserError:
        raise
    metrics = dict(result.metrics or {})
    export = Path(plan["export_dir"])
    val = f", val_loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
    print(f"train: {cfg.train.mode} {metrics.get('step', '?')}/{cfg.train.max_steps} steps, loss "
          f"{metrics.get('loss', float('nan')):.4f}{val}; export -> {export}", flush=True)
    return {
        "metrics": metrics,
        "export_dir": str(export),
        "export_manifest": read_manifest(export),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "train_dir": plan["train_dir"],
        "return_value": result.return_value,
    }
