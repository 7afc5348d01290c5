"""`raydapt eval`: held-out loss, perplexity and exact-match, on a model folder or an endpoint.

    raydapt eval jobs/demo.yaml                     # the train stage's export
    raydapt eval jobs/demo.yaml eval.endpoint=http://127.0.0.1:8000

Held-out problems come from the world's heldout.jsonl, which never overlaps the training
split. Loss counts response tokens only (prompt tokens are given), as in training; the
world's Markov documents get their own loss beside the language's true entropy rate, the
floor no model can beat. Exact-match decodes greedily and compares the text after `####`.
For a `files` corpus, the loss is taken on the prepared validation split instead.
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raydapt import layout
from raydapt.config import EvalConfig, JobConfig
from raydapt.errors import UserError
from raydapt.eval.agreement import agreement, read_heldout_targets
from raydapt.models import count_params, load_model, load_tokenizer, tokenizer_hash, weights_hash
from raydapt.prepare.stage import split_files
from raydapt.prepare.tokenize import Tokenize
from raydapt.rows import loss_mask_of, padded
from raydapt.sources import world_dir
from raydapt.storage import finish_record, hash_json, read_manifest
from raydapt.train.losses import ce_loss
from raydapt.world import MarkovLanguage, exact_match, read_jsonl


@dataclass(frozen=True)
class EvalPlan:
    """One model (or endpoint) to evaluate, and the record file its metrics go to."""

    job: JobConfig
    output: Path  # <out>/eval/<name>.json
    name: str
    model_dir: Path | None  # None: evaluate job.eval.endpoint


def plan(job: JobConfig, model_dir: str | Path | None = None, name: str = "student") -> EvalPlan:
    """The model folder (default: the train export) must hold an HF model."""
    if job.eval.endpoint:
        return EvalPlan(job, layout.eval_dir(job) / "endpoint.json", "endpoint", None)
    model = Path(model_dir or layout.export_dir(job))
    if not (model / "config.json").is_file():
        raise UserError(
            f"eval: no model at {model}; run `raydapt train` first "
            f"(it writes {layout.export_dir(job)})"
        )
    if job.corpus.source == "world":
        world_dir(job)  # raises if the world is missing
    else:
        split_files(layout.prepared_dir(job), "validation")
    return EvalPlan(job, layout.eval_dir(job) / f"{name}.json", name, model)


def fingerprint(p: EvalPlan) -> str | None:
    """The eval settings, the model's weights and the held-out data; None for an endpoint
    (what it serves can change under the same URL)."""
    if p.model_dir is None:
        return None
    data = (
        read_manifest(world_dir(p.job))
        if p.job.corpus.source == "world"
        else read_manifest(layout.prepared_dir(p.job))
    )
    return hash_json(
        {
            "eval": p.job.eval.__dict__,
            "weights": weights_hash(p.model_dir),
            "data": (data or {}).get("fingerprint"),
            "teacher_targets": _targets_stamp(p.job.eval.teacher_targets),
            "v": 2,
        }
    )


def run(p: EvalPlan) -> dict:
    """Evaluate and write the record (metrics plus fingerprint)."""
    if p.model_dir is None:
        metrics = evaluate_endpoint(p.job)
    elif p.job.corpus.source == "world":
        metrics = evaluate_model(p.model_dir, heldout_rows(p.job), p.job.eval)
    else:
        metrics = {"model": str(p.model_dir), "val_loss": validation_loss(p.model_dir, p.job)}
        metrics["perplexity"] = math.exp(metrics["val_loss"])
    if p.model_dir is not None and p.job.eval.teacher_targets:
        metrics.update(teacher_agreement(p.model_dir, p.job.eval.teacher_targets))
    record = finish_record(p.output, {**metrics, "fingerprint": fingerprint(p)})
    print(
        f"[eval] {p.name}: "
        + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)),
        flush=True,
    )
    return record


def _targets_stamp(folder: str) -> str | None:
    """What the held-out targets are, so new ones make the record stale."""
    m = read_manifest(folder) if folder else None
    return m and (m.get("fingerprint") or m.get("created_at"))


def teacher_agreement(model_dir: Path, targets: str) -> dict:
    """teacher_nll, teacher_kl and top1_agreement on the teacher's held-out answers."""
    manifest, table = read_heldout_targets(targets)
    tok = load_tokenizer(model_dir)
    if manifest.get("tokenizer_hash") not in (None, tokenizer_hash(tok)):
        raise UserError(
            f"eval.teacher_targets: {targets} were written with tokenizer "
            f"{manifest.get('tokenizer_hash')} but {model_dir} has {tokenizer_hash(tok)}; "
            "teacher agreement needs the student's tokenizer"
        )
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return agreement(load_model(model_dir).eval(), table, pad)


def heldout_rows(job: JobConfig) -> list[dict]:
    return read_jsonl(world_dir(job) / "heldout.jsonl") if job.corpus.source == "world" else []


