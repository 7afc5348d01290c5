"""The Serve deployment: a FastAPI ingress holding one vLLM `AsyncLLM` engine per replica.

One hop per request (Serve proxy -> replica): the replica parses and validates the OpenAI
request, tokenises it (so length errors are 400s that name the field), picks the base model
or a LoRA adapter from the body's `model`, and streams the engine's outputs back as JSON or
SSE. Auth, request counting and latency are a small ASGI middleware in front of the routes
(middleware.py).
Overload is Serve's: `max_ongoing_requests` per replica, then `max_queued_requests` at the
proxy, then 503 with `Retry-After` (`BackpressureConfig`).

Built by `raydapt.serve.build_app`; run with `raydapt serve JOB`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from ray import serve
from ray.serve.config import BackpressureConfig

from raydapt.config import JobConfig, load_job
from raydapt.errors import UserError
from raydapt.models import load_tokenizer
from raydapt.serve import protocol as P
from raydapt.serve.lora import AdapterLoader
from raydapt.serve.middleware import KEY_DIGESTS, REGISTRY, TOKENS, Middleware
from raydapt.serve.spec import ReplicaSpec, build_spec, replica_env

log = logging.getLogger(__name__)

api = FastAPI(title="raydapt", docs_url=None, redoc_url=None)
api.add_middleware(Middleware)


@api.exception_handler(P.APIError)
async def _api_error(_: Request, e: P.APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@api.exception_handler(Exception)
async def _internal(_: Request, e: Exception) -> JSONResponse:
    log.exception("request failed")
    err = P.APIError(500, f"internal error: {type(e).__name__}", type="server_error")
    return JSONResponse(err.body(), status_code=500)


def _entries(
    tok: Any, ids: list[int], lps: Any, k: int | None, first_none: bool, as_ids: bool = False
) -> list[P.Entry]:
    """vLLM per-position {token_id: Logprob} dicts -> (token, logprob, top-k) tuples."""
    if as_ids:
        tok = _IdNames()
    out: list[P.Entry] = []
    for t, tid in enumerate(ids):
        d = lps[t] if lps is not None and t < len(lps) else None
        if d is None or (first_none and t == 0):
            out.append((tok.decode([tid]), None, None))
            continue
        chosen = d.get(tid)
        top = {}
        for cid, lp in d.items():
            if k is None or lp.rank is None or lp.rank <= max(k, 1) or cid == tid:
                top.setdefault(_name(tok, cid, lp), lp.logprob)
        out.append((_name(tok, tid, chosen), chosen.logprob if chosen else None, top))
    return out


def _name(tok: Any, tid: int, lp: Any) -> str:
    if isinstance(tok, _IdNames) or lp is None or lp.decoded_token is None:
        return tok.decode([tid])
    return lp.decoded_token


class _IdNames:
    """Stands in for the tokenizer when tokens are reported as `token_id:<id>`."""

    def decode(self, ids: list[int]) -> str:
        return f"token_id:{ids[0]}"


class OpenAIServer:
    """One replica: engine, tokenizer, adapter loader. `spec` comes from `build_app`.

    Kept importable by name (the Serve ingress wrapper below is not), so Ray pickles it by
    reference and its methods share the replica process's metrics and key digests
    (raydapt.serve.middleware) with the middleware.
    """

    def __init__(self, spec: ReplicaSpec):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        KEY_DIGESTS[:] = spec.key_digests
        self.spec = spec
        self.name = spec.name
        # OPENAI_API_SERVER: the batch defaults (max_num_seqs, batched tokens) of `vllm serve`
        self.engine = AsyncLLM.from_engine_args(
            AsyncEngineArgs(**spec.engine), usage_context=UsageContext.OPENAI_API_SERVER
        )
        self.tok = load_tokenizer(spec.model_dir)
        self.max_len = self.engine.model_config.max_model_len
        self.max_n = spec.max_n
        loader = AdapterLoader(self.engine, spec.adapters)

        @serve.multiplexed(max_num_models_per_replica=max(1, spec.max_loras))
        async def load_adapter(model_id: str) -> Any:
            return await loader.load(model_id)

        self._load_adapter = load_adapter

    async def check_health(self) -> None:
        """Serve's replica health check: a dead engine gets the replica restarted."""
        await self.engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    # ------------------------------------------------------------------ helpers

    def served(self) -> list[str]:
        return [self.name, *sorted(self.spec.adapters)]

    async def _lora(self, model: str) -> Any:
        if model == self.name:
            return None
        if model in self.spec.adapters:
            return await self._load_adapter(model)
        served = self.served()
        raise P.APIError(
            404,
            f"model {model!r} not found; served models: {', '.join(served)}",
            "model",
            code="model_not_found",
            extra={"available_models": served},
        )

    def _encode(self, prompt: str | list[int]) -> tuple[str, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tok(prompt, add_special_tokens=True)["input_ids"]
        bad = [i for i in prompt if not 0 <= i < len(self.tok)]
        if bad:
            raise P.APIError(400, f"token ids out of range: {bad[:5]}", "prompt")
        return self.tok.decode(prompt), list(prompt)

    def _budget(self, n_prompt: int, max_tokens: int | None, param: str) -> int:
        """The generation budget, or a 400 that names the field that is too long."""
        if n_prompt > self.max_len:
            raise P.APIError(
                400,
                f"prompt has {n_prompt} tokens; the context is {self.max_len}",
                param,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            return max(1, self.max_len - n_prompt)
        if n_prompt + max_tokens > self.max_len:
            raise P.APIError(
                400,
                f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds "
                f"the context of {self.max_len} tokens",
                "max_tokens",
                code="context_length_exceeded",
            )
        return max_tokens

    def _params(
        self,
        req: Any,
        max_tokens: int,
        logprobs: int | None,
        prompt_logprobs: int | None,
        stream: bool,
    ) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=req.n,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            max_tokens=max(1, max_tokens),
            stop=req.stop,
            seed=req.seed,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            ignore_eos=req.ignore_eos,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        )

    async def _run(self, ids: list[int], params: Any, lora: Any) -> AsyncIterator[Any]:
        from vllm.exceptions import VLLMValidationError

        try:
            async for out in self.engine.generate(
                {"prompt_token_ids": ids}, params, uuid.uuid4().hex, lora_request=lora
            ):
                yield out
        except (VLLMValidationError, ValueError) as e:
            raise P.APIError(400, str(e), getattr(e, "parameter", None)) from None

    # ------------------------------------------------------------------ routes

    @api.get("/health")
    async def health(self) -> Response:
        try:
            await self.engine.check_health()
        except Exception as e:  # noqa: BLE001 - any engine failure means unhealthy
            return JSONResponse({"status": "unhealthy", "error": type(e).__name__}, status_code=503)
        return JSONResponse({"status": "ok"})

    @api.get("/metrics")
    async def metrics(self) -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/models")
    async def models(self) -> dict:
        cards = [P.ModelCard(id=self.name).model_dump()]
        cards += [
            P.ModelCard(id=a, parent=self.name).model_dump() for a in sorted(self.spec.adapters)
        ]
        return {"object": "list", "data": cards}

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        req = P.parse_request(await request.body(), P.CompletionRequest)
        P.check_sampling(req, self.max_n)
        prompts = [self._encode(p) for p in P.prompts_of(req)]
        lora = await self._lora(req.model)
        budgets = [self._budget(len(ids), req.max_tokens, "max_tokens") for _, ids in prompts]
        score_only = req.max_tokens == 0
        want_prompt_lp = req.echo and req.logprobs is not None
        params = [
            self._params(req, b, req.logprobs, req.logprobs if want_prompt_lp else None, req.stream)
            for b in budgets
        ]
        rid = P.new_id("cmpl")
        if req.stream:
            gen = self._stream_completion(rid, req, prompts, params, lora, score_only)
            return StreamingResponse(gen, media_type="text/event-stream")
        outs = await asyncio.gather(
            *[self._final(ids, sp, lora) for (_, ids), sp in zip(prompts, params, strict=False)]
        )
        choices, n_prompt, n_gen = [], 0, 0
        for i, ((text, ids), out) in enumerate(zip(prompts, outs, strict=False)):
            n_prompt += len(ids)
            for c in out.outputs:
                gen_ids = [] if score_only else list(c.token_ids)
                n_gen += len(gen_ids)
                choices.append(self._choice(i * req.n + c.index, req, text, ids, out, c, gen_ids))
        TOKENS.labels("prompt").inc(n_prompt)
        TOKENS.labels("generated").inc(n_gen)
        return JSONResponse(
            P.response_body("text_completion", rid, req.model, choices, P.usage(n_prompt, n_gen))
        )

    async def _final(self, ids: list[int], params: Any, lora: Any) -> Any:
        last = None
        async for out in self._run(ids, params, lora):
            last = out  # FINAL_ONLY: one output per request
        return last

    def _choice(
        self, index: int, req: Any, text: str, ids: list[int], out: Any, c: Any, gen_ids: list[int]
    ) -> dict:
        body = "" if not gen_ids else c.text
        lp = None
        if req.logprobs is not None:
            as_ids = req.return_tokens_as_token_ids
            entries = (
                _entries(self.tok, ids, out.prompt_logprobs, req.logprobs, True, as_ids)
                if req.echo
                else []
            )
            entries += _entries(self.tok, gen_ids, c.logprobs, req.logprobs, False, as_ids)
            lp = P.completion_logprobs(entries)
        finish = "length" if req.max_tokens == 0 else c.finish_reason
        return {
            "index": index,
            "text": (text if req.echo else "") + body,
            "logprobs": lp,
            "finish_reason": finish,
        }

    async def _stream_completion(
        self, rid: str, req: Any, prompts: list, params: list, lora: Any, score_only: bool
    ) -> AsyncIterator[str]:
        queue: asyncio.Queue = asyncio.Queue()
        n_gen = [0]

        async def pump(i: int, text: str, ids: list[int], sp: Any) -> None:
            seen: set[int] = set()  # choices whose first chunk (echoed prompt) went out
            try:
                async for out in self._run(ids, sp, lora):
                    for c in out.outputs:
                        gen = [] if score_only else list(c.token_ids)
                        n_gen[0] += len(gen)
                        ch = self._choice(i * req.n + c.index, req, text, ids, out, c, gen)
                        if c.index in seen and req.echo:  # echo only in a choice's first chunk
                            ch["text"] = "" if score_only else c.text
                            if ch["logprobs"]:
                                ch["logprobs"] = P.completion_logprobs(
                                    _entries(
                                        self.tok,
                                        gen,
                                        c.logprobs,
                                        req.logprobs,
                                        False,
                                        req.return_tokens_as_token_ids,
                                    )
                                )
                        seen.add(c.index)
                        ch["finish_reason"] = c.finish_reason if c.finished() else None
                        if score_only and c.finished():
                            ch["finish_reason"] = "length"
                        await queue.put(
                            P.response_body("text_completion", rid, req.model, [ch], None)
                        )
            except P.APIError as e:
                await queue.put(e.body())
            finally:
                await queue.put(None)

        tasks = [
            asyncio.create_task(pump(i, t, ids, sp))
            for i, ((t, ids), sp) in enumerate(zip(prompts, params, strict=False))
        ]
        try:
            done = 0
            while done < len(tasks):
                item = await queue.get()
                if item is None:
                    done += 1
                    continue
                yield P.sse(item)
            if req.stream_options and req.stream_options.include_usage:
                use = P.usage(sum(len(ids) for _, ids in prompts), n_gen[0])
                yield P.sse(P.response_body("text_completion", rid, req.model, [], use))
            yield P.sse("[DONE]")
        finally:
            for t in tasks:
                t.cancel()

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        req = P.parse_request(await request.body(), P.ChatCompletionRequest)
        P.check_sampling(req, self.max_n)
        msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - a template error is the request's fault
            raise P.APIError(400, f"chat template failed: {e}", "messages") from None
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        lora = await self._lora(req.model)
        budget = self._budget(len(ids), req.max_completion_tokens or req.max_tokens, "messages")
        k = (req.top_logprobs or 0) if req.logprobs else None
        sp = self._params(req, budget, k, None, req.stream)
        rid = P.new_id("chatcmpl")
        if req.stream:
            return StreamingResponse(
                self._stream_chat(rid, req, ids, sp, lora, k), media_type="text/event-stream"
            )
        out = await self._final(ids, sp, lora)
        choices = []
        for c in out.outputs:
            lp = (
                P.chat_logprobs(_entries(self.tok, list(c.token_ids), c.logprobs, k, False))
                if k is not None
                else None
            )
            choices.append(
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": lp,
                    "finish_reason": c.finish_reason,
                }
            )
        n_gen = sum(len(c.token_ids) for c in out.outputs)
        TOKENS.labels("prompt").inc(len(ids))
        TOKENS.labels("generated").inc(n_gen)
        return JSONResponse(
            P.response_body("chat.completion", rid, req.model, choices, P.usage(len(ids), n_gen))
        )

    async def _stream_chat(
        self, rid: str, req: Any, ids: list[int], sp: Any, lora: Any, k: int | None
    ) -> AsyncIterator[str]:
        for i in range(req.n):
            yield P.sse(P.chat_chunk(rid, req.model, i, {"role": "assistant", "content": ""}, None))
        n_gen = 0
        try:
            async for out in self._run(ids, sp, lora):
                for c in out.outputs:
                    n_gen += len(c.token_ids)
                    lp = (
                        P.chat_logprobs(_entries(self.tok, list(c.token_ids), c.logprobs, k, False))
                        if k is not None
                        else None
                    )
                    finish = c.finish_reason if c.finished() else None
                    yield P.sse(
                        P.chat_chunk(rid, req.model, c.index, {"content": c.text}, finish, lp)
                    )
        except P.APIError as e:
            yield P.sse(e.body())
        if req.stream_options and req.stream_options.include_usage:
            body = P.chat_chunk(rid, req.model, 0, {}, None)
            body["choices"], body["usage"] = [], P.usage(len(ids), n_gen)
            yield P.sse(body)
        yield P.sse("[DONE]")


