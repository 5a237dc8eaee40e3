"""The quality job on real data: the example models' held-out rows, served predictions logged, truth fed back.

Predictions come from the registered ONNX models (through the drift tests' ``write_log``, as the service
logs them); feedback is stored with the service's own ``write_feedback``. Every number the job reports is
checked against a direct scikit-learn computation on the same joined rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm
from typer.testing import CliRunner

from monitoring.feedback import FeedbackRow, LoggedPrediction, write_feedback
from monitoring.jobs.cli import EXIT_OK, EXIT_TOO_FEW_ROWS, EXIT_USAGE
from monitoring.jobs.cli_quality import EXIT_DEGRADED, performance_app
from monitoring.jobs.quality import NotEnoughFeedback, compare_with_baseline, run_performance
from monitoring.predlog import read_log
from monitoring.verdicts import LATEST_FILE, PerformanceResult, read_latest_quality
from service.core.card import PREDICTION_COLUMN, SCORE_COLUMN
from service.core.errors import ModelNotFound
from service.registry.register import register_model
from service.registry.store import REFERENCE_FILE, Registry
from tests import fixtures as fx
from tests.drift.test_drift import write_log

TOLERANCE = 0.05
"""The default: the held-out rows are the rows the card's metrics were computed on, so live quality is the
baseline up to float32 inference (a label or two flipping near 0.5), far inside five points."""


# ----------------------------------------------------------------------------- helpers


@dataclass
class Served:
    """A data dir whose log holds served predictions of one model, with the truth of every row."""

    data_dir: Path
    rows: pd.DataFrame
    """The logged rows (request_id, index, version, variant, reason, prediction, prediction_score) + ``truth``."""


Actuals = Callable[[np.ndarray], np.ndarray]
"""Turns the true targets into the actuals a stream reports (flipped labels, shifted values)."""


def serve_and_log(data_dir: Path, registry: Path, model: str, truth_shift: Actuals | None = None,
                  fallback_every: int = 0, frame: pd.DataFrame | None = None) -> Served:
    """Log predictions of ``model`` on its held-out reference rows; return the logged rows with their truth.

    ``truth_shift`` turns the true targets into the stream's actuals (flipped labels, shifted values).
    """
    reference = frame if frame is not None else pd.read_parquet(Registry(registry).path(model, "1") / REFERENCE_FILE)
    features = reference.drop(columns=[c for c in ("target", PREDICTION_COLUMN, SCORE_COLUMN) if c in reference])
    write_log(data_dir, registry, model, features, fallback_every=fallback_every)
    logged = read_log(data_dir, model).sort_values(["time", "index"], kind="stable").reset_index(drop=True)
    assert len(logged) == len(reference)  # one logged row per reference row, in order
    truth = reference["target"].to_numpy()
    logged["truth"] = truth_shift(truth) if truth_shift is not None else truth
    return Served(data_dir, logged)


def give_feedback(served: Served, registry: Path, model: str, positions: slice | None = None) -> None:
    """Store the truth of the logged rows at ``positions`` (all by default) as feedback."""
    task = Registry(registry).card(model, "1").task
    rows = served.rows if positions is None else served.rows.iloc[positions]
    feedback = [
        FeedbackRow(request_id=r.request_id, index=int(r.index),
                    actual=r.truth.item() if hasattr(r.truth, "item") else r.truth,
                    prediction=LoggedPrediction(r.version, r.variant, r.prediction, r.prediction_score, r.reason))
        for r in rows.itertuples()
    ]
    write_feedback(served.data_dir, model, task, feedback)


def run_cli(*args: str) -> tuple[int, str]:
    """``vigil performance ...`` in-process; returns (exit code, output)."""
    result = CliRunner().invoke(performance_app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def json_of(output: str) -> dict[str, Any]:
    return json.loads(output[output.index("{"):])


def model_rows(served: Served) -> pd.DataFrame:
    """The rows the model (not the fallback) answered."""
    return served.rows[served.rows["reason"].isna()]


def classification_expected(rows: pd.DataFrame) -> dict[str, float]:
    y, p = rows["truth"].astype(int), rows[PREDICTION_COLUMN].astype(int)
    return {"accuracy": skm.accuracy_score(y, p), "precision": skm.precision_score(y, p),
            "recall": skm.recall_score(y, p), "f1": skm.f1_score(y, p),
            "roc_auc": skm.roc_auc_score(y, rows[SCORE_COLUMN])}


def regression_expected(rows: pd.DataFrame) -> dict[str, float]:
    y, p = rows["truth"].astype(float), rows[PREDICTION_COLUMN].astype(float)
    return {"mae": skm.mean_absolute_error(y, p), "rmse": skm.root_mean_squared_error(y, p),
            "mape": skm.mean_absolute_percentage_error(y, p), "r2": skm.r2_score(y, p)}


def assert_metrics(result: PerformanceResult | dict[str, Any], expected: dict[str, float | None]) -> None:
    """The job's metrics are exactly the expected ones (None: not computed), to float rounding."""
    metrics = result.metrics if isinstance(result, PerformanceResult) else result["metrics"]
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        assert metrics[name] == (None if value is None else pytest.approx(value, rel=1e-9, abs=1e-12)), name


