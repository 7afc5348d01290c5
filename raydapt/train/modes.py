"""Build the model a train mode trains: full, lora, transfer (with an optional new head), distill.

Everything here runs on one worker before FSDP wraps the model, and the checks that need
only the model's config (`check_lora_targets`, `check_seq_len`) also run in the driver
before any worker starts (`raydapt.train.plan`), on a meta-device copy that costs no memory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raydapt.config import TrainConfig
from raydapt.errors import UserError
from raydapt.train.fsdp import decoder_blocks


def is_classification(tc: TrainConfig) -> bool:
    return tc.mode == "transfer" and tc.new_head == "classification"


def meta_model(path: str | Path, tc: TrainConfig) -> nn.Module:
    """The student's module tree on the meta device (no weights read), for driver-side checks."""
    from transformers import (  # slow import
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        if is_classification(tc):
            config.num_labels = tc.num_labels
            return AutoModelForSequenceClassification.from_config(config)
        return AutoModelForCausalLM.from_config(config)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def check_lora_targets(model: nn.Module, targets: list[str]) -> None:
    """Every LoRA target must name at least one Linear module (PEFT's suffix matching)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    missing = [t for t in targets if not any(_matches(n, t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise UserError(
            f"train.lora_targets: {missing} match no Linear module of the student; "
            f"its Linear modules are named {leaves} (for example {names[:4]}); "
            "set train.lora_targets to some of those names"
        )


def check_seq_len(config: Any, seq_len: int, where: str) -> None:
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise UserError(
            f"{where}: rows of seq_len={seq_len} exceed the student's max_position_embeddings="
            f"{max_pos}; rerun `raydapt prepare` with prepare.seq_len<={max_pos} "
            "or pick a larger model"
        )


def load_student(path: str | Path, tc: TrainConfig) -> nn.Module:
    """The pretrained student in fp32 (FSDP's mixed precision casts for compute)."""
    from transformers import (  # slow to import
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    if is_classification(tc):
        return AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=tc.num_labels, dtype=torch.float32
        )
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def apply_lora(model: nn.Module, tc: TrainConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model  # heavy, and only lora mode needs it

    check_lora_targets(model, list(tc.lora_targets))
    cfg = LoraConfig(
        r=tc.lora_r,
        lora_alpha=tc.lora_alpha,
        lora_dropout=tc.lora_dropout,
        target_modules=list(tc.lora_targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def freeze_for_transfer(model: nn.Module, tc: TrainConfig) -> list[str]:
    """Freeze embeddings, the first K blocks and `freeze_regex` matches. Returns frozen names."""
    frozen: set[int] = set()
    if tc.freeze_embeddings:
        frozen |= {id(p) for p in model.get_input_embeddings().parameters()}
    for block in decoder_blocks(model)[: tc.freeze_layers]:
        frozen |= {id(p) for p in block.parameters()}
    pattern = re.compile(tc.freeze_regex) if tc.freeze_regex else None
    names = []
    for name, p in model.named_parameters():
        if id(p) in frozen or (pattern is not None and pattern.search(name)):
            p.requires_grad_(False)
            names.append(name)
    if len(names) == len(list(model.parameters())):
        raise UserError(
            "train.freeze_*: transfer mode froze every parameter; nothing is left to train"
        )
    return names


def build_student(path: str | Path, tc: TrainConfig, seed: int) -> nn.Module:
    """Load the student and set which parameters train, per train.mode."""
    torch.manual_seed(seed)  # new heads and LoRA A matrices start the same on every rank
    model = load_student(path, tc)
    if tc.mode == "lora":
        model = apply_lora(model, tc)
    elif tc.mode == "transfer":
        freeze_for_transfer(model, tc)
    if tc.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if tc.mode == "lora":
            model.enable_input_require_grads()
    return model


def load_teacher(path: str | Path, student_vocab: int) -> nn.Module:
    """A frozen teacher for online distillation; its vocabulary must equal the student's."""
    from transformers import AutoConfig, AutoModelForCausalLM  # slow to import

    config = AutoConfig.from_pretrained(str(path))
    if config.vocab_size != student_vocab:
        raise UserError(
            f"train.teacher=online: the teacher at {path} "
            f"has vocab_size={config.vocab_size} but the "
            f"student has vocab_size={student_vocab}; logit distillation needs one vocabulary "
            "(build the student with the teacher's tokenizer)"
        )
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
