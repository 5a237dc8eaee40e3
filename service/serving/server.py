"""The prediction path in plain Python: load models, validate, route, predict, check, record, answer.

The HTTP layer (``service/app.py``) only moves bytes in and out of
:class:`ModelServer`; everything a request does happens here, so tests can
call it without a server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from monitoring.canary import Breach, CanaryComparison
from monitoring.metrics import VigilMetrics
from monitoring.predlog import LoggedRequest, PredictionLog
from service.core.card import ModelCard
from service.core.errors import Conflict, ModelNotFound, ModelNotReady, VigilError
from service.core.predictor import Batch, ModelTimeout, Predictions, Predictor
from service.core.settings import Settings
from service.inputs import InstanceValidator, PredictRequest
from service.registry.store import Registry
from service.runtime.heuristic import HeuristicPredictor
from service.runtime.onnx import OnnxPredictor
from service.serving.deploy import (
    DeployConfig,
    DeployConfigError,
    DeployState,
    ModelPolicy,
    RollbackRecord,
    check_versions,
    load_deploy,
    load_state,
    record_rollback,
)
from service.serving.routing import Breaker, ModelEntry, ServedVersion, degraded_reason, invalid_rows, merge, state_of

log = logging.getLogger("vigil.serving")



@dataclass
class _Outcome:
    predictions: Predictions
    reasons: list[str | None]
    errored: bool = False  # the model raised or timed out
    # What the request's metrics need (recorded once, at its end): the model call that answered
    # (seconds, instances; 0 instances: no call answered) and its valid outputs.
    call_seconds: float = 0.0
    call_size: int = 0
    answered: Predictions | None = None


class ModelServer:
    """Owns the loaded models of one worker and answers prediction requests."""

    def __init__(self, settings: Settings, metrics: VigilMetrics | None,
                 predlog: PredictionLog | None = None, deploy: DeployConfig | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.predlog = predlog
        self.deploy = deploy or DeployConfig()
        self.registry = Registry(settings.registry)
        self.models: dict[str, ModelEntry] = {}
        self.state = DeployState()
        self._loaded: dict[tuple[str, str], ServedVersion] = {}
        self._errors: dict[tuple[str, str], str] = {}
        self._reload_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="vigil-model")

    # ------------------------------------------------------------------ loading and reloading

    def load_all(self) -> None:
        """Load every registered model's versions as the deploy config says; failures are logged, never fatal."""
        state = self._read_state()
        self.state = state
        self.models = self._build(self.deploy, state)
        if not self.models:
            log.warning("no models registered in %s", self.registry.root)

    def reload(self, deploy: DeployConfig | None = None) -> DeployConfig:
        """Re-read deploy.yaml (or apply ``deploy``) and the rollback state, then swap routing at once.

        Requests already running keep the entries they started with; new ones
        see the new routing. An invalid config raises :class:`DeployConfigError`
        and the current routing keeps serving.
        """
        with self._reload_lock:
            config = deploy if deploy is not None else load_deploy(self.settings.deploy)
            check_versions(config, {name: self.registry.versions(name) for name in self.registry.names()})
            state = self._read_state()
            models = self._build(config, state)
            self.deploy, self.state, self.models = config, state, models
            return config

    def _read_state(self) -> DeployState:
        try:
            return load_state(self.settings.data_dir)
        except DeployConfigError as exc:
            log.error("%s; keeping the rollback state in memory", exc.message)
            return getattr(self, "state", DeployState())

    def _build(self, config: DeployConfig, state: DeployState) -> dict[str, ModelEntry]:
        models: dict[str, ModelEntry] = {}
        for name in self.registry.names():
            policy = config.policy(name)
            old = self.models.get(name)
            try:
                stable_version = policy.stable or self.registry.latest(name)
            except VigilError as exc:
                models[name] = ModelEntry(name=name, policy=policy, error=exc.message)
                continue
            stable = self._served(name, stable_version, "stable", policy)
            if stable is None:
                models[name] = ModelEntry(name=name, policy=policy, error=self._errors.get((name, stable_version)))
                continue
            entry = ModelEntry(name=name, policy=policy, stable=stable)
            if policy.canary is not None:
                entry.canary = self._served(name, policy.canary.version, "canary", policy)
                entry.canary_traffic = state.canary_traffic(name, policy) if entry.canary is not None else 0.0
                same = (old is not None and old.comparison is not None
                        and old.comparison.stable_version == stable_version
                        and old.comparison.canary_version == policy.canary.version)
                entry.comparison = old.comparison if same and old is not None else CanaryComparison(
                    name, stable_version, policy.canary.version, stable.card.prediction_quantiles)
            models[name] = entry
            self._export_traffic(name, old, entry)
        return models

    def _export_traffic(self, name: str, old: ModelEntry | None, new: ModelEntry) -> None:
        if self.metrics is None:
            return
        if old is not None and old.canary is not None and (new.canary is None or new.canary.card.version != old.canary.card.version):
            self.metrics.canary_traffic.labels(name, old.canary.card.version).set(0)
        if new.canary is not None:
            self.metrics.canary_traffic.labels(name, new.canary.card.version).set(new.canary_traffic)

    def _served(self, name: str, version: str, variant: str, policy: ModelPolicy) -> ServedVersion | None:
        """A version in the given role; loaded once per worker and reused across reloads."""
        key = (name, version)
        base = self._loaded.get(key)
        if base is None:
            if key in self._errors:
                return None
            base = self._load_version(name, version, policy)
            if base is None:
                return None
            self._loaded[key] = base
        if base.variant == variant:
            return base
        metrics = self.metrics.bind(base.card, variant) if self.metrics is not None else None
        return dataclasses.replace(base, variant=variant, metrics=metrics)

    def _load_version(self, name: str, version: str, policy: ModelPolicy) -> ServedVersion | None:
        try:
            card = self.registry.card(name, version)
            if card.fallback is None:
                card = self._with_derived_fallback(card)
            validator = InstanceValidator(card, self.settings.max_string_length)
            fallback = HeuristicPredictor(card)
        except Exception as exc:  # noqa: BLE001 - no card, no fallback: the version cannot answer at all
            reason = _why(exc)
            self._errors[(name, version)] = reason
            log.error("model %s:%s cannot be served: %s", name, version, reason)
            if self.metrics is not None:
                self.metrics.model_failed(name)
            return None
        served = ServedVersion(card=card, validator=validator, fallback=fallback, predictor=None,
                               breaker=self._breaker(card, policy),
                               inline_seconds=self.settings.model_inline_seconds)
        if self.metrics is not None:
            served.metrics = self.metrics.bind(card, "stable")
            served.fallback_metrics = self.metrics.bind(card, "fallback")
        try:
            model_path = self.registry.verify(card)
            predictor = OnnxPredictor(card, model_path, self.settings.intra_op_threads)
            warm_up_seconds = _warm_up(predictor, validator, card, policy.timeout_ms / 1000)
        except Exception as exc:  # noqa: BLE001 - the fallback answers instead
            served.load_error = _why(exc)
            log.error("model %s:%s failed to load, its fallback answers: %s", name, version, served.load_error)
            if self.metrics is not None:
                self.metrics.model_failed(name)
            return served
        served.predictor = predictor
        served.load_seconds = predictor.load_seconds
        # A model that is slow from its first call runs on a thread from the first request on.
        served.note_call(warm_up_seconds, time.perf_counter())
        if self.metrics is not None:
            self.metrics.model_loaded(card, predictor.load_seconds)
        log.info("model %s:%s loaded in %.3fs", name, version, predictor.load_seconds)
        return served

    def _with_derived_fallback(self, card: ModelCard) -> ModelCard:
        """Cards written before fallbacks existed: derive the prior/median from the stored reference data."""
        import pandas as pd

        from service.registry.register import derive_fallback
        from service.registry.store import REFERENCE_FILE

        reference = pd.read_parquet(self.registry.path(card.name, card.version) / REFERENCE_FILE)
        spec = derive_fallback(card.task, card.labels, reference, card.target)
        log.warning("%s:%s has no fallback in its card; derived %s from its reference data",
                    card.name, card.version, spec.kind)
        return card.model_copy(update={"fallback": spec})

    def _breaker(self, card: ModelCard, policy: ModelPolicy) -> Breaker:
        def on_transition(state: str) -> None:
            log.warning("breaker of %s:%s is now %s", card.name, card.version, state)
            if self.metrics is not None:
                self.metrics.breaker_changed(card, state)

        return Breaker(policy.breaker, on_transition)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ verdicts from the observing path

    def served_versions(self) -> list[ServedVersion]:
        """Every loaded version (each once, whatever roles it plays)."""
        return list(self._loaded.values())

    def apply_drift(self, served: ServedVersion, result: Any) -> None:
        """Take a drift job's latest verdict for a version: routing (``on_drift: fallback``) and gauges."""
        card = served.card
        health = served.health
        was = health.drift_detected
        # The job's verdict (exit code 3): Evidently's dataset rule, or drift of the model's own output.
        health.drift_detected = bool(result.drift_detected)
        health.drift_share = float(result.drift_share)
        health.drift_checked_at = result.created_at
        if health.drift_detected != was:
            log.warning("drift verdict for %s:%s is now %s (share %.2f)", card.name, card.version,
                        "drift" if health.drift_detected else "no drift", result.drift_share)
        if self.metrics is None:
            return
        m, v = card.name, card.version
        self.metrics.drift_detected.labels(m, v).set(1 if result.drift_detected else 0)
        self.metrics.drift_share.labels(m, v).set(result.drift_share)
        self.metrics.drift_rows.labels(m, v).set(result.rows.window)
        self.metrics.drift_last_run.labels(m, v).set(result.created_at.timestamp())
        for feature, verdict in result.features.items():
            if verdict.score is not None:
                self.metrics.feature_drift_score.labels(m, v, feature).set(verdict.score)
            self.metrics.feature_drift_detected.labels(m, v, feature).set(1 if verdict.drifted else 0)
        if result.prediction is not None and result.prediction.score is not None:
            self.metrics.prediction_drift_score.labels(m, v).set(result.prediction.score)

    def apply_quality(self, served: ServedVersion, result: Any) -> None:
        """Take a quality job's latest verdict for a version: routing (``on_quality_degraded: fallback``) and gauges."""
        card = served.card
        health = served.health
        was = health.quality_degraded
        health.quality_degraded = bool(result.quality_degraded)
        if health.quality_degraded != was:
            log.warning("quality verdict for %s:%s is now %s (%s)", card.name, card.version,
                        "degraded" if health.quality_degraded else "within tolerance",
                        ", ".join(result.degraded_metrics) or "every baseline metric within tolerance")
        if self.metrics is None:
            return
        m, v = card.name, card.version
        self.metrics.quality_degraded.labels(m, v).set(1 if result.quality_degraded else 0)
        for metric, value in result.metrics.items():
            if value is not None:  # not computable on this window (e.g. one class observed): keep no value
                self.metrics.model_quality.labels(m, v, metric).set(value)
        for label, bias in result.prediction_bias.items():  # regression: label "value"
            self.metrics.prediction_bias.labels(m, v, label).set(bias)

    # ------------------------------------------------------------------ canary

    def check_canaries(self) -> list[tuple[str, Breach]]:
        """Compare every live canary with its stable version; roll back those that breach their rules."""
        rolled = []
        for name, entry in list(self.models.items()):
            if entry.comparison is None or entry.canary_traffic <= 0 or entry.policy.canary is None:
                continue
            breach = entry.comparison.evaluate(entry.policy.canary.rollback_when)
            if breach is not None:
                self.rollback(name, breach.reason, breach.figures, by="monitor")
                rolled.append((name, breach))
        return rolled

    def rollback(self, name: str, reason: str, figures: dict[str, Any] | None = None, by: str = "operator") -> RollbackRecord:
        """Turn the canary of ``name`` off, durably: recorded in the state file, exported, logged."""
        entry = self.models.get(name)
        if entry is None or entry.canary is None or entry.canary_traffic <= 0:
            raise Conflict(f"models.{name}.canary: no live canary to roll back")
        version = entry.canary.card.version
        record = RollbackRecord(version=version, reason=reason, figures=figures or {},
                                at=datetime.now(timezone.utc), by=by)  # type: ignore[arg-type]
        try:
            self.state = record_rollback(self.settings.data_dir, name, record)
        except OSError as exc:  # the rollback still happens in this worker; say why it may not survive a restart
            log.error("could not persist the rollback of %s:%s: %s", name, version, exc)
            self.state.rollbacks[name] = record
        self.models = {**self.models, name: dataclasses.replace(entry, canary_traffic=0.0)}
        if self.metrics is not None:
            self.metrics.rollbacks.labels(name, version, reason).inc()
            self.metrics.canary_traffic.labels(name, version).set(0)
        log.warning("canary %s:%s rolled back (%s): %s", name, version, reason, _short(figures or {}))
        return record

    # ------------------------------------------------------------------ readiness and listing

    def not_ready(self) -> dict[str, str]:
        """Models whose own model does not serve (fallback or nothing answers), with the reason."""
        out = {}
        for name, entry in self.models.items():
            if entry.stable is None:
                out[name] = entry.error or "not loaded"
            elif entry.stable.predictor is None:
                out[name] = entry.stable.load_error or "not loaded"
        return out

    def describe(self) -> list[dict[str, Any]]:
        """What ``GET /models`` shows: every registered model, the version it serves and its state."""
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
                "state": state_of(served, entry.policy),
                "task": card.task,
                "features": [f.model_dump(exclude_none=True) for f in card.features],
                "sha256": card.sha256,
                "loaded_at": served.loaded_at.isoformat(),
                "load_seconds": round(served.load_seconds, 4),
                "fallback": card.fallback.kind if card.fallback is not None else None,
                "drift": {"detected": served.health.drift_detected, "share": served.health.drift_share,
                          "checked_at": served.health.drift_checked_at.isoformat()
                          if served.health.drift_checked_at else None},
            }
            if served.load_error:
                item["error"] = served.load_error
            if card.labels is not None:
                item["labels"] = card.labels
            if card.prediction_range is not None:
                item["prediction_range"] = card.prediction_range.model_dump()
            if entry.canary is not None:
                item["canary"] = {
                    "version": entry.canary.card.version,
                    "traffic": entry.canary_traffic,
                    "configured_traffic": entry.policy.canary.traffic if entry.policy.canary else 0.0,
                    "state": state_of(entry.canary, entry.policy),
                    "comparison": entry.comparison.summary() if entry.comparison is not None else None,
                }
            rollback = self.state.rollbacks.get(name)
            if rollback is not None:
                item["last_rollback"] = rollback.model_dump(mode="json")
            out.append(item)
        return out

    # ------------------------------------------------------------------ predicting

    def route(self, name: str, key: str | None = None) -> tuple[ModelEntry, ServedVersion]:
        """The entry and version answering for ``name``; 404 when unknown, 503 when nothing can answer."""
        entry = self.models.get(name)
        if entry is None:
            raise ModelNotFound(f"no model named '{name}'; registered: {', '.join(sorted(self.models)) or 'none'}")
        served = entry.choose(key)
        if served is None:
            raise ModelNotReady(f"model '{name}' is not ready: {entry.error}")
        return entry, served

    async def predict(self, request: PredictRequest, request_id: str) -> dict[str, Any]:
        """Validate, route, predict, check and record one request; returns the response body."""
        started = time.perf_counter()
        entry, served = self.route(request.model, request.key)
        batch, quality = served.validator.validate(request.instances)
        if served.metrics is not None and (quality.missing or quality.out_of_range):
            served.metrics.record_inputs(quality.missing, quality.out_of_range)
        outcome = await self._answer(entry, served, batch)
        items = _items(served, outcome)
        if self.predlog is not None and self.predlog.sampled(entry.policy.log_sample_rate):
            self.predlog.append(_log_record(served, request, request_id, batch, outcome))
        seconds = time.perf_counter() - started
        if served.metrics is not None:
            served.metrics.record_request(seconds, outcome.call_seconds, outcome.call_size, outcome.answered)
        if entry.comparison is not None and entry.canary_traffic > 0:
            entry.comparison.variant(served.variant).record(
                seconds, batch.size, sum(r is not None for r in outcome.reasons), outcome.errored,
                _scores(outcome.predictions))
        return {"request_id": request_id, "model": request.model, "predictions": items}

    async def _answer(self, entry: ModelEntry, served: ServedVersion, batch: Batch) -> _Outcome:
        n = batch.size
        everything = np.arange(n)
        reason = degraded_reason(served, entry.policy)
        if reason is not None:
            return _Outcome(self._call_fallback(served, batch, reason), [reason] * n)
        # Rows with a null go to the fallback when the model cannot take NaN.
        to_fallback: dict[str, np.ndarray] = {}
        model_rows = everything
        if batch.has_nulls and not served.card.handles_missing:
            nulls = _null_rows(batch)
            to_fallback["missing_input"] = everything[nulls]
            model_rows = everything[~nulls]
        parts: list[tuple[np.ndarray, Predictions]] = []
        call_seconds, call_size = 0.0, 0
        answered: Predictions | None = None
        if len(model_rows):
            sub = batch if len(model_rows) == n else _take(batch, model_rows)
            predictions, failure, call_seconds = await self._call(served, entry.policy, sub)
            if failure is not None:
                to_fallback[failure] = model_rows
                served.breaker.record(False)
            else:
                assert predictions is not None
                call_size = sub.size
                bad = invalid_rows(served.card, predictions, entry.policy.output_range_margin)
                # One cheap count: any() and sum() cost ~1 µs each on a small array.
                bad_count = int(np.count_nonzero(bad))
                served.breaker.record(bad_count == 0)
                if bad_count:
                    if served.metrics is not None:
                        served.metrics.record_invalid_outputs(bad_count)
                    to_fallback["invalid_output"] = model_rows[bad]
                    keep = ~bad
                    predictions = _subset(predictions, keep)
                    model_rows = model_rows[keep]
                if len(model_rows):
                    parts.append((model_rows, predictions))
                    answered = predictions
        reasons: list[str | None] = [None] * n
        for why, rows in to_fallback.items():
            if len(rows) == 0:
                continue
            sub = _take(batch, rows)
            fallback_predictions = self._call_fallback(served, sub, why)
            parts.append((rows, fallback_predictions))
            for i in rows.tolist():
                reasons[i] = why
        errored = "model_error" in to_fallback or "timeout" in to_fallback
        return _Outcome(merge(n, parts), reasons, errored, call_seconds, call_size, answered)

    async def _call(self, served: ServedVersion, policy: ModelPolicy,
                    batch: Batch) -> tuple[Predictions | None, str | None, float]:
        """Call the model within its time budget: (predictions, None, seconds) or (None, failure reason, 0.0).

        A failed call is recorded here; a successful one by the request's
        :meth:`BoundModelMetrics.record_request` once the request ends.
        """
        assert served.predictor is not None
        budget = policy.timeout_ms / 1000
        started = time.perf_counter()
        inline = served.calls_inline(started)
        try:
            if inline:
                predictions, seconds = _timed_predict(served.predictor, batch, budget)
            else:
                # A slow model runs on a thread so the worker keeps answering health checks
                # and other models meanwhile; the watchdog still cancels it at the budget.
                loop = asyncio.get_running_loop()
                predictions, seconds = await loop.run_in_executor(
                    self._executor, _timed_predict, served.predictor, batch, budget)
        except ModelTimeout:
            self._model_failed(served, "ModelTimeout", time.perf_counter() - started, batch.size, inline, True)
            return None, "timeout", 0.0
        except Exception as exc:  # noqa: BLE001 - any model failure is answered by the fallback
            self._model_failed(served, type(exc).__name__, time.perf_counter() - started, batch.size, inline)
            log.warning("model %s:%s raised %s: %s", served.card.name, served.card.version,
                        type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "")
            return None, "model_error", 0.0
        served.note_call(seconds, started, inline)
        return predictions, None, seconds

    def _model_failed(self, served: ServedVersion, kind: str, seconds: float, size: int, inline: bool,
                      timed_out: bool = False) -> None:
        served.note_call(seconds, time.perf_counter(), inline, timed_out)
        if served.metrics is not None:
            served.metrics.record_error(kind)
            served.metrics.record_call(seconds, size)

    def _call_fallback(self, served: ServedVersion, batch: Batch, reason: str) -> Predictions:
        started = time.perf_counter()
        predictions = served.fallback.predict(batch)
        if served.fallback_metrics is not None:
            served.fallback_metrics.record_call(time.perf_counter() - started, batch.size, predictions)
            served.fallback_metrics.record_fallback(reason, batch.size)
        return predictions

    def feedback_targets(self) -> tuple[dict[str, ModelCard], dict[str, tuple[Any, Any]]]:
        """What ground truth is checked and counted against: each model's stable card, and each
        live canary comparison with its rollback rules (fed with both variants' actuals)."""
        cards = {name: entry.stable.card for name, entry in self.models.items() if entry.stable is not None}
        comparisons = {name: (entry.comparison, entry.policy.canary.rollback_when)
                       for name, entry in self.models.items()
                       if entry.comparison is not None and entry.policy.canary is not None}
        return cards, comparisons

    def reject(self, model: str | None, code: str) -> None:
        """Count a request refused by validation, by the error code it was answered with.

        ``model`` is whatever the body named: anything not registered is counted
        as ``unknown``, so the label stays a bounded set.
        """
        if self.metrics is not None:
            known = model if model is not None and model in self.models else "unknown"
            self.metrics.rejected(known, REJECTION_REASONS.get(code, code))

    def close(self) -> None:
        """Release the model-call threads."""
        self._executor.shutdown(wait=False, cancel_futures=True)


