"""Loading and unloading model versions: each version once per worker, whatever roles it plays.

A version is loaded the first time the deploy config gives it a role (stable,
canary) and reused across reloads; once no role uses it, it is unloaded: its
session is closed and its gauges cleared. Readiness is the result of loading:
a version whose model fails to load (corrupt file, sha256 mismatch) still
answers from its fallback, and says why.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from monitoring.metrics import VigilMetrics
from service.core.card import ModelCard
from service.core.errors import VigilError
from service.core.predictor import Predictor
from service.core.settings import Settings
from service.inputs import InstanceValidator
from service.registry.store import Registry
from service.runtime.heuristic import HeuristicPredictor
from service.runtime.onnx import OnnxPredictor
from service.serving.deploy import ModelPolicy
from service.serving.routing import Breaker, ServedVersion

log = logging.getLogger("vigil.loading")


class VersionLoader:
    """The loaded versions of one worker, keyed by (model, version), and why others failed."""

    def __init__(self, registry: Registry, settings: Settings, metrics: VigilMetrics | None) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.loaded: dict[tuple[str, str], ServedVersion] = {}
        self.errors: dict[tuple[str, str], str] = {}
        self._retiring: list[tuple[float, ServedVersion]] = []

    def served(self, name: str, version: str, variant: str, policy: ModelPolicy) -> ServedVersion | None:
        """A version in the given role; loaded once per worker and reused across reloads."""
        key = (name, version)
        base = self.loaded.get(key)
        if base is None:
            if key in self.errors:
                return None
            base = self._load(name, version, policy)
            if base is None:
                return None
            self.loaded[key] = base
        if base.variant == variant:
            return base
        metrics = self.metrics.bind(base.card, variant) if self.metrics is not None else None
        # A role of its own: its own batcher, so each merged call's requests share a variant and its metrics.
        return dataclasses.replace(base, variant=variant, metrics=metrics, batcher=None)

    def unload_unused(self, in_use: set[tuple[str, str]], close_after: float) -> list[tuple[str, str]]:
        """Unload every version no role uses any more and clear its gauges; returns them.

        Requests that took such a version just before the switch still hold it,
        so its predictors are closed only at ``close_after`` (``time.monotonic()``,
        past the request timeout), by :meth:`close_retired`.
        """
        gone = [key for key in self.loaded if key not in in_use]
        for key in gone:
            served = self.loaded.pop(key)
            self._retiring.append((close_after, served))
            if self.metrics is not None:
                self.metrics.model_unloaded(served.card)
            log.info("model %s:%s unloaded: no role uses it", *key)
        # A version that failed may be fixed (re-registered) by the time a role names it again.
        for key in [k for k in self.errors if k not in in_use]:
            del self.errors[key]
        return gone

    def close_retired(self, now: float) -> int:
        """Close the predictors of unloaded versions whose grace period is over; returns how many."""
        due = [served for deadline, served in self._retiring if deadline <= now]
        self._retiring = [(deadline, served) for deadline, served in self._retiring if deadline > now]
        for served in due:
            _close(served)
        return len(due)

    def close(self) -> None:
        """Close every loaded predictor (worker shutdown)."""
        for served in [*self.loaded.values(), *(served for _, served in self._retiring)]:
            _close(served)
        self.loaded.clear()
        self._retiring.clear()

    def error(self, name: str, version: str) -> str | None:
        """Why a version cannot be served at all, if it cannot."""
        return self.errors.get((name, version))

    def _load(self, name: str, version: str, policy: ModelPolicy) -> ServedVersion | None:
        try:
            card = self.registry.card(name, version)
            validator = InstanceValidator(card, self.settings.max_string_length)
            fallback = HeuristicPredictor(card)
        except Exception as exc:  # noqa: BLE001 - no card, no fallback: the version cannot answer at all
            reason = _why(exc)
            self.errors[(name, version)] = reason
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

    def _breaker(self, card: ModelCard, policy: ModelPolicy) -> Breaker:
        def on_transition(state: str) -> None:
            log.warning("breaker of %s:%s is now %s", card.name, card.version, state)
            if self.metrics is not None:
                self.metrics.breaker_changed(card, state)

        return Breaker(policy.breaker, on_transition)  # type: ignore[arg-type]


def _close(served: ServedVersion) -> None:
    if served.predictor is not None:
        served.predictor.close()
    served.fallback.close()


def _why(exc: Exception) -> str:
    return exc.message if isinstance(exc, VigilError) else f"{type(exc).__name__}: {exc}"


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
