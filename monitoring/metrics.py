"""Every Prometheus metric Vigil exports, defined once.

Usage::

    metrics = VigilMetrics(registry=CollectorRegistry())
    bound = metrics.bind(card, variant="stable")   # once per model version
    bound.record_request(seconds, call_seconds, call_size, predictions)   # once per /predict request

Label values come from bounded sets only (model, version, variant, reason,
feature, class, worker, kind) — never from request data. Children are bound
once per model version, and the request path's children are *deferred*: a
request adds to numbers in the worker's memory, which are written to the real
children at most ``flush_seconds`` (default ``FLUSH_SECONDS``) later (by the
request path of a busy worker, by a background thread for an idle one, and
first by the worker answering ``/metrics``), so recording costs no lock,
syscall or file write. A model call's duration, batch size and outputs are not
even counted per request: they are queued as they are and counted with numpy
for all requests at once when the worker flushes; the HTTP metrics of each
endpoint are queued the same way, by the edge itself (:class:`EndpointRecorder`).

Under BentoML every worker writes its own files in ``PROMETHEUS_MULTIPROC_DIR``
and ``/metrics`` merges them: counters and histograms sum across workers; each
gauge names its mode (``livemax`` for facts every worker shares, such as which
versions are loaded; per-worker gauges carry a ``worker`` label).
"""

from __future__ import annotations

import math
import os
import re
import struct
import threading
import time
from array import array
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from service.core.card import ModelCard
    from service.core.predictor import Predictions

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
FLUSH_SECONDS = 1.0
"""Default of how often a busy worker writes its deferred metric values to the shared files.

See :class:`DeferredCounter`; the service takes it from ``VIGIL_METRICS_FLUSH_SECONDS``."""
QUEUE_LIMIT = 4096
"""Queued model calls at which the request path flushes itself (a flush that never came); their outputs were queued with them."""
IDLE_FLUSH_SECONDS = 0.5
"""How often the background thread flushes when no request has (an idle worker's last numbers)."""
PROBABILITY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


def prediction_buckets(card: ModelCard) -> tuple[float, ...]:
    """Buckets for ``vigil_prediction_value``, derived from the model's reference predictions.

    The reference deciles put about a tenth of healthy traffic in each bucket,
    so a shift in the distribution shows as mass moving between buckets; the
    card's range (regression) or [0, 1] (scores) bound them on both sides.
    """
    edges = set(round(q, 6) for q in card.prediction_quantiles)
    if card.task == "regression" and card.prediction_range is not None:
        lo, hi = card.prediction_range.min, card.prediction_range.max
        edges.update({round(lo, 6), round(hi, 6)})
    else:
        edges.update({0.0, 1.0})
    ordered = sorted(e for e in edges if math.isfinite(e))
    return tuple(ordered) if ordered else PROBABILITY_BUCKETS


