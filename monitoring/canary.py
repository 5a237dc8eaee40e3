"""Canary analysis: compare a canary with stable over the same window and decide, once for the fleet.

Each worker keeps, per model, the figures of both variants since the canary
started (bounded memory: counts, a latency reservoir, a prediction histogram
on the stable version's reference deciles) and publishes them to the store
(:class:`CanaryPool`). The decision is made on the pooled figures of every
worker of every replica: :meth:`CanaryComparison.evaluate` under the deploy
config's ``rollback_when`` rules, and :meth:`CanaryComparison.proven` under
``promote_when``.

The decision is re-checked as traffic arrives, so the guards are sequential:
look ``k`` happens when the pooled canary requests reach
``min_requests * LOOK_GROWTH**(k-1)``, and spends ``alpha * 6 / (pi^2 k^2)`` of
the total ``ALPHA`` (the spending sums to ``ALPHA`` over all looks), so the
chance that a healthy canary is ever rolled back by a rule's test stays below
``ALPHA`` however long it runs. Looks are counted in the store with a
compare-and-swap: one worker makes each look, and each decision is made once.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from monitoring.store import Store

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

    def snapshot(self) -> dict[str, Any]:
        """The figures as plain JSON data, to pool with other workers' (:meth:`merge`)."""
        with self._lock:
            assert self.histogram is not None
            return {"requests": self.requests, "errors": self.errors, "instances": self.instances,
                    "fallbacks": self.fallbacks, "labelled": self.labelled, "misses": self.misses,
                    "latencies": [round(x, 6) for x in self.latencies], "histogram": self.histogram.tolist()}

    def merge(self, snapshot: dict[str, Any]) -> None:
        """Add another worker's :meth:`snapshot` (same buckets) to these figures."""
        with self._lock:
            assert self.histogram is not None
            for name in ("requests", "errors", "instances", "fallbacks", "labelled", "misses"):
                setattr(self, name, getattr(self, name) + int(snapshot[name]))
            self.latencies.extend(float(x) for x in snapshot["latencies"])
            self.histogram += np.asarray(snapshot["histogram"], dtype=np.int64)

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
ALPHA = 0.001
"""Total chance, over every look at a canary, that a rule's test rolls back a healthy one."""
LOOK_GROWTH = 1.5
"""Each look waits for this factor more pooled canary requests than the one before."""


def look_threshold(look: int, min_requests: int) -> int:
    """Pooled canary requests at which look ``look`` (1, 2, ...) is made."""
    return math.ceil(min_requests * LOOK_GROWTH ** (look - 1))


def look_z(look: int, alpha: float = ALPHA) -> float:
    """One-sided z of look ``look``: it spends ``alpha * 6 / (pi^2 look^2)``, so all looks spend ``alpha``."""
    return NormalDist().inv_cdf(1 - alpha * 6 / (math.pi ** 2 * look ** 2))


def upper_bound_of_increase(bad_a: int, n_a: int, bad_b: int, n_b: int, z: float) -> float:
    """One-sided upper confidence bound of rate B minus rate A (Agresti-Caffo: one pseudo-success and failure each)."""
    p_a, p_b = (bad_a + 1) / (n_a + 2), (bad_b + 1) / (n_b + 2)
    return p_b - p_a + z * math.sqrt(p_a * (1 - p_a) / (n_a + 2) + p_b * (1 - p_b) / (n_b + 2))


def chi2_quantile(dof: int, z: float = Z_ONE_SIDED) -> float:
    """Upper quantile of chi-square with ``dof`` degrees of freedom (Wilson-Hilferty; no SciPy on the request path)."""
    k = max(dof, 1)
    return k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3


EXACT_BELOW = 30
"""Fewer bad outcomes than this in both variants together: the exact conditional test decides, not the z-test."""


def rate_increase_is_significant(bad_a: int, n_a: int, bad_b: int, n_b: int, z: float = Z_ONE_SIDED) -> bool:
    """One-sided test: is rate B above rate A beyond sampling noise, at the level of ``z``?

    With many bad outcomes, the two-proportion z-test (pooled standard error). With few
    (rare errors, a young canary), the normal approximation overstates the evidence: a
    healthy canary with 5 errors in 205 requests against 5 in 1,795 reads as z = 4.2.
    There the exact conditional test decides: given ``k`` bad outcomes in all, B's share
    of them is Binomial(k, n_b / (n_a + n_b)) when the rates are equal.
    """
    if n_a == 0 or n_b == 0:
        return False
    total = bad_a + bad_b
    if 0 < total < EXACT_BELOW:
        if bad_b / n_b <= bad_a / n_a:
            return False
        return binomial_tail(bad_b, total, n_b / (n_a + n_b)) < 1 - NormalDist().cdf(z)
    pooled = (bad_a + bad_b) / (n_a + n_b)
    if pooled in (0.0, 1.0):
        return bad_b / n_b > bad_a / n_a
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    return (bad_b / n_b - bad_a / n_a) / se > z