REJECTION_REASONS = {"model_not_found": "unknown_model"}
"""``vigil_input_rejected_total`` reasons that differ from the error code in the response."""


def _timed_predict(predictor: Predictor, batch: Batch, budget: float) -> tuple[Predictions, float]:
    started = time.perf_counter()
    return predictor.predict(batch, budget), time.perf_counter() - started


def _scores(predictions: Predictions) -> np.ndarray:
    """What the canary's prediction distribution is compared on: values, or the positive/top-class score."""
    if predictions.values is not None:
        return predictions.values
    assert predictions.probabilities is not None
    probs = predictions.probabilities
    return probs[:, 1] if probs.shape[1] == 2 else probs.max(axis=1)


def _short(figures: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
                     if not isinstance(v, dict))


def _why(exc: Exception) -> str:
    return exc.message if isinstance(exc, VigilError) else f"{type(exc).__name__}: {exc}"


def _null_rows(batch: Batch) -> np.ndarray:
    if batch.matrix is not None:
        return np.isnan(batch.matrix).any(axis=1)
    assert batch.columns is not None
    nulls = np.zeros(batch.size, dtype=bool)
    for values in batch.columns.values():
        nulls |= np.fromiter((v is None for v in values), dtype=bool, count=batch.size)
    return nulls


