"""Who answers a request: the model version the deploy config names, or its fallback.

Per model version (state shared by all of a worker's requests): a circuit
breaker over its recent calls, the latest drift verdict, and the checks that
send single instances to the fallback (missing input, invalid output).
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Literal

import numpy as np

from monitoring.canary import CanaryComparison
from monitoring.metrics import BoundModelMetrics
from service.core.card import ModelCard
from service.core.predictor import Predictions, Predictor
from service.inputs import InstanceValidator
from service.serving.deploy import BreakerConfig, ModelPolicy

if TYPE_CHECKING:
    from service.serving.batching import Batcher

BreakerState = Literal["closed", "open", "half_open"]


class Breaker:
    """A circuit breaker over the last ``window`` calls of one model version.

    Closed: every call goes to the model; when the share of bad calls (errors,
    timeouts, invalid outputs) exceeds ``error_rate`` with at least
    ``min_calls`` seen, it opens. Open: nothing goes to the model for
    ``cooldown_seconds``. Half-open: calls go to the model as probes; ``probes``
    good ones close it, one bad one reopens it.
    """

    def __init__(self, config: BreakerConfig, on_transition: Callable[[BreakerState], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.state: BreakerState = "closed"
        self._outcomes: deque[bool] = deque(maxlen=config.window)
        self._bad = 0
        self._opened_at = 0.0
        self._probe_successes = 0
        self._on_transition = on_transition
        self._clock = clock
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """Whether the next call may go to the model."""
        if self.state == "closed":
            return True
        with self._lock:
            if self.state == "open" and self._clock() - self._opened_at >= self.config.cooldown_seconds:
                self._move("half_open")
                self._probe_successes = 0
            return self.state != "open"

    def record(self, ok: bool) -> None:
        """Record the outcome of one model call."""
        with self._lock:
            if self.state == "half_open":
                if not ok:
                    self._open()
                    return
                self._probe_successes += 1
                if self._probe_successes >= self.config.probes:
                    self._outcomes.clear()
                    self._bad = 0
                    self._move("closed")
                return
            if self.state == "open":
                return  # a call that started before the breaker opened
            if len(self._outcomes) == self._outcomes.maxlen and not self._outcomes[0]:
                self._bad -= 1
            self._outcomes.append(ok)
            if not ok:
                self._bad += 1
            seen = len(self._outcomes)
            if seen >= self.config.min_calls and self._bad / seen > self.config.error_rate:
                self._open()

    @property
    def bad_rate(self) -> float:
        """Share of bad calls in the current window."""
        return self._bad / len(self._outcomes) if self._outcomes else 0.0

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._move("open")

    def _move(self, state: BreakerState) -> None:
        if state != self.state:
            self.state = state
            if self._on_transition is not None:
                self._on_transition(state)


@dataclass
class VersionHealth:
    """Verdicts of the observing path about one version, shared by every role it plays (stable, canary)."""

    drift_detected: bool = False
    drift_share: float | None = None
    drift_checked_at: datetime | None = None
    quality_degraded: bool = False


INLINE_CALL_SECONDS = 0.002
"""Default of :attr:`ServedVersion.inline_seconds` (setting ``VIGIL_MODEL_INLINE_SECONDS``)."""
MIN_PROBE_SECONDS = 1.0
MAX_PROBE_SECONDS = 60.0
PROBE_CEILING_SECONDS = 0.05
"""Models typically slower than this on a thread are never timed on the event loop (it would stall it)."""


@dataclass
class ServedVersion:
    """One model version as served: its model (if it loaded), its fallback, and its health state."""

    card: ModelCard
    validator: InstanceValidator
    fallback: Predictor
    predictor: Predictor | None
    breaker: Breaker
    variant: str = "stable"
    load_error: str | None = None
    metrics: BoundModelMetrics | None = None
    fallback_metrics: BoundModelMetrics | None = None
    health: VersionHealth = field(default_factory=VersionHealth)
    loaded_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    load_seconds: float = 0.0
    call_seconds_ewma: float = 0.0
    """Typical duration of a model call made on the event loop."""
    next_probe: float = 0.0
    """While calls run on threads: when (``time.perf_counter()``) to time one on the event loop again."""
    probe_interval: float = MIN_PROBE_SECONDS
    inline_seconds: float = INLINE_CALL_SECONDS
    """Model calls typically faster than this run on the event loop: a thread hop would cost more than the call."""
    batcher: Batcher | None = field(default=None, repr=False, compare=False)
    """Merges the calls of concurrent requests when the model's policy batches (made on first use, per role)."""

    def calls_inline(self, now: float) -> bool:
        """Whether the next model call runs on the event loop: typical calls are fast, or a re-measure is due."""
        seconds = self.call_seconds_ewma
        return seconds < self.inline_seconds or (seconds < PROBE_CEILING_SECONDS and now >= self.next_probe)

    def note_call(self, seconds: float, now: float, inline: bool = True, timed_out: bool = False) -> None:
        """Track typical call time (it decides whether calls run on the event loop or on a thread).

        ``now`` is ``time.perf_counter()`` when the call started; ``inline``: it ran on the event loop.

        A call timed on a thread includes its waits for the interpreter lock
        while the loop is busy (up to the 5 ms switch interval each), so a fast
        model timed there looks slow and would stay on threads for good. So
        while a model that is not very slow runs on threads, one call now and
        then is made on the loop instead (after 1 s, then backing off to a
        minute while it stays slow), and its time replaces the history.
        ``timed_out``: the call was cut at its budget, so it surely was slow.
        """
        if self.call_seconds_ewma == 0:
            self.call_seconds_ewma = seconds
            self.next_probe = now + MIN_PROBE_SECONDS
            return
        if inline and self.call_seconds_ewma >= self.inline_seconds:  # a probe
            self.call_seconds_ewma = seconds
            if seconds >= self.inline_seconds:  # still slow: wait twice as long for the next one
                self.probe_interval = min(self.probe_interval * 2, MAX_PROBE_SECONDS)
                self.next_probe = now + self.probe_interval
            return
        was_fast = self.call_seconds_ewma < self.inline_seconds
        # One call that took long because the worker was descheduled (more busy processes than
        # cores) must not move a fast model to threads: a sample counts for at most ten times the
        # typical time plus 1 ms, so only sustained slowness crosses the threshold.
        if not timed_out:
            seconds = min(seconds, 10 * self.call_seconds_ewma + 0.001)
        self.call_seconds_ewma = 0.9 * self.call_seconds_ewma + 0.1 * seconds
        if was_fast and self.call_seconds_ewma >= self.inline_seconds:
            self.probe_interval = MIN_PROBE_SECONDS
            self.next_probe = now + MIN_PROBE_SECONDS