def binomial_tail(at_least: int, n: int, p: float) -> float:
    """P(X >= at_least) for X ~ Binomial(n, p)."""
    if p >= 1.0:
        return 1.0
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(at_least, n + 1))


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


class PromoteRules(Protocol):
    """When a canary has proven itself (``promote_when`` of the deploy config)."""

    min_requests: int
    min_duration_seconds: float
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
        self.bucket_edges = edges.tolist()
        self.stable = VariantStats(edges)
        self.canary = VariantStats(edges)
        self.started_at = time.time()
        """When this worker started comparing (Unix seconds); the pool's start is the earliest worker's."""

    @property
    def pair(self) -> str:
        """``<stable>-<canary>``: a new stable or canary version is a new comparison."""
        return f"{self.stable_version}-{self.canary_version}"

    def snapshot(self) -> dict[str, Any]:
        """Both variants' figures as JSON data, for :class:`CanaryPool`."""
        return {"stable_version": self.stable_version, "canary_version": self.canary_version,
                "bucket_edges": self.bucket_edges, "started_at": self.started_at,
                "stable": self.stable.snapshot(), "canary": self.canary.snapshot()}

    @classmethod
    def pooled(cls, model: str, snapshots: list[dict[str, Any]]) -> CanaryComparison | None:
        """One comparison holding the sum of every snapshot of the same pair and buckets (None when there is none)."""
        if not snapshots:
            return None
        first = snapshots[0]
        pool = cls(model, first["stable_version"], first["canary_version"], first["bucket_edges"])
        pool.started_at = min(float(snap["started_at"]) for snap in snapshots)
        for snap in snapshots:
            if snap["bucket_edges"] != pool.bucket_edges or snap["canary_version"] != pool.canary_version:
                continue
            pool.stable.merge(snap["stable"])
            pool.canary.merge(snap["canary"])
        return pool

    def variant(self, name: str) -> VariantStats:
        """The stats of ``stable`` or ``canary``."""
        return self.canary if name == "canary" else self.stable

    def evaluate(self, rules: Rules, min_stable_requests: int = 20, z: float = Z_ONE_SIDED) -> Breach | None:
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
                s.errors, s.requests, c.errors, c.requests, z):
            return Breach("error_rate", {**base, "increase": increase, "limit": rules.error_rate_increase})
        increase = canary["fallback_rate"] - stable["fallback_rate"]
        if increase > rules.fallback_rate_increase and rate_increase_is_significant(
                s.fallbacks, s.instances, c.fallbacks, c.instances, z):
            return Breach("fallback_rate", {**base, "increase": increase, "limit": rules.fallback_rate_increase})
        if stable["p95_latency_seconds"] > 0:
            ratio = canary["p95_latency_seconds"] / stable["p95_latency_seconds"]
            # On a busy machine a p95 over a few hundred requests jitters by milliseconds; only a
            # difference above the floor can be the canary's own slowness.
            excess = canary["p95_latency_seconds"] - stable["p95_latency_seconds"]
            # And, as the other rules, evidence: a p95 over a few dozen requests is their second
            # slowest, so the canary must also answer slower than stable's p95 significantly more
            # often than stable does (about 5%), at this look's z.
            slowest = stable["p95_latency_seconds"]
            if ratio > rules.p95_latency_ratio and excess * 1000 > rules.latency_floor_ms and \
                    rate_increase_is_significant(sum(x > slowest for x in s.latencies), len(s.latencies),
                                                 sum(x > slowest for x in c.latencies), len(c.latencies), z):
                return Breach("latency", {**base, "ratio": ratio, "limit": rules.p95_latency_ratio})
        # Quality, once enough of both variants' answers have ground truth: the canary misses
        # (wrong label, or a regression error beyond tolerance) more often than stable.
        if min(s.labelled, c.labelled) >= rules.min_labelled:
            increase = canary["miss_rate"] - stable["miss_rate"]
            if increase > rules.miss_rate_increase and rate_increase_is_significant(
                    s.misses, s.labelled, c.misses, c.labelled, z):
                return Breach("quality", {**base, "increase": increase, "limit": rules.miss_rate_increase})
        shift, noise, n_eff, dof = self._shift()
        if n_eff and shift - noise > rules.prediction_shift and n_eff * shift > chi2_quantile(dof, z):
            return Breach("prediction_shift", {**base, "psi": shift, "psi_noise": noise,
                                               "limit": rules.prediction_shift})
        return None

    def _shift(self) -> tuple[float, float, float, int]:
        """The prediction shift: PSI of canary against stable, the PSI sampling noise alone gives on average,
        the effective sample size and the degrees of freedom (0, 0 when a variant has no predictions)."""
        s, c = self.stable.histogram, self.canary.histogram
        assert s is not None and c is not None
        shift = psi(s, c)
        n_s, n_c = int(s.sum()), int(c.sum())
        if not (n_s and n_c):
            return shift, 0.0, 0.0, 0
        # n_eff * PSI is roughly chi-square with (buckets - 1) degrees of freedom under no shift,
        # so (buckets - 1) / n_eff is the PSI that sampling noise alone produces on average.
        n_eff = n_s * n_c / (n_s + n_c)
        dof = int(((s + c) > 0).sum()) - 1
        return shift, dof / n_eff, n_eff, dof

    def proven(self, rules: Rules, promote: PromoteRules, z: float = Z_ONE_SIDED,
               now: float | None = None) -> dict[str, Any] | None:
        """The evidence that the canary is no worse than stable by any rule's limit, or None while it is lacking.

        Enough evidence: ``promote.min_requests`` canary requests over at least
        ``promote.min_duration_seconds``, and for every rate (errors, fallbacks,
        wrong answers once ``promote.min_labelled`` answers of each variant have
        feedback) an upper confidence bound of the increase below its limit.
        Latency and prediction shift must be within their limits as measured.
        """
        stable, canary = self.stable.figures(), self.canary.figures()
        elapsed = (time.time() if now is None else now) - self.started_at
        s, c = self.stable, self.canary
        if c.requests < promote.min_requests or elapsed < promote.min_duration_seconds or s.requests == 0:
            return None
        bounds = {"error_rate": (upper_bound_of_increase(s.errors, s.requests, c.errors, c.requests, z),
                                 rules.error_rate_increase),
                  "fallback_rate": (upper_bound_of_increase(s.fallbacks, s.instances, c.fallbacks, c.instances, z),
                                    rules.fallback_rate_increase)}
        if promote.min_labelled:
            if min(s.labelled, c.labelled) < promote.min_labelled:
                return None
            bounds["miss_rate"] = (upper_bound_of_increase(s.misses, s.labelled, c.misses, c.labelled, z),
                                   rules.miss_rate_increase)
        if any(bound >= limit for bound, limit in bounds.values()):
            return None
        excess_ms = (canary["p95_latency_seconds"] - stable["p95_latency_seconds"]) * 1000
        if stable["p95_latency_seconds"] > 0 and excess_ms > rules.latency_floor_ms and (
                canary["p95_latency_seconds"] / stable["p95_latency_seconds"] > rules.p95_latency_ratio):
            return None
        shift, noise, _, _ = self._shift()
        if shift - noise > rules.prediction_shift:
            return None
        return {"stable": stable, "canary": canary, "seconds": round(elapsed, 1), "z": round(z, 3),
                "upper_bounds": {name: {"bound": round(bound, 5), "limit": limit}
                                 for name, (bound, limit) in bounds.items()},
                "prediction_psi": shift, "psi_noise": noise}

    def summary(self) -> dict[str, Any]:
        """Live comparison figures (for ``vigil deploy status`` and ``GET /models``)."""
        assert self.stable.histogram is not None and self.canary.histogram is not None
        return {"stable_version": self.stable_version, "canary_version": self.canary_version,
                "stable": self.stable.figures(), "canary": self.canary.figures(),
                "prediction_psi": psi(self.stable.histogram, self.canary.histogram)}