def _encode_rows(tok: Any, rows: list[dict]) -> list[tuple[list[int], np.ndarray]]:
    """(input_ids, loss_mask) per row, with the same row rules as `prepare`."""
    rules = Tokenize(tok, {})
    out = []
    for r in rows:
        doc, _ = rules.doc(
            {k: v for k, v in r.items() if k in ("text", "prompt", "response", "messages")}
        )
        if doc is not None:
            out.append((doc.ids, loss_mask_of(np.asarray(doc.target, np.uint8))))
    return out


def token_loss(model: Any, rows: list[tuple[list[int], Any]], batch_size: int = 32) -> float:
    """Mean next-token NLL (nats) over the masked positions of (input_ids, loss_mask) rows:
    `losses.ce_loss`, the training loss, summed over batches."""
    import torch

    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(rows), batch_size):
        b = {k: v.to(device) for k, v in padded(rows[i : i + batch_size]).items()}
        n = int((b["loss_mask"][:, :-1] > 0).sum())
        with torch.no_grad():
            logits = model(b["input_ids"]).logits  # (B, T, V)
        total += float(ce_loss(logits, b["input_ids"], b["loss_mask"])) * n
        count += n
    return total / max(count, 1)


def greedy_answers(
    model: Any, tok: Any, prompts: list[str], max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy completions of chat-formatted prompts, batched with left padding."""
    import torch

    tok.padding_side = "left"
    outs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            )
            if getattr(tok, "chat_template", None)
            else p + "\n"
            for p in prompts[i : i + batch_size]
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=True)
        with torch.no_grad():
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return outs


def evaluate_model(model_dir: str | Path, rows: list[dict], ecfg: EvalConfig) -> dict:
    """Loss on held-out problems and Markov text, exact-match, parameter count, decode speed."""
    tok, model = load_tokenizer(model_dir), load_model(model_dir).eval()
    problems = [r for r in rows if "answer" in r][: ecfg.max_problems]
    markov = [r for r in rows if r.get("task") == "markov"]
    out: dict[str, Any] = {"model": str(model_dir), "params": count_params(model)}
    if problems:
        out["heldout_loss"] = token_loss(model, _encode_rows(tok, problems), ecfg.batch_size)
        out["perplexity"] = math.exp(out["heldout_loss"])
        t0 = time.perf_counter()
        preds = greedy_answers(
            model, tok, [p["prompt"] for p in problems], ecfg.max_new_tokens, ecfg.batch_size
        )
        dt = time.perf_counter() - t0
        out["exact_match"] = exact_match(preds, [p["answer"] for p in problems])
        out["decode_tokens_per_s"] = sum(len(tok(p)["input_ids"]) for p in preds) / max(dt, 1e-9)
        by_task: dict[str, list[float]] = {}
        for p, pred in zip(problems, preds):
            by_task.setdefault(p["task"], []).append(exact_match([pred], [p["answer"]]))
        out["exact_match_by_task"] = {k: float(np.mean(v)) for k, v in sorted(by_task.items())}
        out["samples"] = [
            {"prompt": p["prompt"], "prediction": pred, "answer": p["answer"]}
            for p, pred in list(zip(problems, preds))[:5]
        ]
    if markov:
        out["markov_loss"] = token_loss(model, _encode_rows(tok, markov), ecfg.batch_size)
        out["markov_entropy_floor"] = MarkovLanguage().entropy_rate()
    out["problems"] = len(problems)
    return out


def validation_loss(model_dir: str | Path, job: JobConfig) -> float:
    """Token loss on the prepared validation split (for corpora without held-out problems)."""
    import pyarrow.parquet as pq

    files = split_files(layout.prepared_dir(job), "validation")
    rows = [(r["input_ids"], r["loss_mask"]) for f in files for r in pq.read_table(f).to_pylist()]
    return token_loss(load_model(model_dir).eval(), rows, job.eval.batch_size)


def evaluate_endpoint(cfg: JobConfig) -> dict:
    """Exact-match through a served OpenAI-compatible endpoint (completions, greedy)."""
    rows = [r for r in heldout_rows(cfg) if "answer" in r][: cfg.eval.max_problems]
    if not rows:
        raise UserError("eval.endpoint: only the world corpus has held-out problems to score")
    base = cfg.eval.endpoint.rstrip("/")
    with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as r:
        model = json.load(r)["data"][0]["id"]
    preds = []
    for row in rows:
        body = json.dumps(
            {
                "model": model,
                "messages": [{"role": "user", "content": row["prompt"]}],
                "max_tokens": cfg.eval.max_new_tokens,
                "temperature": 0,
            }
        ).encode()
        req = urllib.request.Request(
            f"{base}/v1/chat/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            preds.append(json.load(r)["choices"][0]["message"]["content"])
    return {
        "endpoint": base,
        "exact_match": exact_match(preds, [r["answer"] for r in rows]),
        "problems": len(rows),
    }
