"""Prompt log-probs as dense arrays, taken inside vLLM before they become Python objects.

Why: vLLM's engine computes each prompt position's top-k as tensors, then its output
processor turns every position into Python objects (`FlatLogprobs.append_fast`: 40% of the
demo's scoring time) that raydapt immediately turns back into (T, k) arrays. With the engine
in this process (VLLMBackend's default on CPU), a request tagged
`SamplingParams(extra_args={DENSE: True})` skips that: its `LogprobsProcessor` keeps the
engine's (token_ids, logprobs, ranks) tensors as numpy, and `take(request_id)` hands them
over. Untagged requests (generation, serving) are untouched.

Layout of what `take` returns, per prompt of n tokens: `ids` and `lps` (n - 1, k + 1) and
`ranks` (n - 1,): row p - 1 is the distribution over prompt token p; column 0 is token p
itself (whatever its rank), columns 1..k the top k in rank order.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

DENSE = "raydapt_dense_prompt_logprobs"
_LOCK = threading.Lock()
_HELD: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
_INSTALLED = False


def install() -> None:
    """Patch vLLM's LogprobsProcessor in this process, once (idempotent)."""
    global _INSTALLED
    with _LOCK:
        if _INSTALLED:
            return
        from vllm.v1.engine.logprobs import LogprobsProcessor

        make = LogprobsProcessor.from_new_request.__func__
        update = LogprobsProcessor._update_prompt_logprobs

        def from_new_request(cls: Any, tokenizer: Any, request: Any) -> Any:
            proc = make(cls, tokenizer, request)
            extra = getattr(request.sampling_params, "extra_args", None) or {}
            if extra.get(DENSE):
                rid = request.external_req_id or request.request_id
                proc._raydapt_rid = rid
                with _LOCK:
                    _HELD[rid] = []
            return proc

        def update_prompt_logprobs(self: Any, tensors: Any) -> None:
            rid = getattr(self, "_raydapt_rid", None)
            if rid is None:
                return update(self, tensors)
            token_ids, logprobs, ranks, *_ = tensors
            with _LOCK:
                _HELD[rid].append(
                    (
                        np.asarray(token_ids.numpy(), np.int64),
                        np.asarray(logprobs.numpy(), np.float32),
                        np.asarray(ranks.numpy(), np.int64),
                    )
                )
            return None

        LogprobsProcessor.from_new_request = classmethod(from_new_request)
        LogprobsProcessor._update_prompt_logprobs = update_prompt_logprobs
        _INSTALLED = True


def take(request_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The dense prompt log-probs of one finished tagged request (see the module docstring),
    its chunks (chunked prefill) joined in order; forgotten afterwards."""
    with _LOCK:
        chunks = _HELD.pop(request_id)
    if not chunks:
        raise RuntimeError(f"request {request_id}: vLLM returned no prompt log-probs")
    ids, lps, ranks = (np.concatenate(part) for part in zip(*chunks, strict=True))
    return ids, lps, ranks


def topk_rows(ids: np.ndarray, lps: np.ndarray, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`take`'s arrays -> raydapt's (n, k) top-k rows: row t is the distribution over token
    t + 1 (rows 0..n-2), the last row padding (filled by the caller's pad_row)."""
    out_ids = np.zeros((n, k), np.int64)
    out_lps = np.full((n, k), -np.inf, np.float32)
    out_ids[: n - 1] = ids[: n - 1, 1 : k + 1]
    out_lps[: n - 1] = lps[: n - 1, 1 : k + 1]
    return out_ids, out_lps
