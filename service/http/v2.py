"""The Open Inference Protocol's REST routes (``/v2``): one route table, handlers behind OIP's error wrapper.

The table (:data:`ROUTES`) is what ``service/app.py`` mounts (:func:`router`)
and what the edge middleware labels requests by (:func:`endpoint_of`, a fixed
set of templates, never the raw path). ``POST .../infer`` is answered by
:meth:`V2Handlers.infer`, which decodes the tensors with :mod:`service.oip` and
hands them to :meth:`ModelServer.infer <service.serving.server.ModelServer.infer>`:
the same pipeline, limits, metrics and prediction log as ``/predict``. The
edge answers every ``/v2`` route through :meth:`V2Handlers.handler` (unless
CORS is on; FastAPI's router takes them then). Every
refusal has OIP's body, ``{"error": "<message naming the input, row and
problem>"}``, with Vigil's ``code`` and ``details`` beside it; values that do
not fit the card are a 400 here (OIP's status for a request it cannot infer)
where ``/predict`` answers 422.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from service import oip
from service.core.errors import InvalidInput, UnsupportedMediaType, VigilError
from service.http.handlers import Handlers, check_content_type, error_wrapper, json_response, read_body
from service.serving.routing import state_of

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY = frozenset({"application/octet-stream"})
INFER = "/v2/models/{name}/infer"
VERSIONED_INFER = "/v2/models/{name}/versions/{version}/infer"


def oip_error(error: VigilError) -> Response:
    """OIP's error body for any :class:`VigilError`: 400 where ``/predict`` says 422, every other status as is."""
    status = 400 if isinstance(error, InvalidInput) else error.status_code
    body = {"error": oip.error_text(error), "code": error.code, "details": error.details}
    return json_response(body, status, error.headers or None)


answers_oip_errors = error_wrapper(oip_error)
"""The error wrapper of the ``/v2`` routes."""


def endpoint_of(path: str) -> str:
    """The bounded ``endpoint`` label of a path: one of the route table's templates, else ``other``."""
    return _match(path)[0]


@functools.lru_cache(maxsize=1024)
def _match(path: str) -> tuple[str, str | None, str | None]:
    """(template, model name, version) of a ``/v2`` path; the template is ``other`` for anything else.

    Each request asks three times (its label, its handler, its model); the few paths a
    deployment is sent stay in the bounded cache, and any other path is only parsed again.
    """
    if path in _FIXED:
        return _FIXED[path], None, None
    parts = path.split("/")
    if len(parts) < 4 or parts[1] != "v2" or parts[2] != "models" or not parts[3]:
        return "other", None, None
    name, rest, version = parts[3], parts[4:], None
    template = "/v2/models/{name}"
    if len(rest) >= 2 and rest[0] == "versions" and rest[1]:
        version, rest = rest[1], rest[2:]
        template += "/versions/{version}"
    if not rest:
        return template, name, version
    if len(rest) == 1 and rest[0] in ("ready", "infer"):
        return f"{template}/{rest[0]}", name, version
    return "other", None, None


_FIXED = {"/v2": "/v2", "/v2/": "/v2", "/v2/health/live": "/v2/health/live", "/v2/health/ready": "/v2/health/ready"}


def _server_version() -> str:
    try:
        return metadata.version("vigil")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0"


