"""Metric families, read back from a fresh registry after known calls."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from monitoring.metrics import (
    METHOD_CODES,
    OTHER_METHOD,
    EndpointRecorder,
    ProcessSampler,
    VigilMetrics,
    pack_row,
    prediction_buckets,
)
from service.core.card import ModelCard
from service.core.predictor import BREAKER_STATES, FALLBACK_REASONS, VARIANTS, Predictions
from service.registry.store import Registry
from tests.servers import looping, wait_for


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> VigilMetrics:
    return VigilMetrics(registry)


@pytest.fixture(scope="module")
def cards(example_registry: Path) -> dict[str, ModelCard]:
    reg = Registry(example_registry)
    return {name: reg.card(name) for name in ("cancer", "diabetes")}


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def one_counter(flush_seconds: float = 0.1) -> tuple[CollectorRegistry, VigilMetrics, Any]:
    """A registry with one counter ``c``, and metrics whose deferred child of it the test records into."""
    registry = CollectorRegistry()
    metrics = VigilMetrics(registry=None, flush_seconds=flush_seconds)
    return registry, metrics, metrics.counter(Counter("c", "c", registry=registry))


@contextmanager
def flushing_meanwhile(metrics: VigilMetrics) -> Iterator[None]:
    """Flush ``metrics`` from another thread, as fast as it can, while the block records; a flush
    that raises fails the test."""
    def flush_repeatedly(stop: threading.Event) -> None:
        while not stop.is_set():
            metrics.flush()

    with looping(flush_repeatedly, name="flusher"):
        yield


def test_classifier_predictions_count_classes_and_scores(metrics: VigilMetrics, registry: CollectorRegistry,
                                                         cards: dict[str, ModelCard]) -> None:
    bound = metrics.bind(cards["cancer"], "stable")
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [np.nan, np.nan]])
    bound.record_request(0.002, 0.001, 4, Predictions(labels=[0, 1, 1, 0], probabilities=probs))
    bound.record_invalid_outputs(1)
    labels = {"model": "cancer", "version": "1", "variant": "stable"}
    assert value(registry, "vigil_predictions_total", **labels) == 4
    assert value(registry, "vigil_predicted_class_total", **labels, **{"class": "0"}) == 1
    assert value(registry, "vigil_predicted_class_total", **labels, **{"class": "1"}) == 2
    assert value(registry, "vigil_prediction_value_count", **labels) == 3
    assert value(registry, "vigil_prediction_value_sum", **labels) == pytest.approx(1.6)
    assert value(registry, "vigil_prediction_out_of_range_total", model="cancer", version="1") == 1


def test_regression_values_and_fallbacks(metrics: VigilMetrics, registry: CollectorRegistry,
                                        cards: dict[str, ModelCard]) -> None:
    card = cards["diabetes"]
    assert card.prediction_range is not None
    lo, hi = card.prediction_range.min, card.prediction_range.max
    bound = metrics.bind(card, "stable")
    bound.record_request(0.002, 0.001, 5, Predictions(values=np.array([lo, (lo + hi) / 2, hi + 1000, np.inf, np.nan])))
    bound.record_invalid_outputs(3)
    bound.record_fallback("invalid_output", 3)
    bound.record_fallback("invalid_output", 1)
    labels = {"model": "diabetes", "version": "1", "variant": "stable"}
    assert value(registry, "vigil_predictions_total", **labels) == 5
    assert value(registry, "vigil_prediction_value_count", **labels) == 3
    assert value(registry, "vigil_prediction_out_of_range_total", model="diabetes", version="1") == 3
    assert value(registry, "vigil_fallback_total", model="diabetes", version="1", reason="invalid_output") == 4


def test_prediction_buckets_come_from_reference_deciles(cards: dict[str, ModelCard]) -> None:
    card = cards["diabetes"]
    buckets = prediction_buckets(card)
    assert card.prediction_range is not None
    assert buckets[0] == pytest.approx(card.prediction_range.min, abs=1e-5)
    assert buckets[-1] == pytest.approx(card.prediction_range.max, abs=1e-5)
    assert list(buckets) == sorted(buckets) and len(buckets) >= 5
    assert prediction_buckets(cards["cancer"])[0] == 0.0 and prediction_buckets(cards["cancer"])[-1] == 1.0


def test_two_models_with_different_buckets_export_one_family(metrics: VigilMetrics, registry: CollectorRegistry,
                                                             cards: dict[str, ModelCard]) -> None:
    metrics.bind(cards["cancer"], "stable").record_request(
        0.002, 0.001, 1, Predictions(labels=[1], probabilities=np.array([[0.4, 0.6]])))
    metrics.bind(cards["diabetes"], "stable").record_request(0.002, 0.001, 1, Predictions(values=np.array([150.0])))
    families = [f for f in registry.collect() if f.name == "vigil_prediction_value"]
    assert len(families) == 1
    models = {s.labels["model"] for s in families[0].samples}
    assert models == {"cancer", "diabetes"}


def test_deferred_histogram_matches_observe() -> None:
    one, many = CollectorRegistry(), CollectorRegistry()
    buckets = (0.1, 0.5, 1.0, 5.0)
    a = Histogram("h", "h", buckets=buckets, registry=one)
    b = Histogram("h", "h", buckets=buckets, registry=many)
    deferred = VigilMetrics(registry=None).histogram(b)
    values = np.array([0.05, 0.1, 0.3, 0.5, 0.7, 1.0, 3.0, 9.0, 9.5])
    for v in values:
        a.observe(float(v))
    deferred.observe_many(values[:5])
    for v in values[5:]:
        deferred.observe(float(v))
    assert many.get_sample_value("h_count") == 0  # nothing written before the flush
    deferred.flush()
    for le in ("0.1", "0.5", "1.0", "5.0", "+Inf"):
        assert one.get_sample_value("h_bucket", {"le": le}) == many.get_sample_value("h_bucket", {"le": le})
    assert one.get_sample_value("h_sum") == pytest.approx(many.get_sample_value("h_sum"))
    assert one.get_sample_value("h_count") == many.get_sample_value("h_count") == 9
    deferred.observe(0.2)
    deferred.flush()
    deferred.flush()  # a second flush with nothing new adds nothing
    assert many.get_sample_value("h_count") == 10


def test_collecting_the_registry_flushes_and_children_are_shared(metrics: VigilMetrics,
                                                                 registry: CollectorRegistry) -> None:
    first = metrics.counter(metrics.predictions, "m", "1", "stable")
    assert metrics.counter(metrics.predictions, "m", "1", "stable") is first
    first.inc(3)
    metrics.gauge(metrics.http_in_progress, "/predict").value = 2  # how its one writer sets it (EndpointRecorder)
    assert value(registry, "vigil_predictions_total", model="m", version="1", variant="stable") == 3
    assert value(registry, "vigil_http_requests_in_progress", endpoint="/predict") == 2


def ended(recorder: EndpointRecorder, method: str, status: int, seconds: float) -> None:
    """Queue one ended request the way the edge does (service/edge.py)."""
    recorder.done.frombytes(pack_row(METHOD_CODES.get(method, OTHER_METHOD), status, seconds))


def test_endpoint_recorder_counts_requests_by_method_status_and_time(metrics: VigilMetrics,
                                                                      registry: CollectorRegistry) -> None:
    recorder = metrics.endpoint("/predict")
    assert metrics.endpoint("/predict") is recorder
    recorder.active += 2  # what the edge does as two requests begin
    recorder.active -= 1
    ended(recorder, "POST", 200, 0.003)
    assert value(registry, "vigil_http_requests_in_progress", endpoint="/predict") == 1  # one still running
    recorder.active -= 1
    ended(recorder, "POST", 429, 0.0002)
    ended(recorder, "GET", 200, 0.02)
    ended(recorder, "BREW", 405, 0.001)  # not a method label value: counted as 'other'
    assert value(registry, "vigil_http_requests_in_progress", endpoint="/predict") == 0
    assert value(registry, "vigil_http_requests_total", endpoint="/predict", method="POST", code="200") == 1
    assert value(registry, "vigil_http_requests_total", endpoint="/predict", method="POST", code="429") == 1
    assert value(registry, "vigil_http_requests_total", endpoint="/predict", method="GET", code="200") == 1
    assert value(registry, "vigil_http_requests_total", endpoint="/predict", method="other", code="405") == 1
    assert value(registry, "vigil_http_request_duration_seconds_count", endpoint="/predict") == 4
    assert value(registry, "vigil_http_request_duration_seconds_bucket", endpoint="/predict", le="0.0005") == 1
    assert value(registry, "vigil_http_request_duration_seconds_bucket", endpoint="/predict", le="0.005") == 3
    assert value(registry, "vigil_http_request_duration_seconds_sum", endpoint="/predict") == pytest.approx(0.0242)
    ended(recorder, "POST", 200, 0.003)
    assert value(registry, "vigil_http_requests_total", endpoint="/predict", method="POST", code="200") == 2


def test_queued_http_requests_are_counted_exactly_while_another_thread_flushes() -> None:
    registry = CollectorRegistry()
    metrics = VigilMetrics(registry=registry)
    recorder = metrics.endpoint("/predict")
    with flushing_meanwhile(metrics):
        for i in range(30_000):
            ended(recorder, "POST", 200 if i % 3 else 503, 0.001)
    assert registry.get_sample_value("vigil_http_requests_total", {"endpoint": "/predict", "method": "POST",
                                                                   "code": "200"}) == 20_000
    assert registry.get_sample_value("vigil_http_requests_total", {"endpoint": "/predict", "method": "POST",
                                                                   "code": "503"}) == 10_000
    assert registry.get_sample_value("vigil_http_request_duration_seconds_count", {"endpoint": "/predict"}) == 30_000


def test_flushing_from_another_thread_loses_and_doubles_nothing() -> None:
    registry, metrics, deferred = one_counter()
    with flushing_meanwhile(metrics):
        for _ in range(200_000):
            deferred.inc()
    metrics.flush()
    assert registry.get_sample_value("c_total") == 200_000


def test_the_idle_flush_thread_waits_at_least_the_configured_interval() -> None:
    registry, metrics, deferred = one_counter(3.0)
    metrics.flush()
    metrics.start_flushing()
    try:
        deferred.inc()
        # What must not happen can only be watched for a while: two idle intervals of the default
        # 0.5 s, a third of the configured 3 s (this sleep waits for no state).
        time.sleep(1.0)
        assert registry.get_sample_value("c_total") == 0
    finally:
        metrics.stop_flushing()
    assert registry.get_sample_value("c_total") == 1  # stopping writes what is left


def test_queued_outputs_are_counted_exactly_while_another_thread_flushes(cards: dict[str, ModelCard]) -> None:
    registry = CollectorRegistry()
    metrics = VigilMetrics(registry)
    bound = metrics.bind(cards["cancer"], "stable")
    assert metrics.bind(cards["cancer"], "stable") is bound  # one recorder (and one queue) per version
    one = Predictions(labels=[1], probabilities=np.array([[0.25, 0.75]]))
    two = Predictions(labels=[0, 1], probabilities=np.array([[0.9, 0.1], [0.4, 0.6]]))
    with flushing_meanwhile(metrics):
        for i in range(30_000):  # more than QUEUE_LIMIT between some flushes, and flushes racing the appends
            if i % 3:
                bound.record_request(0.002, 0.001, 1, one)
            else:  # the fallback's way: a call with its outputs, no request
                bound.record_call(0.001, 2, two)
    labels = {"model": "cancer", "version": "1", "variant": "stable"}
    assert value(registry, "vigil_request_duration_seconds_count", model="cancer", version="1") == 20_000
    assert value(registry, "vigil_predictions_total", **labels) == 40_000
    assert value(registry, "vigil_predicted_class_total", **labels, **{"class": "1"}) == 30_000
    assert value(registry, "vigil_predicted_class_total", **labels, **{"class": "0"}) == 10_000
    assert value(registry, "vigil_prediction_value_count", **labels) == 40_000
    assert value(registry, "vigil_inference_duration_seconds_count", **labels) == 30_000
    assert value(registry, "vigil_batch_size_sum", model="cancer", version="1") == 40_000


def test_a_request_records_its_duration_model_call_and_outputs(metrics: VigilMetrics, registry: CollectorRegistry,
                                                               cards: dict[str, ModelCard]) -> None:
    bound = metrics.bind(cards["cancer"], "stable")
    two = Predictions(labels=[0, 1], probabilities=np.array([[0.9, 0.1], [0.4, 0.6]]))
    bound.record_request(0.003, 0.001, 2, two)
    bound.record_request(0.004, 0.0, 0, None)  # answered without a model call (e.g. by the fallback)
    labels = {"model": "cancer", "version": "1"}
    assert value(registry, "vigil_request_duration_seconds_count", **labels) == 2
    assert value(registry, "vigil_request_duration_seconds_sum", **labels) == pytest.approx(0.007)
    assert value(registry, "vigil_request_duration_seconds_bucket", **labels, le="0.0025") == 0
    assert value(registry, "vigil_inference_duration_seconds_count", **labels, variant="stable") == 1
    assert value(registry, "vigil_inference_duration_seconds_sum", **labels, variant="stable") == pytest.approx(0.001)
    assert value(registry, "vigil_batch_size_sum", **labels) == 2
    assert value(registry, "vigil_predictions_total", **labels, variant="stable") == 2
    assert value(registry, "vigil_predicted_class_total", **labels, variant="stable", **{"class": "1"}) == 1


def test_outputs_of_other_dtypes_and_layouts_count_as_their_values(metrics: VigilMetrics,
                                                                     registry: CollectorRegistry,
                                                                     cards: dict[str, ModelCard]) -> None:
    bound = metrics.bind(cards["cancer"], "stable")
    columns = np.array([[0.9, 0.2], [0.1, 0.8]], dtype=np.float32).T  # float32, not C-contiguous
    bound.record_request(0.003, 0.001, 2, Predictions(labels=[0, 1], probabilities=columns))
    labels = {"model": "cancer", "version": "1", "variant": "stable"}
    assert value(registry, "vigil_predicted_class_total", **labels, **{"class": "0"}) == 1
    assert value(registry, "vigil_predicted_class_total", **labels, **{"class": "1"}) == 1
    assert value(registry, "vigil_prediction_value_sum", **labels) == pytest.approx(0.9, abs=1e-6)
    bound.record_request(0.003, 0.001, 1, Predictions(labels=[0], probabilities=np.array([[0.7, 0.3]])))  # float64
    assert value(registry, "vigil_predicted_class_total", **labels, **{"class": "0"}) == 2
    assert value(registry, "vigil_prediction_value_sum", **labels) == pytest.approx(1.2, abs=1e-6)
    regression = metrics.bind(cards["diabetes"], "stable")
    regression.record_request(0.003, 0.001, 3, Predictions(values=np.arange(6, dtype=np.int64)[::2]))
    regression.record_request(0.003, 0.001, 2, Predictions(values=np.array([1.5, 2.5], dtype=np.float32)))
    regression_labels = {"model": "diabetes", "version": "1", "variant": "stable"}
    assert value(registry, "vigil_prediction_value_sum", **regression_labels) == 10
    assert value(registry, "vigil_predictions_total", **regression_labels) == 5


def test_inputs_calls_errors_and_rejections(metrics: VigilMetrics, registry: CollectorRegistry,
                                            cards: dict[str, ModelCard]) -> None:
    bound = metrics.bind(cards["cancer"], "stable")
    bound.record_inputs({"mean radius": 2}, {"mean radius": 1, "mean texture": 3})
    bound.record_call(0.004, 16)
    bound.record_error("InvalidArgument")
    bound.record_error("InvalidArgument")
    metrics.rejected("cancer", "invalid_input")
    assert value(registry, "vigil_input_missing_total", model="cancer", feature="mean radius") == 2
    assert value(registry, "vigil_input_out_of_range_total", model="cancer", feature="mean texture") == 3
    assert value(registry, "vigil_batch_size_sum", model="cancer", version="1") == 16
    assert value(registry, "vigil_inference_duration_seconds_count", model="cancer", version="1", variant="stable") == 1
    assert value(registry, "vigil_model_errors_total", model="cancer", version="1", kind="InvalidArgument") == 2
    assert value(registry, "vigil_input_rejected_total", model="cancer", reason="invalid_input") == 1


def test_model_info_and_readiness(metrics: VigilMetrics, registry: CollectorRegistry,
                                  cards: dict[str, ModelCard]) -> None:
    card = cards["cancer"]
    metrics.model_loaded(card, 0.25)
    metrics.model_failed("broken")
    assert value(registry, "vigil_model_info", model="cancer", version="1", sha256=card.sha256) == 1
    assert value(registry, "vigil_model_load_seconds", model="cancer", version="1") == 0.25
    assert value(registry, "vigil_model_ready", model="cancer") == 1
    assert value(registry, "vigil_model_ready", model="broken") == 0


def test_a_loaded_version_starts_its_known_label_sets_at_zero(metrics: VigilMetrics, registry: CollectorRegistry,
                                                              cards: dict[str, ModelCard]) -> None:
    """Dashboards show 0 instead of "No data", and rate()/increase() see the first increment."""
    for card in cards.values():
        metrics.bind(card, "stable")
        metrics.bind(card, "fallback")
        metrics.model_loaded(card, 0.1)
    metrics.model_failed("broken")
    for name in ("cancer", "diabetes"):
        version = {"model": name, "version": "1"}
        for reason in FALLBACK_REASONS:
            assert value(registry, "vigil_fallback_total", **version, reason=reason) == 0
        assert value(registry, "vigil_breaker_open", **version) == 0
        for state in BREAKER_STATES:
            assert value(registry, "vigil_breaker_transitions_total", **version, to=state) == 0
        assert value(registry, "vigil_feedback_total", **version) == 0
    for name in ("cancer", "diabetes", "broken"):
        for family in ("vigil_predlog_rows_total", "vigil_predlog_dropped_total", "vigil_predlog_write_errors_total",
                       "vigil_feedback_unmatched_total"):
            assert value(registry, family, model=name) == 0, (family, name)
    cancer = {"model": "cancer", "version": "1"}
    for variant in VARIANTS:
        assert value(registry, "vigil_feedback_correct_total", **cancer, variant=variant) == 0
    for predicted in ("0", "1"):
        for actual in ("0", "1"):
            assert value(registry, "vigil_feedback_outcomes_total", **cancer, predicted=predicted, actual=actual) == 0
    # Each task gets its own feedback children only.
    assert value(registry, "vigil_prediction_error_count", **cancer) is None
    assert value(registry, "vigil_prediction_abs_error_count", model="diabetes", version="1") == 0
    assert value(registry, "vigil_feedback_correct_total", model="diabetes", version="1", variant="stable") is None
    # Label sets not known in advance, and events an alert reads from a series' appearance, are not created.
    for family in ("vigil_model_errors_total", "vigil_rollbacks_total", "vigil_input_rejected_total",
                   "vigil_promotions_total"):
        assert not [s for m in registry.collect() for s in m.samples if s.name == family], family


def test_a_loaded_version_keeps_an_open_breaker_and_counts_from_zero(metrics: VigilMetrics,
                                                                     registry: CollectorRegistry,
                                                                     cards: dict[str, ModelCard]) -> None:
    card = cards["cancer"]
    metrics.model_loaded(card, 0.1)
    metrics.breaker_changed(card, "open")
    metrics.model_loaded(card, 0.1)  # a reload of the same version
    assert value(registry, "vigil_breaker_open", model="cancer", version="1") == 1
    assert value(registry, "vigil_breaker_transitions_total", model="cancer", version="1", to="open") == 1
    bound = metrics.bind(card, "fallback")
    bound.record_fallback("breaker_open", 3)
    assert value(registry, "vigil_fallback_total", model="cancer", version="1", reason="breaker_open") == 3


def test_the_breaker_states_are_the_routing_states() -> None:
    from typing import get_args

    from service.serving.routing import BreakerState

    assert set(get_args(BreakerState)) == set(BREAKER_STATES)


def test_process_sampler_reports_this_process(metrics: VigilMetrics, registry: CollectorRegistry,
                                             tmp_path: Path) -> None:
    import psutil

    me = psutil.Process()
    sampler = ProcessSampler(metrics, worker="3")
    sampler.sample()
    # The counter is this process's CPU time (user + system) since it started, as the kernel counts it.
    before = value(registry, "vigil_process_cpu_seconds_total", worker="3")
    assert before == pytest.approx(time.process_time(), abs=0.1)
    burn_until = time.process_time() + 0.3
    while time.process_time() < burn_until:
        pass
    extra = [open(tmp_path / f"f{i}", "w") for i in range(7)]
    try:
        sampler.sample()
        fds = value(registry, "vigil_process_open_fds", worker="3")
        assert fds == me.num_fds()
    finally:
        for fh in extra:
            fh.close()
    after = value(registry, "vigil_process_cpu_seconds_total", worker="3")
    assert after - before == pytest.approx(0.3, abs=0.1)  # the CPU just burnt, no more, no less
    assert value(registry, "vigil_process_resident_memory_bytes", worker="3") == pytest.approx(
        me.memory_info().rss, rel=0.1)
    assert value(registry, "vigil_process_threads", worker="3") == me.num_threads()
    sampler.sample()
    assert value(registry, "vigil_process_open_fds", worker="3") == fds - 7  # the seven files closed


def test_a_started_sampler_samples_again_at_its_interval(metrics: VigilMetrics, registry: CollectorRegistry) -> None:
    sampler = ProcessSampler(metrics, worker="4", interval=0.05)
    sampler.start()  # samples once now, then from its own thread
    release = threading.Event()
    extra = threading.Thread(target=release.wait)
    try:
        before = value(registry, "vigil_process_threads", worker="4")
        extra.start()
        # Moved without a sample() call here (the sampler's own thread and the extra one both count).
        wait_for(lambda: value(registry, "vigil_process_threads", worker="4") > before,
                 what="the sampler's thread did not sample again")
    finally:
        release.set()
        sampler.stop()
        if extra.is_alive():
            extra.join()
