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
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from raydapt import layout
from raydapt.config import EvalConfig, JobConfig
from raydapt.errors import UserError
from raydapt.storage import write_json_atomic

log = logging.getLogger(__name__)


def heldout_rows(cfg: JobConfig) -> list[dict]:
    if cfg.corpus.source != "world":
        return []
    from raydapt.corpus import materialize_world
    from raydapt.world import read_jsonl

    return read_jsonl(materialize_world(cfg) / "heldout.jsonl")


def _encode_rows(tok: Any, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(ids, target) per row, with the same rules as `prepare` (Tokenize)."""
    from raydapt.corpus import Tokenize

    t = Tokenize.__new__(Tokenize)  # reuse the row rules with an already-loaded tokenizer
    t.tok, t.opts = tok, {"chat_template": "auto", "max_chars": 10**9, "seq_len": 10**9, "drop_longer": False}
    t.use_template = bool(getattr(tok, "chat_template", None))
    t._wrap = t._template_wrap() if t.use_template else None
    out = []
    for r in rows:
        doc, reason = t.doc({k: v for k, v in r.items() if k in ("text", "prompt", "response", "messages")})
        if doc is not None:
            out.append((doc.ids, doc.target))
    return out


def token_loss(model: Any, encoded: list[tuple[list[int], list[int]]], batch_size: int = 32) -> float:
    """Mean next-token NLL (nats) over target tokens."""
    import torch

    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i : i + batch_size]
        T = max(len(ids) for ids, _ in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        tgt = torch.zeros(len(chunk), T)
        for j, (a, m) in enumerate(chunk):
            ids[j, : len(a)] = torch.tensor(a)
            tgt[j, : len(m)] = torch.tensor(m, dtype=torch.float)
        with torch.no_grad():
            logits = model(ids.to(device)).logits.float()  # (B, T, V)
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
        mask = tgt[:, 1:].to(device)
        total += float(-(logp * mask).sum())
        count += int(mask.sum())
    return total / max(count, 1)


def greedy_answers(model: Any, tok: Any, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions of chat-formatted prompts, batched with left padding."""
    import torch

    tok.padding_side = "left"
    outs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        texts = [
            tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            if getattr(tok, "chat_template", None) else p + "\n"
            for p in prompts[i : i + batch_size]
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=True)
        with torch.no_grad():
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            )
        outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return outs


def evaluate_model(model_dir: str | Path, rows: list[dict], ecfg: EvalConfig) -> dict:
    """Loss on held-out problems and Markov text, exact-match, parameter count, decode speed."""
    from raydapt.models import count_params, load_model, load_tokenizer
    from raydapt.world import MarkovLanguage, exact_match

    tok, model = load_tokenizer(model_dir), load_model(model_dir).eval()
    problems = [r for r in rows if "prompt" in r][: ecfg.max_problems]
    markov = [r for r in rows if r.get("task") == "markov"]
    out: dict[str, Any] = {"model": str(model_dir), "params": count_params(model)}
    if problems:
        out["heldout_loss"] = token_loss(model, _encode_rows(tok, problems), ecfg.batch_size)
        out["perplexity"] = math.exp(out["heldout_loss"])
        t0 = time.perf_counter()
        preds = greedy_answers(model, tok, [p["prompt"] for p in problems], ecfg.max_new_tokens, ecfg.batch_size)
        dt = time.perf_counter() - t0
        out["exact_match"] = exact_match(preds, [p["answer"] for p in problems])
        out["decode_tokens_per_s"] = sum(len(tok(p)["input_ids"]) for p in preds) / max(dt, 1e-9)
        by_task: dict[str, list[float]] = {}
        for p, pred in zip(problems, preds):
            by_task.setdefault(p["task"], []).append(exact_match([pred], [p["answer"]]))
        out["exact_match_by_task"] = {k: float(np.mean(v)) for k, v in sorted(by_task.items())}
        out["samples"] = [{"prompt": p["prompt"], "prediction": pred, "answer": p["answer"]}
                          for p, pred in list(zip(problems, preds))[:5]]
    if markov:
        out["markov_loss"] = token_loss(model, _encode_rows(tok, markov), ecfg.batch_size)
        out["markov_entropy_floor"] = MarkovLanguage().entropy_rate()
    out["problems"] = len(problems)
    return out


def validation_loss(model_dir: str | Path, cfg: JobConfig) -> float:
    """Token loss on the prepared validation split (for corpora without held-out problems)."""
    import pyarrow.parquet as pq

    from raydapt.corpus import split_files
    from raydapt.models import load_model

    files = split_files(layout.prepared_dir(cfg), "validation")
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    # loss_mask is logits-aligned; token_loss wants token-aligned targets: shift right by one
    encoded = [(r["input_ids"], [0] + list(r["loss_mask"][:-1])) for r in rows]
    return token_loss(load_model(model_dir).eval(), encoded, cfg.eval.batch_size)


def run(cfg: JobConfig, model_dir: str | Path | None = None, name: str = "student") -> dict:
    """The eval stage: evaluate `model_dir` (default: the train export) and write metrics.json."""
    if cfg.eval.endpoint:
        return evaluate_endpoint(cfg)
    model_dir = Path(model_dir or layout.export_dir(cfg))
    if not (model_dir / "config.json").is_file():
        raise UserError(f"eval: no model at {model_dir}; run `raydapt train` first (it writes {layout.export_dir(cfg)})")
    rows = heldout_rows(cfg)
    metrics = evaluate_model(model_dir, rows, cfg.eval) if rows else {"model": str(model_dir)}
    if not rows:
        metrics["val_loss"] = validation_loss(model_dir, cfg)
        metrics["perplexity"] = math.exp(metrics["val_loss"])
    out = layout.eval_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{name}.json", metrics)
    print(f"eval[{name}]: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    return metrics


def evaluate_endpoint(cfg: JobConfig) -> dict:
    """Exact-match through a served OpenAI-compatible endpoint (completions, greedy)."""
    import urllib.request

    from raydapt.world import exact_match

    rows = [r for r in heldout_rows(cfg) if "prompt" in r][: cfg.eval.max_problems]
    if not rows:
        raise UserError("eval.endpoint: only the world corpus has held-out problems to score")
    base = cfg.eval.endpoint.rstrip("/")
    with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as r:
        model = json.load(r)["data"][0]["id"]
    preds = []
    for row in rows:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": row["prompt"]}],
                           "max_tokens": cfg.eval.max_new_tokens, "temperature": 0}).encode()
        req = urllib.request.Request(f"{base}/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            preds.append(json.load(r)["choices"][0]["message"]["content"])
    metrics = {"endpoint": base, "exact_match": exact_match(preds, [r["answer"] for r in rows]), "problems": len(rows)}
    layout.eval_dir(cfg).mkdir(parents=True, exist_ok=True)
    write_json_atomic(layout.eval_dir(cfg) / "endpoint.json", metrics)
    print(f"eval[endpoint]: exact_match={metrics['exact_match']:.3f} on {len(rows)} problems")
    return metrics