class V2Handlers:
    """The ``/v2`` handlers of one worker; prediction shares the worker's :class:`Handlers` limits.

    Usage: ``V2Handlers(handlers)``; ``service/app.py`` builds it beside the
    worker's handlers, and the edge middleware answers ``POST .../infer`` with
    :meth:`infer` directly, like ``/predict``.
    """

    def __init__(self, handlers: Handlers) -> None:
        self.handlers = handlers
        handlers.limit(INFER)
        self.worker = handlers.worker
        self.server = handlers.server
        self.settings = handlers.settings
        self.metadata = {"name": "vigil", "version": _server_version(), "extensions": oip.EXTENSIONS}
        self._handlers = {(route.method, route.endpoint): getattr(self, route.handler) for route in ROUTES}

    def handler(self, method: str | None, path: str) -> Callable[[Request], Awaitable[Response]] | None:
        """The handler of a ``/v2`` request by the route table, or None (unknown path or method).

        The edge answers ``/v2`` with it: BentoML's router does not reach a
        path whose model name holds a line break, and would answer its own
        plain-text 404.
        """
        return self._handlers.get((method, _match(path)[0]))

    @answers_oip_errors
    async def server_metadata(self, request: Request) -> Response:
        """``GET /v2``: the server's name, version and the protocol extensions it supports."""
        return json_response(self.metadata)

    @answers_oip_errors
    async def live(self, request: Request) -> Response:
        """``GET /v2/health/live``: the worker answers."""
        return json_response({"live": True})

    @answers_oip_errors
    async def ready(self, request: Request) -> Response:
        """``GET /v2/health/ready``: what ``/readyz`` answers (models that answer from their fallback are named)."""
        report = self.worker.readiness()
        return json_response(report, 200 if report["ready"] else 503)

    @answers_oip_errors
    async def model_metadata(self, request: Request) -> Response:
        """``GET /v2/models/{name}[/versions/{version}]``: inputs, outputs (class order), the versions served."""
        _, name, version = _match(request.scope["path"])
        entry, served = self.server.pinned(name or "", version)
        versions = [s.card.version for s in (entry.stable, entry.canary) if s is not None]
        return json_response(oip.model_metadata(served.card, versions))

    @answers_oip_errors
    async def model_ready(self, request: Request) -> Response:
        """``GET /v2/models/{name}[/versions/{version}]/ready``: 200 when the version answers from its own model."""
        _, name, version = _match(request.scope["path"])
        entry, served = self.server.pinned(name or "", version)
        state = state_of(served, entry.policy)
        return json_response({"name": entry.name, "version": served.card.version, "ready": state == "serving",
                              "state": state}, 200 if state == "serving" else 503)

    @answers_oip_errors
    def infer(self, request: Request) -> Awaitable[Response]:
        """``POST /v2/models/{name}[/versions/{version}]/infer``: tensors (JSON or binary), answered like /predict
        (and, like :meth:`Handlers.predict`, the limited call itself, awaited by the error wrapper)."""
        return self.handlers.within_limits(INFER, self._infer, request)

    async def _infer(self, request: Request, request_id: str) -> Response:
        name: str | None = None
        try:
            _, name, version = _match(request.scope["path"])
            self.server.pinned(name or "", version)  # 404 for an unknown model or version before the body is read
            check_content_type(request, BINARY)
            encoding = request.headers.get("content-encoding")
            if encoding is not None and encoding.strip().lower() != "identity":
                raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported: send the body as is")
            settings = self.settings
            body = await read_body(request, settings.max_body_bytes)
            decoded = oip.parse_request(body, request.headers.get(HEADER_LENGTH), settings.max_instances)
            served, outcome = await self.server.infer(name or "", version, decoded.key,
                                                      functools.partial(oip.batch_for, decoded), request_id)
        except VigilError as exc:
            if exc.status_code < 500:
                self.server.reject(name, exc.code)
            raise
        card = served.card
        outputs, parts = oip.encode_outputs(card, outcome.predictions, decoded.outputs, decoded.binary_outputs)
        answer = orjson.dumps({"model_name": card.name, "model_version": card.version, "id": decoded.id or request_id,
                               "parameters": oip.instance_parameters(card.version, served.variant, outcome.reasons,
                                                                     request_id),
                               "outputs": outputs})
        if not parts:
            return Response(answer, media_type="application/json", headers={"X-Request-ID": request_id})
        return Response(b"".join([answer, *parts]), media_type="application/octet-stream",
                        headers={HEADER_LENGTH: str(len(answer)), "X-Request-ID": request_id})


# ----------------------------------------------------------------------------------- the route table


@dataclass(frozen=True)
class Route:
    """One ``/v2`` route: method, FastAPI path, the :class:`V2Handlers` method answering it, its documentation."""

    method: str
    path: str
    handler: str
    summary: str
    responses: dict[int | str, dict[str, Any]]
    body: dict[str, Any] | None = None

    @property
    def endpoint(self) -> str:
        """The route's ``endpoint`` label: its path with ``{name}`` and ``{version}``."""
        return self.path.replace("{model_name}", "{name}").replace("{model_version}", "{version}")


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "What is wrong: the input or feature, the row and the problem."},
        "code": {"type": "string"},
        "details": {"type": "array", "items": {"type": "object", "properties": {
            "instance": {"type": "integer", "nullable": True}, "field": {"type": "string", "nullable": True},
            "problem": {"type": "string"}}}},
    },
}
TENSOR_DATA: dict[str, Any] = {"type": "array", "items": {}}
"""Flat or nested row-major values (numbers, strings, booleans, nulls)."""
METADATA_TENSOR: dict[str, Any] = {
    "type": "object", "required": ["name", "datatype", "shape"],
    "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                   "shape": {"type": "array", "items": {"type": "integer"}}, "parameters": {"type": "object"}},
}
INFERENCE_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["inputs"],
    "properties": {
        "id": {"type": "string", "maxLength": oip.MAX_ID},
        "parameters": {"type": "object", "properties": {
            "key": {"type": "string", "maxLength": 256}, "content_type": {"type": "string", "enum": ["np", "pd"]},
            "binary_data_output": {"type": "boolean"}}},
        "inputs": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "shape", "datatype", "data"],
            "properties": {"name": {"type": "string", "minLength": 1},
                           "shape": {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
                           "datatype": {"type": "string", "enum": [*oip.NUMPY_TYPES, "BYTES"]},
                           "parameters": {"type": "object"}, "data": TENSOR_DATA}}},
        "outputs": {"type": "array", "items": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string"}, "parameters": {"type": "object", "properties": {
                "binary_data": {"type": "boolean"}}}}}},
    },
}
INFERENCE_RESPONSE: dict[str, Any] = {
    "type": "object", "required": ["model_name", "outputs"],
    "properties": {
        "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
        "parameters": {"type": "object",
                       "description": "Per instance: versions, variants, reasons (null: the model answered)."},
        "outputs": {"type": "array", "items": {
            "type": "object", "required": ["name", "shape", "datatype"],
            "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                           "shape": {"type": "array", "items": {"type": "integer"}},
                           "parameters": {"type": "object"}, "data": TENSOR_DATA}}},
    },
}
SERVER_METADATA: dict[str, Any] = {
    "type": "object", "required": ["name", "version", "extensions"],
    "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                   "extensions": {"type": "array", "items": {"type": "string"}}},
}
MODEL_METADATA: dict[str, Any] = {
    "type": "object", "required": ["name", "platform"],
    "properties": {"name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
                   "platform": {"type": "string"}, "inputs": {"type": "array", "items": METADATA_TENSOR},
                   "outputs": {"type": "array", "items": METADATA_TENSOR}, "parameters": {"type": "object"}},
}
STATE: dict[str, Any] = {"type": "object"}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    texts = {
        400: "A request that cannot be inferred: malformed JSON, tensors that do not fit the model, binary sizes "
             "that do not match the body, values the model card refuses.",
        404: "No model of that name, or the model does not serve that version.",
        413: "Body over the size limit, or more rows than allowed.",
        415: "The body is neither JSON nor binary tensor data, or it is compressed.",
        429: "The worker is at its concurrency limit; retry after the Retry-After seconds.",
        503: "Not ready, or nothing can answer for the model.",
        504: "The request ran past the request timeout.",
    }
    return {code: _json(ERROR_SCHEMA, texts[code]) for code in codes}


