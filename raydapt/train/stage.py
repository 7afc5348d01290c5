"""`raydapt train JOB`: check every input in the driver, then run a Ray Train V2 TorchTrainer.

    raydapt train jobs/lora.yaml train.lr=3e-4
    pipeline.run_stage("train", job)           # what the CLI and `raydapt run` call

`plan` checks, before any worker or GPU is reserved and without writing anything: prepared
data and targets exist (naming the stage that makes them), tokenizer and k compatibility of
the targets, seq_len against the student's positions, LoRA targets, the online teacher's
vocabulary, labels for a classification head, and the checkpoint a resume would start from.
A Tune trial plans with its own `train_dir`, `export_dir`, `run_name` and `resume_from`, so
the checks run on the folders the trial really uses.

`run` deletes the checkpoints this run must not resume (train.resume=false, or the prepared
data or teacher targets changed since they were written), trains and exports. The export's
manifest records `fingerprint(plan)`, which `pipeline.run_stage` compares to skip the stage.

`train.num_workers=0` runs the train function in this process (Train local mode): no
sharding, checkpoints in <train_dir>/checkpoints/. RAYDAPT_FAIL_AT_STEP=N makes the workers
raise right after step N (the resume tests use it). RAYDAPT_HOLD_AT_STEP=N[,M...] with
RAYDAPT_HOLD_FILE=PATH makes every worker, once per step, write its pid to
PATH.s<N>.rank<r> after step N and wait to be killed from outside (fault tests, bench/chaos.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from raydapt import layout
from raydapt.config import JobConfig, TrainConfig
from raydapt.errors import UserError
from raydapt.models import engine_dtype, load_tokenizer, tokenizer_hash
from raydapt.onpolicy.source import HOLD_ENGINE_ENV, EngineHold, SourceSpec, start_source
from raydapt.prepare import split_files
from raydapt.sources import model_path
from raydapt.storage import hash_json, read_manifest, require_manifest, write_json_atomic
from raydapt.targets import check_compatible, read_targets
from raydapt.teach.spec import ActorSpec
from raydapt.train import checkpoint as ckpt
from raydapt.train.loop import FAIL_ENV, HOLD_FILE_ENV, HOLD_STEP_ENV
from raydapt.train.modes import check_lora_targets, check_seq_len, is_classification, meta_model
from raydapt.train.spec import Hold, TrainPlan
from raydapt.train.trainer import build_trainer, unwrap_user_error

BASE_COLUMNS = ("id", "input_ids", "loss_mask")
TOPK_COLUMNS = ("topk_ids", "topk_logprobs")
SAMPLE_COLUMNS = ("sample_ids", "sample_counts")
INPUTS_FILE = "inputs.json"  # in the train folder: the data its checkpoints were trained on
# train.* keys that change how a run goes, not the model it exports: not in the fingerprint
RUN_ONLY_KEYS = ("resume", "max_failures", "placement_strategy", "cpus_per_worker", "torch_threads")


def _offline(tc: TrainConfig) -> bool:
    return tc.mode == "distill" and tc.teacher == "offline"


def _online(tc: TrainConfig) -> bool:
    return tc.mode == "distill" and tc.teacher == "online"


def _on_policy(job: JobConfig, student: str, tok_hash: str, seq_len: int) -> SourceSpec:
    """The rollout source of train.teacher=on_policy: prompts, the two engines, rows per step.
    Checks the prompts exist and the teacher shares the student's tokenizer (the teacher
    scores the student's token ids as they are)."""
    tc, t = job.train, job.teach
    prompts = layout.prepared_dir(job) / "prompts" / "part-00000.parquet"
    lens = []
    if prompts.is_file():
        table = pq.read_table(prompts, columns=["prompt_ids", "split"])
        lens = [
            len(p)
            for p, s in zip(
                table.column("prompt_ids").to_pylist(), table.column("split").to_pylist()
            )
            if s == "train"
        ]
    if not lens:
        raise UserError(
            f"train.teacher=on_policy: the prepared data at {layout.prepared_dir(job)} has no "
            "prompts of split train; give the corpus prompt/response or prompt-only rows "
            "(e.g. corpus.source: world) and rerun `raydapt prepare JOB`"
        )
    teacher = str(model_path(job, "teacher"))
    if tokenizer_hash(load_tokenizer(teacher)) != tok_hash:
        raise UserError(
            f"train.teacher=on_policy: teacher {teacher} has another tokenizer than the student "
            f"{student}; the teacher scores the student's own token ids, so both need one "
            "tokenizer (teacher.path / student.path)"
        )
    r = job.rollout
    need = max(lens) + r.max_tokens + 1  # + 1: the teacher scores the whole row as a prompt
    if need > seq_len:
        raise UserError(
            f"rollout.max_tokens={r.max_tokens}: the longest prompt ({max(lens)} tokens) plus "
            f"the completion needs {need} positions, more than the student's {seq_len}; "
            "lower rollout.max_tokens"
        )
    gpu = tc.use_gpu
    return SourceSpec(
        prompts_file=str(prompts),
        rollout=ActorSpec(
            model=student,
            k=1,
            dtype=engine_dtype(job.student.dtype, student, gpu),
            max_model_len=need,
            num_gpus=r.gpus_per_actor,
            seed=r.seed,
        ),
        teacher=ActorSpec(
            model=teacher,
            k=t.k,
            dtype=engine_dtype(job.teacher.dtype, teacher, gpu),
            max_model_len=need,
            num_gpus=t.gpus_per_actor,
            seed=t.seed,
        ),
        cfg=r,
        teacher_actors=t.min_actors,
        teacher_cpus=t.cpus_per_actor,
        teacher_gpus=t.gpus_per_actor,
        teacher_kv_gib=t.kv_cache_gib,
        rows_per_step=tc.batch_size * max(1, tc.num_workers) * tc.grad_accum,
        last_step=tc.max_steps,
        reference_files=_references(job) if r.on_policy_fraction < 1 else (),
        hold=engine_hold_from_env(),
    )