def flip(share: float, seed: int) -> Actuals:
    """Labels flipped (0 <-> 1) for ``share`` of the rows, chosen at random."""
    def apply(truth: np.ndarray) -> np.ndarray:
        chosen = np.random.default_rng(seed).permutation(len(truth))[:round(share * len(truth))]
        flipped = truth.copy()
        flipped[chosen] = 1 - flipped[chosen]
        return flipped
    return apply


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cancer(tmp_path_factory: pytest.TempPathFactory, example_registry: Path) -> Served:
    """cancer's 171 held-out rows served and logged, with their true labels fed back."""
    served = serve_and_log(tmp_path_factory.mktemp("cancer"), example_registry, "cancer")
    give_feedback(served, example_registry, "cancer")
    return served


@pytest.fixture(scope="module")
def diabetes(tmp_path_factory: pytest.TempPathFactory, example_registry: Path) -> Served:
    """diabetes' 133 held-out rows served and logged, with their true targets fed back."""
    served = serve_and_log(tmp_path_factory.mktemp("diabetes"), example_registry, "diabetes")
    give_feedback(served, example_registry, "diabetes")
    return served


# ----------------------------------------------------------------------------- held-out data: matches, not degraded


def test_classification_quality_matches_sklearn_and_the_card(cancer: Served, example_registry: Path) -> None:
    code, output = run_cli("run", "--model", "cancer", "--last", "7d", "--data-dir", str(cancer.data_dir),
                           "--registry", str(example_registry))
    assert code == EXIT_OK, output
    assert "quality ok" in output

    result = read_latest_quality(cancer.data_dir, "cancer")
    assert result is not None and result.version == "1" and result.task == "classification"
    assert_metrics(result, classification_expected(cancer.rows))
    assert result.averaging == "binary" and result.positive_label == "1"
    assert result.rows.logged == result.rows.with_feedback == result.rows.evaluated == len(cancer.rows) == 171
    assert result.rows.fallback == 0 and result.rows.by_variant == {"stable": 171}
    assert result.rows.feedback_coverage == 1.0

    # The card's held-out metrics are the baseline; live quality on the same rows is that, up to float32.
    card = Registry(example_registry).card("cancer", "1")
    assert set(result.baseline) == set(card.training.metrics) == {"accuracy", "f1", "roc_auc"}
    for name, check in result.baseline.items():
        assert check.kind == "score" and check.baseline == card.training.metrics[name]
        assert check.limit == pytest.approx(check.baseline - TOLERANCE)
        assert abs(check.change) < 0.02 and not check.degraded
    assert not result.quality_degraded and result.degraded_metrics == [] and result.unchecked_baseline == []

    # result.json, Evidently's report.html, latest.json: all there, no temporary file left, latest == result.
    run_dir = Path(result.result_json).parent
    assert run_dir.parent == cancer.data_dir / "performance" / "cancer" / "1"
    html = Path(result.report_html).read_text()
    assert "<html" in html[:1000].lower() and "Accuracy" in html and "RocAuc metric" in html  # Evidently's widgets
    assert json.loads(Path(result.result_json).read_text()) == json.loads((run_dir.parent / LATEST_FILE).read_text())
    assert not list((cancer.data_dir / "performance").rglob(".*.tmp"))