_INFER_RESPONSES = {
    200: {"description": "The outputs; binary tensor data after the JSON header when asked for "
                         "(Inference-Header-Content-Length says where it ends).",
          "content": {"application/json": {"schema": INFERENCE_RESPONSE},
                      "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
    **_errors(400, 404, 413, 415, 429, 503, 504)}
_INFER_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": INFERENCE_REQUEST}}}}
_MODEL = "/v2/models/{model_name}"
_VERSION = "/v2/models/{model_name}/versions/{model_version}"

ROUTES: tuple[Route, ...] = (
    Route("GET", "/v2", "server_metadata", "OIP server metadata", {200: _json(SERVER_METADATA, "Server metadata.")}),
    Route("GET", "/v2/health/live", "live", "OIP server live", {200: _json(STATE, "The worker answers.")}),
    Route("GET", "/v2/health/ready", "ready", "OIP server ready",
          {200: _json(STATE, "Ready."), **_errors(503)}),
    Route("GET", _MODEL, "model_metadata", "OIP model metadata (stable version)",
          {200: _json(MODEL_METADATA, "Inputs, outputs and served versions."), **_errors(404, 503)}),
    Route("GET", _VERSION, "model_metadata", "OIP model metadata of a served version",
          {200: _json(MODEL_METADATA, "Inputs, outputs and served versions."), **_errors(404, 503)}),
    Route("GET", f"{_MODEL}/ready", "model_ready", "OIP model ready (stable version)",
          {200: _json(STATE, "Answers from its own model."), **_errors(404, 503)}),
    Route("GET", f"{_VERSION}/ready", "model_ready", "OIP model ready (a served version)",
          {200: _json(STATE, "Answers from its own model."), **_errors(404, 503)}),
    Route("POST", f"{_MODEL}/infer", "infer", "OIP inference, routed like /predict (stable, canary, fallback)",
          _INFER_RESPONSES, _INFER_BODY),
    Route("POST", f"{_VERSION}/infer", "infer", "OIP inference pinned to a served version",
          _INFER_RESPONSES, _INFER_BODY),
)
"""Every ``/v2`` route, in the order of the protocol's specification."""


def _path_parameters(path: str) -> list[dict[str, Any]]:
    names = [part[1:-1] for part in path.split("/") if part.startswith("{")]
    return [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names]


def router(find: Callable[[], V2Handlers]) -> APIRouter:
    """The ``/v2`` routes as a FastAPI router; ``find`` returns the current worker's :class:`V2Handlers`.

    The handlers read the model and version from the path themselves (the
    edge calls :meth:`V2Handlers.infer` without FastAPI), so the path
    parameters are declared for the OpenAPI document only.
    """
    api = APIRouter(tags=["Open Inference Protocol"])
    for route in ROUTES:
        endpoint = _endpoint(route.handler, find)
        extra: dict[str, Any] = {"parameters": _path_parameters(route.path)} if "{" in route.path else {}
        if route.body is not None:
            extra.update(route.body)
        api.add_api_route(route.path, endpoint, methods=[route.method], summary=route.summary,
                          responses=route.responses, openapi_extra=extra or None,
                          name=f"{route.handler}:{route.path}")
        if route.path == "/v2":  # the specification writes it /v2/
            api.add_api_route("/v2/", endpoint, methods=["GET"], include_in_schema=False)
    return api


def _endpoint(handler: str, find: Callable[[], V2Handlers]) -> Callable[[Request], Any]:
    async def endpoint(request: Request) -> Response:
        return await getattr(find(), handler)(request)

    return endpoint
