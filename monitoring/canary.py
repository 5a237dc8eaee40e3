"""Canary analysis: compare a canary with stable over the same window and decide on rollback.

Each worker keeps, per model, the figures of both variants since the canary
started (bounded memory: counts, a latency reservoir, a prediction histogram
on the stable version's reference deciles). :func:`evaluate` turns them into a
verdict under the deploy config's ``rollback_when`` rules.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PSI_EPSILON = 1e-4
"""Floor for bucket shares in PSI, so an empty bucket does not make the distance infinite."""


@dataclass
class VariantStats:
    """What one variant did since the canary started (in this worker)."""

    bucket_edges: np.ndarray
    requests: int = 0
    errors: int = 0
    instances: int = 0
    fallbacks: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=2000))
    histogram: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.histogram = np.zeros(len(self.bucket_edges) + 1, dtype=np.int64)
        self._lock = threading.Lock()

    def record(self, seconds: float, instances: int, fallbacks: int, errored: bool, scores: np.ndarray | None) -> None:
        """One request answered by this variant."""
        with self._lock:
            self.requests += 1
            self.instances += instances
            self.fallbacks += fallbacks
            self.errors += int(errored)
            self.latencies.append(seconds)
            if scores is not None and len(scores):
                finite = scores[np.isfinite(scores)]
                assert self.histogram is not None
                np.add.at(self.histogram, np.searchsorted(self.bucket_edges, finite, side="left"), 1)

    def figures(self) -> dict[str, float]:
        """Error rate, fallback rate and p95 latency so far."""
        with self._lock:
            latencies = np.fromiter(self.latencies, dtype=np.float64)
            return {
                "requests": float(self.requests),
                "error_rate": self.errors / self.requests if self.requests else 0.0,
                "fallback_rate": self.fallbacks / self.instances if self.instances else 0.0,
                "p95_latency_seconds": float(np.quantile(latencies, 0.95)) if len(latencies) else 0.0,
            }


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index between two histograms over the same buckets."""
    if expected.sum() == 0 or actual.sum() == 0:
        return 0.0
    e = np.maximum(expected / expected.sum(), PSI_EPSILON)
    a = np.maximum(actual / actual.sum(), PSI_EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


@dataclass(frozen=True)
class Breach:
    """Why a canary must be rolled back, with the figures that breached."""

    reason: str
    figures: dict[str, Any]


class CanaryComparison:
    """Figures of stable and canary for one model since the canary (version) started."""

    def __init__(self, model: str, stable_version: str, canary_version: str, bucket_edges: list[float]) -> None:
        self.model = model
        self.stable_version = stable_version
        self.canary_version = canary_version
        edges = np.asarray(sorted(bucket_edges), dtype=np.float64)
        self.stable = VariantStats(edges)
        self.canary = VariantStats(edges)

    def variant(self, name: str) -> VariantStats:
        """The stats of ``stable`` or ``canary``."""
        return self.canary if name == "canary" else self.stable

    def evaluate(self, rules: Any, min_stable_requests: int = 20) -> Breach | None:
        """A :class:`Breach` when the canary is worse than stable beyond the rules, else None.

        Nothing is judged before ``rules.min_requests`` canary requests (and a
        few stable ones) were seen: no verdict from too little data.
        """
        stable, canary = self.stable.figures(), self.canary.figures()
        if canary["requests"] < rules.min_requests or stable["requests"] < min_stable_requests:
            return None
        base = {"stable": stable, "canary": canary}
        increase = canary["error_rate"] - stable["error_rate"]
        if increase > rules.error_rate_increase:
            return Breach("error_rate", {**base, "increase": increase, "limit": rules.error_rate_increase})
        increase = canary["fallback_rate"] - stable["fallback_rate"]
        if increase > rules.fallback_rate_increase:
            return Breach("fallback_rate", {**base, "increase": increase, "limit": rules.fallback_rate_increase})
        if stable["p95_latency_seconds"] > 0:
            ratio = canary["p95_latency_seconds"] / stable["p95_latency_seconds"]
            # Sub-millisecond jitter is not a regression: compare only when the canary is slow in absolute terms too.
            if ratio > rules.p95_latency_ratio and canary["p95_latency_seconds"] > 0.002:
                return Breach("latency", {**base, "ratio": ratio, "limit": rules.p95_latency_ratio})
        assert self.stable.histogram is not None and self.canary.histogram is not None
        shift = psi(self.stable.histogram, self.canary.histogram)
        if shift > rules.prediction_shift:
            return Breach("prediction_shift", {**base, "psi": shift, "limit": rules.prediction_shift})
        return None

    def summary(self) -> dict[str, Any]:
        """Live comparison figures (for ``vigil deploy status`` and ``GET /models``)."""
        assert self.stable.histogram is not None and self.canary.histogram is not None
        return {"stable_version": self.stable_version, "canary_version": self.canary_version,
                "stable": self.stable.figures(), "canary": self.canary.figures(),
                "prediction_psi": psi(self.stable.histogram, self.canary.histogram)}