def _references(job: JobConfig) -> tuple[str, ...]:
    """GKD's offline share: the prepared train rows, one document each."""
    prepared = layout.prepared_dir(job)
    if (read_manifest(prepared) or {}).get("pack", True):
        raise UserError(
            f"rollout.on_policy_fraction={job.rollout.on_policy_fraction}: the prepared rows at "
            f"{prepared} are packed (several documents per row); rerun `raydapt prepare JOB` "
            "with prepare.pack: false"
        )
    return tuple(split_files(prepared, "train"))


def engine_hold_from_env() -> EngineHold | None:
    """Fault-injection point of the on-policy engines (see onpolicy.source.EngineHold)."""
    raw = os.environ.get(HOLD_ENGINE_ENV, "")
    if not raw:
        return None
    points = [p.partition(":") for p in raw.split(",")]
    path = os.environ.get(HOLD_FILE_ENV, "")
    if not path or any(r not in ("rollout", "teacher") or not c.isdigit() for r, _, c in points):
        raise UserError(
            f"{HOLD_ENGINE_ENV}={raw!r}: give role:call pairs separated by commas (role rollout "
            f"or teacher, e.g. rollout:2,teacher:5), with {HOLD_FILE_ENV}=<path>"
        )
    return EngineHold(tuple((r, int(c)) for r, _, c in points), str(Path(path).resolve()))


def checkpoint_key(job: JobConfig, student_path: str) -> str:
    """What a checkpoint must share with the run that resumes it: the model and the mode with
    its shape options (not lr, steps or data, which a resume may change)."""
    tc = job.train
    config = Path(student_path, "config.json")
    keys = {
        "student": str(Path(student_path).resolve()),
        "config": config.read_text() if config.is_file() else "",
        "mode": tc.mode,
    }
    if tc.mode == "lora":
        keys["lora"] = [tc.lora_r, tc.lora_alpha, sorted(tc.lora_targets)]
    if tc.mode == "transfer":
        keys["head"] = [tc.new_head, tc.num_labels]
    return hash_json(keys)


