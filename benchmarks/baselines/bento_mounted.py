"""Baseline ``bento-mounted-bare``: a bare Starlette route mounted into a BentoML service.

The same shape as Vigil's service (``@bentoml.asgi_app`` at ``/``, access log
off) with nothing in the route but the prediction: no FastAPI, no validation,
no metrics of Vigil's own. What it costs is the floor BentoML's server and
middleware (its tracing, metrics and context layers) allow for a mounted route.

Run (``benchmarks/run.py`` does this)::

    BENCH_MODEL_DIR=models/cancer/1 BENCH_WORKERS=2 bentoml serve bento_mounted:Mounted \
        --working-dir benchmarks/baselines
"""

from __future__ import annotations

import bentoml
import orjson
from bench_model import BenchModel, load_model, workers_from_env
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


class PredictRoute:
    """The ``/predict`` endpoint; the service sets :attr:`model` when its worker starts."""

    def __init__(self) -> None:
        self.model: BenchModel | None = None

    async def handle(self, request: Request) -> Response:
        """``POST /predict``: ``{"model", "instances"}`` in, one prediction per instance out."""
        assert self.model is not None, "the service has not loaded the model"
        payload = orjson.loads(await request.body())
        answer = {"model": payload["model"], "predictions": self.model.predict(payload["instances"])}
        return Response(orjson.dumps(answer), media_type="application/json")


ROUTE = PredictRoute()
app = Starlette(routes=[Route("/predict", ROUTE.handle, methods=["POST"])])


@bentoml.service(name="bench-mounted", workers=workers_from_env(), logging={"access": {"enabled": False}})
@bentoml.asgi_app(app, path="/")
class Mounted:
    """Loads the model once per worker, for the mounted route to use."""

    def __init__(self) -> None:
        ROUTE.model = load_model()
