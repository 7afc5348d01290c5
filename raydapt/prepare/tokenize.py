"""Rows -> token ids: text, prompt+response, or chat messages, with the masks to learn from.

One set of row rules, used by `prepare` (in Ray Data tasks) and by `eval` (on held-out
rows), so a held-out loss counts exactly the tokens training counts. The output is
token-aligned (`target[t] = 1` when token t is learned); `raydapt.rows.loss_mask_of` turns
it into the logits-aligned loss mask that rows on disk carry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class TokenizerSpec:
    """A fast tokenizer as a Ray Data worker needs it, built once by the driver.

    `backend` is the Rust tokenizer's own JSON (`backend_tokenizer.to_str()`), so a worker
    rebuilds the exact tokenizer with the `tokenizers` package alone, without importing
    transformers (and torch): seconds of CPU per worker process. The full tokenizer is
    loaded from `path` only if a row needs jinja: chat messages, or a template that is not
    a fixed prefix and suffix around the prompt.
    """

    path: str
    backend: str
    eos_id: int | None
    has_template: bool
    wrap: tuple[str, str] | None  # _template_wrap of the template, if it has one


def tokenizer_spec(path: str | Path) -> TokenizerSpec | str:
    """The driver side of `TokenizerSpec`; a slow (Python) tokenizer stays a path."""
    tok = load_tokenizer(path)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return str(path)
    has = bool(getattr(tok, "chat_template", None))
    return TokenizerSpec(
        str(path), backend.to_str(), tok.eos_token_id, has, _template_wrap(tok) if has else None
    )


def _template_wrap(tok: Any) -> tuple[str, str] | None:
    """(prefix, suffix) around a user prompt, when the template inserts content verbatim.

    Rendering jinja per row dominates tokenizing short rows; most templates are a fixed
    prefix and suffix around the content, which is checked here on two probes.
    """

    def render(content: str) -> str:
        return tok.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    probe = "\x00raydapt-probe\x00"
    full = render(probe)
    if full.count(probe) != 1:
        return None
    prefix, suffix = full.split(probe)
    return (prefix, suffix) if render("a b") == prefix + "a b" + suffix else None


class Tokenize:
    """Rows (text | prompt+response | messages) -> token ids and target masks, or a drop reason.

    Built once per process: `tokenize_batch` keeps one per Ray worker.
    """

    def __init__(self, tokenizer: str | Path | TokenizerSpec | Any, opts: dict):
        """`tokenizer`: a model folder, a loaded tokenizer, or a `TokenizerSpec` (what Ray
        Data workers get: no transformers needed)."""
        self.opts = {**EVAL_OPTS, **opts}
        self._spec = tokenizer if isinstance(tokenizer, TokenizerSpec) else None
        if self._spec is not None:
            from tokenizers import Tokenizer

            backend: Any = Tokenizer.from_str(self._spec.backend)
            has, eos = self._spec.has_template, self._spec.eos_id
        else:
            if isinstance(tokenizer, (str, Path)):
                tokenizer = load_tokenizer(tokenizer)
            self.tok = tokenizer
            backend = getattr(tokenizer, "backend_tokenizer", None)
            has = bool(getattr(tokenizer, "chat_template", None))
            eos = tokenizer.eos_token_id
        # The Rust tokenizer directly: the transformers wrapper doubles the cost per row.
        self._backend_encode = backend.encode if backend is not None else None
        self._eos_ids = [eos] if eos is not None else []
        mode = self.opts["chat_template"]
        if mode == "always" and not has:
            where = self._spec.path if self._spec is not None else tokenizer
            raise UserError(f"prepare.chat_template=always but the tokenizer at {where} has none")
        self.use_template = has and mode != "never"
        if not self.use_template:
            self._wrap = None
        elif self._spec is not None:
            self._wrap = self._spec.wrap
        else:
            self._wrap = _template_wrap(self.tok)

    @cached_property
    def tok(self) -> Any:
        """The full (transformers) tokenizer; from a spec, loaded on first need only."""
        assert self._spec is not None  # set in __init__ otherwise
        return load_tokenizer(self._spec.path)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """One row in, one row out: the doc's hash, ids, target, ... or its drop reason.

        The list columns are built flat (values + offsets): no per-row arrays.
        """
        hashes, reasons, wheres, labels, prompts, answers, truncated = [], [], [], [], [], [], []
        ids: list[int] = []
        target: list[int] = []
        prompt_ids: list[int] = []
        ids_off, prompt_off = [0], [0]
        for row, where in _rows_of(batch, self.opts["format"]):
            doc, reason = self.doc(row)
            reasons.append(reason)
            if doc is None:
                wheres.append(where)
                hashes.append("")
                labels.append(-1)
                prompts.append(None)
                answers.append(None)
                truncated.append(False)
            else:
                wheres.append("")
                hashes.append(doc.hash)
                labels.append(doc.label)
                prompts.append(doc.prompt)
                answers.append(doc.answer)
                truncated.append(doc.truncated)
                ids += doc.ids
                target += doc.target
                if doc.prompt_ids:
                    prompt_ids += doc.prompt_ids
            ids_off.append(len(ids))
            prompt_off.append(len(prompt_ids))
        return pa.table(
            {
                "hash": pa.array(hashes, pa.string()),
                "ids": _list_array(ids_off, ids, pa.int32()),
                "target": _list_array(ids_off, target, pa.uint8()),
                "label": pa.array(labels, pa.int32()),
                "reason": pa.array(reasons, pa.string()),
                "where": pa.array(wheres, pa.string()),
                "prompt": pa.array(prompts, pa.string()),
                "prompt_ids": _list_array(prompt_off, prompt_ids, pa.int32()),
                "answer": pa.array(answers, pa.string()),
                "truncated": pa.array(truncated, pa.bool_()),
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
        # The content hash is sha256 of json.dumps([ids, target, label]). These are lists of
        # Python ints and an int, whose repr is that same text (", " between items) and is
        # twice as fast to build.
        content = repr([ids, target, label])
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
        if self._backend_encode is not None:
            return self._backend_encode(text, add_special_tokens=first).ids
        return self.tok(text, add_special_tokens=first)["input_ids"]

    def _eos(self) -> list[int]:
        return self._eos_ids

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


_CACHED: tuple[Any, Tokenize] | None = None


def tokenize_batch(batch: pa.Table, tokenizer: TokenizerSpec | str, opts: dict) -> pa.Table:
    """`Tokenize(tokenizer, opts)(batch)` as a Ray Data task: the Tokenize is built once per
    worker process and kept, for the next batches and the next runs with the same args."""
    global _CACHED
    key = (tokenizer, tuple(sorted(opts.items())))
    if _CACHED is None or _CACHED[0] != key:
        _CACHED = None  # drop the old tokenizer first
        _CACHED = (key, Tokenize(tokenizer, opts))
    return _CACHED[1](batch)


def _list_array(offsets: list[int], values: list[int], type_: pa.DataType) -> pa.ListArray:
    """list<type_> from flat values and int32 offsets (the type pa.array gives row lists)."""
    return pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32()), pa.array(values, type_), type=pa.list_(type_)
    )


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
