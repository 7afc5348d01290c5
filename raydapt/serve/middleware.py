"""Auth, request counts and latency: a pure ASGI middleware in front of the replica's routes.

One metrics registry per replica process; `KEY_DIGESTS` is filled in place by the replica's
constructor (raydapt.serve.app.OpenAIServer) from its spec, so the middleware and the routes
of one replica read the same digests.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Histogram

from raydapt.serve import protocol as P
from raydapt.serve.auth import authorized

REGISTRY = CollectorRegistry()  # one per replica process
REQUESTS = Counter(
    "raydapt_requests",
    "HTTP requests by route and status code",
    ["route", "status"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "raydapt_request_latency_seconds",
    "Time to the end of the response body",
    ["route"],
    registry=REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TOKENS = Counter("raydapt_tokens", "Prompt and generated tokens", ["kind"], registry=REGISTRY)
KEY_DIGESTS: list[str] = []  # filled in place by the replica's __init__
_OPEN_ROUTES = ("/health",)
_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class Middleware:
    """Pure ASGI: 401 without a valid key, then count status and time the whole body."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, t0, status = scope["path"], time.perf_counter(), [500]
        # a fixed label set: unknown paths must not grow the metrics without bound
        route = path if path in _ROUTES else "other"
        if path not in _OPEN_ROUTES:
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not authorized(auth, KEY_DIGESTS):
                err = P.APIError(
                    401,
                    "missing or invalid API key: send `Authorization: Bearer <key>`",
                    type="authentication_error",
                )
                resp = JSONResponse(err.body(), status_code=401)
                REQUESTS.labels(route, "401").inc()
                return await resp(scope, receive, send)

        async def send_and_record(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            REQUESTS.labels(route, str(status[0])).inc()
            LATENCY.labels(route).observe(time.perf_counter() - t0)
