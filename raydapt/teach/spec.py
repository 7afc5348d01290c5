"""What a teacher actor is told: one typed spec that crosses the Ray boundary whole."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sampling:
    """Generation settings (teach.kind generate | generate+score)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    seed: int = 0


@dataclass(frozen=True)
class ActorSpec:
    """One teacher engine and what it writes. Built by `teach.stage.actor_spec`."""

    model: str
    k: int = 16
    signal: str = "topk"  # topk | sampled | topk+sampled (teach.signal)
    samples: int = 0  # draws per position for the sampled signals
    dtype: str = "auto"
    backend: str = "vllm"  # vllm | hf
    kind: str = "score"  # score | generate | generate+score
    max_model_len: int = 0
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    num_gpus: float = 0.0
    trust_remote_code: bool = False
    enforce_eager: bool = True
    seed: int = 0
    id_dtype: str = "int32"
    same_tokenizer: bool = True
    student_tokenizer_path: str | None = None
    final: str = ""  # the targets folder; parts are staged beside it
    gen: Sampling = field(default_factory=Sampling)
    hf_batch_tokens: int = 8192  # hf backend: tokens per forward pass
