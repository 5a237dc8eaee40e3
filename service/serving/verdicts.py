"""Applying the observing path's verdicts to a served version: routing (``on_drift``/``on_quality_degraded``) and gauges.

The jobs write their verdicts to ``latest.json``; the control loop reads them
(:mod:`monitoring.verdicts`) and hands each to these functions. Every worker
applies the same verdict, so the gauges are exported ``livemax``.
"""

from __future__ import annotations

import logging

from monitoring.metrics import VigilMetrics
from monitoring.verdicts import DriftResult, PerformanceResult
from service.serving.routing import ServedVersion

log = logging.getLogger("vigil.verdicts")


def apply_drift(served: ServedVersion, result: DriftResult, metrics: VigilMetrics | None) -> None:
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
    if metrics is None:
        return
    m, v = card.name, card.version
    metrics.drift_detected.labels(m, v).set(1 if result.drift_detected else 0)
    metrics.drift_share.labels(m, v).set(result.drift_share)
    metrics.drift_rows.labels(m, v).set(result.rows.window)
    metrics.drift_last_run.labels(m, v).set(result.created_at.timestamp())
    for feature, verdict in result.features.items():
        if verdict.score is not None:
            metrics.feature_drift_score.labels(m, v, feature).set(verdict.score)
        metrics.feature_drift_detected.labels(m, v, feature).set(1 if verdict.drifted else 0)
    if result.prediction is not None and result.prediction.score is not None:
        metrics.prediction_drift_score.labels(m, v).set(result.prediction.score)

def apply_quality(served: ServedVersion, result: PerformanceResult, metrics: VigilMetrics | None) -> None:
    """Take a quality job's latest verdict for a version: routing (``on_quality_degraded: fallback``) and gauges."""
    card = served.card
    health = served.health
    was = health.quality_degraded
    health.quality_degraded = bool(result.quality_degraded)
    if health.quality_degraded != was:
        log.warning("quality verdict for %s:%s is now %s (%s)", card.name, card.version,
                    "degraded" if health.quality_degraded else "within tolerance",
                    ", ".join(result.degraded_metrics) or "every baseline metric within tolerance")
    if metrics is None:
        return
    m, v = card.name, card.version
    metrics.quality_degraded.labels(m, v).set(1 if result.quality_degraded else 0)
    for metric, value in result.metrics.items():
        if value is not None:  # not computable on this window (e.g. one class observed): keep no value
            metrics.model_quality.labels(m, v, metric).set(value)
    for label, bias in result.prediction_bias.items():  # regression: label "value"
        metrics.prediction_bias.labels(m, v, label).set(bias)
