"""OpenAI wire format: request models, validation into OpenAI-style errors, response builders.

Requests are parsed by hand (not by FastAPI's body binding) so that every bad input becomes
the OpenAI error body `{"error": {"message", "type", "param", "code"}}` with HTTP 400 and the
offending field in `param`, which is what the official `openai` client surfaces as
`BadRequestError`. Responses are built as plain dicts shaped like OpenAI's (the pydantic
response models below document and test that shape; they are not on the hot path).

Pure module: no Ray, no vLLM imports, so it is cheap to unit-test.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_LOGPROBS = 20  # vLLM's default engine `max_logprobs`; the OpenAI API caps chat at 20 too


class APIError(Exception):
    """An error that becomes an OpenAI error body with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict | None = None,
    ):
        super().__init__(message)
        self.extra = extra or {}
        self.status, self.message, self.param, self.type = status, message, param, type
        self.code = code or {
            400: "invalid_value",
            401: "invalid_api_key",
            404: "model_not_found",
            429: "rate_limited",
            503: "overloaded",
        }.get(status, "error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
                **self.extra,
            }
        }


# ----------------------------------------------------------------------------- requests

Prompt = str | list[str] | list[int] | list[list[int]]


class _Base(BaseModel):
    # Clients send fields we do not act on (user, logit_bias, ...): accept and ignore them.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Base):
    include_usage: bool = False


class CompletionRequest(_Base):
    model: str
    prompt: Prompt
    max_tokens: int | None = 16
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: int | None = None
    echo: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM extensions: logprob tokens as "token_id:<id>" (clients map them back exactly);
    # ignore_eos generates exactly max_tokens (benchmarks)
    return_tokens_as_token_ids: bool = False
    ignore_eos: bool = False


class ChatMessage(_Base):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text parts
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_Base):
    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False


def parse_request(raw: bytes, cls: type[_Base]) -> Any:
    """JSON bytes -> request model, or APIError(400) naming the first bad field."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for p in err["loc"] if not str(p).startswith(("list[", "str", "int"))]
        param = loc[0] if loc else None
        if err["type"] == "missing":
            raise APIError(
                400, f"missing required field `{param}`", param, code="missing_required_parameter"
            ) from None
        raise APIError(
            400,
            f"invalid `{param}`: {err['msg']} (got {err.get('input')!r:.80})",
            param,
            code="invalid_type",
        ) from None


def prompts_of(req: CompletionRequest) -> list[str | list[int]]:
    """Normalise `prompt` to a list whose items are a string or a list of token ids."""
    p = req.prompt
    if isinstance(p, str):
        items: list = [p]
    elif p and all(isinstance(x, int) for x in p):
        items = [list(p)]
    else:
        items = list(p)
    if not items or any(len(x) == 0 for x in items):
        raise APIError(400, "`prompt` must not be empty", "prompt")
    return items


def check_sampling(req: Any, max_n: int) -> None:
    """Checks shared by both endpoints; the token-length check needs the tokenizer (app.py)."""
    if req.n < 1 or req.n > max_n:
        raise APIError(400, f"`n` must be between 1 and {max_n} (serve.max_n), got {req.n}", "n")
    if req.temperature is not None and req.temperature < 0:
        raise APIError(400, f"`temperature` must be >= 0, got {req.temperature}", "temperature")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise APIError(400, f"`top_p` must be in (0, 1], got {req.top_p}", "top_p")
    mt = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if mt is not None and mt < 0:
        raise APIError(400, f"`max_tokens` must be >= 0, got {mt}", "max_tokens")
    if isinstance(req, CompletionRequest):
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"`logprobs` must be in [0, {MAX_LOGPROBS}]", "logprobs")
        if mt == 0 and not req.echo:
            raise APIError(
                400, "`max_tokens` may be 0 only with `echo` (prompt scoring)", "max_tokens"
            )
    elif req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"`top_logprobs` must be in [0, {MAX_LOGPROBS}]", "top_logprobs")
    if isinstance(req, ChatCompletionRequest) and not req.messages:
        raise APIError(400, "`messages` must not be empty", "messages")


# ----------------------------------------------------------------------------- responses


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "raydapt"
    parent: str | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def finite(x: float | None) -> float | None:
    """JSON has no inf/nan; OpenAI clients expect numbers, so clamp -inf to a large negative."""
    if x is None:
        return None
    return x if math.isfinite(x) else -9999.0


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response_body(kind: str, rid: str, model: str, choices: list[dict], use: dict | None) -> dict:
    """A whole response (or a completion stream chunk); kind: text_completion | chat.completion."""
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": use,
    }


def chat_chunk(
    rid: str, model: str, index: int, delta: dict, finish: str | None, logprobs: dict | None = None
) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        ],
    }


Entry = tuple[str, float | None, dict[str, float] | None]  # token, logprob, top-k


def completion_logprobs(entries: list[Entry], start_offset: int = 0) -> dict:
    """Legacy completions `logprobs`: parallel lists plus the text offset of each token."""
    offsets, off = [], start_offset
    for tok, _, _ in entries:
        offsets.append(off)
        off += len(tok)
    return {
        "tokens": [e[0] for e in entries],
        "token_logprobs": [finite(e[1]) for e in entries],
        "top_logprobs": [e[2] and {k: finite(v) for k, v in e[2].items()} for e in entries],
        "text_offset": offsets,
    }


def chat_logprobs(entries: list[Entry]) -> dict:
    """Chat `logprobs`: one object per generated token with its top alternatives."""

    def item(tok: str, lp: float | None) -> dict:
        return {"token": tok, "logprob": finite(lp), "bytes": list(tok.encode())}

    return {
        "content": [
            {**item(t, lp), "top_logprobs": [item(k, v) for k, v in (top or {}).items()]}
            for t, lp, top in entries
        ]
    }


def sse(obj: dict | str) -> str:
    """One server-sent event: `data: {...}\\n\\n` (or the literal `[DONE]`)."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"
