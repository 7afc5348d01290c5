"""Rows -> token ids: text, prompt+response, or chat messages, with the masks to learn from.

One set of row rules, used by `prepare` (in Ray Data actors) and by `eval` (on held-out
rows), so a held-out loss counts exactly the tokens training counts. The output is
token-aligned (`target[t] = 1` when token t is learned); `raydapt.rows.loss_mask_of` turns
it into the logits-aligned loss mask that rows on disk carry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from raydapt.errors import UserError
from raydapt.models import load_tokenizer

# Row rules for callers that keep every row whole (eval): no length limits.
EVAL_OPTS = {"chat_template": "auto", "max_chars": 10**9, "seq_len": 10**9, "drop_longer": False}


@dataclass
class Doc:
    """One tokenized document. `target` marks tokens that are predicted (token-aligned)."""

    hash: str
    ids: list[int]
    target: list[int]
    label: int = -1
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    answer: str | None = None
    truncated: bool = False


class Tokenize:
    """Rows (text | prompt+response | messages) -> token ids and target masks, or a drop reason.

    A callable class so Ray Data loads the tokenizer once per actor.
    """

    def __init__(self, tokenizer: str | Any, opts: dict):
        """`tokenizer`: a model folder (Ray Data actors load it once each) or a loaded one."""
        self.tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        self.opts = {**EVAL_OPTS, **opts}
        mode = self.opts["chat_template"]
        has = bool(getattr(self.tok, "chat_template", None))
        if mode == "always" and not has:
            raise UserError(
                f"prepare.chat_template=always but the tokenizer at {tokenizer} has none"
            )
        self.use_template = has and mode != "never"
        self._wrap = self._template_wrap() if self.use_template else None

    def _template_wrap(self) -> tuple[str, str] | None:
        """(prefix, suffix) around a user prompt, when the template inserts content verbatim.

        Rendering jinja per row dominates tokenizing short rows; most templates are a fixed
        prefix and suffix around the content, which is checked here on two probes.
        """

        def render(content: str) -> str:
            return self.tok.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )

        probe = "\x00raydapt-probe\x00"
        full = render(probe)
        if full.count(probe) != 1:
            return None
        prefix, suffix = full.split(probe)
        return (prefix, suffix) if render("a b") == prefix + "a b" + suffix else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = _rows_of(batch, self.opts["format"])
        out: dict[str, list] = {
            k: []
            for k in (
                "hash",
                "ids",
                "target",
                "label",
                "reason",
                "prompt",
                "prompt_ids",
                "answer",
                "where",
                "truncated",
            )
        }
        for row, where in rows:
            doc, reason = self.doc(row)
            out["reason"].append(reason)
            out["where"].append(where if reason else "")
            out["hash"].append(doc.hash if doc else "")
            out["ids"].append(np.asarray(doc.ids if doc else [], np.int32))
            out["target"].append(np.asarray(doc.target if doc else [], np.uint8))
            out["label"].append(doc.label if doc else -1)
            out["prompt"].append(doc.prompt if doc else None)
            out["prompt_ids"].append(np.asarray((doc.prompt_ids if doc else None) or [], np.int32))
            out["answer"].append(doc.answer if doc else None)
            out["truncated"].append(bool(doc and doc.truncated))
        return pa.table(
            {
                "hash": pa.array(out["hash"], pa.string()),
                "ids": pa.array(out["ids"], pa.list_(pa.int32())),
                "target": pa.array(out["target"], pa.list_(pa.uint8())),
                "label": pa.array(out["label"], pa.int32()),
                "reason": pa.array(out["reason"], pa.string()),
                "where": pa.array(out["where"], pa.string()),
                "prompt": pa.array(out["prompt"], pa.string()),
                "prompt_ids": pa.array(out["prompt_ids"], pa.list_(pa.int32())),
                "answer": pa.array(out["answer"], pa.string()),
                "truncated": pa.array(out["truncated"], pa.bool_()),
            }
        )

    def doc(self, row: Any) -> tuple[Doc | None, str]:
        if not isinstance(row, dict):
            return None, "malformed"
        o = self.opts
        try:
            if "messages" in row and row["messages"] is not None:
                parts = self._messages(row["messages"])
            elif "prompt" in row and row.get("response") is not None:
                parts = self._prompt_response(row["prompt"], row["response"])
            elif "prompt" in row and "text" not in row:
                parts = self._prompt_only(row["prompt"])
            elif "text" in row:
                parts = self._text(row["text"])
            else:
                return None, "malformed"
        except _Drop as d:
            return None, d.reason
        ids, target, prompt_ids = parts
        label = row.get("label", -1)
        if label is None:
            label = -1
        if not isinstance(label, int) or isinstance(label, bool):
            return None, "malformed"
        truncated = len(ids) > o["seq_len"]
        if truncated:
            if o["drop_longer"]:
                return None, "too_long_tokens"
            ids, target = ids[: o["seq_len"]], target[: o["seq_len"]]
        content = json.dumps([ids, target, label])
        h = hashlib.sha256(content.encode()).hexdigest()[:20]
        prompt = row.get("prompt") if isinstance(row.get("prompt"), str) else None
        answer = row.get("answer") if isinstance(row.get("answer"), str) else None
        return Doc(h, ids, target, label, prompt, prompt_ids, answer, truncated), ""

    def _check_str(self, s: Any) -> str:
        if not isinstance(s, str):
            raise _Drop("malformed")
        if not s.strip():
            raise _Drop("empty")
        if len(s) > self.opts["max_chars"]:
            raise _Drop("too_long_chars")
        return s

    def _encode(self, text: str, first: bool) -> list[int]:
        # The Rust tokenizer directly: the transformers wrapper doubles the cost per row.
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is not None:
            return backend.encode(text, add_special_tokens=first).ids
        return self.tok(text, add_special_tokens=first)["input_ids"]

    def _eos(self) -> list[int]:
        return [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []

    def _text(self, text: Any):
        ids = self._encode(self._check_str(text), True) + self._eos()
        return ids, [0] + [1] * (len(ids) - 1), None

    def _prompt_only(self, prompt: Any):
        """A prompt for the teacher to answer (teach.kind generate): nothing to learn yet."""
        p_ids = self._encode(self._prompt_text(self._check_str(prompt)), True)
        return p_ids, [0] * len(p_ids), p_ids

    def _prompt_response(self, prompt: Any, response: Any):
        prompt, response = self._check_str(prompt), self._check_str(response)
        p_ids = self._encode(self._prompt_text(prompt), True)
        r_ids = self._encode(response, False) + self._eos()
        return p_ids + r_ids, [0] * len(p_ids) + [1] * len(r_ids), p_ids

    def _prompt_text(self, prompt: str) -> str:
        if self._wrap:
            ptext = self._wrap[0] + prompt + self._wrap[1]
        elif self.use_template:
            ptext = self.tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
        else:
            ptext = prompt + "\n"
        return ptext

    def _messages(self, messages: Any):
        if not isinstance(messages, list) or not messages:
            raise _Drop("malformed" if not isinstance(messages, list) else "empty")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _Drop("malformed")
            self._check_str(m.get("content"))
        if not any(m["role"] == "assistant" for m in messages):
            raise _Drop("empty")  # nothing to learn from
        ids: list[int] = []
        target: list[int] = []
        for i, m in enumerate(messages):
            # Render prefixes and diff them, so masks follow the template exactly.
            text = self._render(messages[: i + 1], False)
            new = self._encode(text, True)[len(ids) :]
            if m["role"] == "assistant":
                head = self._encode(self._render(messages[:i], True), True)[len(ids) :]
                target += [0] * len(head) + [1] * (len(new) - len(head))
            else:
                target += [0] * len(new)
            ids += new
        return ids, target, None

    def _render(self, messages: list[dict], gen_prompt: bool) -> str:
        if self.use_template:
            return self.tok.apply_chat_template(
                messages, add_generation_prompt=gen_prompt, tokenize=False
            )
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant: " if gen_prompt else "")


class _Drop(Exception):
    def __init__(self, reason: str):
        self.reason = reason


def _rows_of(batch: pa.Table, fmt: str) -> list[tuple[Any, str]]:
    """(row, origin) pairs. jsonl arrives as raw lines (read_text) so bad JSON is countable."""
    paths = (
        batch.column("path").to_pylist() if "path" in batch.column_names else [""] * batch.num_rows
    )
    if fmt == "jsonl":
        out = []
        for line, path in zip(batch.column("text").to_pylist(), paths):
            if not line.strip():
                out.append(({"text": ""}, path))
                continue
            try:
                out.append((json.loads(line), path))
            except json.JSONDecodeError:
                out.append((None, f"{path}: {line[:80]!r}"))
        return out
    cols = [c for c in batch.column_names if c != "path"]
    return list(zip(batch.select(cols).to_pylist(), paths))
