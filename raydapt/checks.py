"""Cross-field checks of a job: choices, ranges, combinations and Tune search spaces.

Pure functions over a built job (a raydapt.config.JobConfig), returning every problem found
so that `config.job_from_dict` reports them all at once. This module imports nothing from
config.py (it reads field names off the objects it is given), so the two stay acyclic.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from raydapt.stage import NAMES as STAGES
from raydapt.world import TASKS

_CHOICES: dict[str, tuple[str, ...]] = {
    "corpus.source": ("world", "files"),
    "corpus.format": ("auto", "jsonl", "parquet", "txt"),
    "prepare.chat_template": ("auto", "always", "never"),
    "teach.kind": ("score", "generate", "generate+score"),
    "teach.backend": ("vllm", "hf"),
    "teach.split": ("train", "validation", "all"),
    "train.mode": ("full", "lora", "transfer", "distill"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.schedule": ("cosine", "linear", "constant"),
    "train.teacher": ("offline", "online", "on_policy"),
    "rollout.eos_guard": ("stop", "mask", "off"),
    "teach.signal": ("topk", "sampled", "topk+sampled"),
    "train.kd_loss": ("forward_kl", "reverse_kl", "jsd", "reverse_kl_sampled"),
    "train.new_head": ("", "classification"),
    "train.placement_strategy": ("PACK", "SPREAD"),
    "serve.proxy_location": ("EveryNode", "HeadOnly"),
    "tune.search": ("random", "grid", "optuna"),
    "tune.scheduler": ("fifo", "asha", "pbt"),
    "tune.mode": ("min", "max"),
    "teacher.dtype": ("auto", "float32", "bfloat16", "float16"),
    "student.dtype": ("auto", "float32", "bfloat16", "float16"),
}

_POSITIVE = (
    "prepare.seq_len",
    "prepare.rows_per_shard",
    "teach.k",
    "teach.batch_size",
    "teach.n",
    "teach.max_tokens",
    "teach.min_actors",
    "teach.tensor_parallel_size",
    "train.batch_size",
    "train.grad_accum",
    "train.max_steps",
    "train.lora_r",
    "train.kd_chunk",
    "tune.num_samples",
    "tune.max_concurrent_trials",
    "eval.batch_size",
    "rollout.num_actors",
    "rollout.max_tokens",
    "rollout.sync_every",
    "rollout.temperature",
    "eval.max_new_tokens",
    "serve.min_replicas",
    "serve.max_ongoing_requests",
    "serve.max_n",
    "cluster.num_cpus",
)


def closest(key: str, known: dict) -> str:
    match = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean `{match[0]}`?)" if match else f" (known: {', '.join(known)})"


def validate(cfg: Any) -> list[str]:
    """Cross-field checks. Returns problems instead of raising so callers collect them all."""
    p: list[str] = []
    for dotted, choices in _CHOICES.items():
        v = get_dotted(cfg, dotted)
        if v not in choices:
            p.append(f"{dotted}: {v!r} is not one of {', '.join(map(repr, choices))}")
    for dotted in _POSITIVE:
        v = get_dotted(cfg, dotted)
        if not (isinstance(v, (int, float)) and v > 0):
            p.append(f"{dotted}: must be > 0, got {v!r}")
    for s in cfg.stages:
        if s not in STAGES:
            p.append(f"stages: {s!r} is not a stage; choose from {', '.join(STAGES)}")
    if not 0.0 <= cfg.prepare.val_fraction < 1.0:
        p.append(f"prepare.val_fraction: must be in [0, 1), got {cfg.prepare.val_fraction}")
    if cfg.corpus.source == "files" and not cfg.corpus.paths:
        p.append("corpus.paths: corpus.source is `files` but no paths are given")
    unknown_tasks = set(cfg.corpus.world_tasks) - set(TASKS)
    if cfg.corpus.source == "world" and unknown_tasks:
        p.append(f"corpus.world_tasks: unknown {sorted(unknown_tasks)}; known {list(TASKS)}")
    p += _model_inits(cfg)
    if cfg.teach.max_actors < cfg.teach.min_actors:
        p.append("teach.max_actors: must be >= teach.min_actors")
    if cfg.serve.max_replicas < cfg.serve.min_replicas:
        p.append("serve.max_replicas: must be >= serve.min_replicas")
    if not 0.0 <= cfg.train.kd_alpha <= 1.0:
        p.append(f"train.kd_alpha: must be in [0, 1], got {cfg.train.kd_alpha}")
    if not 0.0 <= cfg.train.jsd_beta <= 1.0:  # the losses' range: 0 is forward KL, 1 reverse KL
        p.append(f"train.jsd_beta: must be in [0, 1], got {cfg.train.jsd_beta}")
    if cfg.train.kd_temperature <= 0:
        p.append(f"train.kd_temperature: must be > 0, got {cfg.train.kd_temperature}")
    if cfg.train.lr <= 0:
        p.append(f"train.lr: must be > 0, got {cfg.train.lr}")
    if cfg.train.num_workers < 0:
        p.append(f"train.num_workers: must be >= 0, got {cfg.train.num_workers}")
    if cfg.train.keep_checkpoints < 0:
        p.append(
            f"train.keep_checkpoints: must be >= 0 (0 keeps all), got {cfg.train.keep_checkpoints}"
        )
    if cfg.train.mode == "lora" and not cfg.train.lora_targets:
        p.append("train.lora_targets: lora mode needs at least one target module")
    if cfg.train.mode == "transfer" and cfg.train.freeze_layers < 0:
        p.append("train.freeze_layers: must be >= 0")
    p += _on_policy(cfg)
    p += _signal(cfg)
    for key, spec in cfg.tune.space.items():
        p += _validate_space_entry(key, spec, cfg.train)
    return p


def _signal(cfg: Any) -> list[str]:
    """Sampled teacher signals: drawn from the whole distribution, read by forward KL."""
    t, tc = cfg.teach, cfg.train
    if t.signal == "topk":
        return []
    p = []
    if t.backend != "hf":
        p.append(
            f"teach.signal: {t.signal} draws from the teacher's whole distribution, which "
            "vLLM's prompt log-probs do not return (only the top k); set teach.backend: hf"
        )
    if not 0 < t.samples <= 32767:
        p.append(f"teach.samples: must be in 1..32767, got {t.samples}")
    if t.kind == "generate":
        p.append(f"teach.signal: {t.signal} is a scored signal; teach.kind generate scores nothing")
    if tc.kd_temperature != 1.0:
        p.append(
            f"train.kd_temperature: the teacher draws at temperature 1, so teach.signal "
            f"{t.signal} is unbiased only at 1 (got {tc.kd_temperature})"
        )
    if tc.mode == "distill" and tc.teacher == "offline" and tc.kd_loss != "forward_kl":
        p.append(
            f"train.kd_loss: teach.signal {t.signal} estimates forward KL (draws estimate "
            f"expectations under the teacher); set train.kd_loss: forward_kl (got {tc.kd_loss})"
        )
    return p


ON_POLICY_TUNE = (
    "train.teacher: on_policy runs in `raydapt train`/`run`, not in tune sweeps "
    "(each trial would need its own rollout and teacher engines)"
)


def _on_policy(cfg: Any) -> list[str]:
    """What on-policy distillation needs of the other settings."""
    tc = cfg.train
    if tc.teacher != "on_policy":
        if tc.kd_loss == "reverse_kl_sampled":
            return [
                "train.kd_loss: reverse_kl_sampled needs the student's own samples; "
                "set train.teacher: on_policy"
            ]
        return []
    p = []
    if tc.mode != "distill":
        p.append(
            f"train.teacher: on_policy is a distill teacher; set train.mode: distill "
            f"(got {tc.mode!r})"
        )
    if tc.kd_alpha != 1.0:
        p.append(
            f"train.kd_alpha: on_policy trains on the student's own samples, where CE "
            f"would reinforce its mistakes; set 1.0 (got {tc.kd_alpha})"
        )
    r = cfg.rollout
    if not 0.0 <= r.on_policy_fraction <= 1.0:
        p.append(f"rollout.on_policy_fraction: must be in [0, 1], got {r.on_policy_fraction}")
    elif r.on_policy_fraction < 1.0 and cfg.prepare.pack:
        p.append(
            "rollout.on_policy_fraction < 1 trains some steps on the prepared reference "
            "responses, one per row: set prepare.pack: false"
        )
    if r.max_staleness < 0:
        p.append(f"rollout.max_staleness: must be >= 0, got {r.max_staleness}")
    if r.max_engine_restarts < 0:
        p.append(f"rollout.max_engine_restarts: must be >= 0, got {r.max_engine_restarts}")
    if "tune" in cfg.stages:
        p.append(ON_POLICY_TUNE + "; remove tune from stages")
    return p


def _model_inits(cfg: Any) -> list[str]:
    """`init: prune` is a student's, needs a teacher to cut, and one way to choose layers."""
    p = []
    if cfg.teacher.init:
        p.append("teacher.init: only the student has an init (a teacher is a path or preset)")
    s = cfg.student
    if s.init not in ("", "prune"):
        p.append(f"student.init: {s.init!r} is not one of '', 'prune'")
    elif s.init == "prune":
        if s.path:
            p.append("student.init: prune builds the student; clear student.path (or init)")
        if not (cfg.teacher.path or cfg.teacher.preset):
            p.append("student.init: prune needs a teacher (teacher.path or teacher.preset)")
        if bool(s.keep_layers) == (s.keep_every > 0):
            p.append("student.init: prune needs exactly one of keep_layers and keep_every")
    elif s.keep_layers or s.keep_every:
        p.append("student.keep_layers/keep_every: only used with student.init=prune")
    return p


