"""The prediction path in plain Python: load models, validate, predict, record, answer.

The HTTP layer (``service/app.py``) only moves bytes in and out of
:class:`ModelServer`; everything a request does happens here, so tests can
call it without a server.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from service.errors import ModelNotFound, ModelNotReady, VigilError
from service.inputs import InstanceValidator, PredictRequest
from service.registry import ModelCard, Registry
from service.runtime import Batch, OnnxPredictor, Predictions, Predictor
from service.settings import Settings

from monitoring.metrics import BoundModelMetrics, VigilMetrics
from monitoring.predlog import LoggedRequest, PredictionLog

log = logging.getLogger("vigil.serving")


@dataclass
class ServedVersion:
    """One loaded model version with everything its requests need, prepared once."""

    card: ModelCard
    predictor: Predictor
    validator: InstanceValidator
    metrics: BoundModelMetrics | None
    variant: str = "stable"
    loaded_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    load_seconds: float = 0.0


@dataclass
class ModelEntry:
    """A registered model: the version it serves, or why it cannot serve."""

    name: str
    stable: ServedVersion | None = None
    error: str | None = None


class ModelServer:
    """Owns the loaded models of one worker and answers prediction requests."""

    def __init__(self, settings: Settings, metrics: VigilMetrics | None,
                 predlog: PredictionLog | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.predlog = predlog
        self.registry = Registry(settings.registry)
        self.models: dict[str, ModelEntry] = {}

    # ------------------------------------------------------------------ loading

    def load_all(self) -> None:
        """Load the newest version of every registered model; a model that fails is logged and skipped."""
        for name in self.registry.names():
            self.models[name] = self._load(name)
        if not self.models:
            log.warning("no models registered in %s", self.registry.root)

    def _load(self, name: str) -> ModelEntry:
        try:
            card = self.registry.card(name)
            model_path = self.registry.verify(card)
            predictor = OnnxPredictor(card, model_path, self.settings.intra_op_threads)
            validator = InstanceValidator(card, self.settings.max_string_length)
            # One warm-up call so the first client does not pay for lazy initialisation.
            _warm_up(predictor, validator, card)
        except Exception as exc:  # noqa: BLE001 - any failure means "this model does not serve"
            reason = exc.message if isinstance(exc, VigilError) else f"{type(exc).__name__}: {exc}"
            log.error("model '%s' is not served: %s", name, reason)
            if self.metrics is not None:
                self.metrics.model_failed(name)
            return ModelEntry(name=name, error=reason)
        bound = self.metrics.bind(card, "stable") if self.metrics is not None else None
        if self.metrics is not None:
            self.metrics.model_loaded(card, predictor.load_seconds)
        log.info("model %s:%s loaded in %.3fs", card.name, card.version, predictor.load_seconds)
        served = ServedVersion(card=card, predictor=predictor, validator=validator, metrics=bound,
                               load_seconds=predictor.load_seconds)
        return ModelEntry(name=name, stable=served)

    # ------------------------------------------------------------------ readiness and listing

    def not_ready(self) -> dict[str, str]:
        """Models that are registered but cannot serve, with the reason."""
        return {name: entry.error or "not loaded" for name, entry in self.models.items() if entry.stable is None}

    def describe(self) -> list[dict[str, Any]]:
        """What ``GET /models`` shows: every registered model and the version it serves."""
        out = []
        for name, entry in sorted(self.models.items()):
            if entry.stable is None:
                out.append({"name": name, "state": "not_ready", "error": entry.error})
                continue
            served = entry.stable
            card = served.card
            item: dict[str, Any] = {
                "name": name,
                "version": card.version,
                "variant": served.variant,
                "state": "serving",
                "task": card.task,
                "features": [f.model_dump(exclude_none=True) for f in card.features],
                "sha256": card.sha256,
                "loaded_at": served.loaded_at.isoformat(),
                "load_seconds": round(served.load_seconds, 4),
            }
            if card.labels is not None:
                item["labels"] = card.labels
            if card.prediction_range is not None:
                item["prediction_range"] = card.prediction_range.model_dump()
            out.append(item)
        return out

    # ------------------------------------------------------------------ predicting

    def served(self, name: str) -> ServedVersion:
        """The version answering for ``name``; 404 when unknown, 503 when it failed to load."""
        entry = self.models.get(name)
        if entry is None:
            raise ModelNotFound(f"no model named '{name}'; registered: {', '.join(sorted(self.models)) or 'none'}")
        if entry.stable is None:
            raise ModelNotReady(f"model '{name}' is not ready: {entry.error}")
        return entry.stable

    def predict(self, request: PredictRequest, request_id: str) -> dict[str, Any]:
        """Validate, predict and record one request; returns the response body."""
        started = time.perf_counter()
        try:
            served = self.served(request.model)
        except ModelNotFound:
            self._reject("unknown", "unknown_model")
            raise
        try:
            batch, quality = served.validator.validate(request.instances)
        except VigilError:
            self._reject(request.model, "invalid_input")
            raise
        recorder = served.metrics
        if recorder is not None:
            recorder.record_inputs(quality.missing, quality.out_of_range)
        call_started = time.perf_counter()
        try:
            predictions = served.predictor.predict(batch)
        except Exception as exc:
            if recorder is not None:
                recorder.record_error(type(exc).__name__)
            log.exception("model %s:%s failed", served.card.name, served.card.version)
            raise ModelNotReady(f"model '{request.model}' failed to predict: {type(exc).__name__}") from exc
        call_seconds = time.perf_counter() - call_started
        items = _answer(served, predictions)
        if recorder is not None:
            recorder.record_call(call_seconds, batch.size)
            recorder.record_predictions(predictions)
        if self.predlog is not None:
            self.predlog.append(_log_record(served, request, request_id, predictions))
        if recorder is not None:
            recorder.request_duration.observe(time.perf_counter() - started)
        return {"request_id": request_id, "model": request.model, "predictions": items}

    def _reject(self, model: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected(model, reason)

    def reject(self, model: str | None, reason: str) -> None:
        """Count a request refused before it reached a model (bad body, too large, ...)."""
        known = model if model is not None and model in self.models else "unknown"
        self._reject(known, reason)


def _answer(served: ServedVersion, predictions: Predictions) -> list[dict[str, Any]]:
    version, variant = served.card.version, served.variant
    if predictions.values is not None:
        return [{"version": version, "variant": variant, "value": v} for v in predictions.values.tolist()]
    assert predictions.labels is not None and predictions.probabilities is not None
    keys = [str(label) for label in served.card.labels or []]
    return [
        {"version": version, "variant": variant, "label": label, "probabilities": dict(zip(keys, row))}
        for label, row in zip(predictions.labels, predictions.probabilities.tolist())
    ]


def _log_record(served: ServedVersion, request: PredictRequest, request_id: str,
                predictions: Predictions) -> LoggedRequest:
    if predictions.values is not None:
        prediction: list[Any] = predictions.values.tolist()
        score = None
    else:
        assert predictions.labels is not None and predictions.probabilities is not None
        prediction = predictions.labels
        probs = predictions.probabilities
        score = (probs[:, 1] if probs.shape[1] == 2 else probs.max(axis=1)).tolist()
    return LoggedRequest(time=time.time(), request_id=request_id, card=served.card, variant=served.variant,
                         instances=request.instances, prediction=prediction, score=score, reasons=None)


def _warm_up(predictor: Predictor, validator: InstanceValidator, card: ModelCard) -> None:
    row: dict[str, Any] = {}
    for spec in card.features:
        if spec.type == "string":
            row[spec.name] = (spec.categories or [""])[0]
        elif spec.min is not None and spec.max is not None:
            mid = (spec.min + spec.max) / 2
            row[spec.name] = int(mid) if spec.type == "int" else mid
        else:
            row[spec.name] = 0 if spec.type == "int" else 0.0
    batch, _ = validator.validate([row])
    predictor.predict(batch)


def worker_label() -> str:
    """This worker's bounded label value: BentoML's worker index, else ``0``."""
    try:
        from bentoml._internal.context import server_context

        if server_context.worker_index is not None:
            return str(server_context.worker_index)
    except ImportError:  # pragma: no cover - bentoml is a dependency
        pass
    return os.environ.get("VIGIL_WORKER_INDEX", "0")


__all__ = ["Batch", "ModelEntry", "ModelServer", "ServedVersion", "worker_label"]
