"""Fallback heuristics, the circuit breaker, output checks and deploy policies as plain objects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from service.core.card import ModelCard
from service.core.errors import RegistryError
from service.core.predictor import Batch, Predictions
from service.registry.register import derive_fallback, register_model
from service.registry.store import Registry
from service.runtime.heuristic import HeuristicPredictor
from service.serving.deploy import BreakerConfig, DeployConfigError, check_versions, parse_deploy
from service.serving.routing import Breaker, invalid_rows
from tests.onnx_graphs import small_reference, sqrt_regressor


@pytest.fixture(scope="module")
def cards(example_registry: Path) -> dict[str, ModelCard]:
    reg = Registry(example_registry)
    return {name: reg.card(name) for name in ("cancer", "diabetes")}


def test_derived_fallbacks_summarise_the_reference_target(cards: dict[str, ModelCard], example_registry: Path) -> None:
    reference = pd.read_parquet(example_registry / "cancer" / "1" / "reference.parquet")
    prior = cards["cancer"].fallback
    assert prior is not None and prior.kind == "prior"
    shares = reference["target"].value_counts(normalize=True)
    assert prior.probabilities == pytest.approx({str(k): v for k, v in shares.items()})
    diabetes = pd.read_parquet(example_registry / "diabetes" / "1" / "reference.parquet")
    median = cards["diabetes"].fallback
    assert median is not None and median.kind == "median"
    assert median.value == pytest.approx(float(diabetes["target"].median()))


def test_prior_answers_majority_class_with_reference_shares(cards: dict[str, ModelCard]) -> None:
    batch = Batch(size=3, matrix=np.zeros((3, 30)))
    predictions = HeuristicPredictor(cards["cancer"]).predict(batch)
    assert predictions.labels == [1, 1, 1]
    assert predictions.probabilities is not None
    assert predictions.probabilities.sum(axis=1) == pytest.approx([1, 1, 1])


def test_declared_rules_in_order_with_default(tmp_path: Path) -> None:
    reference = small_reference(tmp_path / "r.parquet")
    card = register_model("r", sqrt_regressor(tmp_path / "m.onnx"), reference, target="target", registry=tmp_path / "reg",
                          fallback={"kind": "rules", "default": 0.0,
                                    "rules": [{"feature": "x0", "op": ">", "threshold": 0.5, "then": 10.0},
                                              {"feature": "x1", "op": "<=", "threshold": 0.2, "then": 20.0}]})
    matrix = np.array([[0.9, 0.1], [0.1, 0.1], [0.1, 0.9], [np.nan, 0.1]])
    values = HeuristicPredictor(card).predict(Batch(size=4, matrix=matrix)).values
    assert values is not None and values.tolist() == [10.0, 20.0, 0.0, 20.0]


def test_bucket_medians_of_a_declared_feature(tmp_path: Path) -> None:
    reference = small_reference(tmp_path / "r.parquet", rows=200)
    card = register_model("b", sqrt_regressor(tmp_path / "m.onnx"), reference, target="target", registry=tmp_path / "reg",
                          fallback={"kind": "bucket_median", "feature": "x0"})
    spec = card.fallback
    assert spec is not None and spec.kind == "bucket_median"
    assert len(spec.values) == len(spec.edges) + 1 == 5
    assert spec.values == sorted(spec.values)  # the target grows with x0
    values = HeuristicPredictor(card).predict(Batch(size=2, matrix=np.array([[0.01, 0.5], [0.99, 0.5]]))).values
    assert values is not None and values[0] == spec.values[0] and values[1] == spec.values[-1]


def test_declared_fallback_is_validated(tmp_path: Path) -> None:
    reference = small_reference(tmp_path / "r.parquet")
    with pytest.raises(RegistryError, match="not a feature"):
        register_model("x", sqrt_regressor(tmp_path / "m.onnx"), reference, target="target",
                       registry=tmp_path / "reg",
                       fallback={"kind": "rules", "default": 0.0,
                                 "rules": [{"feature": "nope", "op": ">", "threshold": 1, "then": 1.0}]})
    with pytest.raises(RegistryError, match="kind"):
        derive_fallback("regression", None, pd.read_parquet(reference).assign(prediction=1.0), "target",
                        declared={"kind": "magic"})


def test_breaker_opens_over_the_rate_and_closes_after_probes() -> None:
    now = [0.0]
    transitions: list[str] = []
    breaker = Breaker(BreakerConfig(window=10, min_calls=5, error_rate=0.2, cooldown_seconds=30, probes=2),
                      transitions.append, clock=lambda: now[0])
    for ok in [True, True, True, False]:
        breaker.record(ok)
    assert breaker.state == "closed"  # fewer than min_calls
    breaker.record(False)  # 2 bad of 5 = 40% > 20%
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 29.9
    assert not breaker.allow()
    now[0] = 30.0
    assert breaker.allow() and breaker.state == "half_open"
    breaker.record(True)
    assert breaker.state == "half_open"
    breaker.record(True)
    assert breaker.state == "closed" and breaker.bad_rate == 0
    assert transitions == ["open", "half_open", "closed"]


def test_breaker_rate_is_over_the_last_window_only() -> None:
    breaker = Breaker(BreakerConfig(window=10, min_calls=10, error_rate=0.2))
    for _ in range(2):
        breaker.record(False)
    for _ in range(20):
        breaker.record(True)  # the early failures slide out of the window
    breaker.record(False)
    breaker.record(False)
    assert breaker.state == "closed" and breaker.bad_rate == pytest.approx(0.2)
    breaker.record(False)
    assert breaker.state == "open"


def test_failed_probe_reopens() -> None:
    now = [0.0]
    breaker = Breaker(BreakerConfig(window=5, min_calls=1, error_rate=0.5, cooldown_seconds=1), clock=lambda: now[0])
    breaker.record(False)
    now[0] = 2.0
    assert breaker.allow()
    breaker.record(False)
    assert breaker.state == "open" and not breaker.allow()


def test_invalid_rows_use_the_widened_reference_range(cards: dict[str, ModelCard]) -> None:
    card = cards["diabetes"]
    assert card.prediction_range is not None
    lo, hi = card.prediction_range.min, card.prediction_range.max
    span = hi - lo
    values = np.array([lo, hi + 0.2 * span, hi + 0.3 * span, np.nan, -np.inf])
    assert invalid_rows(card, Predictions(values=values), margin=0.25).tolist() == [False, False, True, True, True]
    probs = np.array([[0.5, 0.5], [np.nan, 0.5]])
    assert invalid_rows(cards["cancer"], Predictions(labels=[0, 0], probabilities=probs), 0.25).tolist() == [False, True]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("models:\n  cancer:\n    canary: {version: '2', traffic: 1.5}\n", "models.cancer.canary.traffic"),
        ("models:\n  cancer:\n    on_drift: panic\n", "models.cancer.on_drift"),
        ("models:\n  cancer:\n    timeout_ms: 0\n", "models.cancer.timeout_ms"),
        ("models:\n  cancer:\n    log_sample_rate: 2\n", "models.cancer.log_sample_rate"),
        ("models:\n  cancer:\n    colour: red\n", "models.cancer.colour"),
        ("models:\n  cancer:\n    breaker: {min_calls: 50, window: 10}\n", "models.cancer.breaker"),
        ("models: [1, 2]\n", "models"),
        ("models:\n  cancer: {stable: '1'\n", "not valid YAML"),
    ],
)
def test_invalid_deploy_config_names_the_key(text: str, key: str) -> None:
    with pytest.raises(DeployConfigError) as info:
        parse_deploy(text)
    assert key in info.value.message


def test_deploy_versions_must_exist() -> None:
    config = parse_deploy("models:\n  cancer:\n    stable: '1'\n    canary: {version: '7'}\n  ghost: {}\n")
    with pytest.raises(DeployConfigError) as info:
        check_versions(config, {"cancer": ["1", "2"]})
    assert "models.cancer.canary.version" in info.value.message and "models.ghost" in info.value.message
    assert parse_deploy("").policy("anything").on_drift == "alert"


def _comparison(stable_scores: np.ndarray, canary_scores: np.ndarray, stable_errors: int = 0,
                canary_errors: int = 0) -> "CanaryComparison":
    from monitoring.canary import CanaryComparison

    comparison = CanaryComparison("m", "1", "2", list(np.linspace(0.1, 0.9, 9)))
    for i, score in enumerate(stable_scores):
        comparison.stable.record(0.001, 1, 0, i < stable_errors, np.array([score]))
    for i, score in enumerate(canary_scores):
        comparison.canary.record(0.001, 1, 0, i < canary_errors, np.array([score]))
    return comparison


def test_canary_from_the_same_distribution_is_not_judged_shifted() -> None:
    from service.serving.deploy import RollbackRules

    rng = np.random.default_rng(0)
    for seed in range(20):  # small samples: raw PSI alone is often above 0.2 here
        rng = np.random.default_rng(seed)
        comparison = _comparison(rng.uniform(0, 1, 120), rng.uniform(0, 1, 45))
        assert comparison.evaluate(RollbackRules(min_requests=40)) is None


def test_shifted_or_erroring_canary_breaches() -> None:
    from service.serving.deploy import RollbackRules

    rng = np.random.default_rng(1)
    shifted = _comparison(rng.uniform(0, 1, 300), rng.uniform(0.5, 1, 100))
    breach = shifted.evaluate(RollbackRules(min_requests=40))
    assert breach is not None and breach.reason == "prediction_shift" and breach.figures["psi"] > 0.2
    erroring = _comparison(rng.uniform(0, 1, 300), rng.uniform(0, 1, 100), stable_errors=3, canary_errors=30)
    breach = erroring.evaluate(RollbackRules(min_requests=40))
    assert breach is not None and breach.reason == "error_rate"
    one_error = _comparison(rng.uniform(0, 1, 300), rng.uniform(0, 1, 45), canary_errors=1)
    assert one_error.evaluate(RollbackRules(min_requests=40)) is None  # 1/45 is not evidence
    too_early = _comparison(rng.uniform(0, 1, 300), rng.uniform(0.5, 1, 30))
    assert too_early.evaluate(RollbackRules(min_requests=40)) is None


def test_canary_with_worse_ground_truth_breaches_on_quality() -> None:
    from service.serving.deploy import RollbackRules

    rng = np.random.default_rng(4)
    comparison = _comparison(rng.uniform(0, 1, 300), rng.uniform(0, 1, 100))
    rules = RollbackRules(min_requests=40, min_labelled=50)
    for i in range(200):
        comparison.stable.record_feedback(missed=i % 20 == 0)  # 5% wrong
    for i in range(60):
        comparison.canary.record_feedback(missed=i % 3 == 0)  # 33% wrong
    breach = comparison.evaluate(rules)
    assert breach is not None and breach.reason == "quality" and breach.figures["increase"] > 0.25
    fair = _comparison(rng.uniform(0, 1, 300), rng.uniform(0, 1, 100))
    for i in range(200):
        fair.stable.record_feedback(missed=i % 20 == 0)
    for i in range(60):
        fair.canary.record_feedback(missed=i % 15 == 0)  # 7%: within noise of 5%
    assert fair.evaluate(rules) is None


def test_calls_leave_the_event_loop_when_slow_and_come_back_when_fast() -> None:
    from service.serving.routing import MAX_PROBE_SECONDS, MIN_PROBE_SECONDS, ServedVersion

    def served_version() -> ServedVersion:
        return ServedVersion(card=None, validator=None, fallback=None, predictor=None, breaker=None)  # type: ignore[arg-type]

    served = served_version()

    def call(now: float, seconds: float, seconds_on_thread: float | None = None) -> bool:
        inline = served.calls_inline(now)
        served.note_call(seconds if inline else (seconds_on_thread or seconds), now, inline)
        return inline

    assert call(0.0, 0.00001)
    assert call(0.001, 0.05) and call(0.002, 0.00001) and call(0.003, 0.05)  # hiccups: it stays on the loop
    assert served.calls_inline(0.004)
    timed_out = served_version()
    timed_out.note_call(0.00001, now=0.0)
    timed_out.note_call(0.2, inline=True, now=0.1, timed_out=True)  # cut at its budget: surely slow
    assert not timed_out.calls_inline(0.2)
    t = 0.0
    while call(t, 0.02):  # the model turns slow: once its typical time passes 2 ms, calls go to threads
        t += 0.01
    assert t < 1.0
    # A fast model looks slow on a thread (lock waits): only a call on the loop can bring it back.
    assert not call(t + 0.5, 0.00001, seconds_on_thread=0.005)
    assert call(t + MIN_PROBE_SECONDS, 0.02)  # one call a second later is timed on the loop: still slow
    assert not call(t + MIN_PROBE_SECONDS + 1.5, 0.02)  # so the next probe waits twice as long
    assert call(t + MIN_PROBE_SECONDS + 2.0, 0.02)
    for _ in range(10):
        call(served.next_probe, 0.02)
    assert served.probe_interval == MAX_PROBE_SECONDS
    assert call(served.next_probe, 0.00001)  # fast again: back on the loop, for good
    assert all(call(served.next_probe + i, 0.00001) for i in range(5))

    served = served_version()  # a model slower than 50 ms is never timed on the loop: it would stall it
    assert call(0.0, 0.5)  # (the warm-up call, made before any request)
    assert not any(call(float(s), 0.5) for s in range(1, 200))
    for s in range(200, 260):  # it turns fast: timed on threads, its typical time falls under 50 ms
        call(float(s), 0.00001, seconds_on_thread=0.004)
    assert call(500.0, 0.00001) and call(500.1, 0.00001)


def test_the_inline_threshold_is_configurable() -> None:
    from service.serving.routing import ServedVersion

    def steady_5ms(inline_seconds: float) -> bool:
        served = ServedVersion(card=None, validator=None, fallback=None, predictor=None,  # type: ignore[arg-type]
                               breaker=None, inline_seconds=inline_seconds)
        for i in range(100):
            served.note_call(0.005, now=i * 0.01, inline=served.calls_inline(i * 0.01))
        return served.calls_inline(0.995)  # before the first probe back on the loop is due

    assert not steady_5ms(0.002)  # the default: a 5 ms model runs on threads
    assert steady_5ms(0.010)  # VIGIL_MODEL_INLINE_SECONDS=0.01: it stays on the event loop


def test_a_server_takes_its_inline_threshold_from_settings(example_registry: Path, tmp_path: Path) -> None:
    from service.core.settings import Settings
    from service.serving.deploy import DeployConfig
    from service.serving.server import ModelServer

    settings = Settings(registry=example_registry, data_dir=tmp_path, deploy=tmp_path / "none.yaml",
                        model_inline_seconds=0.5)
    server = ModelServer(settings, None, None, DeployConfig())
    server.load_all()
    try:
        _, served = server.route("cancer")
        for i in range(50):  # a model that takes 100 ms a call
            served.note_call(0.1, now=i * 0.2, inline=served.calls_inline(i * 0.2))
        assert served.calls_inline(10.0)  # under the configured 0.5 s: still on the event loop
    finally:
        server.close()
