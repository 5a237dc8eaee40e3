"""Fault injection with real ONNX graphs: the fallback answers, the breaker opens and closes, nothing 5xx.

The tests share one server, so none depends on another having run: counts are read as deltas, and
each breaker test has a model of its own (``sqrt_breaker``, ``absurd_breaker``).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from service.registry.register import register_model
from tests.onnx_graphs import (
    absurd_regressor,
    index_lookup_reference,
    index_lookup_regressor,
    slow_regressor,
    small_reference,
    sqrt_regressor,
)
from tests.servers import VigilServer, metric_value, vigil_server, wait_for

pytestmark = pytest.mark.integration

FAST_BREAKER = {"window": 10, "min_calls": 5, "error_rate": 0.2, "cooldown_seconds": 2, "probes": 2}


@pytest.fixture(scope="module")
def registry(example_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("faults")
    root = work / "models"
    shutil.copytree(example_registry, root)
    for name in ("sqrt", "sqrt_breaker"):
        register_model(name, sqrt_regressor(work / f"{name}.onnx"),
                       small_reference(work / f"{name}.parquet", target_of="sqrt"), target="target", registry=root)
    register_model("gappy", sqrt_regressor(work / "gappy.onnx"),
                   small_reference(work / "gappy.parquet", target_of="sqrt", null_x1=6), target="target", registry=root)
    for name in ("absurd", "absurd_breaker"):
        register_model(name, absurd_regressor(work / f"{name}.onnx"), small_reference(work / f"{name}.parquet"),
                       target="target", registry=root)
    register_model("lookup", index_lookup_regressor(work / "lookup.onnx"),
                   index_lookup_reference(work / "lookup.parquet"), target="target", registry=root)
    register_model("slow", slow_regressor(work / "slow.onnx"),
                   small_reference(work / "slow.parquet", x0=(0.0, 0.001)), target="target", registry=root)
    return root


@pytest.fixture(scope="module")
def server(registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VigilServer]:
    deploy = tmp_path_factory.mktemp("deploy") / "deploy.yaml"
    deploy.write_text(yaml.safe_dump({"models": {
        "sqrt": {"breaker": FAST_BREAKER},
        "sqrt_breaker": {"breaker": FAST_BREAKER},
        "absurd": {"breaker": FAST_BREAKER},
        "absurd_breaker": {"breaker": FAST_BREAKER},
        "lookup": {"breaker": FAST_BREAKER},
        "slow": {"timeout_ms": 300},
        "gappy": {"log_sample_rate": 0.0},
    }}))
    with vigil_server(registry, env={"VIGIL_DEPLOY": str(deploy)}) as srv:
        yield srv


def predict(server: VigilServer, model: str, instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    response = server.post("/predict", json={"model": model, "instances": instances})
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def state(server: VigilServer, model: str) -> str:
    return {m["name"]: m for m in server.get("/models").json()["models"]}[model]["state"]


def counts(server: VigilServer, *series: tuple[str, dict[str, str]]) -> list[float]:
    """The current value of each (family, labels) pair, 0 for a series not exported yet."""
    text = server.metrics_text()
    return [metric_value(text, name, **labels) or 0.0 for name, labels in series]


def test_nan_output_for_one_instance_is_answered_by_the_fallback(server: VigilServer, registry: Path) -> None:
    series = [("vigil_fallback_total", {"model": "sqrt", "reason": "invalid_output"}),
              ("vigil_prediction_out_of_range_total", {"model": "sqrt"})]
    before = counts(server, *series)
    answers = predict(server, "sqrt", [{"x0": 0.25, "x1": 0.5}, {"x0": -4.0, "x1": 0.5}])
    assert answers[0]["variant"] == "stable" and answers[0]["value"] == pytest.approx(1.0)
    assert answers[1]["variant"] == "fallback" and answers[1]["reason"] == "invalid_output"
    median = yaml.safe_load((registry / "sqrt" / "1" / "card.yaml").read_text())["fallback"]["value"]
    assert answers[1]["value"] == pytest.approx(median)
    assert [a - b for a, b in zip(counts(server, *series), before)] == [1, 1]


def test_null_the_model_cannot_take_is_answered_by_the_fallback(server: VigilServer, registry: Path) -> None:
    card = yaml.safe_load((registry / "gappy" / "1" / "card.yaml").read_text())
    assert {f["name"]: f.get("nullable") for f in card["features"]}["x1"] is True
    series = [("vigil_fallback_total", {"model": "gappy", "reason": "missing_input"}),
              ("vigil_input_missing_total", {"model": "gappy", "feature": "x1"}),
              ("vigil_predictions_total", {"model": "gappy", "variant": "stable"})]
    before = counts(server, *series)
    answers = predict(server, "gappy", [{"x0": 0.25, "x1": 0.5}, {"x0": 0.25, "x1": None}, {"x0": 0.25}])
    assert answers[0]["variant"] == "stable" and answers[0]["value"] == pytest.approx(1.0)
    assert [a.get("reason") for a in answers[1:]] == ["missing_input", "missing_input"]
    assert answers[1]["value"] == pytest.approx(card["fallback"]["value"])
    assert [a - b for a, b in zip(counts(server, *series), before)] == [2, 2, 1]


def test_a_model_sampled_at_zero_answers_but_is_not_logged(server: VigilServer) -> None:
    from monitoring.predlog import read_log

    served = server.post("/predict", json={"model": "sqrt", "instances": [{"x0": 0.04, "x1": 0.1}]}).json()
    unlogged = server.post("/predict", json={"model": "gappy", "instances": [{"x0": 0.04, "x1": 0.1}]})
    assert unlogged.status_code == 200
    wait_for(lambda: served["request_id"] in set(read_log(server.home / "var", "sqrt")["request_id"]))
    assert read_log(server.home / "var", "gappy").empty  # nothing of it, ever, though it answered


def test_absurd_values_are_refused(server: VigilServer) -> None:
    answers = predict(server, "absurd", [{"x0": 0.5, "x1": 0.5}, {"x0": 0.5, "x1": 6.0}])
    assert answers[0]["variant"] == "stable" and answers[0]["value"] == pytest.approx(1.0)
    assert answers[1]["reason"] == "invalid_output" and abs(answers[1]["value"]) < 10


def test_model_error_is_answered_by_the_fallback(server: VigilServer) -> None:
    (before,) = counts(server, ("vigil_model_errors_total", {"model": "lookup"}))
    answers = predict(server, "lookup", [{"idx": 2.0, "x": 0.0}, {"idx": 99.0, "x": 0.0}])
    assert [a["reason"] for a in answers] == ["model_error", "model_error"]  # one call, one failure
    assert counts(server, ("vigil_model_errors_total", {"model": "lookup"})) == [before + 1]


def test_slow_model_is_cut_at_its_budget(server: VigilServer) -> None:
    # x0 = 1000 is 1e9 loop steps: about 45 minutes here, minutes on any machine. Answered at all
    # (the client gives up after 30 s, a hundred times the 300 ms budget), it was cut at its budget.
    answers = predict(server, "slow", [{"x0": 1000.0, "x1": 0.1}])
    assert answers[0]["variant"] == "fallback" and answers[0]["reason"] == "timeout"
    fast = predict(server, "slow", [{"x0": 0.0005, "x1": 0.1}])
    assert fast[0]["variant"] == "stable"
    assert server.get("/livez").status_code == 200


def test_breaker_opens_then_closes_when_the_model_recovers(server: VigilServer) -> None:
    healthy = {"x0": 0.25, "x1": 0.5}
    for _ in range(6):
        predict(server, "sqrt_breaker", [{"x0": -1.0, "x1": 0.0}])
    assert state(server, "sqrt_breaker") == "breaker_open"
    answer = predict(server, "sqrt_breaker", [healthy])[0]
    assert answer["variant"] == "fallback" and answer["reason"] == "breaker_open"
    text = server.metrics_text()
    assert metric_value(text, "vigil_breaker_open", model="sqrt_breaker") == 1
    assert metric_value(text, "vigil_breaker_transitions_total", model="sqrt_breaker", to="open") == 1
    # A healthy model in the same service is unaffected.
    assert predict(server, "diabetes", [{"age": 50.0, "sex": 1.0, "bmi": 25.0, "bp": 90.0, "s1": 180.0, "s2": 100.0,
                                         "s3": 50.0, "s4": 4.0, "s5": 4.5, "s6": 90.0}])[0]["variant"] == "stable"
    time.sleep(FAST_BREAKER["cooldown_seconds"])  # COOLDOWN: see below
    probes = [predict(server, "sqrt_breaker", [healthy])[0] for _ in range(FAST_BREAKER["probes"])]
    assert all(p["variant"] == "stable" for p in probes)
    assert state(server, "sqrt_breaker") == "serving"
    assert predict(server, "sqrt_breaker", [healthy])[0]["variant"] == "stable"
    text = server.metrics_text()
    assert metric_value(text, "vigil_breaker_open", model="sqrt_breaker") == 0
    assert metric_value(text, "vigil_breaker_transitions_total", model="sqrt_breaker", to="half_open") == 1
    assert metric_value(text, "vigil_breaker_transitions_total", model="sqrt_breaker", to="closed") == 1


def test_failing_probe_reopens_the_breaker(server: VigilServer) -> None:
    for _ in range(6):
        predict(server, "absurd_breaker", [{"x0": 0.5, "x1": 9.0}])
    assert state(server, "absurd_breaker") == "breaker_open"
    time.sleep(FAST_BREAKER["cooldown_seconds"])  # COOLDOWN: see below
    assert predict(server, "absurd_breaker", [{"x0": 0.5, "x1": 9.0}])[0]["reason"] == "invalid_output"  # the probe
    assert state(server, "absurd_breaker") == "breaker_open"
    assert predict(server, "absurd_breaker", [{"x0": 0.5, "x1": 0.5}])[0]["reason"] == "breaker_open"


# COOLDOWN: the breaker turns half-open at the first call after its cooldown, measured from the
# call that opened it; that call was answered before the sleep began, so the sleep is a wait for
# the state (there is nothing to poll: the state changes only when a call arrives).
