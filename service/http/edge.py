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

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ENDPOINTS = frozenset({"/predict", "/feedback", "/models", "/metrics", "/livez", "/healthz", "/readyz",
                       "/admin/reload", "/admin/rollback", "/admin/promote", "/docs.json", "/"})
UNTRACKED = frozenset({"/metrics", "/livez", "/healthz", "/readyz"})
"""Probes and scrapes: answered, but not counted as traffic."""


HOT_ROUTES = frozenset({"/predict", "/feedback"})
"""POST routes the edge hands straight to the service's handlers."""


class EdgeMiddleware:
    """Counts requests by bounded endpoint, answers ``/readyz``, and takes the hot routes the short way.

    BentoML puts a user middleware inside its tracing and timeout layers but
    outside its CORS and context middleware, its router and the mounted app.
    ``POST /predict`` and ``/feedback`` go from here to the service's handlers
    directly: those layers did nothing for them and cost about a tenth of a
    single-row prediction (``benchmarks/``). With CORS enabled in BentoML's
    config they take the normal way, so CORS headers are never lost.
    """

    def __init__(self, app: ASGIApp, service: Any = None) -> None:
        """Wrap ``app``; ``service`` is the Vigil service, else found through BentoML at the first request."""
        self.app = app
        self._service: Any = service
        self._direct = service is not None and not _cors_enabled()

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
        direct = self._direct and path in HOT_ROUTES and scope.get("method") == "POST"
        metrics = service.metrics
        if metrics is None or path in UNTRACKED:
            if direct:
                await _answer_directly(service, path, scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        # A known path is its own label; any other path is 'other' and is never a key.
        recorder = metrics.endpoints.get(path) or metrics.endpoint(path if path in ENDPOINTS else "other")
        status = 500
        recorder.active += 1
        started = time.perf_counter()
        try:
            if direct:  # the handler's response says its status: no wrapper around send
                status = await _answer_directly(service, path, scope, receive, send)
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
        try:
            import bentoml

            service = bentoml.get_current_service()
        except Exception:  # noqa: BLE001 - not instantiated yet (start-up): BentoML's own handling applies
            return None
        self._service = service
        self._direct = not _cors_enabled()
        return service


async def _answer_directly(service: Any, path: str, scope: Scope, receive: Receive, send: Send) -> int:
    """Answer a hot route with the service's handler; returns the status sent."""
    handler = service.handle_predict if path == "/predict" else service.handle_feedback
    response = await handler(Request(scope, receive))
    await response(scope, receive, send)
    return int(response.status_code)


def _cors_enabled() -> bool:
    try:
        from bentoml._internal.configuration.containers import BentoMLContainer

        return bool(BentoMLContainer.http.cors.enabled.get())
    except Exception:  # noqa: BLE001 - unknown BentoML layout: keep every request on BentoML's own path
        return True


async def _ready(service: Any, send: Send) -> None:
    report = service.readiness()
    body = orjson.dumps(report)
    await send({"type": "http.response.start", "status": 200 if report["ready"] else 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def patch_bentoml_timeout() -> bool:
    """Make BentoML's per-request timeout cancel its timer when the request ends.

    BentoML 1.4's ``TimeoutMiddleware`` wraps every request in a new task and
    schedules a timer it never cancels: each request's future, context and
    span stay alive for the whole timeout. At a thousand requests a second
    that is hundreds of thousands of live objects, and Python's full garbage
    collections then stop the worker for 100-250 ms every second or two (the
    p99 floor measured in ``benchmarks/``). The replacement keeps BentoML's
    behaviour (a 504 when no response has started within the timeout) with
    ``asyncio.timeout``, which cancels its timer on exit and adds no task.
    Returns False (and changes nothing) if BentoML's class is not where expected.
    """
    import asyncio

    try:
        from bentoml._internal.server.http.traffic import TimeoutMiddleware
    except ImportError:
        return False
    if getattr(TimeoutMiddleware, "_vigil_patched", False):
        return True

    async def call(self: Any, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        started = False
        try:
            async with asyncio.timeout(self.timeout) as deadline:

                async def first_send_stops_the_clock(message: dict[str, Any]) -> None:
                    nonlocal started
                    if not started:
                        started = True
                        deadline.reschedule(None)  # like BentoML: only the start of the answer is timed
                    await send(message)

                await self.app(scope, receive, first_send_stops_the_clock)
        except TimeoutError:
            if started:
                raise
            body = orjson.dumps({"error": {"code": "timeout", "details": [],
                                           "message": f"not able to answer within {self.timeout} s"}})
            await send({"type": "http.response.start", "status": 504,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

    TimeoutMiddleware.__call__ = call  # type: ignore[method-assign]
    TimeoutMiddleware._vigil_patched = True  # type: ignore[attr-defined]
    return True
