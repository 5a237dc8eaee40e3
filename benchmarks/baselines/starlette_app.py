"""Baseline ``starlette``: the same prediction in a minimal Starlette app under uvicorn.

No BentoML, no validation, no metrics: read the body, parse it with orjson,
predict, answer with orjson. It is the floor of Python HTTP overhead with the
server stack BentoML itself runs on (uvicorn with uvloop and httptools).

Run (``benchmarks/run.py`` does this)::

    BENCH_MODEL_DIR=models/cancer/1 python -m uvicorn starlette_app:app \
        --app-dir benchmarks/baselines --workers 2 --no-access-log
"""

from __future__ import annotations

import orjson
from bench_model import load_model
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

MODEL = load_model()


async def predict(request: Request) -> Response:
    """``POST /predict``: ``{"model", "instances"}`` in, one prediction per instance out."""
    payload = orjson.loads(await request.body())
    answer = {"model": payload["model"], "predictions": MODEL.predict(payload["instances"])}
    return Response(orjson.dumps(answer), media_type="application/json")


async def readyz(request: Request) -> Response:
    """``GET /readyz``: the model loads at import, so a listening worker is ready."""
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/readyz", readyz)])
