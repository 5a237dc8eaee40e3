"""Canary analysis: compare a canary with stable over the same window and decide on rollback.

Each worker keeps, per model, the figures of both variants since the canary
started (bounded memory: counts, a latency reservoir, a prediction histogram
on the stable version's reference deciles). :func:`evaluate` turns them into a
verdict under the deploy config's ``rollback_when`` rules.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

PSI_SMOOTHING = 0.5
"""Pseudo-count added to every bucket (Jeffreys): an empty bucket in a small sample must not read as infinite shift."""


@dataclass
class VariantStats:
    """What one variant did since the canary started (in this worker)."""

    bucket_edges: np.ndarray
    requests: int = 0
    errors: int = 0
    instances: int = 0
    fallbacks: int = 0
    labelled: int = 0
    """Answers that received ground truth (feedback)."""
    misses: int = 0
    """Of those: wrong labels (classification) or errors beyond the model's tolerance (regression)."""
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

    def record_feedback(self, missed: bool) -> None:
        """One answer of this variant got its ground truth."""
        with self._lock:
            self.labelled += 1
            self.misses += int(missed)

    def figures(self) -> dict[str, float]:
        """Error rate, fallback rate and p95 latency so far."""
        with self._lock:
            latencies = np.fromiter(self.latencies, dtype=np.float64)
            return {
                "requests": float(self.requests),
                "error_rate": self.errors / self.requests if self.requests else 0.0,
                "fallback_rate": self.fallbacks / self.instances if self.instances else 0.0,
                "p95_latency_seconds": float(np.quantile(latencies, 0.95)) if len(latencies) else 0.0,
                "labelled": float(self.labelled),
                "miss_rate": self.misses / self.labelled if self.labelled else 0.0,
            }


Z_ONE_SIDED = 3.09
"""Standard normal quantile for p = 0.001: a breach must also be this unlikely to be noise."""


def chi2_quantile(dof: int, z: float = Z_ONE_SIDED) -> float:
    """Upper quantile of chi-square with ``dof`` degrees of freedom (Wilson-Hilferty; no SciPy on the request path)."""
    k = max(dof, 1)
    return k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3


def rate_increase_is_significant(bad_a: int, n_a: int, bad_b: int, n_b: int, z: float = Z_ONE_SIDED) -> bool:
    """One-sided two-proportion z-test: is rate B above rate A beyond sampling noise?"""
    if n_a == 0 or n_b == 0:
        return False
    pooled = (bad_a + bad_b) / (n_a + n_b)
    if pooled in (0.0, 1.0):
        return bad_b / n_b > bad_a / n_a
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    return (bad_b / n_b - bad_a / n_a) / se > z


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index between two histograms over the same buckets."""
    if expected.sum() == 0 or actual.sum() == 0:
        return 0.0
    e = (expected + PSI_SMOOTHING) / (expected.sum() + PSI_SMOOTHING * len(expected))
    a = (actual + PSI_SMOOTHING) / (actual.sum() + PSI_SMOOTHING * len(actual))
    return float(np.sum((a - e) * np.log(a / e)))


class Rules(Protocol):
    """The limits a canary is judged against (``rollback_when`` of the deploy config)."""

    min_requests: int
    error_rate_increase: float
    p95_latency_ratio: float
    latency_floor_ms: float
    fallback_rate_increase: float
    prediction_shift: float
    miss_rate_increase: float
    min_labelled: int


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

    def evaluate(self, rules: Rules, min_stable_requests: int = 20) -> Breach | None:
        """A :class:`Breach` when the canary is worse than stable beyond the rules, else None.

        Nothing is judged before ``rules.min_requests`` canary requests (and a
        few stable ones) were seen: no verdict from too little data.
        """
        stable, canary = self.stable.figures(), self.canary.figures()
        if canary["requests"] < rules.min_requests or stable["requests"] < min_stable_requests:
            return None
        base = {"stable": stable, "canary": canary}
        # Every rule needs both an effect above its limit and evidence that it is not sampling
        # noise: with a few hundred requests, one unlucky error or a noisy histogram is common.
        s, c = self.stable, self.canary
        increase = canary["error_rate"] - stable["error_rate"]
        if increase > rules.error_rate_increase and rate_increase_is_significant(
                s.errors, s.requests, c.errors, c.requests):
            return Breach("error_rate", {**base, "increase": increase, "limit": rules.error_rate_increase})
        increase = canary["fallback_rate"] - stable["fallback_rate"]
        if increase > rules.fallback_rate_increase and rate_increase_is_significant(
                s.fallbacks, s.instances, c.fallbacks, c.instances):
            return Breach("fallback_rate", {**base, "increase": increase, "limit": rules.fallback_rate_increase})
        if stable["p95_latency_seconds"] > 0:
            ratio = canary["p95_latency_seconds"] / stable["p95_latency_seconds"]
            # On a busy machine a p95 over a few hundred requests jitters by milliseconds; only a
            # difference above the floor can be the canary's own slowness.
            excess = canary["p95_latency_seconds"] - stable["p95_latency_seconds"]
            if ratio > rules.p95_latency_ratio and excess * 1000 > rules.latency_floor_ms:
                return Breach("latency", {**base, "ratio": ratio, "limit": rules.p95_latency_ratio})
        # Quality, once enough of both variants' answers have ground truth: the canary misses
        # (wrong label, or a regression error beyond tolerance) more often than stable.
        if min(s.labelled, c.labelled) >= rules.min_labelled:
            increase = canary["miss_rate"] - stable["miss_rate"]
            if increase > rules.miss_rate_increase and rate_increase_is_significant(
                    s.misses, s.labelled, c.misses, c.labelled):
                return Breach("quality", {**base, "increase": increase, "limit": rules.miss_rate_increase})
        assert s.histogram is not None and c.histogram is not None
        shift = psi(s.histogram, c.histogram)
        n_s, n_c = int(s.histogram.sum()), int(c.histogram.sum())
        if n_s and n_c:
            # n_eff * PSI is roughly chi-square with (buckets - 1) degrees of freedom under no shift,
            # so (buckets - 1) / n_eff is the PSI that sampling noise alone produces on average.
            n_eff = n_s * n_c / (n_s + n_c)
            dof = int(((s.histogram + c.histogram) > 0).sum()) - 1
            noise = dof / n_eff
            if shift - noise > rules.prediction_shift and n_eff * shift > chi2_quantile(dof):
                return Breach("prediction_shift", {**base, "psi": shift, "psi_noise": noise,
                                                   "limit": rules.prediction_shift})
        return None

    def summary(self) -> dict[str, Any]:
        """Live comparison figures (for ``vigil deploy status`` and ``GET /models``)."""
        assert self.stable.histogram is not None and self.canary.histogram is not None
        return {"stable_version": self.stable_version, "canary_version": self.canary_version,
                "stable": self.stable.figures(), "canary": self.canary.figures(),
                "prediction_psi": psi(self.stable.histogram, self.canary.histogram)}
