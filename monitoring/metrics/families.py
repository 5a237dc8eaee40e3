"""Every Prometheus family Vigil exports, defined once, and the bucket layouts they use.

Label values come from bounded sets only (model, version, variant, reason,
feature, class, worker, kind), never from request data. Under BentoML every
worker writes its own files in ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics``
merges them: counters and histograms sum across workers; each gauge names its
mode (``livemax`` for facts every worker shares, such as which versions are
loaded; per-worker gauges carry a ``worker`` label).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from monitoring.metrics.deferred import DeferredChildren
from monitoring.metrics.exposition import _FlushBeforeCollect, _MergedFamily

if TYPE_CHECKING:
    from service.core.card import ModelCard

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
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


def error_buckets(card: ModelCard) -> tuple[float, ...]:
    """Buckets for regression errors, scaled to the model's reference prediction range."""
    span = 1.0
    if card.prediction_range is not None and card.prediction_range.max > card.prediction_range.min:
        span = card.prediction_range.max - card.prediction_range.min
    steps = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0)
    return tuple(sorted({round(-span * f, 6) for f in steps} | {0.0} | {round(span * f, 6) for f in steps}))


class MetricFamilies(DeferredChildren):
    """The metric families, registered in one registry, and their deferred children (:class:`DeferredChildren`).

    :class:`~monitoring.metrics.VigilMetrics` adds the recorders and the flush.
    """

    def __init__(self, registry: CollectorRegistry | None) -> None:
        super().__init__()
        self.registry = registry
        r = registry
        if r is not None:
            r.register(_FlushBeforeCollect(self.flush))  # first: a collection sees every deferred value
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
        self.batched_requests = Histogram(
            "vigil_batched_requests",
            "Requests answered by one model call on the model threads, for models with batching on (above 1: merged).",
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
        self.promotions = Counter(
            "vigil_promotions", "Canaries promoted to stable by the fleet's decision (promote_when), once per fleet.",
            ["model", "version"], registry=r)
        self.canary_phase = Gauge(
            "vigil_canary_phase", "Each model's canary as this worker routes it: 0 none, 1 progressing, "
            "2 rolled back, 3 promoted. Workers that disagree have not all taken the fleet's decision.",
            ["model"], multiprocess_mode="liveall", registry=r)
        self.deploy_routing_hash = Gauge(
            "vigil_deploy_routing_hash", "A 48-bit digest of the routing this worker serves (every model's stable, "
            "canary and canary share): equal on every worker and replica that serve the same deploy config and state.",
            multiprocess_mode="liveall", registry=r)
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
            "vigil_feedback_unmatched", "Feedback values never matched to a logged prediction: refused at once (no such logged instance), "
            "or stored and given up on after VIGIL_FEEDBACK_MATCH_SECONDS (kept for the jobs).",
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

    def prediction_error_family(self, buckets: tuple[float, ...]) -> Histogram:
        """The ``vigil_prediction_error`` family object for one bucket layout."""
        return self.per_model_histogram(
            "vigil_prediction_error", "Actual minus predicted value (regression feedback).",
            ["model", "version"], buckets)

    def prediction_abs_error_family(self, buckets: tuple[float, ...]) -> Histogram:
        """The ``vigil_prediction_abs_error`` family object for one bucket layout."""
        return self.per_model_histogram(
            "vigil_prediction_abs_error", "Absolute error of regression predictions on feedback.",
            ["model", "version"], buckets)