def _check_tokenizer(job: JobConfig, prepared: dict, student: str) -> tuple[str, int]:
    """The prepared rows were tokenized with the student's tokenizer. Returns (hash, pad id)."""
    tok = load_tokenizer(student)
    tok_hash = tokenizer_hash(tok)
    if prepared.get("tokenizer_hash") not in (None, tok_hash):
        raise UserError(
            f"prepared data at {layout.prepared_dir(job)} was tokenized with tokenizer "
            f"{prepared.get('tokenizer_hash')} ({prepared.get('tokenizer_path')}) "
            "but the student's is "
            f"{tok_hash}; rerun `raydapt prepare JOB` with the student's tokenizer"
        )
    return tok_hash, int(prepared.get("pad_id", tok.pad_token_id or 0))


def _train_source(job: JobConfig, tok_hash: str) -> tuple[list[str], dict | None]:
    """Files of the training rows: the prepared train split, or the teacher targets (offline
    distill) with their manifest."""
    if job.train.mode == "distill" and job.train.teacher == "on_policy":
        # the rows come from the rollout source; prepared train rows are optional (a corpus
        # of open instructions has none) and only GKD's reference share reads them
        return split_files(layout.prepared_dir(job), "train", required=False), None
    if not _offline(job.train):
        return split_files(layout.prepared_dir(job), "train"), None
    folder = layout.targets_dir(job)
    manifest, files = read_targets(folder)
    if not files:
        raise UserError(f"targets at {folder} hold no parquet files; rerun `raydapt teach JOB`")
    t = job.teach
    check_compatible(manifest, tok_hash, t.k, str(folder), t.signal, t.samples)
    return [str(f) for f in files], manifest


def _val_files(job: JobConfig) -> list[str]:
    try:
        return split_files(layout.prepared_dir(job), "validation")
    except UserError:
        return []


def _check_labels(files: list[str], num_labels: int) -> None:
    """Classification needs labelled rows, each label < num_labels (reads one column)."""
    labels = pq.ParquetDataset(files).read(columns=["label"]).column("label")
    labelled = pc.filter(labels, pc.greater_equal(labels, 0))
    if len(labelled) == 0:
        raise UserError(
            f"train.new_head=classification: no row of {files[0]} ... has a label >= 0; "
            "give the corpus rows a `label` and rerun `raydapt prepare JOB`"
        )
    top = pc.max(labelled).as_py()
    if top >= num_labels:
        raise UserError(
            f"train.num_labels={num_labels} but the prepared rows hold label {top}; "
            f"set train.num_labels>={top + 1}"
        )


def _check_teacher(job: JobConfig, student_vocab: int) -> str:
    from transformers import AutoConfig  # slow to import (seconds)

    teacher = str(model_path(job, "teacher"))
    vocab = AutoConfig.from_pretrained(teacher).vocab_size
    if vocab != student_vocab:
        raise UserError(
            f"train.teacher=online: teacher {teacher} has vocab_size={vocab} but the student has "
            f"vocab_size={student_vocab}; logit distillation needs one vocabulary "
            "(teacher.path / student.path)"
        )
    return teacher


def _data_inputs(prepared: dict, targets: dict | None) -> dict:
    """Hashes of the manifests of the data a run trains on (prepared rows; offline targets)."""
    out = {"prepared": hash_json(prepared)}
    if targets is not None:
        out["targets"] = hash_json(targets)
    return out


def _data_changed(train_dir: Path, now: dict) -> bool:
    """The checkpoints in `train_dir` were trained on other data (inputs.json differs).

    The checkpoint key covers the model and mode only, since a resume may change lr or
    max_steps; without this a train stage rerun because `raydapt teach` rewrote the targets
    restored the old run's last step and exported the old model unchanged.
    """
    record = train_dir / INPUTS_FILE
    try:
        return json.loads(record.read_text()) != now
    except (OSError, ValueError):
        return False


def _check_resume(tc: TrainConfig, folder: Path | None, key: str) -> None:
    """The checkpoint a resume would load fits this run (model, mode, not past max_steps)."""
    if folder is None:
        return
    meta = ckpt.check_folder(folder, key)
    if int(meta.get("step", 0)) > tc.max_steps:
        raise UserError(
            f"checkpoint {folder} is at step {meta['step']}, past train.max_steps={tc.max_steps}; "
            "raise train.max_steps, or set train.resume=false to start over"
        )