def _take(batch: Batch, rows: np.ndarray) -> Batch:
    if batch.matrix is not None:
        sub = batch.matrix[rows]
        return Batch(size=len(rows), matrix=sub, has_nulls=bool(np.isnan(sub).any()))
    assert batch.columns is not None
    picked = rows.tolist()
    columns = {name: [values[i] for i in picked] for name, values in batch.columns.items()}
    return Batch(size=len(rows), columns=columns,
                 has_nulls=any(v is None for values in columns.values() for v in values))


def _subset(predictions: Predictions, keep: np.ndarray) -> Predictions:
    if predictions.values is not None:
        return Predictions(values=predictions.values[keep])
    assert predictions.labels is not None and predictions.probabilities is not None
    return Predictions(labels=[label for label, k in zip(predictions.labels, keep.tolist()) if k],
                       probabilities=predictions.probabilities[keep])


def _items(served: ServedVersion, outcome: _Outcome) -> list[dict[str, Any]]:
    version, variant = served.card.version, served.variant
    predictions = outcome.predictions
    items: list[dict[str, Any]]
    if predictions.values is not None:
        items = [{"version": version, "variant": variant, "value": v} for v in predictions.values.tolist()]
    else:
        assert predictions.labels is not None and predictions.probabilities is not None
        keys = [str(label) for label in served.card.labels or []]
        items = [
            {"version": version, "variant": variant, "label": label, "probabilities": dict(zip(keys, row))}
            for label, row in zip(predictions.labels, predictions.probabilities.tolist())
        ]
    for item, reason in zip(items, outcome.reasons):
        if reason is not None:
            item["variant"] = "fallback"
            item["reason"] = reason
    return items