# ----------------------------------------------------------------------------- the fleet's one decision


Verdict = tuple[str, "str | None", dict[str, Any]]
"""A look's verdict: ``rolled_back`` or ``promoted``, the rule breached (rollbacks), the figures behind it."""


def judge(pooled: CanaryComparison, rules: Rules, promote: PromoteRules | None, look: int) -> Verdict | None:
    """Look ``look`` at the pooled figures: rolled back when a rule is breached at that look's z,
    promoted when ``promote`` is set and the canary has proven itself at it, else no verdict yet."""
    z = look_z(look)
    breach = pooled.evaluate(rules, z=z)
    if breach is not None:
        return "rolled_back", breach.reason, {**breach.figures, "look": look, "z": round(z, 3)}
    if promote is not None:
        evidence = pooled.proven(rules, promote, z)
        if evidence is not None:
            return "promoted", None, {**evidence, "look": look}
    return None


@dataclass
class Decision:
    """What the fleet decided about one canary: the looks made so far and, once there is one, the verdict."""

    looks: int = 0
    verdict: str = "observing"
    """``observing``, ``rolled_back`` or ``promoted``."""
    reason: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    at: float | None = None
    requests_at_last_look: int = 0
    labelled_at_last_look: int = 0

    def look_due(self, requests: int, labelled: int, min_requests: int, min_labelled: int) -> bool:
        """Whether the evidence grew enough for the next look: the requests reached the next look's
        threshold, or the answers with feedback (of the less-labelled variant) first reached
        ``min_labelled`` or grew by ``LOOK_GROWTH`` since the last look."""
        if self.verdict != "observing" or requests < min_requests:
            return False
        if requests >= look_threshold(self.looks + 1, min_requests):
            return True
        return labelled >= min_labelled and labelled >= max(min_labelled, LOOK_GROWTH * self.labelled_at_last_look)

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, indent=2, default=float).encode()

    @classmethod
    def from_json(cls, data: bytes | None) -> Decision:
        return cls(**json.loads(data)) if data else cls()


