"""The HTTP handlers: read the request, call the worker, write the response; errors go through one wrapper.

Every handler is a method of :class:`Handlers` behind :func:`answers_errors`,
which turns any :class:`~service.core.errors.VigilError` into its status and
the one error body. The edge middleware calls :meth:`Handlers.predict` and
:meth:`Handlers.feedback` directly; BentoML's router reaches every handler
through the route table in ``service/app.py``.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import anyio.to_thread
import orjson
from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import Response

from monitoring.metrics import DeferredCounter, exposition
from service.core.errors import (
    BadRequest,
    Forbidden,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
    UnsupportedMediaType,
    VigilError,
    error_body,
)
from service.http.schemas import AdminModelRequest
from service.inputs import parse_envelope, parse_json
from service.serving.worker import Worker

Handler = Callable[[Any, Request], Awaitable[Response]]
Answer = Callable[[Request, str], Awaitable[Response]]
"""What runs within the limits: the request and its request id in, the response out."""


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response serialised with orjson."""
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def error_wrapper(respond: Callable[[VigilError], Response]) -> Callable[[Handler], Handler]:
    """An error wrapper: a :class:`VigilError` raised by the handler is answered with ``respond(error)``.

    :func:`answers_errors` is Vigil's own (``error_body`` with the error's status
    and headers); the ``/v2`` routes write OIP's error body with the same wrapper.
    """

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapped(self: Any, request: Request) -> Response:
            try:
                return await handler(self, request)
            except VigilError as exc:
                return respond(exc)

        return wrapped

    return wrap


def error_response(error: VigilError) -> Response:
    """A :class:`VigilError` as its status, its headers and ``error_body``."""
    return json_response(error_body(error), error.status_code, error.headers or None)


answers_errors = error_wrapper(error_response)
"""The one error wrapper of Vigil's own routes."""