def _log_record(served: ServedVersion, request: PredictRequest, request_id: str, batch: Batch,
                outcome: _Outcome) -> LoggedRequest:
    predictions = outcome.predictions
    if predictions.values is not None:
        prediction: list[Any] = predictions.values.tolist()
        score = None
    else:
        assert predictions.labels is not None and predictions.probabilities is not None
        prediction = predictions.labels
        probs = predictions.probabilities
        score = (probs[:, 1] if probs.shape[1] == 2 else probs.max(axis=1)).tolist()
    has_fallback = any(r is not None for r in outcome.reasons)
    # With the numeric matrix the log needs the instance dicts only to hash PII features.
    keep_instances = batch.matrix is None or served.card.hashes_pii
    return LoggedRequest(time=time.time(), request_id=request_id, card=served.card, variant=served.variant,
                         instances=request.instances if keep_instances else None, prediction=prediction, score=score,
                         reasons=outcome.reasons if has_fallback else None, matrix=batch.matrix)


def _warm_up(predictor: Predictor, validator: InstanceValidator, card: ModelCard, budget_seconds: float) -> float:
    """One call so the first client does not pay for lazy initialisation; returns its duration."""
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
    started = time.perf_counter()
    try:
        predictor.predict(batch, budget_seconds)  # the first call pays for lazy initialisation
        started = time.perf_counter()
        predictor.predict(batch, budget_seconds)
    except Exception as exc:  # noqa: BLE001 - a model that fails on some inputs still loaded
        log.warning("warm-up call of %s:%s failed (%s); the model stays loaded", card.name, card.version,
                    type(exc).__name__)
    return time.perf_counter() - started


def worker_label() -> str:
    """This worker's bounded label value: BentoML's worker index, else ``0``."""
    try:
        from bentoml._internal.context import server_context

        if server_context.worker_index is not None:
            return str(server_context.worker_index)
    except ImportError:  # pragma: no cover - bentoml is a dependency
        pass
    return os.environ.get("VIGIL_WORKER_INDEX", "0")


__all__ = ["ModelEntry", "ModelServer", "ServedVersion", "worker_label"]
