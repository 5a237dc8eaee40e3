"""Ground truth through the real service: feedback accepted at once, joined to logged predictions, exact live metrics.

The server (2 workers) is shared by the module's tests: counts are read as deltas, and waited for,
since the worker that took the feedback may not be the one answering /metrics.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pytest

from tests.servers import VigilServer, metric_value, vigil_server, wait_for, wait_for_value

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(example_registry: Path) -> Iterator[VigilServer]:
    with vigil_server(example_registry, workers=2) as srv:
        yield srv


def reference(registry: Path, model: str) -> pd.DataFrame:
    return pd.read_parquet(registry / model / "1" / "reference.parquet")


def features(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return frame.drop(columns=[c for c in ("target", "prediction", "prediction_score") if c in frame]).to_dict(
        orient="records")


def serve(server: VigilServer, model: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Predict, and return once the answer is in the prediction log (where feedback is joined)."""
    response = server.post("/predict", json={"model": model, "instances": rows})
    assert response.status_code == 200, response.text
    server.wait_until_logged(model, [response.json()["request_id"]])
    return response.json()


def feedback(server: VigilServer, body: dict[str, Any], expect: int = 200) -> dict[str, Any]:
    response = server.post("/feedback", json=body)
    assert response.status_code == expect, response.text
    return response.json()


Series = tuple[str, tuple[tuple[str, str], ...]]


def series(name: str, **labels: str) -> Series:
    return name, tuple(sorted(labels.items()))


def values(server: VigilServer, wanted: list[Series]) -> dict[Series, float]:
    text = server.metrics_text()
    return {s: metric_value(text, s[0], **dict(s[1])) or 0.0 for s in wanted}


def wait_for_increase(server: VigilServer, before: dict[Series, float], expected: dict[Series, float]) -> None:
    """Wait until each series has grown by exactly its expected amount (every worker has flushed)."""
    wait_for_value(lambda: {s: values(server, list(before))[s] - before[s] for s in before}, expected)


def test_classification_feedback_counts_exactly(server: VigilServer, example_registry: Path) -> None:
    frame = reference(example_registry, "cancer").head(12)
    truth = frame["target"].tolist()
    outcome_series = [series("vigil_feedback_outcomes_total", model="cancer", predicted=p, actual=a)
                      for p in ("0", "1") for a in ("0", "1")]
    watched = [series("vigil_feedback_total", model="cancer", version="1"),
               series("vigil_feedback_correct_total", model="cancer", variant="stable"), *outcome_series]
    before = values(server, watched)
    first = serve(server, "cancer", features(frame.iloc[:8]))
    second = serve(server, "cancer", features(frame.iloc[8:]))
    predicted = [p["label"] for p in first["predictions"] + second["predictions"]]

    # Sent right after the response: accepted at once, counted when the prediction reaches the log.
    whole = feedback(server, {"model": "cancer", "request_id": first["request_id"], "actuals": truth[:8]})
    assert {k: whole[k] for k in ("model", "accepted", "duplicates")} == {"model": "cancer", "accepted": 8,
                                                                          "duplicates": 0}
    assert 0 <= whole["pending"] <= 8
    again = feedback(server, {"model": "cancer", "request_id": first["request_id"], "actuals": truth[:8]})
    assert again["accepted"] == 0 and again["duplicates"] == 8
    partial = feedback(server, {"model": "cancer", "items": [
        {"request_id": second["request_id"], "index": 0, "actual": truth[8]},
        {"request_id": second["request_id"], "index": 3, "actual": truth[11]},
        {"request_id": second["request_id"], "index": 3, "actual": truth[11]}]})
    assert partial["accepted"] == 2 and partial["duplicates"] == 1

    used = list(range(8)) + [8, 11]
    outcomes = Counter((str(predicted[i]), str(truth[i])) for i in used)
    wait_for_increase(server, before, {
        watched[0]: 10, watched[1]: sum(predicted[i] == truth[i] for i in used),
        **{s: outcomes.get((dict(s[1])["predicted"], dict(s[1])["actual"]), 0) for s in outcome_series}})


