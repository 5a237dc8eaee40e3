"""Baseline ``bento-quickstart``: the service BentoML's quickstart would have you write.

A ``@bentoml.service`` class that loads the model in ``__init__`` and a sync
``@bentoml.api`` method with typed parameters, so BentoML parses and
validates the JSON body with pydantic, runs the method in its thread pool and
serializes the returned dict. BentoML's defaults are kept (access log on), as
in the quickstart; no monitoring beyond BentoML's own.

Run (``benchmarks/run.py`` does this)::

    BENCH_MODEL_DIR=models/cancer/1 BENCH_WORKERS=2 bentoml serve bento_quickstart:Quickstart \
        --working-dir benchmarks/baselines
"""

from __future__ import annotations

from typing import Any

import bentoml
from bench_model import load_model, workers_from_env


@bentoml.service(name="bench-quickstart", workers=workers_from_env())
class Quickstart:
    """Predicts with the ONNX model loaded once per worker."""

    def __init__(self) -> None:
        self.model = load_model()

    @bentoml.api
    def predict(self, model: str, instances: list[dict[str, float]]) -> dict[str, Any]:
        """One prediction per instance."""
        return {"model": model, "predictions": self.model.predict(instances)}
