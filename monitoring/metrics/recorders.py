"""The recorders: what the request path, the edge and the feedback handler call to record.

Each is bound once (per model version and variant, per endpoint, per version
with feedback) and keeps its children, so a request finds them in attributes.
:class:`BoundModelMetrics` and :class:`EndpointRecorder` only queue numbers;
the worker's flush counts the queues into the deferred children with numpy.
"""

from __future__ import annotations

import math
from array import array
from typing import TYPE_CHECKING, Any

import numpy as np

from monitoring.metrics.deferred import _QUEUED_NUMBERS_LIMIT, ROW_NUMBERS, DeferredCounter, _take_rows, pack_row
from monitoring.metrics.families import error_buckets, prediction_buckets
from service.core.predictor import FALLBACK_REASONS, VARIANTS

if TYPE_CHECKING:
    from monitoring.metrics.families import MetricFamilies
    from service.core.card import ModelCard
    from service.core.predictor import Predictions

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other")
"""Values of the ``method`` label; any other method is counted as ``other``."""
METHOD_CODES = {method: code for code, method in enumerate(HTTP_METHODS[:-1])}
"""A method's code in :attr:`EndpointRecorder.done` (``METHOD_CODES.get(method, OTHER_METHOD)``)."""
OTHER_METHOD = len(HTTP_METHODS) - 1


class EndpointRecorder:
    """The HTTP metrics of one endpoint (a bounded label value), recorded without a call per request.

    On a request's path a Python call costs more than the recording it would
    make, so the edge calls nothing here and writes two attributes itself:
    :attr:`active` goes up by one when a request begins and down when it ends,
    and the ended request's row is appended to :attr:`done`:
    ``done.frombytes(pack_row(METHOD_CODES.get(method, OTHER_METHOD), status, seconds))``.
    The flush exports :attr:`active` as the in-progress gauge and counts
    :attr:`done` into the duration histogram and the status counters with numpy
    (:meth:`count_done`). Only the worker's event loop writes them (see
    :class:`DeferredCounter`).
    """

    __slots__ = ("metrics", "endpoint", "active", "done", "_in_progress", "_duration", "_answered")

    def __init__(self, metrics: MetricFamilies, endpoint: str) -> None:
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


class BoundModelMetrics:
    """Deferred children for one (model, version, variant), bound once: the request path's recorder.

    Call it from the worker's event loop only (see :class:`DeferredCounter`).
    :meth:`record_request` and :meth:`record_call` only queue what they are
    given; :meth:`count_queued` counts the queue into the children when the
    worker flushes, one numpy pass for every request since the last flush. A
    request is one call to :meth:`record_request`, which touches as few objects
    as it can: on a single-row request each call and each object is a share of
    monitoring's cost worth saving.
    """

    def __init__(self, metrics: MetricFamilies, card: ModelCard, variant: str) -> None:
        name, version = card.name, card.version
        self.metrics = metrics
        self.model = name
        self.request_duration = metrics.histogram(metrics.request_duration, name, version)
        self.inference_duration = metrics.histogram(metrics.inference_duration, name, version, variant)
        self.batch_size = metrics.histogram(metrics.batch_size, name, version)
        self.batched_requests = metrics.histogram(metrics.batched_requests, name, version)
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
        # instance), copied into a queue of their own type. Copied, not kept: output arrays kept until
        # the flush fragment the allocator and slow down onnxruntime's own allocations. No queue holds an
        # object the garbage collector tracks, so the requests between two flushes add nothing to its
        # collections.
        self._calls = array("d")
        self._outputs = {"f": array("f"), "d": array("d")}  # by numpy's dtype.char, which array shares
        self._width = 1 if self.regression else len(self.classes)
        self._errors: dict[str, DeferredCounter] = {}
        # Every reason at 0 from the start, so the dashboards show 0 and rate() sees a reason's first answers.
        self._fallback = {reason: metrics.counter(metrics.fallback, name, version, reason)
                          for reason in FALLBACK_REASONS}
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

    def record_batched(self, requests: int) -> None:
        """One model call made by a model's batcher: how many requests' rows it carried."""
        self.batched_requests.observe(requests)

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


class FeedbackMetrics:
    """Ground truth for one model version: counts, confusion, and regression errors.

    Every child exists from the start at 0, created when the version loads
    (:meth:`~monitoring.metrics.VigilMetrics.model_loaded`): the dashboards show
    0 before any feedback, and ``increase()`` sees the first one. The confusion
    counts take one child per (predicted, actual) pair of the card's labels,
    the pairs traffic would create anyway.
    """

    def __init__(self, metrics: MetricFamilies, card: ModelCard) -> None:
        name, version = card.name, card.version
        self.metrics = metrics
        self.model, self.version = name, version
        self.regression = card.task == "regression"
        self.accepted = metrics.feedback.labels(name, version)
        if self.regression:
            buckets = error_buckets(card)
            self.error = metrics.prediction_error_family(buckets).labels(name, version)
            self.abs_error = metrics.prediction_abs_error_family(tuple(b for b in buckets if b > 0)).labels(
                name, version)
            return
        for variant in VARIANTS:
            metrics.feedback_correct.labels(name, version, variant)
        labels = [str(label) for label in card.labels or []]
        for predicted in labels:
            for actual in labels:
                metrics.feedback_outcomes.labels(name, version, predicted, actual)

    def record(self, variant: str, predicted: Any, actual: Any) -> None:
        """One accepted actual for a prediction served by ``variant``."""
        self.accepted.inc()
        if self.regression:
            error = float(actual) - float(predicted)
            self.error.observe(error)
            self.abs_error.observe(abs(error))
            return
        self.metrics.feedback_outcomes.labels(self.model, self.version, str(predicted), str(actual)).inc()
        if str(predicted) == str(actual):
            self.metrics.feedback_correct.labels(self.model, self.version, variant).inc()
