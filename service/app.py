"""The BentoML service: the worker's lifecycle hooks and the route table, nothing else.

Routes belong to a FastAPI app mounted into the BentoML service with
``@bentoml.asgi_app``, so BentoML's OpenAPI document (``/docs.json``) lists
them; each one calls a method of :class:`~service.http.handlers.Handlers`. The
edge middleware (:mod:`service.http.edge`) answers ``POST /predict`` and
``/feedback`` with the same handlers before BentoML's router, unless CORS is
enabled in BentoML's config. The Open Inference Protocol's ``/v2`` routes come
from their own route table (:mod:`service.http.v2`), answered by the worker's
:class:`~service.http.v2.V2Handlers`; the edge answers ``POST .../infer``
directly too. BentoML provides the server, the workers and ``/livez``; the
edge answers ``/readyz``.
"""

from __future__ import annotations

import bentoml
from fastapi import FastAPI, Request
from starlette.responses import Response

from service.core.settings import Settings
from service.http.bentoml_compat import (
    current_service,
    freeze_heap,
    patch_timeout_middleware,
    service_config,
    worker_label,
)
from service.http.edge import EdgeMiddleware
from service.http.handlers import Handlers
from service.http.schemas import (
    ADMIN_BODY,
    ERRORS,
    FEEDBACK_REQUEST_BODY,
    METRICS_RESPONSES,
    PREDICT_BODY,
    PredictResponse,
)
from service.http.v2 import V2Handlers, router
from service.serving.worker import Worker

__all__ = ["Vigil", "http"]

SETTINGS = Settings()
"""Read once per process: ``@bentoml.service`` needs the worker count before any worker starts."""

http = FastAPI(title="Vigil", description="Predictions from registered ONNX models, monitored.")
http.include_router(router(lambda: current_service().v2))


@bentoml.service(**service_config(SETTINGS))
@bentoml.asgi_app(http, path="/")
class Vigil:
    """Serves every registered model's stable (and canary) version and records its metrics."""

    def __init__(self) -> None:
        patch_timeout_middleware()
        self.worker = Worker(SETTINGS, worker_label())
        self.worker.start()
        self.handlers = Handlers(self.worker)
        self.v2 = V2Handlers(self.handlers)
        freeze_heap()

    def __is_ready__(self) -> bool:
        """Ready once the models are loaded and the worker's background parts run."""
        return self.worker.is_ready()

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        """Stop every background part; buffered prediction log rows are written before the worker exits."""
        self.worker.stop()

    @http.post("/predict", summary="Predict with a registered model", response_model=PredictResponse,
               responses=ERRORS, openapi_extra=PREDICT_BODY)
    async def predict(self, request: Request) -> Response:
        """Answer ``{"model", "instances", "key"}`` with one prediction per instance."""
        return await self.handlers.predict(request)

    @http.post("/feedback", summary="Ground truth for served predictions", responses=ERRORS,
               openapi_extra=FEEDBACK_REQUEST_BODY)
    async def feedback(self, request: Request) -> Response:
        """Join actuals to logged predictions by request id and index; duplicates are acknowledged, not counted."""
        return await self.handlers.feedback(request)

    @http.get("/models", summary="Registered models and the versions they serve")
    async def models(self, request: Request) -> Response:
        """Every registered model: version, task, features, sha256, load time, or why it is not ready."""
        return await self.handlers.models(request)

    # Left out of the OpenAPI document: a name with a newline never reaches a ``:path`` route, and
    # Starlette answers it with a plain-text 404 the document cannot describe. The README documents it.
    @http.api_route("/canary/{model:path}", methods=["GET", "POST"], responses=ERRORS, include_in_schema=False,
                    summary="The fleet's decision on a model's canary; .../gate for Flagger (412 once rolled back)")
    async def canary(self, request: Request, model: str) -> Response:
        """``/canary/{model}``: ``phase`` (none, progressing, rolled_back, promoted), ``healthy``, the pooled figures.

        ``/canary/{model}/gate`` answers the same with 200 while healthy and 412 once rolled back: Flagger's
        webhooks pass on any 2xx. One path route takes both, so any path under /canary gets a JSON answer.
        """
        return await self.handlers.canary(request)

    @http.get("/metrics", summary="Prometheus metrics of every worker", responses=METRICS_RESPONSES)
    async def metrics_endpoint(self, request: Request) -> Response:
        """The ``vigil_`` families, merged over all workers (Prometheus multiprocess mode)."""
        return await self.handlers.metrics_text(request)

    @http.post("/admin/reload", summary="Re-read deploy.yaml now (bearer token)", responses=ERRORS)
    async def admin_reload(self, request: Request) -> Response:
        """Apply deploy.yaml now; an invalid file is refused and the current routing keeps serving."""
        return await self.handlers.admin_reload(request)

    @http.post("/admin/rollback", summary="Turn a canary off, or serve a given version (bearer token)",
               responses=ERRORS, openapi_extra=ADMIN_BODY)
    async def admin_rollback(self, request: Request) -> Response:
        """``{"model"}`` turns the live canary off (recorded, survives restarts); ``{"model", "to"}`` edits deploy.yaml."""
        return await self.handlers.admin_rollback(request)

    @http.post("/admin/promote", summary="Make the canary the stable version (bearer token)", responses=ERRORS,
               openapi_extra=ADMIN_BODY)
    async def admin_promote(self, request: Request) -> Response:
        """Edit deploy.yaml so the canary becomes stable, then reload."""
        return await self.handlers.admin_promote(request)


Vigil.add_asgi_middleware(EdgeMiddleware)
