"""Every BentoML workaround and private import Vigil relies on, each with its reason.

This is the one module to re-check when BentoML is upgraded (pinned to 1.4 in
``pyproject.toml``). Each function degrades to BentoML's own behaviour when
the private name it reads is not where 1.4 keeps it.
"""

from __future__ import annotations

import asyncio
import gc
import os
from typing import Any, Awaitable, Callable

import orjson

from service.core.errors import RequestTimeout, error_body
from service.core.settings import Settings

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

UNTRACED = ["/predict", "/feedback", "/metrics", "/models", "/livez", "/readyz", "/healthz"]
"""Routes BentoML does not trace unless ``VIGIL_TRACING=true``.

BentoML opens an OpenTelemetry span (and one per ASGI send/receive) for every
request even when no exporter is configured, which costs a large share of a
single-row prediction (``benchmarks/README.md``). The cost to the user is that
these routes produce no spans; Vigil's own metrics and request ids still cover
them. It must be the service's own ``tracing`` section: BentoML copies it over
the top-level ``tracing`` settings, so ``BENTOML_CONFIG_OPTIONS=tracing.excluded_urls``
never reaches the workers.
"""


def service_config(settings: Settings) -> dict[str, Any]:
    """The ``@bentoml.service`` arguments, each chosen for a reason given beside it."""
    return {
        "name": "vigil",
        "workers": settings.workers,
        # BentoML's own timeout stays as the outer safety net just past Vigil's (which answers 504
        # itself). Its middleware keeps a timer per request alive for the whole timeout (see
        # patch_timeout_middleware).
        "traffic": {"timeout": settings.request_timeout_seconds + 1},
        # Per-request access logs cost a log line per prediction; Prometheus counts requests.
        "logging": {"access": {"enabled": False}},
        # BentoML's HTTP metrics label requests with the raw path (unbounded on 404s); the edge
        # middleware exports bounded ones and Vigil serves /metrics itself.
        "metrics": {"enabled": False},
        "tracing": {} if settings.tracing else {"excluded_urls": UNTRACED},
    }


def current_service() -> Any | None:
    """The service instance of this worker, or None before BentoML has built it (start-up)."""
    try:
        import bentoml

        return bentoml.get_current_service()
    except Exception:  # noqa: BLE001 - not instantiated yet: BentoML's own handling applies
        return None


def worker_label() -> str:
    """This worker's bounded label value: BentoML's worker index (private ``server_context``), else ``0``."""
    try:
        from bentoml._internal.context import server_context

        if server_context.worker_index is not None:
            return str(server_context.worker_index)
    except ImportError:  # pragma: no cover - BentoML moved it
        pass
    return os.environ.get("VIGIL_WORKER_INDEX", "0")


def cors_enabled() -> bool:
    """Whether BentoML's CORS middleware is on (private ``BentoMLContainer``): then the edge takes no shortcut."""
    try:
        from bentoml._internal.configuration.containers import BentoMLContainer

        return bool(BentoMLContainer.http.cors.enabled.get())
    except Exception:  # noqa: BLE001 - unknown BentoML layout: keep every request on BentoML's own path
        return True


def patch_timeout_middleware() -> bool:
    """Make BentoML's per-request timeout (private ``TimeoutMiddleware``) cancel its timer when the request ends.

    BentoML 1.4's ``TimeoutMiddleware`` wraps every request in a new task and
    schedules a timer it never cancels: each request's future, context and
    span stay alive for the whole timeout. At a thousand requests a second
    that is hundreds of thousands of live objects, and Python's full garbage
    collections then stop the worker for a large part of the p99
    (``benchmarks/README.md``). The replacement keeps BentoML's behaviour (a
    504 when no response has started within the timeout) with
    ``asyncio.timeout``, which cancels its timer on exit and adds no task.
    Called when a worker starts; returns False (and changes nothing) if
    BentoML's class is not where expected.
    """
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
            body = orjson.dumps(error_body(RequestTimeout(f"not able to answer within {self.timeout} s")))
            await send({"type": "http.response.start", "status": 504,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

    TimeoutMiddleware.__call__ = call  # type: ignore[method-assign]
    TimeoutMiddleware._vigil_patched = True  # type: ignore[attr-defined]
    return True


def freeze_heap() -> None:
    """Move everything alive now out of the cyclic collector's sight (``gc.freeze``).

    Not a BentoML workaround but part of the worker's start-up next to them:
    modules, schemas and sessions live as long as the worker, and full
    collections walking them stopped the worker for tens of milliseconds every
    few seconds under load (``benchmarks/README.md``).
    """
    gc.collect()
    gc.freeze()