def test_unknown_ids_and_wrong_types_are_refused_and_nothing_is_stored(server: VigilServer,
                                                                        example_registry: Path) -> None:
    served = serve(server, "cancer", features(reference(example_registry, "cancer").head(2)))
    before = metric_value(server.metrics_text(), "vigil_feedback_total", model="cancer") or 0
    unmatched = metric_value(server.metrics_text(), "vigil_feedback_unmatched_total", model="cancer") or 0
    error = feedback(server, {"model": "cancer", "items": [
        {"request_id": served["request_id"], "index": 0, "actual": 1},
        {"request_id": "f" * 32, "index": 0, "actual": 1}]}, expect=404)["error"]
    assert error["code"] == "unknown_request_id" and error["details"][0]["instance"] == 1
    server.wait_for_metric("vigil_feedback_unmatched_total", unmatched + 1, model="cancer")
    for bad in ("1", 2, 0.5, True, None):
        error = feedback(server, {"model": "cancer", "request_id": served["request_id"], "actuals": [bad, 0]},
                         expect=422)["error"]
        assert error["details"][0]["field"] == "actual" and "labels" in error["details"][0]["problem"]
    assert feedback(server, {"model": "cancer", "actuals": [1]}, expect=400)["error"]["code"] == "invalid_request"
    assert feedback(server, {"model": "nope", "request_id": "x", "actuals": [1]}, expect=404)["error"]["code"] == \
        "model_not_found"
    assert (metric_value(server.metrics_text(), "vigil_feedback_total", model="cancer") or 0) == before
    # The valid half of the refused body was not stored: it is accepted now, once.
    assert feedback(server, {"model": "cancer", "request_id": served["request_id"], "actuals": [1, 0]})["accepted"] == 2
    server.wait_for_metric("vigil_feedback_total", before + 2, model="cancer")


def test_regression_feedback_observes_errors(server: VigilServer, example_registry: Path) -> None:
    frame = reference(example_registry, "diabetes").head(5)
    watched = [series("vigil_prediction_error_count", model="diabetes"),
               series("vigil_prediction_error_sum", model="diabetes"),
               series("vigil_prediction_abs_error_sum", model="diabetes")]
    before = values(server, watched)
    served = serve(server, "diabetes", features(frame))
    predicted = [p["value"] for p in served["predictions"]]
    actuals = frame["target"].astype(float).tolist()
    feedback(server, {"model": "diabetes", "request_id": served["request_id"], "actuals": actuals})
    server.wait_for_metric("vigil_prediction_error_count", before[watched[0]] + 5, model="diabetes")
    after = values(server, watched)
    assert after[watched[1]] - before[watched[1]] == pytest.approx(
        sum(a - v for a, v in zip(actuals, predicted)), rel=1e-6)
    assert after[watched[2]] - before[watched[2]] == pytest.approx(
        sum(abs(a - v) for a, v in zip(actuals, predicted)), rel=1e-6)
    error = feedback(server, {"model": "diabetes", "request_id": served["request_id"], "actuals": ["x"] * 5},
                     expect=422)["error"]
    assert "number" in error["details"][0]["problem"]


def test_the_local_default_keeps_everything_under_the_data_dir(server: VigilServer, example_registry: Path) -> None:
    """Without VIGIL_STORE the store is VIGIL_DATA_DIR, as on one machine: log, feedback, workers."""
    frame = reference(example_registry, "cancer").head(1)
    served = serve(server, "cancer", features(frame))
    assert feedback(server, {"model": "cancer", "request_id": served["request_id"],
                             "actuals": frame["target"].tolist()})["accepted"] == 1
    var = server.home / "var"
    wait_for(lambda: any(served["request_id"][:12] in p.name
                         for p in var.glob("predlog/model=cancer/date=*/hour=*/part-*.parquet")), timeout=30)
    assert list(var.glob("feedback/model=cancer/date=*/fb-*.parquet"))
    assert len(list(var.glob("workers/*.json"))) == 2  # one per worker process, each with its own token