class CanaryPool:
    """The canary figures of every worker of every replica, and the fleet's decision, in the shared store.

    Layout: ``canary/<model>/<stable>-<canary>/workers/<token>.json`` (each worker's
    own figures since it started comparing, replaced on every publish) and
    ``canary/<model>/<stable>-<canary>/decision.json`` (the looks and the verdict,
    changed only by compare-and-swap, so each look and each verdict happens once).
    """

    def __init__(self, store: Store, token: str) -> None:
        self.store = store
        self.token = token

    @staticmethod
    def prefix(model: str, pair: str) -> str:
        return f"canary/{model}/{pair}"

    def publish(self, comparison: CanaryComparison) -> None:
        """Write this worker's figures of ``comparison``."""
        key = f"{self.prefix(comparison.model, comparison.pair)}/workers/{self.token}.json"
        self.store.put(key, json.dumps(comparison.snapshot()).encode())

    def pooled(self, model: str, pair: str) -> CanaryComparison | None:
        """The sum of every worker's published figures of ``model``'s comparison ``pair``."""
        snapshots = []
        for key in self.store.list(f"{self.prefix(model, pair)}/workers/"):
            try:
                snapshots.append(json.loads(self.store.get(key)))
            except (FileNotFoundError, ValueError):
                continue  # replaced or being written: the next round reads it
        return CanaryComparison.pooled(model, snapshots)

    def decision(self, model: str, pair: str) -> Decision:
        """The fleet's decision so far (``observing`` with no looks when none was made)."""
        try:
            return Decision.from_json(self.store.get(f"{self.prefix(model, pair)}/decision.json"))
        except FileNotFoundError:
            return Decision()

    def look(self, model: str, pair: str, pooled: CanaryComparison, rules: Rules,
             judge: Callable[[int], tuple[str, str | None, dict[str, Any]] | None]) -> Decision | None:
        """Make the next look when the pooled evidence grew enough (:meth:`Decision.look_due`) and no verdict stands.

        ``judge(look)`` returns ``(verdict, reason, figures)`` or None (keep observing). Returns the
        decision this worker wrote when it made a verdict, else None: another worker made this look,
        the threshold is not reached, or the look found nothing.
        """
        made: list[Decision] = []
        requests, labelled = pooled.canary.requests, min(pooled.stable.labelled, pooled.canary.labelled)

        def change(current: bytes | None) -> bytes | None:
            made.clear()
            decision = Decision.from_json(current)
            if not decision.look_due(requests, labelled, rules.min_requests, rules.min_labelled):
                return None
            look = decision.looks + 1
            outcome = judge(look)
            decision.looks, decision.requests_at_last_look, decision.labelled_at_last_look = look, requests, labelled
            if outcome is not None:
                decision.verdict, decision.reason, decision.figures = outcome
                decision.at = time.time()
                made.append(decision)
            return decision.to_json()

        self.store.update(f"{self.prefix(model, pair)}/decision.json", change, durable=True)
        return made[0] if made else None