class Handlers:
    """The handlers of one worker; ``metrics`` and ``readiness`` are what the edge middleware reads."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.settings = worker.settings
        self.server = worker.server
        self.metrics = worker.metrics
        self.readiness = worker.readiness
        self._in_flight = 0
        self._next_request_id = worker.next_request_id
        self._refusals: dict[str, tuple[DeferredCounter, DeferredCounter]] = {}
        self.limit("/predict")

    def limit(self, endpoint: str) -> None:
        """Put ``endpoint`` under :meth:`within_limits`, its 429 and 504 counters at 0 from now on (a dashboard
        shows 0 refusals, not "No data"); each prediction route calls it once, when it is built."""
        if self.metrics is not None:
            self._refusals[endpoint] = (self.metrics.counter(self.metrics.overloaded, endpoint),
                                        self.metrics.counter(self.metrics.request_timeouts, endpoint))

    @answers_errors
    def predict(self, request: Request) -> Awaitable[Response]:
        """``POST /predict``: ``{"model", "instances", "key"}`` answered with one prediction per instance.

        Refused at once with 429 when the worker is at its concurrency limit, and
        with 504 past the request timeout; every answer carries the request id.
        A plain function that returns the limited call, not a coroutine of its own:
        the wrapper awaits it, one frame fewer on every request.
        """
        return self.within_limits("/predict", self._predict, request)

    async def within_limits(self, endpoint: str, answer: Answer, request: Request) -> Response:
        """Run ``answer`` with a new request id under the worker's concurrency limit (429) and request timeout
        (504), shared by every prediction route; ``endpoint`` is the bounded label the refusals are counted under.

        Every refusal and error carries the request id in ``X-Request-ID``, as every answer does.
        """
        request_id = self._next_request_id()
        settings = self.settings
        try:
            if self._in_flight >= settings.max_concurrency:
                # Refuse at once, before reading the body: queueing would only add latency to
                # every request while the worker is saturated.
                if self.metrics is not None:
                    self._refusals[endpoint][0].inc()
                raise Overloaded(f"this worker is answering {self._in_flight} requests, its limit; retry shortly")
            self._in_flight += 1
            try:
                # asyncio.timeout() only schedules a timer; wait_for() would also wrap the call in a new task.
                async with asyncio.timeout(settings.request_timeout_seconds):
                    return await answer(request, request_id)
            except TimeoutError:
                if self.metrics is not None:
                    self._refusals[endpoint][1].inc()
                raise RequestTimeout(f"the request took longer than {settings.request_timeout_seconds:g} s") from None
            finally:
                self._in_flight -= 1
        except VigilError as exc:
            exc.headers = {**exc.headers, "X-Request-ID": request_id}
            raise

    async def _predict(self, request: Request, request_id: str) -> Response:
        model: str | None = None
        try:
            check_content_type(request)
            payload = parse_json(await read_body(request, self.settings.max_body_bytes))
            if isinstance(payload, dict) and isinstance(payload.get("model"), str):
                model = payload["model"]
            envelope = parse_envelope(payload, self.settings.max_instances)
            answer = await self.server.predict(envelope, request_id)
        except VigilError as exc:
            if exc.status_code < 500:
                self.server.reject(model, exc.code)
            raise
        return json_response(answer, headers={"X-Request-ID": request_id})

    @answers_errors
    async def feedback(self, request: Request) -> Response:
        """``POST /feedback``: actuals joined to logged predictions; duplicates are acknowledged, not counted."""
        check_content_type(request)
        payload = parse_json(await read_body(request, self.settings.max_body_bytes))
        body = self.worker.feedback.parse(payload)
        cards, comparisons = self.server.feedback_targets()
        # Joining reads prediction-log segments: off the event loop.
        answer = await anyio.to_thread.run_sync(self.worker.feedback.accept, body, cards, comparisons)
        return json_response(answer)

    @answers_errors
    async def models(self, request: Request) -> Response:
        """``GET /models``: every registered model, the versions it serves and their state."""
        return json_response({"models": self.server.describe()})

    @answers_errors
    async def canary(self, request: Request) -> Response:
        """``GET /canary/{model}``: the fleet's decision; ``.../gate`` answers 412 once the canary is rolled back."""
        model = request.path_params["model"]
        gate = model.endswith("/gate")
        status = await anyio.to_thread.run_sync(self.server.canary_status, model.removesuffix("/gate"))
        return json_response(status, 412 if gate and not status["healthy"] else 200)

    @answers_errors
    async def metrics_text(self, request: Request) -> Response:
        """``GET /metrics``: the ``vigil_`` families merged over all workers (Prometheus multiprocess mode)."""
        if self.metrics is not None:
            self.metrics.flush()  # this worker's numbers exact; the others' at most metrics_flush_seconds old
        text, content_type = await anyio.to_thread.run_sync(exposition)
        return Response(text, media_type=content_type)

    @answers_errors
    async def admin_reload(self, request: Request) -> Response:
        """``POST /admin/reload``: apply deploy.yaml now; an invalid file is refused and the current routing keeps serving."""
        check_admin(request, self.settings.admin_token)
        refused = await anyio.to_thread.run_sync(self.worker.control.reload, "admin request")
        if refused is not None:
            raise refused
        return json_response({"reloaded": True, "models": self.server.describe()})

    @answers_errors
    async def admin_rollback(self, request: Request) -> Response:
        """``POST /admin/rollback``: ``{"model"}`` turns the live canary off; ``{"model", "to"}`` serves that version."""
        check_admin(request, self.settings.admin_token)
        body = await self._admin_body(request)
        if body.to is None:
            record = self.worker.turn_canary_off(body.model)
            return json_response({"model": body.model, "rolled_back": record.model_dump(mode="json")})
        await anyio.to_thread.run_sync(self.worker.serve_version, body.model, body.to)
        return json_response({"model": body.model, "stable": body.to})

    @answers_errors
    async def admin_promote(self, request: Request) -> Response:
        """``POST /admin/promote``: the canary becomes the stable version."""
        check_admin(request, self.settings.admin_token)
        body = await self._admin_body(request)
        stable = await anyio.to_thread.run_sync(self.worker.promote_canary, body.model)
        return json_response({"model": body.model, "stable": stable})

    async def _admin_body(self, request: Request) -> AdminModelRequest:
        check_content_type(request)
        payload = parse_json(await read_body(request, self.settings.max_body_bytes))
        try:
            body = AdminModelRequest.model_validate(payload)
        except ValueError as exc:
            raise BadRequest(f"expected {{model, to?}}: {exc}", code="invalid_request") from None
        self.worker.check_model(body.model, body.to)
        return body


async def read_body(request: Request, limit: int) -> bytes:
    """Read the body, refusing it as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_size = int(declared)
        except ValueError:
            raise BadRequest(f"invalid Content-Length header: {declared!r}", code="bad_header") from None
        if declared_size > limit:
            raise PayloadTooLarge(f"request body of {declared_size} bytes is over the {limit}-byte limit", code="body_too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # a chunked body has no Content-Length: stop reading once past the limit
            raise PayloadTooLarge(f"request body is over the {limit}-byte limit", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def check_admin(request: Request, token: SecretStr | None) -> None:
    if token is None or not token.get_secret_value().strip():
        # An empty token would match an empty bearer header: treated as unset, never as open.
        raise Forbidden("admin endpoints are disabled: set VIGIL_ADMIN_TOKEN to enable them")
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise Unauthorized("missing or wrong bearer token")


def check_content_type(request: Request, also: frozenset[str] = frozenset()) -> None:
    """415 unless the body is JSON (or, for routes that take it, one of the media types ``also``)."""
    content_type = request.headers.get("content-type")
    if content_type is None:
        return  # curl-style clients without a header still send JSON; the parser decides
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json") and media not in also:
        accepted = " or ".join(["application/json", *sorted(also)])
        raise UnsupportedMediaType(f"expected Content-Type {accepted}, got '{media or content_type}'")