def test_classification_bias_is_predicted_minus_observed_share(cancer: Served, example_registry: Path) -> None:
    result = run_performance(cancer.data_dir, example_registry, "cancer")
    n = len(cancer.rows)
    predicted = cancer.rows[PREDICTION_COLUMN].astype(int)
    observed = cancer.rows["truth"].astype(int)
    assert list(result.class_shares) == ["0", "1"]  # the card's labels, in its order
    for label in (0, 1):
        share = result.class_shares[str(label)]
        assert share.predicted == int((predicted == label).sum()) / n
        assert share.observed == int((observed == label).sum()) / n
        assert result.prediction_bias[str(label)] == share.bias == share.predicted - share.observed
    assert result.prediction_bias["0"] == -result.prediction_bias["1"]


def test_regression_quality_and_bias_match_sklearn(diabetes: Served, example_registry: Path) -> None:
    code, output = run_cli("run", "--model", "diabetes", "--data-dir", str(diabetes.data_dir),
                           "--registry", str(example_registry), "--json")
    assert code == EXIT_OK, output
    result = json_of(output)
    assert_metrics(result, regression_expected(diabetes.rows))
    actual, predicted = diabetes.rows["truth"].astype(float), diabetes.rows[PREDICTION_COLUMN].astype(float)
    assert result["prediction_bias"] == {"value": pytest.approx(float(np.mean(actual - predicted)), rel=1e-9)}
    assert result["class_shares"] == {} and result["averaging"] is None

    baseline = result["baseline"]
    assert set(baseline) == {"mae", "r2"}  # the card's training metrics
    assert baseline["mae"]["kind"] == "error" and baseline["r2"]["kind"] == "score"
    assert baseline["mae"]["limit"] == pytest.approx(baseline["mae"]["baseline"] * 1.10)
    assert abs(baseline["mae"]["change"]) < 0.01 * baseline["mae"]["baseline"]
    assert not result["quality_degraded"]


# ----------------------------------------------------------------------------- degraded streams


def test_flipped_labels_are_degraded_and_exit_3(tmp_path: Path, example_registry: Path) -> None:
    served = serve_and_log(tmp_path, example_registry, "cancer", truth_shift=flip(0.3, seed=5))
    give_feedback(served, example_registry, "cancer")

    code, output = run_cli("run", "--model", "cancer", "--data-dir", str(tmp_path), "--registry",
                           str(example_registry), "--json")
    assert code == EXIT_DEGRADED, output
    result = json_of(output)
    assert_metrics(result, classification_expected(served.rows))
    assert result["quality_degraded"]
    assert set(result["degraded_metrics"]) == {"accuracy", "f1", "roc_auc"}
    assert result["baseline"]["accuracy"]["change"] < -0.2
    n = len(served.rows)
    for label in (0, 1):
        predicted = int((served.rows[PREDICTION_COLUMN].astype(int) == label).sum())
        observed = int((served.rows["truth"].astype(int) == label).sum())
        assert result["prediction_bias"][str(label)] == predicted / n - observed / n

    # The summary a person reads names what degraded.
    code, text = run_cli("run", "--model", "cancer", "--data-dir", str(tmp_path), "--registry", str(example_registry))
    assert code == EXIT_DEGRADED and "DEGRADED (accuracy, f1, roc_auc)" in text
    # A tolerance wide enough takes the verdict back.
    code, _ = run_cli("run", "--model", "cancer", "--data-dir", str(tmp_path), "--registry", str(example_registry),
                      "--tolerance", "0.5")
    assert code == EXIT_OK