_SPACE_FORMS = ("loguniform", "uniform", "choice", "randint", "grid")


def _validate_space_entry(key: str, spec: Any, train_config: Any) -> list[str]:
    where = f"tune.space.{key}"
    if not key.startswith("train."):
        return [f"{where}: only train.* keys can be searched"]
    name = key.split(".", 1)[1]
    known = {f.name: 1 for f in dataclasses.fields(train_config)}
    if name not in known:
        return [f"{where}: train has no key `{name}`{closest(name, known)}"]
    if not isinstance(spec, dict) or len(spec) != 1:
        return [f"{where}: expected one of {{{'|'.join(_SPACE_FORMS)}: ...}}, got {spec!r}"]
    ((form, args),) = spec.items()
    if form not in _SPACE_FORMS:
        return [f"{where}: unknown form `{form}`; use one of {', '.join(_SPACE_FORMS)}"]
    if not isinstance(args, list) or not args:
        return [f"{where}.{form}: expected a non-empty list, got {args!r}"]
    if form in ("loguniform", "uniform", "randint"):
        if (
            len(args) != 2
            or not all(isinstance(a, (int, float)) for a in args)
            or args[0] >= args[1]
        ):
            return [f"{where}.{form}: expected [low, high] with low < high, got {args!r}"]
        if form == "loguniform" and args[0] <= 0:
            return [f"{where}.loguniform: bounds must be > 0, got {args!r}"]
    return []


def get_dotted(cfg: Any, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