def hold_from_env() -> Hold | None:
    """Fault-injection point for the fault tests and bench/chaos.py (see loop.hold_for_kill)."""
    raw = os.environ.get(HOLD_STEP_ENV, "")
    path = os.environ.get(HOLD_FILE_ENV, "")
    if not raw:
        return None
    try:
        steps = tuple(int(s) for s in raw.split(","))
    except ValueError:
        raise UserError(
            f"{HOLD_STEP_ENV}={raw!r}: give step numbers separated by commas, e.g. 4,9"
        ) from None
    if not path:
        raise UserError(
            f"{HOLD_STEP_ENV}={raw} needs {HOLD_FILE_ENV}=<path> "
            "(where the held workers write their pids)"
        )
    return Hold(steps, str(Path(path).resolve()))


def _columns(tc: TrainConfig, train_files: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train columns, validation columns): labels for classification, top-k for distill."""
    extra = ("label",) if is_classification(tc) else ()
    names = pq.read_schema(train_files[0]).names if train_files else []
    distill = tc.mode == "distill"
    topk = TOPK_COLUMNS if distill and "topk_ids" in names else ()
    draws = SAMPLE_COLUMNS if distill and "sample_ids" in names else ()
    return BASE_COLUMNS + extra + topk + draws, BASE_COLUMNS + extra


def plan(
    job: JobConfig,
    *,
    train_dir: str | Path | None = None,
    export_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    run_name: str | None = None,
    fail_at_step: int | None = None,
) -> TrainPlan:
    """Every driver-side check on the final folders; reads only. The keywords are for Tune
    trials (their own folders and start checkpoint) and fault tests (`fail_at_step`; default
    RAYDAPT_FAIL_AT_STEP)."""
    tc = job.train
    prepared = require_manifest(layout.prepared_dir(job), "prepared data", "prepare JOB")
    student = str(model_path(job, "student"))
    tok_hash, pad_id = _check_tokenizer(job, prepared, student)
    meta = meta_model(student, tc)
    check_seq_len(
        meta.config, int(prepared.get("seq_len", 0)), f"{layout.prepared_dir(job)}/manifest.json"
    )
    if tc.mode == "lora":
        check_lora_targets(meta, list(tc.lora_targets))
    train_files, targets = _train_source(job, tok_hash)
    if targets and targets.get("seq_len"):
        check_seq_len(
            meta.config, int(targets["seq_len"]), f"{layout.targets_dir(job)}/manifest.json"
        )
    teacher = _check_teacher(job, meta.config.vocab_size) if _online(tc) else None
    on_policy = None
    if tc.mode == "distill" and tc.teacher == "on_policy":
        positions = int(getattr(meta.config, "max_position_embeddings", 0) or 1 << 30)
        on_policy = _on_policy(job, student, tok_hash, positions)
    if is_classification(tc):
        _check_labels(train_files, tc.num_labels)
    tdir = Path(train_dir or layout.train_dir(job)).resolve()
    name, key, local = run_name or job.name, checkpoint_key(job, student), tc.num_workers == 0
    inputs = _data_inputs(prepared, targets)
    resume = tc.resume and not _data_changed(tdir, inputs)
    start_from = Path(resume_from).resolve() if resume_from else None
    if resume:
        own = ckpt.latest_local(tdir) if local else ckpt.latest_ray(tdir / name)
        _check_resume(tc, own or start_from, key)
    train_cols, val_cols = _columns(tc, train_files)
    return TrainPlan(
        job=job,
        output=Path(export_dir or layout.export_dir(job)).resolve(),
        train_dir=tdir,
        run_name=name,
        student_path=student,
        teacher_path=teacher,
        pad_id=pad_id,
        ckpt_key=key,
        local_mode=local,
        resume=resume,
        resume_from=start_from,
        fail_at_step=int(os.environ.get(FAIL_ENV, "0") or 0)
        if fail_at_step is None
        else fail_at_step,
        hold=hold_from_env(),
        train_files=tuple(train_files),
        val_files=tuple(_val_files(job)),
        train_columns=train_cols,
        val_columns=val_cols,
        prepared=prepared,
        targets=targets,
        data_inputs=inputs,
        lineage=_lineage(
            job,
            student,
            teacher or (on_policy and on_policy.teacher.model),
            tok_hash,
            prepared,
            targets,
        ),
        on_policy=on_policy,
    )


def _identity(manifest: dict) -> str:
    """A data manifest's fingerprint (or, for one written without it, its hash)."""
    return manifest.get("fingerprint") or hash_json(manifest)


