"""The model server of one worker: routing table, prediction, rollback and the ``/models`` listing.

The HTTP layer only moves bytes in and out of :class:`ModelServer`; everything
a request does happens here and in the modules it composes (loading,
answering, routing, verdicts), so tests can call it without a server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

from monitoring.canary import CanaryComparison, CanaryPool, judge
from monitoring.metrics import VigilMetrics
from monitoring.predlog import PredictionLog
from monitoring.store import Store, settings_store
from monitoring.verdicts import DriftResult, PerformanceResult
from service.core.card import ModelCard
from service.core.errors import Conflict, ModelNotFound, ModelNotReady, VigilError
from service.core.requestid import new_token
from service.core.settings import Settings
from service.core.predictor import Batch
from service.inputs import InputQuality, InstanceValidator, PredictRequest
from service.registry.store import Registry
from service.serving.answer import Answerer, Outcome, log_record, response_items
from service.serving.deploy import (
    DeployConfig,
    DeployConfigError,
    DeployState,
    PromotionRecord,
    RollbackRecord,
    check_versions,
    load_deploy,
    load_state,
    record_stable,
    record_rollback,
)
from service.serving.loading import VersionLoader
from service.serving.routing import ModelEntry, ServedVersion, state_of
from service.serving.verdicts import apply_drift, apply_quality

log = logging.getLogger("vigil.serving")

CANARY_PHASES = ("none", "progressing", "rolled_back", "promoted")
"""The values of ``vigil_canary_phase``, by position."""

Validate = Callable[[InstanceValidator], tuple[Batch, InputQuality, list[dict[str, Any]] | None]]
"""Decoded inputs checked by a version's validator: its batch, input quality, and the instances to log (or None)."""


