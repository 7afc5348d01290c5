"""How close a student is to its teacher, on the teacher's own held-out answers.

A real chat teacher's answers have no exact reference, so a distilled student is judged the
way distillation papers judge it (MiniLLM, DistiLLM): on held-out prompts the teacher
answered (targets written by `raydapt teach` with `teach.split: validation`),

- `teacher_nll`: the student's next-token NLL of the teacher's answer tokens (nats/token);
- `teacher_kl`: KL(teacher || student), exact over the stored top-k ids plus a tail bucket
  (`losses.topk_kd_loss`, the training KD term);
- `top1_agreement`: how often the student's argmax is the teacher's top-1 token.

Pure torch over a targets table; no Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raydapt.errors import UserError
from raydapt.rows import collate
from raydapt.targets import read_targets
from raydapt.train.losses import KD, ce_loss, topk_kd_loss


def read_heldout_targets(folder: str | Path) -> tuple[dict, pa.Table]:
    """The manifest and scored rows of a complete targets folder; a folder without top-k is
    refused."""
    manifest, files = read_targets(folder)
    table = pa.concat_tables(pq.read_table(f) for f in files) if files else None
    if table is None or table.num_rows == 0 or "topk_ids" not in table.column_names:
        raise UserError(
            f"eval.teacher_targets: {folder} holds no scored rows; write them with "
            "`raydapt teach JOB teach.split=validation teach.kind=generate+score`"
        )
    if manifest.get("split") not in (None, "validation"):
        raise UserError(
            f"eval.teacher_targets: {folder} was written for teach.split="
            f"{manifest.get('split')!r}; use held-out targets (teach.split=validation)"
        )
    return manifest, table


def agreement(model: Any, table: pa.Table, pad_id: int, batch_size: int = 8) -> dict[str, float]:
    """Token-weighted teacher_nll, teacher_kl and top1_agreement over `table`'s masked
    positions (the teacher's answer tokens)."""
    device = next(model.parameters()).device
    nll = kl = agree = count = 0.0
    for start in range(0, table.num_rows, batch_size):
        rows = np.arange(start, min(start + batch_size, table.num_rows))
        b = {k: v.to(device) for k, v in collate(table, rows, pad_id).items()}
        mask = b["loss_mask"]
        n = float(mask[:, :-1].sum())
        if n == 0:
            continue
        with torch.no_grad():
            logits = model(b["input_ids"]).logits.float()
        nll += float(ce_loss(logits, b["input_ids"], mask)) * n
        kl_mask = mask.clone()
        kl_mask[:, -1] = 0
        kl += float(
            topk_kd_loss(logits, b["topk_ids"], b["topk_logprobs"], kl_mask, KD(chunk=None))
        ) * float(kl_mask.sum())
        same = logits.argmax(-1) == b["topk_ids"][..., 0]
        agree += float((same.float() * kl_mask).sum())
        count += n
    if count == 0:
        raise UserError("eval.teacher_targets: the held-out targets have no answer tokens")
    return {"teacher_nll": nll / count, "teacher_kl": kl / count, "top1_agreement": agree / count}
