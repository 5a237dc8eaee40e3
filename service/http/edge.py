"""The outer edge of every request: bounded HTTP metrics and a readiness answer that names models.

An ASGI middleware added to the BentoML service, so it sees every path,
including BentoML's own ``/livez`` and ``/readyz``. BentoML's HTTP metrics are
switched off because they label requests with the raw path (every random 404
became a new series); here the ``endpoint`` label takes values from a fixed
set and everything else is ``other``.
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

import orjson
from starlette.requests import Request

from monitoring.metrics import METHOD_CODES, OTHER_METHOD, pack_row
from service.http.bentoml_compat import cors_enabled, current_service
from service.http.v2 import endpoint_of

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ENDPOINTS = frozenset({"/predict", "/feedback", "/models", "/metrics", "/livez", "/healthz", "/readyz",
                       "/admin/reload", "/admin/rollback", "/admin/promote", "/docs.json", "/"})
UNTRACKED = frozenset({"/metrics", "/livez", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
"""Probes and scrapes: answered, but not counted as traffic."""


class EdgeMiddleware:
    """Counts requests by bounded endpoint, answers ``/readyz``, and takes the hot routes the short way.

    BentoML puts a user middleware inside its tracing and timeout layers but
    outside its CORS and context middleware, its router and the mounted app.
    ``POST /predict``, ``/feedback`` and every ``/v2`` route go from here to the
    service's handlers directly: those layers do nothing for them and cost a noticeable share of a
    single-row prediction (``benchmarks/README.md``). With CORS enabled in
    BentoML's config they take the normal way, so CORS headers are never lost.
    """

    def __init__(self, app: ASGIApp, handlers: Any = None, v2: Any = None) -> None:
        """Wrap ``app``; ``handlers`` are the worker's :class:`~service.http.handlers.Handlers` (and ``v2``
        its :class:`~service.http.v2.V2Handlers`), else found through BentoML's current service at the
        first request (BentoML builds its middleware before the service instance exists)."""
        self.app = app
        self._service: Any = None
        self._direct = False
        self._hot: dict[str, Any] = {}
        self._v2: Any = None
        if handlers is not None:
            self._take(handlers, v2)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        service = self._service if self._service is not None else self._find_service()
        if service is None:
            await self.app(scope, receive, send)
            return
        if path == "/readyz" and scope.get("method") in ("GET", "HEAD"):
            await _ready(service, send)
            return
        handler = None
        if self._direct:
            method = scope.get("method")
            if method == "POST":
                handler = self._hot.get(path)
            if handler is None and self._v2 is not None and path.startswith("/v2"):
                handler = self._v2.handler(method, path)
        metrics = service.metrics
        if metrics is None or path in UNTRACKED:
            if handler is not None:
                await _answer_directly(handler, scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        # A known path is its own label; a /v2 path is its route's template; any other path is
        # 'other' and is never a key.
        recorder = metrics.endpoints.get(path) or metrics.endpoint(path if path in ENDPOINTS else endpoint_of(path))
        status = 500
        recorder.active += 1
        started = time.perf_counter()
        try:
            if handler is not None:  # the handler's response says its status: no wrapper around send
                status = await _answer_directly(handler, scope, receive, send)
            else:
                async def recording_send(message: dict[str, Any]) -> None:
                    nonlocal status
                    if message["type"] == "http.response.start":
                        status = message["status"]
                    await send(message)

                await self.app(scope, receive, recording_send)
        finally:
            # Written here, not through a call: see EndpointRecorder (a call costs more than this).
            finished = time.perf_counter()
            recorder.active -= 1
            recorder.done.frombytes(pack_row(METHOD_CODES.get(scope.get("method"), OTHER_METHOD), status,
                                             finished - started))
            if finished >= metrics.flush_due:  # a busy worker flushes on its own loop, no thread wakes it
                metrics.flush()

    def _find_service(self) -> Any:
        service = current_service()
        handlers = getattr(service, "handlers", None)
        if handlers is None:
            return None
        self._take(handlers, getattr(service, "v2", None))
        return handlers

    def _take(self, handlers: Any, v2: Any) -> None:
        self._hot = {"/predict": handlers.predict, "/feedback": handlers.feedback}
        self._v2 = v2
        self._direct = not cors_enabled()
        self._service = handlers


async def _answer_directly(handler: Any, scope: Scope, receive: Receive, send: Send) -> int:
    """Answer a hot route with the service's handler; returns the status sent."""
    response = await handler(Request(scope, receive))
    await response(scope, receive, send)
    return int(response.status_code)


async def _ready(service: Any, send: Send) -> None:
    report = service.readiness()
    body = orjson.dumps(report)
    await send({"type": "http.response.start", "status": 200 if report["ready"] else 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
