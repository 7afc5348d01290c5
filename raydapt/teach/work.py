"""One batch of teacher work: input rows (pyarrow) -> a targets table. Backend-agnostic.

The actor in pool.py calls `teach_batch`; tests call it directly on the HF backend. A batch
becomes exactly one targets part, so a part holds whole prompts (all n samples of each).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from raydapt.targets import make_table
from raydapt.teach.convert import response_loss_mask, row_seed, sample_id
from raydapt.teach.spec import ActorSpec


def _lists(col: pa.ChunkedArray, dtype: Any) -> list[np.ndarray]:
    return [np.asarray(x if x is not None else [], dtype) for x in col.to_pylist()]


def score_batch(backend: Any, batch: pa.Table, spec: ActorSpec) -> pa.Table:
    """Prepared rows (id, input_ids, loss_mask) -> rows with the teacher's top-k per position."""
    ids = batch.column("id").to_pylist()
    seqs = _lists(batch.column("input_ids"), np.int32)
    masks = _lists(batch.column("loss_mask"), np.uint8)
    for m in masks:
        if len(m):
            m[-1] = 0  # the last position has no next token (already 0 in prepared rows)
    return scored_table(ids, seqs, masks, backend.score(seqs), spec)


def scored_table(
    ids: list[str],
    seqs: list[np.ndarray],
    masks: list[np.ndarray],
    dense: list[tuple],
    spec: ActorSpec,
    generation: dict[str, list] | None = None,
) -> pa.Table:
    """A backend's scores -> targets rows of the spec's signal: (top-k ids, logprobs) per row,
    and for the sampled signals (draw ids, counts) after them (top-k None for `sampled`)."""
    topk = spec.signal != "sampled"
    draws = ([d[2] for d in dense], [d[3] for d in dense]) if spec.signal != "topk" else None
    return make_table(
        ids,
        seqs,
        masks,
        [d[0] for d in dense] if topk else None,
        [d[1] for d in dense] if topk else None,
        spec.k,
        spec.id_dtype,
        generation,
        draws,
        spec.signal,
        spec.samples,
    )


def generate_batch(
    backend: Any, batch: pa.Table, spec: ActorSpec, student_tok: Any = None
) -> pa.Table:
    """Prompt rows (id, prompt, prompt_ids) -> n sampled rows each; scored too for
    generate+score."""
    gen = spec.gen
    pids = batch.column("id").to_pylist()
    prompt_ids = _lists(batch.column("prompt_ids"), np.int32)
    if spec.same_tokenizer:
        engine_prompts = [p.tolist() for p in prompt_ids]
    else:  # the teacher reads the raw prompt through its own chat template
        engine_prompts = [
            teacher_prompt_ids(backend.tokenizer, t) for t in batch.column("prompt").to_pylist()
        ]
    seeds = [[row_seed(spec.seed, sample_id(p, j)) for j in range(gen.n)] for p in pids]
    samples = backend.generate(engine_prompts, seeds, gen)
    cols: dict[str, list] = {
        k: []
        for k in (
            "id",
            "input_ids",
            "loss_mask",
            "prompt_ids",
            "response_ids",
            "text",
            "sample_index",
        )
    }
    for pid, p_ids, outs in zip(pids, prompt_ids, samples, strict=True):
        for j, (resp, text, ended) in enumerate(outs):
            if not spec.same_tokenizer:
                resp = student_ids(student_tok, text, ended)
            resp = np.asarray(resp, np.int32)
            cols["id"].append(sample_id(pid, j))
            cols["input_ids"].append(np.concatenate([p_ids, resp]))
            cols["loss_mask"].append(response_loss_mask(len(p_ids), len(resp)))
            cols["prompt_ids"].append(p_ids)
            cols["response_ids"].append(resp)
            cols["text"].append(text)
            cols["sample_index"].append(j)
    generation = {k: cols[k] for k in ("prompt_ids", "response_ids", "text", "sample_index")}
    if spec.kind == "generate":
        return make_table(
            cols["id"],
            cols["input_ids"],
            cols["loss_mask"],
            None,
            None,
            spec.k,
            spec.id_dtype,
            generation,
        )
    dense = backend.score(cols["input_ids"])
    return scored_table(cols["id"], cols["input_ids"], cols["loss_mask"], dense, spec, generation)


def teacher_prompt_ids(tok: Any, prompt: str) -> list[int]:
    """A raw user prompt through the teacher's chat template (plain text if it has none)."""
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    return list(tok(text, add_special_tokens=False)["input_ids"])


def student_ids(tok: Any, text: str, ended: bool) -> list[int]:
    """A teacher completion re-tokenized for the student; eos kept when the teacher stopped
    there."""
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    return ids + [tok.eos_token_id] if ended and tok.eos_token_id is not None else ids


def teach_batch(
    backend: Any, batch: pa.Table, spec: ActorSpec, student_tok: Any = None
) -> pa.Table:
    if spec.kind == "score":
        return score_batch(backend, batch, spec)
    return generate_batch(backend, batch, spec, student_tok)