def test_shifted_actuals_are_degraded_with_their_bias(tmp_path: Path, example_registry: Path) -> None:
    served = serve_and_log(tmp_path, example_registry, "diabetes", truth_shift=lambda y: y.astype(float) + 60.0)
    give_feedback(served, example_registry, "diabetes")

    code, output = run_cli("run", "--model", "diabetes", "--data-dir", str(tmp_path), "--registry",
                           str(example_registry), "--json")
    assert code == EXIT_DEGRADED, output
    result = json_of(output)
    assert_metrics(result, regression_expected(served.rows))
    assert set(result["degraded_metrics"]) == {"mae", "r2"}
    # The model now under-predicts by the shift, on top of its own small mean error.
    actual, predicted = served.rows["truth"].astype(float), served.rows[PREDICTION_COLUMN].astype(float)
    bias = result["prediction_bias"]["value"]
    assert bias == pytest.approx(float(np.mean(actual - predicted)), rel=1e-9) and 50 < bias < 70


# ----------------------------------------------------------------------------- what counts


def test_fallback_answers_are_excluded(tmp_path: Path, example_registry: Path) -> None:
    served = serve_and_log(tmp_path, example_registry, "cancer", fallback_every=3)
    give_feedback(served, example_registry, "cancer")
    by_model = model_rows(served)
    n_fallback = len(served.rows) - len(by_model)
    assert n_fallback == 71  # requests 0 and 3 of the four requests of 50, 50, 50 and 21 rows

    result = run_performance(tmp_path, example_registry, "cancer")
    assert result.rows.with_feedback == 171 and result.rows.fallback == n_fallback
    assert result.rows.evaluated == len(by_model) == 100
    assert_metrics(result, classification_expected(by_model))
    predicted = by_model[PREDICTION_COLUMN].astype(int)
    assert result.class_shares["1"].predicted == int((predicted == 1).sum()) / len(by_model)
    assert any("fallback" in note and str(n_fallback) in note for note in result.notes)


def test_window_is_on_prediction_time_and_partial_feedback_counts(tmp_path: Path, example_registry: Path) -> None:
    served = serve_and_log(tmp_path, example_registry, "cancer")
    give_feedback(served, example_registry, "cancer", positions=slice(0, 120))
    middle = served.rows["time"].iloc[100].to_pydatetime()

    # Predictions from the middle on: 71 logged, 20 of them with feedback so far.
    result = run_performance(tmp_path, example_registry, "cancer", since=middle, min_rows=20)
    assert result.rows.logged == 71 and result.rows.with_feedback == result.rows.evaluated == 20
    assert result.rows.feedback_coverage == pytest.approx(20 / 71)
    assert_metrics(result, classification_expected(served.rows.iloc[100:120]))
    with pytest.raises(NotEnoughFeedback):  # 20 rows < the default 50
        run_performance(tmp_path, example_registry, "cancer", since=middle)
    # Before the middle: every prediction has feedback.
    result = run_performance(tmp_path, example_registry, "cancer", until=middle)
    assert result.rows.evaluated == result.rows.logged == 100
    assert_metrics(result, classification_expected(served.rows.iloc[:100]))


def test_too_few_rows_exit_4_and_write_nothing(tmp_path: Path, example_registry: Path) -> None:
    served = serve_and_log(tmp_path, example_registry, "cancer", frame=pd.read_parquet(
        Registry(example_registry).path("cancer", "1") / REFERENCE_FILE).head(60))
    give_feedback(served, example_registry, "cancer", positions=slice(0, 10))

    code, output = run_cli("run", "--model", "cancer", "--data-dir", str(tmp_path), "--registry", str(example_registry))
    assert code == EXIT_TOO_FEW_ROWS
    assert "cancer:1 has 10 prediction(s) with feedback" in output and "at least 50" in output
    assert read_latest_quality(tmp_path, "cancer") is None
    with pytest.raises(NotEnoughFeedback) as raised:
        run_performance(tmp_path, example_registry, "cancer", min_rows=11)
    assert raised.value.rows == 10 and raised.value.version == "1"
    # Nothing logged at all for the other model: the same exit, not a crash.
    code, _ = run_cli("run", "--model", "diabetes", "--data-dir", str(tmp_path), "--registry", str(example_registry))
    assert code == EXIT_TOO_FEW_ROWS


