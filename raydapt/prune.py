"""A student pruned from its teacher: keep some decoder layers, copy everything else.

Depth pruning is the cheapest good initialisation for a distilled student (Minitron,
arXiv 2407.14679; "ShortGPT", 2403.03853): the kept layers, the embeddings, the final norm
and the head start from the teacher's weights, so the student shares the teacher's tokenizer
and vocabulary by construction and KD only has to heal the cut. Works on any HF decoder
whose layers live under `*.layers.<i>.` (Llama, Qwen2/3, Mistral, SmolLM2, Gemma).

    keep = layers_to_keep(30, every=6)          # [0, 6, 12, 18, 24, 29]
    prune_model("models/smollm2", "models/student", keep)
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from raydapt.errors import UserError
from raydapt.storage import atomic_dir, finish_manifest, read_manifest

RECORD = "pruned.json"
_LAYER = re.compile(r"^(.*?\blayers\.)(\d+)(\..*)$")
# Config lists with one entry per layer (Qwen3 and Gemma's sliding/full attention pattern).
_PER_LAYER_KEYS = ("layer_types", "sliding_window_pattern_list", "no_rope_layers")


def layers_to_keep(n_layers: int, keep: list[int] | None = None, every: int = 0) -> list[int]:
    """The sorted teacher layers to keep: `keep` as given, or every `every`-th plus the last.

    The last layer is always in an `every` selection: it writes the representation the
    head reads, and dropping it costs the most (ShortGPT's block-influence scores).
    """
    if keep:
        bad = [i for i in keep if not isinstance(i, int) or not 0 <= i < n_layers]
        if bad:
            raise UserError(
                f"student.keep_layers: {bad} out of range for a teacher with {n_layers} layers "
                f"(use 0..{n_layers - 1})"
            )
        if len(set(keep)) != len(keep):
            raise UserError(f"student.keep_layers: {keep} lists a layer twice")
        return sorted(keep)
    if every <= 0:
        raise UserError("student.init=prune needs student.keep_layers or student.keep_every > 0")
    return sorted(set(range(0, n_layers, every)) | {n_layers - 1})


def renamed_key(key: str, new_index: dict[int, int]) -> str | None:
    """`model.layers.12.mlp...` -> `model.layers.2.mlp...` (None for a dropped layer)."""
    m = _LAYER.match(key)
    if not m:
        return key
    i = int(m.group(2))
    return f"{m.group(1)}{new_index[i]}{m.group(3)}" if i in new_index else None


def prune_model(teacher: str | Path, out: str | Path, keep: list[int]) -> Path:
    """Write a student with the teacher's layers `keep` (renumbered 0..len-1) to `out`.

    The folder is written atomically with the teacher's tokenizer files and a record of what
    was kept (`pruned.json`), so a student can always be traced to its teacher.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    teacher, t0 = Path(teacher), time.perf_counter()
    config = AutoConfig.from_pretrained(teacher)
    n = config.num_hidden_layers
    keep = layers_to_keep(n, keep)
    src = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in src.state_dict().items():
        new_key = renamed_key(key, new_index)
        if new_key is not None:
            state[new_key] = value
    config.num_hidden_layers = len(keep)
    for name in _PER_LAYER_KEYS:
        value = getattr(config, name, None)
        if isinstance(value, list) and len(value) == n:
            setattr(config, name, [value[i] for i in keep])
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = student.load_state_dict(state, strict=False)
    # Tied heads are not in the state dict twice; anything else missing is a real mismatch.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise UserError(
            f"pruning {teacher}: keys did not map (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); this architecture's layers are not `*.layers.<i>.`"
        )
    params = sum(p.numel() for p in student.parameters())
    with atomic_dir(out) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        for f in teacher.iterdir():  # tokenizer, chat template, generation config
            if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "chat_temp"))):
                shutil.copy2(f, tmp / f.name)
            elif f.name in ("generation_config.json", "vocab.json", "merges.txt"):
                shutil.copy2(f, tmp / f.name)
        record = {
            "teacher": str(teacher),
            "teacher_layers": n,
            "kept_layers": keep,
            "params": params,
            "teacher_params": sum(p.numel() for p in src.parameters()),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / RECORD).write_text(json.dumps(record, indent=2))
        finish_manifest(tmp, {"kind": "pruned-student", **record})
    return Path(out)


def pruned_record(folder: str | Path) -> dict | None:
    """What a pruned student kept, or None for a folder that is not a complete pruned student."""
    m = read_manifest(folder)
    return m if m and m.get("kind") == "pruned-student" else None
