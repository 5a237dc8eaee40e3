"""The BentoML service: HTTP in and out, nothing else.

Routes belong to a FastAPI app mounted into the BentoML service with
``@bentoml.asgi_app``, so BentoML's OpenAPI document (``/docs.json``) lists
them. The hot routes (``/predict``, ``/feedback``) are additionally served by
plain Starlette routes placed first (see the end of this module): measured in
``benchmarks/``, an ``@bentoml.api`` endpoint or a FastAPI route costs more per
request than Vigil's whole prediction path, and the request path here does its
own, stricter validation anyway. BentoML still provides the server, the
workers, ``/livez`` and ``/readyz``; Vigil serves ``/metrics`` itself.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import itertools
import logging
import os
import secrets
from typing import Any

import anyio.to_thread
import bentoml
import orjson
from fastapi import FastAPI, Request
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from monitoring.metrics import ProcessSampler, VigilMetrics, exposition, live_worker_pids
from monitoring.predlog import PredictionLog
from service.core.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
    UnsupportedMediaType,
    VigilError,
    error_body,
)
from service.core.settings import Settings
from service.feedback import FEEDBACK_BODY, FeedbackService
from service.http.edge import EdgeMiddleware, patch_bentoml_timeout
from service.inputs import PredictRequest, parse_envelope, parse_json
from service.serving.control import ControlLoop
from service.serving.deploy import (
    DeployConfig,
    DeployConfigError,
    clear_rollback,
    edit_deploy,
    load_deploy,
    promote,
    rollback_to,
)
from service.serving.server import ModelServer, worker_label

log = logging.getLogger("vigil.app")
SETTINGS = Settings()

http = FastAPI(title="Vigil", description="Predictions from registered ONNX models, monitored.")


class ErrorDetail(BaseModel):
    """One problem in a request."""

    instance: int | None = None
    field: str | None = None
    problem: str


class ErrorInfo(BaseModel):
    code: str
    message: str
    details: list[ErrorDetail] = []


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body has this shape."""

    error: ErrorInfo


class Prediction(BaseModel):
    """One instance's answer: ``label`` and ``probabilities`` (classification) or ``value`` (regression)."""

    version: str
    variant: str
    label: int | str | None = None
    probabilities: dict[str, float] | None = None
    value: float | None = None


class AdminModelRequest(BaseModel):
    """Body of ``/admin/rollback`` and ``/admin/promote``."""

    model_config = {"extra": "forbid"}
    model: str = Field(min_length=1, max_length=64)
    to: str | None = Field(None, min_length=1, max_length=64)
    """Rollback only: serve this version as stable (and drop the canary) instead of just turning the canary off."""


class PredictResponse(BaseModel):
    request_id: str
    model: str
    predictions: list[Prediction]