def test_usage_errors_exit_2(tmp_path: Path, example_registry: Path) -> None:
    base = ["run", "--data-dir", str(tmp_path), "--registry", str(example_registry)]
    for args, message in [
        (["--model", "nope"], "not registered"),
        (["--model", "cancer", "--version", "9"], "no version '9'"),
        (["--model", "cancer", "--since", "2024-01-01", "--last", "7d"], "either --since or --last"),
        (["--model", "cancer", "--last", "soon"], "--last expects a duration"),
        (["--model", "cancer", "--since", "2030-01-01", "--until", "2029-01-01"], "the window is empty"),
    ]:
        code, output = run_cli(*base, *args)
        assert code == EXIT_USAGE and message in output, (args, output)
    with pytest.raises(ModelNotFound):
        run_performance(tmp_path, example_registry, "nope")


def test_default_version_is_the_newest_with_feedback(tmp_path: Path, registry_copy: Path,
                                                     trained_examples: dict[str, Path]) -> None:
    served = serve_and_log(tmp_path, registry_copy, "cancer")
    register_model("cancer", trained_examples["cancer"] / "model.onnx",
                   trained_examples["cancer"] / "reference.parquet", target="target", registry=registry_copy)
    give_feedback(served, registry_copy, "cancer")
    assert run_performance(tmp_path, registry_copy, "cancer").version == "1"  # 2 has no feedback
    with pytest.raises(NotEnoughFeedback):
        run_performance(tmp_path, registry_copy, "cancer", version="2")


def test_multiclass_string_labels_use_macro_averages(tmp_path: Path) -> None:
    """A three-class wine model with string labels: macro precision/recall/F1, no ROC AUC, no baseline."""
    fitted = fx.fit_tensor_classifier(string_labels=True)
    files = fx.write_artefacts(tmp_path / "artefacts", fx.export(fitted.estimator,
                                                                 fx.tensor_types(len(fx.WINE_NUMERIC))),
                               fitted.reference)
    registry = tmp_path / "models"
    register_model("wine", files.model, files.reference, target=fx.TARGET, registry=registry)
    served = serve_and_log(tmp_path / "data", registry, "wine", frame=fitted.reference)
    give_feedback(served, registry, "wine")

    result = run_performance(tmp_path / "data", registry, "wine")
    y, p = served.rows["truth"].astype(str), served.rows[PREDICTION_COLUMN].astype(str)
    assert_metrics(result, {
        "accuracy": skm.accuracy_score(y, p), "precision": skm.precision_score(y, p, average="macro"),
        "recall": skm.recall_score(y, p, average="macro"), "f1": skm.f1_score(y, p, average="macro"),
        "roc_auc": None})
    assert result.averaging == "macro" and result.positive_label is None
    assert list(result.class_shares) == ["class_0", "class_1", "class_2"]
    assert sum(result.prediction_bias.values()) == pytest.approx(0, abs=1e-12)
    assert not result.quality_degraded and result.baseline == {}
    assert any("roc_auc not computed" in note for note in result.notes)
    assert any("no training metrics" in note for note in result.notes)


# ----------------------------------------------------------------------------- the baseline rule


def test_baseline_rule_scores_absolute_errors_relative() -> None:
    checks, unchecked = compare_with_baseline(
        {"accuracy": 0.90, "f1_x": 0.1, "roc_auc": 0.949, "mae": 54.9, "rmse": 56.0, "mape": None},
        {"accuracy": 0.95, "roc_auc_score": 1.0, "mae": 50.0, "root_mean_squared_error": 50.0, "mape": 0.3,
         "log_loss": 0.1},
        tolerance=0.05, error_tolerance=0.10)
    accuracy = checks["accuracy"]
    assert (accuracy.kind, accuracy.baseline, accuracy.live) == ("score", 0.95, 0.90)
    assert accuracy.change == pytest.approx(-0.05) and accuracy.limit == pytest.approx(0.90)
    assert not accuracy.degraded  # at the limit is still within tolerance
    assert checks["roc_auc"].degraded  # 1.0 - 0.949 > 0.05, through the scikit-learn name
    assert not checks["mae"].degraded and checks["mae"].limit == pytest.approx(55.0)
    assert checks["rmse"].degraded and checks["rmse"].kind == "error"
    assert sorted(unchecked) == ["log_loss", "mape"]  # unknown kind; not computed live