class DeferredCounter:
    """A counter child whose increments stay in this worker's memory until :meth:`VigilMetrics.flush`.

    In multiprocess mode every ``inc`` of prometheus_client takes a lock, asks
    the kernel for the pid and writes the shared file: a dozen of those per
    request were a fifth of a single-row prediction's CPU. Here the request path
    only adds to a number. One thread records (the worker's event loop); the
    flush, from any thread, writes the difference since the last flush, so no
    increment is lost or counted twice without a lock on the request path.
    """

    __slots__ = ("child", "total", "_flushed")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.total: float = 0
        self._flushed: float = 0

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (visible in the exposition after the next flush)."""
        self.total += amount

    def flush(self) -> None:
        """Write what was added since the last flush to the real child."""
        total = self.total
        if total != self._flushed:
            self.child.inc(total - self._flushed)
            self._flushed = total


class DeferredGauge:
    """A gauge child set from a value kept in memory, written at flush (see :class:`DeferredCounter`)."""

    __slots__ = ("child", "value", "_flushed")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.value: float = 0
        self._flushed: float | None = None

    def inc(self, amount: float = 1) -> None:
        """Raise the value."""
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        """Lower the value."""
        self.value -= amount

    def flush(self) -> None:
        """Export the current value if it changed."""
        value = self.value
        if value != self._flushed:
            self.child.set(value)
            self._flushed = value


class DeferredHistogram:
    """A histogram child whose observations are counted per bucket in memory until flush.

    ``observe`` costs a bisection and two additions instead of two locked
    file writes; :meth:`observe_many` counts a whole array with numpy (a
    64-row request would otherwise pay for 64 observations). The flush adds each
    bucket's new count and the sum to the real child, which is what
    ``Histogram.observe`` does one value at a time.
    """

    __slots__ = ("child", "bounds", "counts", "sum", "_array_bounds", "_flushed_counts", "_flushed_sum",
                 "_buckets", "_sum")

    def __init__(self, child: Any) -> None:
        buckets, bounds, total = (getattr(child, name, None) for name in ("_buckets", "_upper_bounds", "_sum"))
        if buckets is None or bounds is None or total is None:
            raise RuntimeError("this prometheus_client has no Histogram._buckets/_upper_bounds/_sum: "
                               "install prometheus-client>=0.20,<1")
        self.child = child
        self._buckets, self._sum = buckets, total
        self.bounds: list[float] = list(bounds)
        self._array_bounds = np.asarray(self.bounds)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self._flushed_counts = [0] * len(self.bounds)
        self._flushed_sum = 0.0

    def observe(self, value: float) -> None:
        """Count one value (``le`` semantics: the first bucket whose bound is at least the value)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_many(self, values: np.ndarray) -> None:
        """Count every value of an array."""
        if values.size == 0:
            return
        counts = np.bincount(np.searchsorted(self._array_bounds, values, side="left"), minlength=len(self.bounds))
        for index in np.flatnonzero(counts).tolist():
            self.counts[index] += int(counts[index])
        self.sum += float(values.sum())

    def flush(self) -> None:
        """Add the new observations to the real child."""
        if self.counts == self._flushed_counts:  # nothing observed since: one C comparison, not a Python loop
            return
        for index, count in enumerate(self.counts):
            delta = count - self._flushed_counts[index]
            if delta:
                self._buckets[index].inc(delta)
                self._flushed_counts[index] = count
        total = self.sum
        if total != self._flushed_sum:
            self._sum.inc(total - self._flushed_sum)
            self._flushed_sum = total


Deferred = DeferredCounter | DeferredGauge | DeferredHistogram


