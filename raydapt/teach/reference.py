"""Reference teacher scorer in plain transformers: top-k logprobs per position -> targets folder.

The production scorer is the vLLM teacher pool (`raydapt teach`); this one is small, exact
and slow, for tests and for checking the pool: a teacher forward in fp32, log_softmax,
topk, written through `raydapt.targets.make_table` / `PartStore.finalize`, so the output
is a complete targets dataset in the schema of raydapt.targets.

    from raydapt.teach.reference import score_topk
    score_topk("runs/demo/models/teacher", rows, k=8, out="runs/demo/targets")
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from raydapt.models import load_model, load_tokenizer, tokenizer_hash, weights_hash
from raydapt.targets import PartStore, id_dtype_for, make_table


@torch.no_grad()
def topk_logprobs(
    model: torch.nn.Module, input_ids: list[np.ndarray], k: int, pad_id: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row: (T, k) top-k ids and (T, k) log-probs of the next token at temperature 1."""
    t = max(len(x) for x in input_ids)
    batch = torch.full((len(input_ids), t), pad_id, dtype=torch.long)
    for i, x in enumerate(input_ids):
        batch[i, : len(x)] = torch.as_tensor(np.asarray(x, np.int64))
    logits = model(
        input_ids=batch, use_cache=False
    ).logits.float()  # (B, T, V); right padding is causal-safe
    lp, ids = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)  # (B, T, k)
    return [(ids[i, : len(x)].numpy(), lp[i, : len(x)].numpy()) for i, x in enumerate(input_ids)]


def score_topk(
    model_dir: str | os.PathLike,
    rows: pa.Table,
    k: int,
    out: str | os.PathLike,
    batch_size: int = 8,
    manifest: dict | None = None,
) -> dict:
    """Score `rows` (columns id, input_ids, loss_mask) with the HF model at `model_dir`.

    Writes a complete targets folder at `out` and returns its manifest, which records the
    lineage fields `check_compatible` reads (tokenizer_hash, k).
    """
    model = load_model(model_dir, "float32").eval()
    tok = load_tokenizer(model_dir)
    id_dtype = id_dtype_for(model.config.vocab_size)
    store = PartStore(out)
    ids = rows.column("id").to_pylist()
    inp = [np.asarray(x, np.int32) for x in rows.column("input_ids").to_pylist()]
    mask = [np.asarray(x, np.uint8) for x in rows.column("loss_mask").to_pylist()]
    for s in range(0, len(ids), batch_size):
        scored = topk_logprobs(model, inp[s : s + batch_size], k, tok.pad_token_id or 0)
        table = make_table(
            ids[s : s + batch_size],
            inp[s : s + batch_size],
            mask[s : s + batch_size],
            [a for a, _ in scored],
            [b for _, b in scored],
            k,
            id_dtype,
        )
        store.write(table)
    lineage = {
        "kind": "score",
        "backend": "hf-reference",
        "k": k,
        "teacher_path": str(Path(model_dir).resolve()),
        "weights_hash": weights_hash(model_dir),
        "tokenizer_hash": tokenizer_hash(tok),
        "tokenizer_path": str(model_dir),
        "encoding": {"topk_ids": id_dtype, "topk_logprobs": "float16"},
        "temperature": 1.0,
        **(manifest or {}),
    }
    return store.finalize(lineage)