Server = serve.ingress(api)(OpenAIServer)


def build_app(cfg: JobConfig, spec: ReplicaSpec) -> Any:
    """The Serve application (bound deployment) of a checked replica spec."""
    s = cfg.serve
    deployment = serve.deployment(Server).options(
        name="OpenAIServer",
        autoscaling_config={
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "initial_replicas": s.min_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
        },
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=s.retry_after_s),
        ray_actor_options={
            "num_cpus": s.cpus_per_replica,
            "num_gpus": s.gpus_per_replica,
            "runtime_env": {"env_vars": replica_env(cfg)},
        },
        health_check_period_s=10,
        health_check_timeout_s=60,
        graceful_shutdown_timeout_s=5,
        # the proxy already logs method, path, status and latency of every request; a second
        # line per request from the replica costs CPU that generation needs on small machines
        logging_config={"enable_access_log": False},
    )
    return deployment.bind(spec)


def build_from_env(args: dict[str, str] | None = None) -> Any:
    """Serve application builder for `serveConfigV2` (KubeRay RayService, `serve deploy`).

    The model folder comes from `args["model"]` or the RAYDAPT_SERVE_MODEL env var; other
    `serve.*` settings come from `args` as `key: value` pairs, e.g. `{"max_replicas": "4"}`.
    """
    args = dict(args or {})
    model = args.pop("model", None) or os.environ.get("RAYDAPT_SERVE_MODEL")
    if not model:
        raise UserError(
            "build_from_env: set RAYDAPT_SERVE_MODEL (or the application arg "
            "`model`) to the HF model folder to serve"
        )
    cfg = load_job(None, [f"serve.{k}={v}" for k, v in args.items()])
    return build_app(cfg, build_spec(cfg, model))
