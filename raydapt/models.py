"""Load HF causal LMs and tokenizers; build small Llama models from presets (`init-model`).

Real users pass hub ids or local folders; tests and the demo build their own models:

    raydapt init-model --preset tiny --corpus runs/demo/corpus/train.jsonl --out runs/tiny

builds a randomly initialised Llama with a byte-level BPE tokenizer trained on the corpus,
saved as safetensors. vLLM's CPU attention needs head_dim in VLLM_CPU_HEAD_DIMS, and vLLM
needs vocab_size == len(tokenizer): both hold by construction.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raydapt.errors import UserError
from raydapt.storage import hash_files, sha256_bytes

VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]

# Roles become special tokens; assistant turns end with eos, so a served chat stops there.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<|eos|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int = 512
    head_dim: int = 64


PRESETS: dict[str, Preset] = {
    "tiny": Preset(hidden=128, layers=2, heads=2, intermediate=384),
    "small": Preset(hidden=256, layers=4, heads=4, intermediate=768),
    "base": Preset(hidden=512, layers=8, heads=8, intermediate=1536, max_positions=1024),
}


def corpus_texts(path: str | Path) -> list[str]:
    """Texts to train a tokenizer on, from jsonl (text | prompt+response | messages) or txt."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"corpus for the tokenizer not found: {path}")
    texts: list[str] = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                texts.append(line.rstrip("\n"))
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                texts.extend(
                    str(row[k])
                    for k in ("text", "prompt", "response")
                    if isinstance(row.get(k), str)
                )
                for m in row.get("messages") or []:
                    if isinstance(m, dict) and isinstance(m.get("content"), str):
                        texts.append(m["content"])
    if not texts:
        raise UserError(f"corpus {path} holds no text to train a tokenizer on")
    return texts


def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """Byte-level BPE with individual digits (so arithmetic sees one token per digit)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        chat_template=CHAT_TEMPLATE,
    )


def init_model(
    preset: str,
    corpus: str | Path,
    out: str | Path,
    vocab_size: int = 512,
    seed: int = 0,
    tokenizer_from: str | Path | None = None,
) -> Path:
    """Build a random Llama of `preset` plus a tokenizer; save both to `out` (HF format).

    `tokenizer_from` reuses an existing tokenizer (a student must share its teacher's
    tokenizer for logit distillation) instead of training a new one.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    p = PRESETS[preset]
    assert p.head_dim in VLLM_CPU_HEAD_DIMS and p.hidden == p.heads * p.head_dim
    tok = (
        load_tokenizer(tokenizer_from)
        if tokenizer_from
        else train_tokenizer(corpus_texts(corpus), vocab_size)
    )
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=p.hidden,
        intermediate_size=p.intermediate,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.heads,
        head_dim=p.head_dim,
        max_position_embeddings=p.max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    _write_generation_config(out, tok)
    return out


def _write_generation_config(out: Path, tok: Any) -> None:
    gen = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def check_source(path: str) -> None:
    """A missing local folder is a user error; anything shaped like `org/name` is a hub id."""
    if os.path.isdir(path) or is_hub_id(path):
        return
    raise UserError(f"model folder not found: {path} (pass an existing folder or a hub id)")


def is_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) <= 2 and all(parts) and not path.startswith((".", "/", "~"))


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = str(path)
    check_source(path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise UserError(f"cannot load a tokenizer from {path}: {e}") from None


def load_model(path: str | Path, dtype: str = "float32", **kw: Any):
    """Load an HF causal LM; a path that does not load is a UserError naming it."""
    import torch
    from transformers import AutoModelForCausalLM

    path = str(path)
    check_source(path)
    torch_dtype = {
        "auto": "auto",
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kw)
    except OSError as e:
        raise UserError(f"cannot load a model from {path}: {e}") from None
    return model


def engine_dtype(requested: str, model_path: str | Path, on_gpu: bool) -> str:
    """The dtype a vLLM engine runs: on CPU, `auto` keeps a float32 checkpoint in float32.

    vLLM's `auto` casts a float32 checkpoint to 16 bits. On a CPU without bfloat16 instructions
    its bfloat16 matmuls fall back to a slow path (the demo's teacher scored 2.5x slower than in
    float32) and the logprobs lose precision against transformers' float32 reference. On a GPU
    the 16-bit cast is what users expect, so `auto` stays vLLM's there.
    """
    if requested != "auto" or on_gpu:
        return requested
    config = Path(model_path) / "config.json"
    if not config.is_file():
        return requested  # a hub id: vLLM reads its config
    data = json.loads(config.read_text())
    saved = str(data.get("dtype") or data.get("torch_dtype") or "").removeprefix("torch.")
    return "float32" if saved == "float32" else requested


def check_vocab(model_or_config: Any, tokenizer: Any, where: str) -> None:
    """A tokenizer whose ids exceed the embedding would index out of range: fail clearly."""
    cfg = getattr(model_or_config, "config", model_or_config)
    n_emb = cfg.vocab_size
    if len(tokenizer) > n_emb:
        raise UserError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
            f"{n_emb} rows; use the tokenizer the model was trained with"
        )


def tokenizer_hash(tokenizer: Any) -> str:
    """A content hash of the tokenizer (vocabulary, merges, normalizer, specials)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = (
        backend.to_str()
        if backend is not None
        else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    )
    specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return sha256_bytes((body + specials).encode())[:16]


def weights_hash(folder: str | Path) -> str:
    """Hash of a model folder's weight files (safetensors / bin), for lineage."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    return hash_files(files) if files else "remote:" + str(folder)


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
