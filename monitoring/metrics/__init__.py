"""Every Prometheus metric Vigil exports, and how the request path records them without slowing down.

Usage::

    metrics = VigilMetrics(registry=CollectorRegistry())
    bound = metrics.bind(card, variant="stable")   # once per model version
    bound.record_request(seconds, call_seconds, call_size, predictions)   # once per /predict request

The package, bottom up:

- :mod:`~monitoring.metrics.deferred`: deferred children, which keep what is
  recorded in the worker's memory until the flush, and the row queues;
- :mod:`~monitoring.metrics.families`: every family, defined once, and the
  bucket layouts;
- :mod:`~monitoring.metrics.recorders`: what the request path, the edge and
  the feedback handler call;
- :mod:`~monitoring.metrics.exposition`: the ``/metrics`` text;
- :mod:`~monitoring.metrics.process`: the worker's resources;
- :class:`VigilMetrics` (here): the families with their recorders and the flush.

Children are bound once per model version, and the request path's children
are *deferred*: a request adds to numbers in the worker's memory, which are
written to the real children at most ``flush_seconds`` (default
``FLUSH_SECONDS``) later (by the request path of a busy worker, by a background
thread for an idle one, and first by the worker answering ``/metrics``), so
recording costs no lock, syscall or file write. A model call's duration, batch
size and outputs are not even counted per request: they are queued as they are
and counted with numpy for all requests at once when the worker flushes; the
HTTP metrics of each endpoint are queued the same way, by the edge itself
(:class:`EndpointRecorder`).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry

from monitoring.metrics.deferred import (
    FLUSH_SECONDS,
    IDLE_FLUSH_SECONDS,
    QUEUE_LIMIT,
    ROW_NUMBERS,
    Deferred,
    DeferredCounter,
    DeferredGauge,
    DeferredHistogram,
    pack_row,
)
from monitoring.metrics.exposition import exposition, forget_dead_workers, live_worker_pids
from monitoring.metrics.families import (
    BATCH_BUCKETS,
    LATENCY_BUCKETS,
    PROBABILITY_BUCKETS,
    MetricFamilies,
    error_buckets,
    prediction_buckets,
)
from monitoring.metrics.process import ProcessSampler
from monitoring.metrics.recorders import (
    HTTP_METHODS,
    METHOD_CODES,
    OTHER_METHOD,
    BoundModelMetrics,
    EndpointRecorder,
    FeedbackMetrics,
)
from service.core.predictor import BREAKER_STATES

if TYPE_CHECKING:
    from service.core.card import ModelCard

__all__ = [
    "BATCH_BUCKETS", "FLUSH_SECONDS", "HTTP_METHODS", "IDLE_FLUSH_SECONDS", "LATENCY_BUCKETS", "METHOD_CODES",
    "OTHER_METHOD", "PROBABILITY_BUCKETS", "QUEUE_LIMIT", "ROW_NUMBERS", "BoundModelMetrics", "Deferred",
    "DeferredCounter", "DeferredGauge", "DeferredHistogram", "EndpointRecorder", "FeedbackMetrics", "MetricFamilies",
    "ProcessSampler", "VigilMetrics", "error_buckets", "exposition", "forget_dead_workers", "live_worker_pids",
    "pack_row", "prediction_buckets",
]


class VigilMetrics(MetricFamilies):
    """The metric families with their recorders and their flush; one per process, given the registry to register in."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY, flush_seconds: float = FLUSH_SECONDS) -> None:
        # Set before the families register the collector that flushes: a collection may call flush() from then on.
        self.flush_seconds = flush_seconds
        self._bound: dict[tuple[str, str, str, str], BoundModelMetrics] = {}
        self.endpoints: dict[str, EndpointRecorder] = {}
        """Recorders by endpoint label; the edge reads it directly (:meth:`endpoint` adds to it)."""
        self._flushing = threading.Event()
        self.flush_due = 0.0
        """``time.perf_counter()`` from which the request path flushes (the edge checks it after each request)."""
        super().__init__(registry)

    def flush(self) -> None:
        """Write every deferred value to the real metric children (the shared files in multiprocess mode).

        Safe from any thread while the event loop keeps recording: each child
        writes only the difference since its previous flush.
        """
        with self._flush_lock:
            self.flush_due = time.perf_counter() + self.flush_seconds
            for bound in list(self._bound.values()):
                bound.count_queued()
            for endpoint in list(self.endpoints.values()):
                endpoint.count_done()  # may create status counters: before the children are listed
            for child in list(self._deferred.values()):
                child.flush()

    def start_flushing(self, interval: float | None = None) -> None:
        """Flush from a daemon thread whenever ``interval`` seconds pass without a flush, until :meth:`stop_flushing`.

        ``interval`` defaults to ``IDLE_FLUSH_SECONDS``, or ``flush_seconds`` when that is longer (the
        thread is for idle workers: it must not flush a busy one more often than its own loop does).
        """
        if interval is None:
            interval = max(IDLE_FLUSH_SECONDS, self.flush_seconds)

        def run() -> None:
            while not self._flushing.wait(interval):
                if time.perf_counter() >= self.flush_due - self.flush_seconds + interval:  # idle that long
                    self.flush()

        threading.Thread(target=run, name="vigil-metrics-flush", daemon=True).start()

    def stop_flushing(self) -> None:
        """Stop the flushing thread and write what is left."""
        self._flushing.set()
        self.flush()

    def endpoint(self, endpoint: str) -> EndpointRecorder:
        """The HTTP recorder of ``endpoint``, which must come from a bounded set (see ``service.edge``)."""
        recorder = self.endpoints.get(endpoint)
        if recorder is None:
            recorder = self.endpoints.setdefault(endpoint, EndpointRecorder(self, endpoint))
        return recorder

    def feedback_recorder(self, card: ModelCard) -> FeedbackMetrics:
        """Children recording ground truth for one model version."""
        return FeedbackMetrics(self, card)

    def bind(self, card: ModelCard, variant: str) -> BoundModelMetrics:
        """Children for one model version and variant, bound once and reused by every request."""
        key = (card.name, card.version, card.sha256, variant)
        bound = self._bound.get(key)
        if bound is None:
            made = BoundModelMetrics(self, card, variant)  # binds children, which takes the lock itself
            with self._flush_lock:  # a flush iterates over the bound recorders
                bound = self._bound.setdefault(key, made)
        return bound

    def rejected(self, model: str, reason: str) -> None:
        """Count a request refused by validation (``model`` must be a registered name or ``unknown``)."""
        self.counter(self.input_rejected, model, reason).inc()

    def model_loaded(self, card: ModelCard, load_seconds: float) -> None:
        """Mark a model version as loaded, and create the children of what it may go on to count, at 0.

        A child that does not exist is "No data" on a dashboard, and ``rate()``
        cannot see the step to its first value: so the breaker's gauge and its
        transitions and the version's feedback children start at 0 here, as the
        fallback reasons do when the version is bound (:meth:`bind`). Label sets
        that are not known in advance (a model error's exception class, an HTTP
        status, a rollback's rule) are left to the dashboards' queries, and
        nothing is created that an alert reads as an event.
        """
        name, version = card.name, card.version
        self.model_info.labels(name, version, card.sha256).set(1)
        self.model_load_seconds.labels(name, version).set(load_seconds)
        self.model_ready.labels(name).set(1)
        self.breaker_open.labels(name, version)  # a new gauge child is 0; an open breaker keeps its 1
        for state in BREAKER_STATES:
            self.breaker_transitions.labels(name, version, state)
        self.feedback_recorder(card)
        self._model_known(name)

    def _model_known(self, name: str) -> None:
        """Create the per-model counters of a registered model at 0 (prediction log, unmatched feedback)."""
        for family in (self.predlog_rows, self.predlog_dropped, self.predlog_write_errors, self.feedback_unmatched):
            family.labels(name)

    def breaker_changed(self, card: ModelCard, state: str) -> None:
        """Export a breaker transition."""
        self.breaker_open.labels(card.name, card.version).set(1 if state == "open" else 0)
        self.breaker_transitions.labels(card.name, card.version, state).inc()

    def model_unloaded(self, card: ModelCard) -> None:
        """Clear the gauges of a version no role serves any more (its counters keep their history).

        In multiprocess mode a gauge's value lives in this worker's file until
        the worker exits, so it is set to 0 there as well as dropped here.
        """
        for family, labels in ((self.model_info, (card.name, card.version, card.sha256)),
                               (self.model_load_seconds, (card.name, card.version)),
                               (self.breaker_open, (card.name, card.version))):
            family.labels(*labels).set(0)
            family.remove(*labels)

    def model_failed(self, name: str) -> None:
        """Mark a model as not serving (it failed to load); its per-model counters start at 0 all the same."""
        self.model_ready.labels(name).set(0)
        self._model_known(name)