def _openapi_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema as OpenAPI 3.0 (what BentoML publishes) accepts it.

    ``$defs`` are inlined (FastAPI does not hoist them from ``openapi_extra``),
    ``anyOf [X, null]`` becomes ``X`` with ``nullable``, and numeric
    ``exclusiveMinimum``/``exclusiveMaximum`` become the 3.0 boolean form.
    """
    defs = schema.get("$defs", {})

    def convert(node: Any) -> Any:
        if isinstance(node, list):
            return [convert(v) for v in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return convert(defs[ref.removeprefix("#/$defs/")])
        out = {k: convert(v) for k, v in node.items() if k != "$defs"}
        options = out.get("anyOf")
        if isinstance(options, list) and {"type": "null"} in options:
            rest = [o for o in options if o != {"type": "null"}]
            out.pop("anyOf")
            out.update(rest[0] if len(rest) == 1 else {"anyOf": rest})
            out["nullable"] = True
        for key, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if isinstance(out.get(key), (int, float)) and not isinstance(out.get(key), bool):
                out[bound] = out.pop(key)
                out[key] = True
        return out

    return convert(schema)


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Malformed JSON or a body that is not {model, instances, key}.",
        404: "No model of that name.",
        413: "Body over the size limit, or more instances than allowed.",
        415: "The body is not JSON.",
        422: "Instances that do not match the model's input schema; details name the instance and field.",
        401: "Admin endpoints: missing or wrong bearer token.",
        403: "Admin endpoints: disabled because VIGIL_ADMIN_TOKEN is not set.",
        409: "Admin endpoints: the action does not apply (e.g. no canary to promote or roll back).",
        429: "The worker is at its concurrency limit; retry after the Retry-After seconds.",
        503: "The model is registered but nothing can answer for it.",
        504: "The request ran past the request timeout.",
    }.items()
}


_ADMIN_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _openapi_schema(AdminModelRequest.model_json_schema())}}}}


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
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


def _check_admin(request: Request, token: Any) -> None:
    if token is None:
        raise Forbidden("admin endpoints are disabled: set VIGIL_ADMIN_TOKEN to enable them")
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise Unauthorized("missing or wrong bearer token")


async def _admin_body(request: Request, limit: int, server: ModelServer) -> AdminModelRequest:
    _check_content_type(request)
    payload = parse_json(await _read_body(request, limit))
    try:
        body = AdminModelRequest.model_validate(payload)
    except ValueError as exc:
        raise BadRequest(f"expected {{model, to?}}: {exc}", code="invalid_request") from None
    if body.model not in server.models:
        raise ModelNotFound(f"no model named '{body.model}'")
    if body.to is not None and body.to not in server.registry.versions(body.model):
        raise ModelNotFound(f"model '{body.model}' has no version '{body.to}'")
    return body


def _check_content_type(request: Request) -> None:
    content_type = request.headers.get("content-type")
    if content_type is None:
        return  # curl-style clients without a header still send JSON; the parser decides
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(f"expected Content-Type application/json, got '{media or content_type}'")


# The hot routes are served by a bare Starlette app mounted ahead of the FastAPI one: measured here,
# FastAPI's per-request dependency machinery (it injects ``self``) and its app-level middleware cost
# more than everything Vigil does for a single-row prediction. The FastAPI routes stay for the
# OpenAPI document that BentoML publishes at /docs.json; requests never reach them.
async def _predict_route(request: Request) -> Response:
    return await bentoml.get_current_service().handle_predict(request)


async def _feedback_route(request: Request) -> Response:
    return await bentoml.get_current_service().handle_feedback(request)


_HOT = Starlette(routes=[Route("/predict", _predict_route, methods=["POST"]),
                        Route("/feedback", _feedback_route, methods=["POST"])])
"""The hot routes as a bare Starlette app: FastAPI's own app-level middleware stays out of their way too."""

__all__ = ["Vigil", "http"]

UNTRACED = ["/predict", "/feedback", "/metrics", "/models", "/livez", "/readyz", "/healthz"]
"""Routes BentoML does not trace unless ``VIGIL_TRACING=true``.

BentoML opens an OpenTelemetry span (and one per ASGI send/receive) for every
request even when no exporter is configured: measured in ``benchmarks/``, about
a sixth of a single-row prediction's CPU. The cost to the user is that these
routes produce no spans; Vigil's own metrics and request ids still cover them.
It must be the service's own ``tracing`` section: BentoML copies it over the
top-level ``tracing`` settings, so ``BENTOML_CONFIG_OPTIONS=tracing.excluded_urls``
never reaches the workers.
"""