def _lineage(
    job: JobConfig,
    student: str,
    teacher: str | None,
    tok_hash: str,
    prepared: dict,
    targets: dict | None,
) -> dict[str, Any]:
    """What the export manifest says the model was made from."""
    t = targets or {}
    return {
        "mode": job.train.mode,
        "student": student,
        "teacher": teacher,
        "tokenizer_hash": tok_hash,
        "prepared_fingerprint": _identity(prepared),
        "targets": {
            "fingerprint": _identity(t),
            "kind": t.get("kind"),
            "k": t.get("k"),
            "teacher": t.get("teacher"),
        }
        if targets is not None
        else None,
        "train": dataclasses.asdict(job.train),
    }


def fingerprint(p: TrainPlan) -> str:
    """What decides the export: the train section (less RUN_ONLY_KEYS), the student (path and
    config.json), the prepared data, and the teacher targets (offline) or teacher path (online)."""
    train = {k: v for k, v in dataclasses.asdict(p.job.train).items() if k not in RUN_ONLY_KEYS}
    config = Path(p.student_path, "config.json")
    keys: dict[str, Any] = {
        "train": train,
        "student": p.student_path,
        "student_config": config.read_text() if config.is_file() else "",
        "prepared": _identity(p.prepared),
        "v": 1,
    }
    if p.targets is not None:
        keys["targets"] = _identity(p.targets)
    if p.teacher_path is not None:
        keys["teacher"] = p.teacher_path
    if p.on_policy is not None:
        keys["on_policy"] = [p.on_policy.teacher.model, dataclasses.asdict(p.job.rollout)]
    return hash_json(keys)


def prepare_train_dir(p: TrainPlan) -> None:
    """Delete the checkpoints this run must not resume, and record the data it trains on."""
    stale = [d for d in p.checkpoint_dirs if d.exists()] if not p.resume else []
    if stale and p.job.train.resume:
        print(
            "train: the prepared data or teacher targets changed since the checkpoints in "
            f"{p.train_dir} "
            "were written; starting over",
            flush=True,
        )
    for d in stale:
        shutil.rmtree(d)
    p.train_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(p.train_dir / INPUTS_FILE, p.data_inputs)


def run(p: TrainPlan) -> dict[str, Any]:
    """Train and export. Returns the export manifest plus the final metrics, the folders, the
    last checkpoint and the step this run started from."""
    import ray.train  # slow to import (about 1 s)

    p = dataclasses.replace(p, lineage={**p.lineage, "fingerprint": fingerprint(p)})
    prepare_train_dir(p)
    source = start_source(p.on_policy) if p.on_policy is not None else None
    try:
        result = build_trainer(p, source=source).fit()
    except ray.train.TrainingFailedError as e:
        unwrap_user_error(e)
        raise
    finally:
        if source is not None:
            ray.get(source.shutdown.remote())
            ray.kill(source)
    manifest = read_manifest(p.output)
    if manifest is None:
        raise RuntimeError(f"internal: training finished but wrote no export at {p.output}")
    metrics, rv = dict(result.metrics or {}), result.return_value or {}
    tc = p.job.train
    val = f", val_loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
    print(
        f"[train] {tc.mode} {metrics.get('step', '?')}/{tc.max_steps} steps, loss "
        f"{metrics.get('loss', float('nan')):.4f}{val}; export -> {p.output}",
        flush=True,
    )
    if rv.get("start_step") == tc.max_steps:  # resumed at the end: a changed lr trained nothing
        print(
            f"[train] resumed from a checkpoint at step {tc.max_steps} = train.max_steps, so "
            "nothing was trained and the export is that checkpoint's model; set "
            "train.resume=false to train again from scratch, or raise train.max_steps",
            flush=True,
        )
    return {
        **manifest,
        "metrics": metrics,
        "export_dir": str(p.output),
        "train_dir": str(p.train_dir),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "start_step": rv.get("start_step"),
        "world_size": rv.get("world_size"),
    }