class ModelServer:
    """Owns the loaded models of one worker and answers prediction requests."""

    def __init__(self, settings: Settings, metrics: VigilMetrics | None,
                 predlog: PredictionLog | None = None, deploy: DeployConfig | None = None,
                 store: Store | None = None, token: str | None = None) -> None:
        self.settings = settings
        self.store = store if store is not None else settings_store(settings)
        self.pool = CanaryPool(self.store, token or new_token())
        self._canary_published: dict[str, tuple[Any, ...]] = {}
        """Per model, the figures this worker last published (:meth:`check_canaries` skips unchanged ones)."""
        """Every worker's canary figures and the fleet's one decision, in the store."""
        self.metrics = metrics
        self.predlog = predlog
        self.deploy = deploy or DeployConfig()
        self.registry = Registry(settings.registry)
        self.models: dict[str, ModelEntry] = {}
        self.state = DeployState()
        self.loader = VersionLoader(self.registry, settings, metrics)
        self.answerer = Answerer()
        self._reload_lock = threading.Lock()

    def load_all(self) -> None:
        """Load every registered model's versions as the deploy config says; failures are logged, never fatal."""
        with self._reload_lock:
            state = self._read_state()
            self.state = state
            self.models = self._build(self.deploy, state)
            self._unload_unused()
            self._export_routing()
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
            self._unload_unused()
            self._export_routing()
            return config

    def routing_hash(self) -> int:
        """A 48-bit digest of what this worker serves (each model's stable, canary and canary share).

        Exported as ``vigil_deploy_routing_hash``: replicas that serve the same routing export the same
        number, so an alert can see replicas that disagree (a config or state change one has not taken).
        """
        served = sorted((name, e.stable.card.version if e.stable else None,
                         e.canary.card.version if e.canary else None, round(e.canary_traffic, 6))
                        for name, e in self.models.items())
        return int(hashlib.sha256(repr(served).encode()).hexdigest()[:12], 16)

    def canary_phase(self, name: str) -> str:
        """``none``, ``progressing``, ``rolled_back`` or ``promoted``: this worker's view of a model's canary."""
        entry = self.models.get(name)
        if entry is None or entry.stable is None:
            return "none"
        promotion = self.state.promotions.get(name)
        if entry.canary is None:
            return "promoted" if promotion is not None and promotion.version == entry.stable.card.version else "none"
        rolled = self.state.rollbacks.get(name)
        if rolled is not None and rolled.version == entry.canary.card.version:
            return "rolled_back"
        return "progressing" if entry.canary_traffic > 0 else "none"

    def _export_routing(self) -> None:
        if self.metrics is None:
            return
        self.metrics.deploy_routing_hash.set(self.routing_hash())
        for name in self.models:
            self.metrics.canary_phase.labels(name).set(CANARY_PHASES.index(self.canary_phase(name)))

    def _unload_unused(self) -> None:
        in_use = {(entry.name, served.card.version) for entry in self.models.values()
                  for served in (entry.stable, entry.canary) if served is not None}
        self.loader.unload_unused(in_use, time.monotonic() + self.settings.request_timeout_seconds)

    def _read_state(self) -> DeployState:
        try:
            return load_state(self.store)
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
            promotion = state.promoted(name, stable_version)
            if promotion is not None:
                stable_version = promotion.version
                if policy.canary is not None and policy.canary.version == promotion.version:
                    policy = policy.model_copy(update={"canary": None})
            stable = self.loader.served(name, stable_version, "stable", policy)
            if stable is None:
                models[name] = ModelEntry(name=name, policy=policy, error=self.loader.error(name, stable_version))
                continue
            entry = ModelEntry(name=name, policy=policy, stable=stable)
            if policy.canary is not None:
                entry.canary = self.loader.served(name, policy.canary.version, "canary", policy)
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

    def served_versions(self) -> list[ServedVersion]:
        """Every loaded version (each once, whatever roles it plays)."""
        return list(self.loader.loaded.values())

    def apply_drift(self, served: ServedVersion, result: DriftResult) -> None:
        """Take a drift job's latest verdict for a version (routing and gauges)."""
        apply_drift(served, result, self.metrics)

    def apply_quality(self, served: ServedVersion, result: PerformanceResult) -> None:
        """Take a quality job's latest verdict for a version (routing and gauges)."""
        apply_quality(served, result, self.metrics)

    # ------------------------------------------------------------------ canary

    def check_canaries(self) -> list[tuple[str, str]]:
        """Publish this worker's canary figures; judge the fleet's pooled figures at the next look.

        Every worker publishes; the one whose compare-and-swap makes a look judges it
        (:class:`monitoring.canary.CanaryPool`), so a rollback or promotion happens once for
        the fleet. It is recorded in the deploy state, which every worker reloads.
        Returns ``(model, verdict)`` of the decisions this worker made.
        """
        decided = []
        for name, entry in list(self.models.items()):
            canary = entry.policy.canary
            if entry.comparison is None or entry.canary_traffic <= 0 or canary is None:
                continue
            comparison = entry.comparison
            # Unchanged figures: nothing to publish, and no look can be due on their account (a look
            # needs more evidence; whoever adds it publishes, then reads the pool). Skipping them keeps
            # a round, and so the time every worker takes to learn a verdict, short with many canaries.
            figures = (comparison.pair, comparison.stable.requests, comparison.stable.labelled,
                       comparison.canary.requests, comparison.canary.labelled)
            if self._canary_published.get(name) == figures:
                continue
            try:
                self.pool.publish(comparison)
                pooled = self.pool.pooled(name, comparison.pair) or comparison
                decision = self.pool.look(name, comparison.pair, pooled, canary.rollback_when,
                                          lambda look, c=pooled, k=canary: judge(c, k.rollback_when, k.promote_when, look))
            except Exception as exc:  # noqa: BLE001 - store away: the next round tries again
                log.error("canary of %s: cannot reach the pooled figures: %s", name, exc)
                continue
            self._canary_published[name] = figures
            if decision is None:
                continue
            if decision.verdict == "rolled_back":
                self.rollback(name, decision.reason or "monitor", decision.figures, by="monitor")
            else:
                self.promote(name, decision.figures)
            decided.append((name, decision.verdict))
        return decided

    def configured_stable(self, name: str) -> str:
        """The stable version the deploy config names for ``name`` (its newest version when it names none)."""
        return self.deploy.policy(name).stable or self.registry.latest(name)

    def promote(self, name: str, evidence: dict[str, Any], by: str = "monitor") -> PromotionRecord:
        """Make the canary of ``name`` stable for the fleet: recorded in the deploy state, exported, logged."""
        entry = self.models.get(name)
        if entry is None or entry.canary is None or entry.stable is None:
            raise Conflict(f"models.{name}.canary: there is no canary to promote")
        record = PromotionRecord(version=entry.canary.card.version, previous=self.configured_stable(name),
                                 evidence=evidence, at=datetime.now(timezone.utc), by=by)  # type: ignore[arg-type]
        self.state = record_stable(self.store, name, record)
        if self.metrics is not None and by == "monitor":
            self.metrics.promotions.labels(name, record.version).inc()
        log.warning("canary %s:%s promoted to stable by the %s (replaces %s): %s", name, record.version, by,
                    entry.stable.card.version, _short(evidence))
        self.reload()
        return record

    def serve_stable(self, name: str, version: str) -> PromotionRecord:
        """An operator's rollback: serve ``version`` as the stable of ``name`` on every replica, canary off.

        Recorded in the deploy state in the store, not in deploy.yaml (read-only on a fleet). A config that
        later names another stable (or another canary) wins over it.
        """
        entry = self.models.get(name)
        if entry is None:
            raise ModelNotFound(f"no model named '{name}'")
        now = datetime.now(timezone.utc)
        record = PromotionRecord(version=version, previous=self.configured_stable(name), at=now, by="operator",
                                 kind="rollback")
        canary = self.deploy.policy(name).canary
        canary_off = (RollbackRecord(version=canary.version, reason="manual", at=now, by="operator")
                      if canary is not None and canary.version != version else None)
        self.state = record_stable(self.store, name, record, canary_off)
        log.warning("%s: stable set to %s by an operator (the config names %s)", name, version, record.previous)
        self.reload()
        return record

    def canary_status(self, name: str) -> dict[str, Any]:
        """What ``GET /canary/{model}`` answers: the fleet's decision on the model's canary and the pooled figures."""
        entry = self.models.get(name)
        if entry is None:
            raise ModelNotFound(f"no model named '{name}'; registered: {', '.join(sorted(self.models)) or 'none'}")
        out: dict[str, Any] = {"model": name, "stable_version": entry.stable.card.version if entry.stable else None}
        promotion = self.state.promotions.get(name)
        comparison = entry.comparison
        if comparison is None:
            phase = self.canary_phase(name)
            out.update(phase=phase, canary_version=None, healthy=True,
                       promotion=promotion.model_dump(mode="json") if phase == "promoted" and promotion else None)
            return out
        decision = self.pool.decision(name, comparison.pair)
        pooled = self.pool.pooled(name, comparison.pair) or comparison
        rolled = self.state.rollbacks.get(name)
        phase = self.canary_phase(name)
        out.update(phase=phase, canary_version=comparison.canary_version, traffic=entry.canary_traffic,
                   healthy=phase != "rolled_back", looks=decision.looks, reason=decision.reason or
                   (rolled.reason if phase == "rolled_back" and rolled else None),
                   pooled=pooled.summary())
        return out

    def rollback(self, name: str, reason: str, figures: dict[str, Any] | None = None, by: str = "operator") -> RollbackRecord:
        """Turn the canary of ``name`` off, durably: recorded in the state file, exported, logged.

        Under the reload lock: the canary checks and the admin API call this beside the control
        loop's reloads, and neither may swap in routing built from the other's stale view.
        """
        with self._reload_lock:
            entry = self.models.get(name)
            if entry is None or entry.canary is None or entry.canary_traffic <= 0:
                raise Conflict(f"models.{name}.canary: no live canary to roll back")
            version = entry.canary.card.version
            record = RollbackRecord(version=version, reason=reason, figures=figures or {},
                                    at=datetime.now(timezone.utc), by=by)  # type: ignore[arg-type]
            try:
                self.state = record_rollback(self.store, name, record)
            except Exception as exc:  # noqa: BLE001 - store away or state unreadable: it still happens here
                log.error("could not persist the rollback of %s:%s: %s", name, version, exc)
                self.state.rollbacks[name] = record
            self.models = {**self.models, name: dataclasses.replace(entry, canary_traffic=0.0)}
            self._export_routing()
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
            promotion = self.state.promotions.get(name)
            if promotion is not None and promotion.version == card.version:
                item["promotion"] = promotion.model_dump(mode="json")
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

    def pinned(self, name: str, version: str | None) -> tuple[ModelEntry, ServedVersion]:
        """The entry and its served version ``version`` (stable or canary; the stable one when None).

        404 when the model is unknown or does not serve that version, 503 when nothing can answer for it.
        """
        entry = self.models.get(name)
        if entry is None:
            raise ModelNotFound(f"no model named '{name}'; registered: {', '.join(sorted(self.models)) or 'none'}")
        if entry.stable is None:
            raise ModelNotReady(f"model '{name}' is not ready: {entry.error}")
        if version is None:
            return entry, entry.stable
        for served in (entry.stable, entry.canary):
            if served is not None and served.card.version == version:
                return entry, served
        serving = ", ".join(f"{s.card.version} ({s.variant})" for s in (entry.stable, entry.canary) if s is not None)
        raise ModelNotFound(f"model '{name}' does not serve version '{version}'; it serves {serving}")

    async def predict(self, request: PredictRequest, request_id: str) -> dict[str, Any]:
        """Validate, route, predict, check and record one request; returns the response body."""
        started = time.perf_counter()
        entry, served = self.route(request.model, request.key)
        batch, quality = served.validator.validate(request.instances)
        outcome = await self._answer(started, entry, served, batch, quality, request.instances, request_id, True)
        return {"request_id": request_id, "model": request.model, "predictions": response_items(served, outcome)}

    async def infer(self, name: str, version: str | None, key: str | None, validate: Validate,
                    request_id: str) -> tuple[ServedVersion, Outcome]:
        """:meth:`predict` for inputs decoded already (the Open Inference Protocol's tensors).

        ``validate`` turns them into the routed version's batch with its
        validator (a numeric matrix goes through ``validate_matrix`` without
        instance dicts) and returns the instances the prediction log needs to
        hash PII, or None. Without ``version`` the call is routed like
        :meth:`predict`; with it, it is pinned to that served version and kept
        out of the canary comparison (its traffic is the client's choice, not a
        random split).
        """
        started = time.perf_counter()
        entry, served = self.route(name, key) if version is None else self.pinned(name, version)
        batch, quality, instances = validate(served.validator)
        return served, await self._answer(started, entry, served, batch, quality, instances, request_id,
                                          version is None)

    async def _answer(self, started: float, entry: ModelEntry, served: ServedVersion, batch: Batch,
                      quality: InputQuality, instances: list[dict[str, Any]] | None, request_id: str,
                      compare: bool) -> Outcome:
        """What every prediction shares once validated: answer, log, record metrics and the canary comparison."""
        if served.metrics is not None and (quality.missing or quality.out_of_range):
            served.metrics.record_inputs(quality.missing, quality.out_of_range)
        outcome = await self.answerer.answer(entry, served, batch)
        if self.predlog is not None and self.predlog.sampled(entry.policy.log_sample_rate):
            self.predlog.append(log_record(served, instances, request_id, batch, outcome))
        seconds = time.perf_counter() - started
        if served.metrics is not None:
            served.metrics.record_request(seconds, outcome.call_seconds, outcome.call_size, outcome.answered)
        if compare and entry.comparison is not None and entry.canary_traffic > 0:
            entry.comparison.variant(served.variant).record(
                seconds, batch.size, sum(r is not None for r in outcome.reasons), outcome.errored,
                outcome.predictions.scores())
        return outcome

    def feedback_targets(self) -> tuple[dict[str, ModelCard], dict[str, tuple[CanaryComparison, float]]]:
        """What ground truth is checked and counted against: each model's stable card, and each live
        canary comparison with the tolerance that makes a regression answer wrong (fed with both variants' actuals)."""
        cards = {name: entry.stable.card for name, entry in self.models.items() if entry.stable is not None}
        comparisons = {name: (entry.comparison, entry.policy.canary.rollback_when.regression_tolerance)
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
        """Release the model-call threads and every loaded model."""
        self.answerer.close()
        self.loader.close()





def _short(figures: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
                     if not isinstance(v, dict))


REJECTION_REASONS = {"model_not_found": "unknown_model"}
"""``vigil_input_rejected_total`` reasons that differ from the error code in the response."""