@bentoml.service(
    name="vigil",
    workers=SETTINGS.workers,
    # BentoML's own timeout stays as the outer safety net just past Vigil's (which answers 504
    # itself). Its middleware keeps a timer per request alive for the whole timeout, so a
    # long one holds memory in proportion to request rate times timeout.
    traffic={"timeout": SETTINGS.request_timeout_seconds + 1},
    # Per-request access logs cost a log line per prediction; Prometheus counts requests.
    logging={"access": {"enabled": False}},
    # BentoML's HTTP metrics label requests with the raw path (unbounded on 404s); the edge
    # middleware exports bounded ones and Vigil serves /metrics itself.
    metrics={"enabled": False},
    tracing={} if SETTINGS.tracing else {"excluded_urls": UNTRACED},
)
@bentoml.asgi_app(http, path="/")
@bentoml.asgi_app(_HOT, path="/")
class Vigil:
    """Serves every registered model's stable version and records its metrics."""

    def __init__(self) -> None:
        self.settings = SETTINGS
        self._in_flight = 0
        # Request ids: a random per-worker prefix and a counter. uuid4() asks the kernel for
        # randomness on every request, which costs more here than the id is worth.
        self._id_prefix = secrets.token_hex(8)
        self._ids = itertools.count()
        settings = self.settings
        self.metrics = VigilMetrics(flush_seconds=settings.metrics_flush_seconds) if settings.metrics_enabled else None
        self.predlog = PredictionLog(
            settings.data_dir, worker_label(), self.metrics, flush_interval=settings.predlog_flush_seconds,
            max_buffer_rows=settings.predlog_buffer_rows, pii_salt=settings.pii_salt,
            sample_rate=settings.predlog_sample_rate,
        ) if settings.predlog_enabled else None
        try:
            deploy = load_deploy(settings.deploy)
        except DeployConfigError as exc:
            # Refusing to start would crash-loop the workers; serve every model's newest
            # version with default policies and say so loudly.
            log.error("deploy config refused, serving defaults: %s", exc.message)
            deploy = DeployConfig()
        self.server = ModelServer(settings, self.metrics, self.predlog, deploy)
        self.server.load_all()
        self.feedback_service = FeedbackService(settings.data_dir, self.metrics)
        self.control = ControlLoop(self.server, settings.control_interval_seconds)
        self.control.start()
        if self.predlog is not None:
            self.predlog.start()
        self.sampler = (ProcessSampler(self.metrics, worker_label(), settings.process_sample_seconds)
                        if self.metrics is not None else None)
        if self.sampler is not None:
            self.sampler.start()
        if self.metrics is not None:
            self.metrics.start_flushing()
        # Everything alive now (modules, schemas, sessions) lives as long as the worker. Moving it
        # out of the collector's sight keeps full collections from walking ~180k objects: each
        # took ~95 ms every few seconds under load, the largest part of the p99 (benchmarks/).
        gc.collect()
        gc.freeze()

    def __is_ready__(self) -> bool:
        """Ready once every model that can load has loaded (loading happens in ``__init__``)."""
        return True

    def readiness(self) -> dict[str, Any]:
        """What ``/readyz`` answers: ready, every model that does not serve from its own model, and the workers.

        A dead worker makes the service not ready: outside a container BentoML
        replaces it within seconds, inside one (``BENTOML_CONTAINERIZED``) it does
        not, and the orchestrator must see that instead of a silently smaller server.
        """
        report: dict[str, Any] = {"ready": self.__is_ready__(), "not_ready": self.server.not_ready(),
                                  "models": {m["name"]: m["state"] for m in self.server.describe()}}
        multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if multiproc_dir and self.metrics is not None:
            alive = len(live_worker_pids(multiproc_dir))
            report["workers"] = {"expected": self.settings.workers, "alive": alive}
            if alive < self.settings.workers:
                report["ready"] = False
        return report

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        """Stop sampling and write every buffered prediction log row before the worker exits."""
        self.control.stop()
        if self.sampler is not None:
            self.sampler.stop()
        if self.metrics is not None:
            self.metrics.stop_flushing()
        if self.predlog is not None:
            self.predlog.close()
        self.server.close()

    @http.post(
        "/predict",
        summary="Predict with a registered model",
        response_model=PredictResponse,
        responses=_ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _openapi_schema(PredictRequest.model_json_schema())}},
            }
        },
    )
    async def predict(self, request: Request) -> Response:
        """Answer ``{"model", "instances", "key"}`` with one prediction per instance."""
        return await self.handle_predict(request)

    async def handle_predict(self, request: Request) -> Response:
        """The ``/predict`` handler proper (also reached without FastAPI, see the end of this module)."""
        request_id = f"{self._id_prefix}{next(self._ids):016x}"
        if self._in_flight >= self.settings.max_concurrency:
            # Refuse at once, before reading the body: queueing would only add latency to
            # every request while the worker is saturated.
            if self.metrics is not None:
                self.metrics.counter(self.metrics.overloaded, "/predict").inc()
            busy = Overloaded(f"this worker is answering {self._in_flight} requests, its limit; retry shortly")
            return _json(error_body(busy), busy.status_code, {"Retry-After": "1", "X-Request-ID": request_id})
        self._in_flight += 1
        try:
            # asyncio.timeout() only schedules a timer; wait_for() would also wrap the call in a new task.
            async with asyncio.timeout(self.settings.request_timeout_seconds):
                return await self._predict(request, request_id)
        except TimeoutError:
            if self.metrics is not None:
                self.metrics.counter(self.metrics.request_timeouts, "/predict").inc()
            late = RequestTimeout(f"the request took longer than {self.settings.request_timeout_seconds:g} s")
            return _json(error_body(late), late.status_code, {"X-Request-ID": request_id})
        finally:
            self._in_flight -= 1

    async def _predict(self, request: Request, request_id: str) -> Response:
        model: str | None = None
        try:
            _check_content_type(request)
            body = await _read_body(request, self.settings.max_body_bytes)
            payload = parse_json(body)
            if isinstance(payload, dict) and isinstance(payload.get("model"), str):
                model = payload["model"]
            envelope = parse_envelope(payload, self.settings.max_instances)
            answer = await self.server.predict(envelope, request_id)
        except VigilError as exc:
            if exc.status_code < 500:
                self.server.reject(model, exc.code)
            return _json(error_body(exc), exc.status_code, {"X-Request-ID": request_id})
        return _json(answer, headers={"X-Request-ID": request_id})

    @http.post("/admin/reload", summary="Re-read deploy.yaml now (bearer token)", responses=_ERRORS)
    async def admin_reload(self, request: Request) -> Response:
        """Apply deploy.yaml now; an invalid file is refused and the current routing keeps serving."""
        try:
            _check_admin(request, self.settings.admin_token)
            refused = await anyio.to_thread.run_sync(self.control.reload, "admin request")
            if refused is not None:
                raise refused
        except VigilError as exc:
            return _json(error_body(exc), exc.status_code)
        return _json({"reloaded": True, "models": self.server.describe()})

    @http.post("/admin/rollback", summary="Turn a canary off, or serve a given version (bearer token)",
               responses=_ERRORS, openapi_extra=_ADMIN_BODY)
    async def admin_rollback(self, request: Request) -> Response:
        """``{"model"}`` turns the live canary off (recorded, survives restarts); ``{"model", "to"}`` edits deploy.yaml."""
        try:
            _check_admin(request, self.settings.admin_token)
            body = await _admin_body(request, self.settings.max_body_bytes, self.server)
            if body.to is None:
                record = self.server.rollback(body.model, "manual")
                return _json({"model": body.model, "rolled_back": record.model_dump(mode="json")})
            versions = {name: self.server.registry.versions(name) for name in self.server.registry.names()}
            await anyio.to_thread.run_sync(lambda: edit_deploy(
                self.settings.deploy, lambda doc: rollback_to(doc, body.model, body.to or ""), versions))
            await anyio.to_thread.run_sync(self.server.reload)
        except VigilError as exc:
            return _json(error_body(exc), exc.status_code)
        return _json({"model": body.model, "stable": body.to})

    @http.post("/admin/promote", summary="Make the canary the stable version (bearer token)", responses=_ERRORS,
               openapi_extra=_ADMIN_BODY)
    async def admin_promote(self, request: Request) -> Response:
        """Edit deploy.yaml so the canary becomes stable, then reload."""
        try:
            _check_admin(request, self.settings.admin_token)
            body = await _admin_body(request, self.settings.max_body_bytes, self.server)
            promoted: list[str] = []

            def change(doc: Any) -> None:
                promoted.append(promote(doc, body.model))

            try:
                await anyio.to_thread.run_sync(lambda: edit_deploy(self.settings.deploy, change))
            except DeployConfigError as exc:
                raise Conflict(exc.message) from None
            clear_rollback(self.settings.data_dir, body.model)
            await anyio.to_thread.run_sync(self.server.reload)
        except VigilError as exc:
            return _json(error_body(exc), exc.status_code)
        return _json({"model": body.model, "stable": promoted[0]})

    @http.post(
        "/feedback",
        summary="Ground truth for served predictions",
        responses=_ERRORS,
        openapi_extra={"requestBody": {"required": True,
                                       "content": {"application/json": {"schema": _openapi_schema(FEEDBACK_BODY.json_schema())}}}},
    )
    async def feedback(self, request: Request) -> Response:
        """Join actuals to logged predictions by request id and index; duplicates are acknowledged, not counted."""
        return await self.handle_feedback(request)

    async def handle_feedback(self, request: Request) -> Response:
        """The ``/feedback`` handler proper (also reached without FastAPI, see the end of this module)."""
        try:
            _check_content_type(request)
            payload = parse_json(await _read_body(request, self.settings.max_body_bytes))
            body = self.feedback_service.parse(payload)
            cards, comparisons = self.server.feedback_targets()
            # Joining reads prediction-log segments: off the event loop.
            answer = await anyio.to_thread.run_sync(self.feedback_service.accept, body, cards, comparisons)
        except VigilError as exc:
            return _json(error_body(exc), exc.status_code)
        return _json(answer)

    @http.get("/metrics", summary="Prometheus metrics of every worker",
              responses={200: {"description": "Prometheus text exposition format",
                               "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics_endpoint(self) -> Response:
        """The ``vigil_`` families, merged over all workers (Prometheus multiprocess mode)."""
        if self.metrics is not None:
            self.metrics.flush()  # this worker's numbers exact; the others' at most metrics_flush_seconds old
        text, content_type = await anyio.to_thread.run_sync(exposition)
        return Response(text, media_type=content_type)

    @http.get("/models", summary="Registered models and the versions they serve")
    async def models(self) -> Response:
        """Every registered model: version, task, features, sha256, load time, or why it is not ready."""
        return _json({"models": self.server.describe()})


Vigil.add_asgi_middleware(EdgeMiddleware)
patch_bentoml_timeout()