class _FlushBeforeCollect:
    """Registered first, so a collection of the registry (single-process mode) sees every deferred value."""

    def __init__(self, metrics: VigilMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        self.metrics.flush()
        return []


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other")
"""Values of the ``method`` label; any other method is counted as ``other``."""
METHOD_CODES = {method: code for code, method in enumerate(HTTP_METHODS[:-1])}
"""A method's code in :attr:`EndpointRecorder.done` (``METHOD_CODES.get(method, OTHER_METHOD)``)."""
OTHER_METHOD = len(HTTP_METHODS) - 1

ROW_NUMBERS = 3
"""Numbers in one queued row (:attr:`EndpointRecorder.done`, a version's model calls)."""
pack_row = struct.Struct(f"{ROW_NUMBERS}d").pack
"""A row's numbers as the bytes of doubles, appended with ``array("d").frombytes``.

``array.extend`` converts each number through a slow argument parser, twice: for a
row of three that was ~190 ns against ~80 ns for ``frombytes(pack_row(...))``,
twice per request (callgrind: 4,300 of monitoring's instructions per single-row
request, ``benchmarks/README.md``)."""

_QUEUED_NUMBERS_LIMIT = ROW_NUMBERS * QUEUE_LIMIT  # once, not per request


class EndpointRecorder:
    """The HTTP metrics of one endpoint (a bounded label value), recorded without a call per request.

    A Python call costs more on a request's path than the recording it makes
    (the three calls this class took before were about 2 µs of a ~100 µs
    single-row request, measured in one process; ``benchmarks/README.md``), so the edge writes
    two attributes itself: :attr:`active` goes up by one when a request begins and down
    when it ends, and the ended request's row is appended to :attr:`done`:
    ``done.frombytes(pack_row(METHOD_CODES.get(method, OTHER_METHOD), status, seconds))``. The flush
    exports :attr:`active` as the in-progress gauge and counts :attr:`done` into
    the duration histogram and the status counters with numpy (:meth:`count_done`).
    Only the worker's event loop writes them (see :class:`DeferredCounter`).
    """

    __slots__ = ("metrics", "endpoint", "active", "done", "_in_progress", "_duration", "_answered")

    def __init__(self, metrics: VigilMetrics, endpoint: str) -> None:
        self.metrics = metrics
        self.endpoint = endpoint
        self.active = 0
        """Requests to the endpoint begun and not yet ended in this worker."""
        self.done = array("d")
        """Ended requests not yet counted, three numbers each: method code, status, seconds."""
        self._in_progress = metrics.gauge(metrics.http_in_progress, endpoint)
        self._duration = metrics.histogram(metrics.http_duration, endpoint)
        self._answered: dict[float, DeferredCounter] = {}

    def count_done(self) -> None:
        """Count the queued requests into the children; called by the flush, under its lock.

        Whole rows are taken from the front of :attr:`done` while the event
        loop may append behind them (:func:`_take_rows`).
        """
        self._in_progress.value = self.active
        figures = _take_rows(self.done, ROW_NUMBERS)
        if figures is None:
            return
        self._duration.observe_many(figures[:, 2])
        keys, counts = np.unique(figures[:, 0] * 1000 + figures[:, 1], return_counts=True)
        for key, count in zip(keys.tolist(), counts.tolist()):
            answered = self._answered.get(key)
            if answered is None:
                method, status = divmod(int(key), 1000)
                answered = self._answered[key] = self.metrics.counter(
                    self.metrics.http_requests, self.endpoint, HTTP_METHODS[method], str(status))
            answered.inc(count)


class VigilMetrics:
    """The metric families; one instance per process, given the registry to register in."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY, flush_seconds: float = FLUSH_SECONDS) -> None:
        self.registry = registry
        self.flush_seconds = flush_seconds
        r = registry
        self._deferred: dict[tuple[int, tuple[str, ...]], Deferred] = {}
        self._bound: dict[tuple[str, str, str, str], BoundModelMetrics] = {}
        self.endpoints: dict[str, EndpointRecorder] = {}
        """Recorders by endpoint label; the edge reads it directly (:meth:`endpoint` adds to it)."""
        # Re-entrant: the flush creates the status counters of new (method, status) pairs.
        self._flush_lock = threading.RLock()
        self._flushing = threading.Event()
        self.flush_due = 0.0
        """``time.perf_counter()`` from which the request path flushes (the edge checks it after each request)."""
        if r is not None:
            r.register(_FlushBeforeCollect(self))
        self.http_requests = Counter(
            "vigil_http_requests", "HTTP requests answered, by endpoint (a fixed set; unknown paths are 'other').",
            ["endpoint", "method", "code"], registry=r)
        self.http_duration = Histogram(
            "vigil_http_request_duration_seconds", "Time to answer an HTTP request, by endpoint.",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.http_in_progress = Gauge(
            "vigil_http_requests_in_progress", "HTTP requests being answered now, summed over workers.",
            ["endpoint"], multiprocess_mode="livesum", registry=r)
        self.overloaded = Counter(
            "vigil_requests_overloaded", "Requests refused with 429 because the worker was at its concurrency limit.",
            ["endpoint"], registry=r)
        self.request_timeouts = Counter(
            "vigil_request_timeouts", "Requests answered 504 because they ran past the request timeout.",
            ["endpoint"], registry=r)
        self.request_duration = Histogram(
            "vigil_request_duration_seconds", "End-to-end time of a /predict request inside the service.",
            ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference_duration = Histogram(
            "vigil_inference_duration_seconds", "Time of one model call (onnxruntime or fallback).",
            ["model", "version", "variant"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "vigil_batch_size", "Instances per model call.",
            ["model", "version"], buckets=BATCH_BUCKETS, registry=r)
        self.predictions = Counter(
            "vigil_predictions", "Instances answered.", ["model", "version", "variant"], registry=r)
        # Some histograms take their buckets from each model's reference data, and a histogram
        # object has one layout: each layout gets its own object under the same name, and one
        # collector exports them as one family (see per_model_histogram()).
        self._layouts: dict[str, dict[tuple[float, ...], Histogram]] = {}
        self.predicted_class = Counter(
            "vigil_predicted_class", "Classification outputs by class.",
            ["model", "version", "variant", "class"], registry=r)
        self.prediction_out_of_range = Counter(
            "vigil_prediction_out_of_range",
            "Model outputs outside the card's range (regression) or not finite.",
            ["model", "version"], registry=r)
        self.input_missing = Counter(
            "vigil_input_missing", "Null or absent values in accepted requests (nullable features).",
            ["model", "feature"], registry=r)
        self.input_out_of_range = Counter(
            "vigil_input_out_of_range",
            "Accepted values outside the reference min/max recorded in the card.",
            ["model", "feature"], registry=r)
        self.input_rejected = Counter(
            "vigil_input_rejected", "Requests refused by validation, by reason.", ["model", "reason"], registry=r)
        self.model_errors = Counter(
            "vigil_model_errors", "Exceptions raised by the model runtime.", ["model", "version", "kind"], registry=r)
        self.model_info = Gauge(
            "vigil_model_info", "1 for every model version loaded and serving.",
            ["model", "version", "sha256"], multiprocess_mode="livemax", registry=r)
        self.model_load_seconds = Gauge(
            "vigil_model_load_seconds", "Time taken to load the model version.",
            ["model", "version"], multiprocess_mode="livemax", registry=r)
        self.model_ready = Gauge(
            "vigil_model_ready", "1 when the model serves, 0 when it failed to load.",
            ["model"], multiprocess_mode="livemin", registry=r)
        self.fallback = Counter(
            "vigil_fallback", "Instances answered by the heuristic fallback, by reason.",
            ["model", "version", "reason"], registry=r)
        self.breaker_open = Gauge(
            "vigil_breaker_open", "1 while the circuit breaker of a model version is open (in any worker).",
            ["model", "version"], multiprocess_mode="livemax", registry=r)
        self.breaker_transitions = Counter(
            "vigil_breaker_transitions", "Circuit breaker state changes, by the state entered.",
            ["model", "version", "to"], registry=r)
        # Drift verdicts are read from the drift job's latest.json by every worker: all workers
        # agree, so 'livemax' exports one series per model version instead of one per worker.
        self.drift_detected = Gauge(
            "vigil_drift_detected", "1 when the latest drift run judged the dataset drifted.",
            ["model", "version"], multiprocess_mode="livemax", registry=r)
        self.drift_share = Gauge(
            "vigil_drift_share", "Share of features judged drifted by the latest drift run.",
            ["model", "version"], multiprocess_mode="livemax", registry=r)
        self.feature_drift_score = Gauge(
            "vigil_feature_drift_score", "Drift score of a feature in the latest drift run (stat test's own scale).",
            ["model", "version", "feature"], multiprocess_mode="livemax", registry=r)
        self.feature_drift_detected = Gauge(
            "vigil_feature_drift_detected", "1 when the latest drift run judged the feature drifted.",
            ["model", "version", "feature"], multiprocess_mode="livemax", registry=r)
        self.prediction_drift_score = Gauge(
            "vigil_prediction_drift_score", "Drift score of the prediction column in the latest drift run.",
            ["model", "version"], multiprocess_mode="livemax", registry=r)
        self.drift_rows = Gauge(
            "vigil_drift_rows", "Logged rows in the window of the latest drift run.",
            ["model", "version"], multiprocess_mode="livemax", registry=r)
        self.drift_last_run = Gauge(
            "vigil_drift_last_run_timestamp_seconds", "Unix time of the latest drift run.",
            ["model", "version"], multiprocess_mode="livemax", registry=r)
        self.rollbacks = Counter(
            "vigil_rollbacks", "Canary rollbacks, by the rule that was breached (or 'manual').",
            ["model", "version", "reason"], registry=r)
        self.canary_traffic = Gauge(
            "vigil_canary_traffic_ratio", "Share of requests routed to the canary version (0 once rolled back).",
            ["model", "version"], multiprocess_mode="livemax", registry=r)
        self.deploy_reloads = Counter(
            "vigil_deploy_reloads", "Deploy config reloads applied.", registry=r)
        self.deploy_reload_errors = Counter(
            "vigil_deploy_reload_errors", "Deploy config reloads refused (invalid file); the last good config serves.",
            registry=r)
        self.feedback = Counter(
            "vigil_feedback", "Ground-truth values accepted (duplicates are not counted).", ["model", "version"],
            registry=r)
        self.feedback_unmatched = Counter(
            "vigil_feedback_unmatched", "Feedback refused because its request id is not in the prediction log.",
            ["model"], registry=r)
        self.feedback_correct = Counter(
            "vigil_feedback_correct", "Classification feedback whose actual label equals the served prediction.",
            ["model", "version", "variant"], registry=r)
        self.feedback_outcomes = Counter(
            "vigil_feedback_outcomes", "Confusion counts: served prediction against the actual label.",
            ["model", "version", "predicted", "actual"], registry=r)
        self.model_quality = Gauge(
            "vigil_model_quality", "Quality on joined feedback from the latest performance run, by metric.",
            ["model", "version", "metric"], multiprocess_mode="livemax", registry=r)
        self.prediction_bias = Gauge(
            "vigil_prediction_bias",
            "Classification: predicted minus observed share of a class; regression (class=\"value\"): mean of "
            "actual minus predicted. From the latest performance run.",
            ["model", "version", "class"], multiprocess_mode="livemax", registry=r)
        self.quality_degraded = Gauge(
            "vigil_quality_degraded", "1 when live quality dropped below the card's training metrics beyond tolerance.",
            ["model", "version"], multiprocess_mode="livemax", registry=r)
        self.predlog_rows = Counter(
            "vigil_predlog_rows", "Rows written to the prediction log.", ["model"], registry=r)
        self.predlog_dropped = Counter(
            "vigil_predlog_dropped", "Rows not logged: buffer full or write failed.", ["model"], registry=r)
        self.predlog_write_errors = Counter(
            "vigil_predlog_write_errors", "Prediction log flushes that failed (disk full, permissions).",
            ["model"], registry=r)
        self.predlog_flush_seconds = Histogram(
            "vigil_predlog_flush_seconds", "Time of one prediction log flush.", buckets=LATENCY_BUCKETS, registry=r)
        self.process_memory = Gauge(
            "vigil_process_resident_memory_bytes", "Resident memory of the worker process.",
            ["worker"], multiprocess_mode="livemax", registry=r)
        self.process_cpu = Counter(
            "vigil_process_cpu_seconds", "CPU time (user + system) used by the worker process.",
            ["worker"], registry=r)
        self.process_open_fds = Gauge(
            "vigil_process_open_fds", "Open file descriptors of the worker process.",
            ["worker"], multiprocess_mode="livemax", registry=r)
        self.process_threads = Gauge(
            "vigil_process_threads", "Threads of the worker process.",
            ["worker"], multiprocess_mode="livemax", registry=r)

    def per_model_histogram(self, name: str, documentation: str, labelnames: list[str],
                            buckets: tuple[float, ...]) -> Histogram:
        """The histogram object of family ``name`` for one bucket layout (created once per layout)."""
        layouts = self._layouts.get(name)
        if layouts is None:
            layouts = self._layouts[name] = {}
            if self.registry is not None:
                self.registry.register(_MergedFamily(layouts))
        family = layouts.get(buckets)
        if family is None:
            family = layouts[buckets] = Histogram(name, documentation, labelnames, buckets=buckets, registry=None)
        return family

    def prediction_value_family(self, buckets: tuple[float, ...]) -> Histogram:
        """The ``vigil_prediction_value`` family object for one bucket layout."""
        return self.per_model_histogram(
            "vigil_prediction_value",
            "Regression value, or positive-class score of a binary classifier; buckets from the reference predictions.",
            ["model", "version", "variant"], buckets)

    def counter(self, family: Counter, *labels: str) -> DeferredCounter:
        """The deferred child of a counter for ``labels`` (one per label set, shared by every caller)."""
        return self._deferred_child(DeferredCounter, family, labels)  # type: ignore[return-value]

    def gauge(self, family: Gauge, *labels: str) -> DeferredGauge:
        """The deferred child of a gauge for ``labels``; only the worker's event loop may change it."""
        return self._deferred_child(DeferredGauge, family, labels)  # type: ignore[return-value]

    def histogram(self, family: Histogram, *labels: str) -> DeferredHistogram:
        """The deferred child of a histogram for ``labels``."""
        return self._deferred_child(DeferredHistogram, family, labels)  # type: ignore[return-value]

    def _deferred_child(self, kind: type, family: Any, labels: tuple[str, ...]) -> Deferred:
        key = (id(family), labels)
        child = self._deferred.get(key)
        if child is None:
            with self._flush_lock:
                child = self._deferred.get(key)
                if child is None:
                    child = self._deferred[key] = kind(family.labels(*labels) if labels else family)
        return child

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
        """Mark a model version as loaded."""
        self.model_info.labels(card.name, card.version, card.sha256).set(1)
        self.model_load_seconds.labels(card.name, card.version).set(load_seconds)
        self.model_ready.labels(card.name).set(1)

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
        """Mark a model as not serving (it failed to load)."""
        self.model_ready.labels(name).set(0)


def exposition() -> tuple[bytes, str]:
    """The text served at ``/metrics``: every worker's families merged in multiprocess mode, else this process's."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if multiproc_dir:
        from prometheus_client import multiprocess

        forget_dead_workers(multiproc_dir)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=multiproc_dir)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


_LIVE_GAUGE = re.compile(r"^gauge_live\w+?_(\d+)\.db$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _gauge_writer_pids(multiproc_dir: str) -> set[int]:
    """Pids that wrote live-mode gauge files (Vigil's workers), running or not."""
    return {int(m.group(1)) for name in os.listdir(multiproc_dir) if (m := _LIVE_GAUGE.match(name))}


def live_worker_pids(multiproc_dir: str) -> set[int]:
    """Pids of processes that write live gauges (Vigil's workers) and are still running."""
    return {pid for pid in _gauge_writer_pids(multiproc_dir) if _pid_alive(pid)}


def forget_dead_workers(multiproc_dir: str) -> list[int]:
    """Drop the live-mode gauge files of workers that died without cleaning up (SIGKILL, OOM).

    prometheus_client only forgets a process when ``mark_process_dead`` is called,
    which a killed worker never does: its in-progress counts and per-worker gauges
    would stay exported forever. Counters and histograms are kept (they must not
    go backwards).
    """
    from prometheus_client import multiprocess

    dead = {pid for pid in _gauge_writer_pids(multiproc_dir) if not _pid_alive(pid)}
    for pid in dead:
        multiprocess.mark_process_dead(pid, multiproc_dir)
    return sorted(dead)


class _MergedFamily:
    """Exposes several same-named histogram objects (one per bucket layout) as one family."""

    def __init__(self, families: dict[tuple[float, ...], Histogram]) -> None:
        self.families = families

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        merged = None
        for family in self.families.values():
            for metric in family.collect():
                if merged is None:
                    merged = metric
                else:
                    merged.samples.extend(metric.samples)
        if merged is not None:
            yield merged


def _take_rows(queue: array, width: int) -> np.ndarray | None:
    """The whole rows of ``width`` numbers at the front of ``queue``, removed from it (None: no whole row).

    A copy: the event loop may go on appending behind them, even between the
    numbers of one row, and those stay for the next flush.
    """
    taken = len(queue) - len(queue) % width
    if not taken:
        return None
    rows = np.frombuffer(queue[:taken], dtype=queue.typecode).reshape(-1, width)
    del queue[:taken]
    return rows


class BoundModelMetrics:
    """Deferred children for one (model, version, variant), bound once: the request path's recorder.

    Call it from the worker's event loop only (see :class:`DeferredCounter`).
    :meth:`record_request` and :meth:`record_call` only queue what they are
    given; :meth:`count_queued` counts the queue into the children when the
    worker flushes, one numpy pass for every request since the last flush. A
    request is one call to :meth:`record_request`: on a single-row request each
    call, and each object it touches, is a measurable share of monitoring's
    cost (``benchmarks/README.md``).
    """

    def __init__(self, metrics: VigilMetrics, card: ModelCard, variant: str) -> None:
        name, version = card.name, card.version
        self.metrics = metrics
        self.model = name
        self.request_duration = metrics.histogram(metrics.request_duration, name, version)
        self.inference_duration = metrics.histogram(metrics.inference_duration, name, version, variant)
        self.batch_size = metrics.histogram(metrics.batch_size, name, version)
        self.predictions = metrics.counter(metrics.predictions, name, version, variant)
        self.prediction_value = metrics.histogram(
            metrics.prediction_value_family(prediction_buckets(card)), name, version, variant)
        self.out_of_range = metrics.counter(metrics.prediction_out_of_range, name, version)
        self.regression = card.task != "classification"
        self.binary = not self.regression and len(card.labels or []) == 2
        self.classes = [metrics.counter(metrics.predicted_class, name, version, variant, str(label))
                        for label in (card.labels or [])]
        self._missing = {f.name: metrics.counter(metrics.input_missing, name, f.name) for f in card.features}
        self._input_oor = {f.name: metrics.counter(metrics.input_out_of_range, name, f.name) for f in card.features}
        # Queued for the flush: each request's (request seconds, model call seconds, instances in the
        # call) as three doubles (NaN request seconds: a model call alone; 0 instances: no call), and the
        # numbers of each call's outputs (regression values, or one row of class probabilities an
        # instance), copied into a queue of their own type. Copied, not kept: an output array kept until
        # the flush left the allocator fragmented, and onnxruntime's allocations slower (callgrind:
        # 1,300 instructions per single-row request). No queue holds an object the garbage collector
        # tracks, so the requests between two flushes add nothing to its collections.
        self._calls = array("d")
        self._outputs = {"f": array("f"), "d": array("d")}  # by numpy's dtype.char, which array shares
        self._width = 1 if self.regression else len(self.classes)
        self._errors: dict[str, DeferredCounter] = {}
        self._fallback: dict[str, DeferredCounter] = {}
        self._version = version

    def record_inputs(self, missing: dict[str, int], out_of_range: dict[str, int]) -> None:
        """Count missing and out-of-reference-range input values of an accepted request."""
        for feature, count in missing.items():
            self._missing[feature].inc(count)
        for feature, count in out_of_range.items():
            self._input_oor[feature].inc(count)

    def record_request(self, seconds: float, call_seconds: float, call_size: int,
                       answered: Predictions | None) -> None:
        """One ``/predict`` request: its duration, its model call (``call_size`` 0: none) and what the model answered.

        ``answered`` holds the model's valid outputs (None when it answered
        nothing); everything is counted at the next flush.
        """
        calls = self._calls
        calls.frombytes(pack_row(seconds, call_seconds, call_size))
        if answered is not None:
            # One kind per version (values or probabilities, by the card's task), each row ``_width`` numbers.
            output = answered.values if self.regression else answered.probabilities
            if output is not None:
                queue = self._outputs.get(output.dtype.char)
                if queue is None:  # neither float32 nor float64: rare, counted as float64
                    output, queue = output.astype(np.float64), self._outputs["d"]
                queue.frombytes(output.tobytes())  # C order whatever the array's layout
        if len(calls) >= _QUEUED_NUMBERS_LIMIT:  # every output came with a row here: this bounds them too
            self.metrics.flush()

    def record_call(self, seconds: float, size: int, answered: Predictions | None = None) -> None:
        """One model call outside :meth:`record_request` (a failed one, or the fallback's, with its outputs)."""
        self.record_request(math.nan, seconds, size, answered)

    def count_queued(self) -> None:
        """Count every queued call and output into the children; called by the flush, under its lock.

        The flushers are the only writers of these children and the only
        takers from the queues, and the event loop only appends, a whole row
        (or a call's outputs) at a time: taking whole rows from the front of
        each queue (:func:`_take_rows`) never loses one appended meanwhile.
        """
        figures = _take_rows(self._calls, ROW_NUMBERS)
        if figures is not None:
            requests = figures[:, 0]
            self.request_duration.observe_many(requests[~np.isnan(requests)])
            called = figures[figures[:, 2] > 0]
            self.inference_duration.observe_many(called[:, 1])
            self.batch_size.observe_many(called[:, 2])
        # Not skipped when no row was: another thread may have flushed between a row and its outputs.
        for queue in self._outputs.values():
            outputs = _take_rows(queue, self._width)
            if outputs is not None:
                self._count_outputs(outputs)

    def _count_outputs(self, outputs: np.ndarray) -> None:
        """Count output rows (one an instance) into the prediction families."""
        self.predictions.inc(len(outputs))
        if self.regression:
            values = outputs[:, 0]
            self.prediction_value.observe_many(values[np.isfinite(values)])
            return
        finite_rows = np.isfinite(outputs).all(axis=1)
        counts = np.bincount(outputs.argmax(axis=1)[finite_rows], minlength=len(self.classes))
        for index in np.flatnonzero(counts).tolist():
            self.classes[index].inc(int(counts[index]))
        if self.binary:
            self.prediction_value.observe_many(outputs[finite_rows, 1])

    def record_invalid_outputs(self, count: int) -> None:
        """Count model outputs that were non-finite or outside the allowed range."""
        self.out_of_range.inc(count)

    def record_fallback(self, reason: str, count: int) -> None:
        """Count instances answered by the fallback."""
        child = self._fallback.get(reason)
        if child is None:
            child = self._fallback[reason] = self.metrics.counter(self.metrics.fallback, self.model, self._version,
                                                                  reason)
        child.inc(count)

    def record_error(self, kind: str) -> None:
        """Count an exception from the model runtime (``kind`` is the exception class name)."""
        child = self._errors.get(kind)
        if child is None:
            child = self._errors[kind] = self.metrics.counter(self.metrics.model_errors, self.model, self._version,
                                                              kind)
        child.inc()


def error_buckets(card: ModelCard) -> tuple[float, ...]:
    """Buckets for regression errors, scaled to the model's reference prediction range."""
    span = 1.0
    if card.prediction_range is not None and card.prediction_range.max > card.prediction_range.min:
        span = card.prediction_range.max - card.prediction_range.min
    steps = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0)
    return tuple(sorted({round(-span * f, 6) for f in steps} | {0.0} | {round(span * f, 6) for f in steps}))


class FeedbackMetrics:
    """Ground truth for one model version: counts, confusion, and regression errors."""

    def __init__(self, metrics: VigilMetrics, card: ModelCard) -> None:
        name, version = card.name, card.version
        self.metrics = metrics
        self.model, self.version = name, version
        self.accepted = metrics.feedback.labels(name, version)
        buckets = error_buckets(card)
        self.error = metrics.per_model_histogram(
            "vigil_prediction_error", "Actual minus predicted value (regression feedback).",
            ["model", "version"], buckets).labels(name, version)
        self.abs_error = metrics.per_model_histogram(
            "vigil_prediction_abs_error", "Absolute error of regression predictions on feedback.",
            ["model", "version"], tuple(b for b in buckets if b > 0)).labels(name, version)

    def record(self, variant: str, predicted: Any, actual: Any, regression: bool) -> None:
        """One accepted actual for a prediction served by ``variant``."""
        self.accepted.inc()
        if regression:
            error = float(actual) - float(predicted)
            self.error.observe(error)
            self.abs_error.observe(abs(error))
            return
        self.metrics.feedback_outcomes.labels(self.model, self.version, str(predicted), str(actual)).inc()
        if str(predicted) == str(actual):
            self.metrics.feedback_correct.labels(self.model, self.version, variant).inc()


class ProcessSampler:
    """Samples this worker's memory, CPU, fds and threads into the ``vigil_process_*`` families.

    BentoML's ``/metrics`` runs prometheus_client in multiprocess mode, which
    exports no ``process_*`` metrics; this fills the gap per worker from a
    daemon thread (reading ``/proc`` is I/O, so it stays off the request path).
    """

    def __init__(self, metrics: VigilMetrics, worker: str, interval: float = 2.0) -> None:
        self.interval = interval
        self.memory = metrics.process_memory.labels(worker)
        self.cpu = metrics.process_cpu.labels(worker)
        self.fds = metrics.process_open_fds.labels(worker)
        self.threads = metrics.process_threads.labels(worker)
        self._cpu_seen = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        """Take one sample now."""
        times = os.times()
        cpu = times.user + times.system
        if cpu > self._cpu_seen:
            self.cpu.inc(cpu - self._cpu_seen)
            self._cpu_seen = cpu
        self.memory.set(_resident_bytes())
        self.threads.set(threading.active_count() if not _proc_available() else _proc_threads())
        if _proc_available():
            self.fds.set(len(os.listdir("/proc/self/fd")))

    def start(self) -> None:
        """Sample now and then every ``interval`` seconds until :meth:`stop`."""
        self.sample()
        self._thread = threading.Thread(target=self._run, name="vigil-process-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except OSError:
                pass  # /proc hiccups must not kill the sampler

    def stop(self) -> None:
        """Stop the sampling thread."""
        self._stop.set()


def _proc_available() -> bool:
    return os.path.isdir("/proc/self/fd")


def _resident_bytes() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return float(int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except OSError:
        import resource

        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _proc_threads() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return threading.active_count()