def degraded_reason(served: ServedVersion, policy: ModelPolicy) -> str | None:
    """Why the whole request goes to the fallback, or None when the model may answer."""
    if served.predictor is None:
        return "load_failed"
    if policy.on_drift == "fallback" and served.health.drift_detected:
        return "drift"
    if policy.on_quality_degraded == "fallback" and served.health.quality_degraded:
        return "quality"
    if not served.breaker.allow():
        return "breaker_open"
    return None


def state_of(served: ServedVersion, policy: ModelPolicy) -> str:
    """What ``GET /models`` shows for a version."""
    if served.predictor is None:
        return "load_failed"
    if served.breaker.state != "closed":
        return "breaker_open" if served.breaker.state == "open" else "breaker_half_open"
    if served.health.drift_detected and policy.on_drift == "fallback":
        return "degraded_by_drift"
    if served.health.quality_degraded and policy.on_quality_degraded == "fallback":
        return "degraded_by_quality"
    return "serving"


def invalid_rows(card: ModelCard, predictions: Predictions, margin: float) -> np.ndarray:
    """Rows whose output cannot be served: non-finite, or a regression value outside the allowed range."""
    if predictions.values is not None:
        values = predictions.values
        bad = ~np.isfinite(values)
        allowed = card.allowed_range(margin)
        if allowed is not None:
            with np.errstate(invalid="ignore"):
                bad |= (values < allowed[0]) | (values > allowed[1])
        return bad
    assert predictions.probabilities is not None
    finite = np.isfinite(predictions.probabilities)
    if finite.all():  # the common case, one check for the whole batch
        return np.zeros(len(finite), dtype=bool)
    return ~finite.all(axis=1)


def merge(size: int, parts: list[tuple[np.ndarray, Predictions]]) -> Predictions:
    """Assemble row-aligned predictions from parts, each given with the row indices it answers."""
    if len(parts) == 1 and len(parts[0][0]) == size:
        return parts[0][1]  # one predictor answered every row, in order
    first = parts[0][1]
    if first.values is not None:
        values = np.empty(size, dtype=np.float64)
        for rows, part in parts:
            assert part.values is not None
            values[rows] = part.values
        return Predictions(values=values)
    assert first.probabilities is not None
    probabilities = np.empty((size, first.probabilities.shape[1]), dtype=np.float64)
    labels: list[Any] = [None] * size
    for rows, part in parts:
        assert part.probabilities is not None and part.labels is not None
        probabilities[rows] = part.probabilities
        for i, label in zip(rows.tolist(), part.labels):
            labels[i] = label
    return Predictions(labels=labels, probabilities=probabilities)


@dataclass
class ModelEntry:
    """A registered model: its stable version (and canary), or why it cannot serve at all."""

    name: str
    policy: ModelPolicy = field(default_factory=ModelPolicy)
    stable: ServedVersion | None = None
    error: str | None = None
    canary: ServedVersion | None = None
    canary_traffic: float = 0.0
    comparison: CanaryComparison | None = None

    def choose(self, key: str | None) -> ServedVersion | None:
        """Stable or canary for one request: by a hash of ``key`` when sticky, else at random."""
        if self.canary is None or self.canary_traffic <= 0:
            return self.stable
        assert self.policy.canary is not None
        if key is not None and self.policy.canary.sticky:
            digest = hashlib.blake2b(f"{self.name}\x00{key}".encode(), digest_size=8).digest()
            draw = int.from_bytes(digest, "big") / 2**64
        else:
            draw = random.random()
        return self.canary if draw < self.canary_traffic else self.stable
