"""The drift job on real data: the example models' held-out rows, logged through the real prediction log.

Windows are drawn from the reference data itself (resampled with replacement,
small noise on continuous features), so "no drift" is the truth, and shifted
copies of them are the truth for "drift". Predictions come from the registered
ONNX model, as in the service.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from monitoring.jobs.cli import EXIT_DRIFT, EXIT_TOO_FEW_ROWS, EXIT_USAGE, drift_app
from monitoring.jobs.drift import (
    DriftConfigError,
    NotEnoughRows,
    _resolve_version,
    run_drift,
    time_stratified_positions,
)
from monitoring.predlog import LoggedRequest, PredictionLog
from monitoring.verdicts import LATEST_FILE, DriftResult, VerdictError, read_latest_drift
from service.core.card import PREDICTION_COLUMN, SCORE_COLUMN, ModelCard
from service.core.errors import ModelNotFound
from service.core.predictor import Batch
from service.registry.register import register_model
from service.registry.store import REFERENCE_FILE, Registry
from service.runtime.onnx import OnnxPredictor

NOT_FEATURES = ("target", PREDICTION_COLUMN, SCORE_COLUMN)
SHIFTED = {"bmi": "top", "bp": "top", "s3": "top", "s1": "scale", "s5": "scale"}
"""Five of diabetes' ten features: enough for Evidently's dataset drift rule (half the features)."""


# ----------------------------------------------------------------------------- helpers


def reference_features(registry: Path, model: str, version: str = "1") -> pd.DataFrame:
    """The version's held-out reference rows, features only."""
    frame = pd.read_parquet(Registry(registry).path(model, version) / REFERENCE_FILE)
    return frame.drop(columns=[c for c in NOT_FEATURES if c in frame.columns])


def same_distribution(reference: pd.DataFrame, rows: int, seed: int) -> pd.DataFrame:
    """Reference rows resampled with replacement, with noise of 1% of a std on continuous features.

    Features whose values repeat a lot (diabetes' ``sex``, and ``s4``, a ratio of small integers) get no
    noise: jitter would smear their steps, which K-S rightly calls a change of distribution.
    """
    rng = np.random.default_rng(seed)
    frame = reference.iloc[rng.integers(0, len(reference), rows)].reset_index(drop=True)
    for name in frame.columns:
        if reference[name].value_counts(normalize=True).max() < 0.1:
            frame[name] = frame[name] + rng.normal(0, 0.01 * reference[name].std(), rows)
    return frame


def shift(frame: pd.DataFrame, reference: pd.DataFrame, how: dict[str, str], seed: int) -> pd.DataFrame:
    """``top``: values only from the top 20% of the reference range; ``scale``: values times 1.5."""
    rng = np.random.default_rng(seed)
    frame = frame.copy()
    for name, kind in how.items():
        if kind == "top":
            low, high = reference[name].min(), reference[name].max()
            frame[name] = rng.uniform(low + 0.8 * (high - low), high, len(frame))
        else:
            frame[name] = frame[name] * 1.5
    return frame


def write_log(data_dir: Path, registry: Path, model: str, frame: pd.DataFrame, version: str = "1",
              end: datetime | None = None, span: timedelta = timedelta(hours=6), batch: int = 50,
              log_card: ModelCard | None = None, fallback_every: int = 0) -> None:
    """Predict ``frame`` with the registered model and log it as requests of ``batch`` rows, evenly over ``span``.

    ``log_card`` (default: the registered card) is the card the logging service believed in, so a test can log
    fewer columns than the registry's card names. With ``fallback_every=k``, every k-th request is logged as
    answered by a fallback that predicts one constant value, as the service does while a model is degraded.
    """
    reg = Registry(registry)
    card = reg.card(model, version)
    predictions = OnnxPredictor(card, reg.verify(card)).predict(
        Batch(size=len(frame), matrix=frame[card.feature_names].to_numpy(dtype=np.float64)))
    if predictions.values is not None:
        outputs, scores = predictions.values.tolist(), None
    else:
        probs = predictions.probabilities
        outputs = predictions.labels
        scores = (probs[:, 1] if probs.shape[1] == 2 else probs.max(axis=1)).tolist()
    end = end or datetime.now(timezone.utc) - timedelta(minutes=1)
    start = (end - span).timestamp()
    step = span.total_seconds() / len(frame)
    records = frame[card.feature_names].to_dict("records")
    plog = PredictionLog(data_dir, worker="t", max_buffer_rows=len(frame) + 1)
    for number, lo in enumerate(range(0, len(frame), batch)):
        hi = min(lo + batch, len(frame))
        fallback = fallback_every and number % fallback_every == 0
        plog.append(LoggedRequest(
            time=start + lo * step, request_id=uuid.uuid4().hex, card=log_card or card, variant="stable",
            instances=records[lo:hi], prediction=[outputs[0]] * (hi - lo) if fallback else outputs[lo:hi],
            score=scores[lo:hi] if scores is not None else None,
            reasons=["drift"] * (hi - lo) if fallback else None))
        if hi % 20_000 < batch:
            plog.flush()  # segments of ~20k rows, like a busy service's flushes
    plog.close()


def run_cli(*args: str) -> tuple[int, str]:
    """``vigil drift ...`` in-process; returns (exit code, stdout and stderr as a terminal shows them)."""
    result = CliRunner().invoke(drift_app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a crash is a test failure with its traceback, not an exit code to compare
    return result.exit_code, result.output


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def diabetes_reference(example_registry: Path) -> pd.DataFrame:
    return reference_features(example_registry, "diabetes")


@pytest.fixture(scope="module")
def same_dir(tmp_path_factory: pytest.TempPathFactory, example_registry: Path,
             diabetes_reference: pd.DataFrame) -> Path:
    """A data dir whose diabetes log is 2,000 rows from the reference distribution."""
    data_dir = tmp_path_factory.mktemp("same")
    write_log(data_dir, example_registry, "diabetes", same_distribution(diabetes_reference, 2000, seed=1))
    return data_dir


@pytest.fixture(scope="module")
def shifted_dir(tmp_path_factory: pytest.TempPathFactory, example_registry: Path,
                diabetes_reference: pd.DataFrame) -> Path:
    """A data dir whose diabetes log has the :data:`SHIFTED` features moved."""
    data_dir = tmp_path_factory.mktemp("shifted")
    frame = shift(same_distribution(diabetes_reference, 2000, seed=2), diabetes_reference, SHIFTED, seed=3)
    write_log(data_dir, example_registry, "diabetes", frame)
    return data_dir


# ----------------------------------------------------------------------------- the verdicts, through the CLI


def test_same_distribution_is_not_drift(same_dir: Path, example_registry: Path) -> None:
    code, output = run_cli("run", "--model", "diabetes", "--last", "24h", "--data-dir", str(same_dir),
                           "--registry", str(example_registry), "--prune-days", "0")
    assert code == 0, output
    assert "no drift" in output.lower()

    result = read_latest_drift(same_dir, "diabetes")
    assert result is not None and result.version == "1"
    assert not result.drift_detected and not result.dataset_drift
    assert result.drifted_features == [] and result.drift_share == 0
    assert len(result.features) == 10 and not result.skipped_features
    assert result.prediction is not None and result.prediction.column == PREDICTION_COLUMN
    assert not result.prediction.drifted
    assert result.rows.window == result.rows.current == 2000 and result.rows.current_sampling == "none"
    assert result.rows.reference == result.rows.reference_available == 133
    for feature in result.features.values():
        assert feature.missing_share == 0
        assert feature.out_of_range_share is not None and feature.out_of_range_share < 0.05  # noise at the edges
        assert feature.stat_test in ("ks", "z")  # Evidently's defaults for a reference under 1,000 rows

    # result.json, report.html, latest.json: all there, no temporary file left, latest == result.
    run_dir = Path(result.result_json).parent
    assert run_dir.parent == same_dir / "drift" / "diabetes" / "1"
    html = Path(result.report_html).read_text()
    assert "<html" in html[:1000].lower() and "bmi" in html  # Evidently's report, with the features in it
    assert json.loads(Path(result.result_json).read_text()) == json.loads((run_dir.parent / LATEST_FILE).read_text())
    assert not list((same_dir / "drift").rglob(".*.tmp"))


def test_shifted_features_are_drift_and_named(shifted_dir: Path, example_registry: Path) -> None:
    code, output = run_cli("run", "--model", "diabetes", "--data-dir", str(shifted_dir),
                           "--registry", str(example_registry), "--prune-days", "0", "--json")
    assert code == EXIT_DRIFT, output
    result = json.loads(output[output.index("{"):])
    assert sorted(result["drifted_features"]) == sorted(SHIFTED)
    assert result["drift_detected"] and result["dataset_drift"] and result["drift_share"] == pytest.approx(0.5)
    assert result["prediction"]["drifted"]  # bmi and s5 move the regressor's output
    shifted_range = result["features"]["bmi"]["out_of_range_share"]
    assert shifted_range == 0  # top 20% of the reference range: shifted, yet never out of range

    # latest.json follows the newest run.
    first = read_latest_drift(shifted_dir, "diabetes", "1")
    again = run_drift(shifted_dir, example_registry, "diabetes", stattests={"bmi": {"threshold": 1e-300}})
    assert read_latest_drift(shifted_dir, "diabetes", "1") == again != first
    assert "bmi" not in again.drifted_features and again.features["bmi"].threshold == 1e-300


def test_one_shifted_feature_is_drift_through_the_prediction(
        tmp_path: Path, example_registry: Path, diabetes_reference: pd.DataFrame) -> None:
    """One feature of ten is under Evidently's dataset rule (half of them), but it moves the model's output."""
    frame = shift(same_distribution(diabetes_reference, 1500, seed=4), diabetes_reference, {"s5": "scale"}, seed=5)
    write_log(tmp_path, example_registry, "diabetes", frame)
    code, output = run_cli("run", "--model", "diabetes", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out"),
                           "--registry", str(example_registry), "--prune-days", "0")
    assert code == EXIT_DRIFT, output
    assert "prediction drift" in output and "drifted: s5" in output

    result = DriftResult.model_validate_json((tmp_path / "out" / "result.json").read_text())
    assert result.drifted_features == ["s5"]
    assert result.drift_share == pytest.approx(0.1) and not result.dataset_drift
    assert result.prediction is not None and result.prediction.drifted and result.drift_detected
    assert result.features["s5"].out_of_range_share > 0.2  # 1.5x pushes the upper part past the reference max
    assert (tmp_path / "out" / "report.html").is_file()
    assert read_latest_drift(tmp_path, "diabetes", "1") == result  # latest.json follows runs written elsewhere too


def test_fallback_answers_are_left_out_of_prediction_drift(
        tmp_path: Path, example_registry: Path, diabetes_reference: pd.DataFrame) -> None:
    """While a model is degraded the fallback answers with a constant: that is not the model's output drifting."""
    write_log(tmp_path, example_registry, "diabetes", same_distribution(diabetes_reference, 1000, seed=10),
              fallback_every=2)
    result = run_drift(tmp_path, example_registry, "diabetes")
    assert result.prediction is not None and result.prediction.rows == 500
    assert not result.prediction.drifted and not result.drift_detected
    assert any("fallback answered 500 of the 1000 rows" in note for note in result.notes)


def test_classifier_pii_and_missing_columns_are_skipped_with_a_note(
        tmp_path: Path, registry_copy: Path, trained_examples: dict[str, Path]) -> None:
    """cancer:2 drops 'mean radius' as PII; the service that logged also lacked 'mean texture'."""
    card = register_model("cancer", trained_examples["cancer"] / "model.onnx",
                          trained_examples["cancer"] / "reference.parquet", target="target",
                          registry=registry_copy, pii={"mean radius": "drop"})
    assert card.version == "2"
    log_card = card.model_copy(update={"features": [
        f.model_copy(update={"pii": "drop"}) if f.name == "mean texture" else f for f in card.features]})
    reference = reference_features(registry_copy, "cancer", "2")
    write_log(tmp_path, registry_copy, "cancer", same_distribution(reference, 600, seed=6), version="2",
              log_card=log_card)

    result = run_drift(tmp_path, registry_copy, "cancer")  # default version: the newest with logged rows
    assert result.version == "2" and result.task == "classification"
    skipped = {s.feature: s.reason for s in result.skipped_features}
    assert skipped.keys() == {"mean radius", "mean texture"}
    assert "PII" in skipped["mean radius"] and "not in the prediction log" in skipped["mean texture"]
    assert len(result.features) == 28 and not result.dataset_drift
    assert result.prediction is not None and result.prediction.column == SCORE_COLUMN


# ----------------------------------------------------------------------------- too few rows, usage errors


def test_too_few_rows_raises_and_exits_4(tmp_path: Path, example_registry: Path,
                                         diabetes_reference: pd.DataFrame) -> None:
    write_log(tmp_path, example_registry, "diabetes", same_distribution(diabetes_reference, 150, seed=7))
    with pytest.raises(NotEnoughRows) as info:
        run_drift(tmp_path, example_registry, "diabetes")
    assert (info.value.rows, info.value.min_rows) == (150, 200)
    assert "150" in str(info.value) and "200" in str(info.value)

    code, output = run_cli("run", "--model", "diabetes", "--data-dir", str(tmp_path),
                           "--registry", str(example_registry), "--min-rows", "151")
    assert code == EXIT_TOO_FEW_ROWS
    assert "150" in output and "151" in output and "Traceback" not in output
    assert not (tmp_path / "drift" / "diabetes" / "1" / LATEST_FILE).exists()  # no verdict written


@pytest.mark.parametrize("args, message", [
    (["--model", "diabetes", "--last", "24 hours"], "--last"),
    (["--model", "diabetes", "--last", "0h"], "--last"),
    (["--model", "diabetes", "--since", "yesterday"], "--since"),
    (["--model", "diabetes", "--until", "2024-13-01"], "--until"),
    (["--model", "diabetes", "--since", "2024-01-01T00:00:00Z", "--last", "24h"], "either"),
    (["--model", "diabetes", "--since", "2024-01-02", "--until", "2024-01-01"], "before"),
    (["--model", "nosuchmodel"], "nosuchmodel"),
    (["--model", "diabetes", "--version", "9"], "'9'"),
    (["--model", "diabetes", "--stattest", "bmi=nosuchtest"], "nosuchtest"),
    (["--model", "diabetes", "--stattest", "nosuchfeature=ks"], "nosuchfeature"),
    (["--model", "diabetes", "--stattest", "bmi"], "--stattest"),
])
def test_usage_errors_exit_2_with_a_message(tmp_path: Path, example_registry: Path, same_dir: Path,
                                            args: list[str], message: str) -> None:
    code, output = run_cli("run", *args, "--data-dir", str(same_dir), "--registry", str(example_registry),
                           "--prune-days", "0")
    assert code == EXIT_USAGE, output
    assert message in output and "Traceback" not in output


def test_unknown_model_and_bad_override_raise(example_registry: Path, same_dir: Path) -> None:
    with pytest.raises(ModelNotFound, match="nosuchmodel"):
        run_drift(same_dir, example_registry, "nosuchmodel")
    with pytest.raises(DriftConfigError, match="nosuchfeature"):
        run_drift(same_dir, example_registry, "diabetes", stattests={"nosuchfeature": {"stattest": "ks"}})


def test_read_latest_names_a_corrupt_file(tmp_path: Path) -> None:
    assert read_latest_drift(tmp_path, "diabetes") is None
    latest = tmp_path / "drift" / "diabetes" / "1" / LATEST_FILE
    latest.parent.mkdir(parents=True)
    latest.write_text('{"model": "diabetes"}')
    with pytest.raises(VerdictError, match=str(latest)):
        read_latest_drift(tmp_path, "diabetes", "1")


def test_prune_runs_after_the_job_unless_disabled(tmp_path: Path, example_registry: Path) -> None:
    old = tmp_path / "predlog" / "model=diabetes" / "date=2000-01-01"
    old.mkdir(parents=True)
    (old / "part-0.parquet").write_bytes(b"")
    code, output = run_cli("run", "--model", "diabetes", "--data-dir", str(tmp_path),
                           "--registry", str(example_registry), "--prune-days", "0")
    assert code == EXIT_TOO_FEW_ROWS and old.exists()
    code, output = run_cli("run", "--model", "diabetes", "--data-dir", str(tmp_path),
                           "--registry", str(example_registry))
    assert code == EXIT_TOO_FEW_ROWS and not old.exists()


# ----------------------------------------------------------------------------- version choice, sampling


def test_default_version_is_the_newest_with_logged_rows(tmp_path: Path, registry_copy: Path,
                                                        trained_examples: dict[str, Path],
                                                        diabetes_reference: pd.DataFrame) -> None:
    register_model("diabetes", trained_examples["diabetes"] / "model.onnx",
                   trained_examples["diabetes"] / "reference.parquet", target="target", registry=registry_copy)
    reg = Registry(registry_copy)
    until = datetime.now(timezone.utc)
    assert _resolve_version(reg, tmp_path, "diabetes", None, until) == "2"  # nothing logged: the newest
    write_log(tmp_path, registry_copy, "diabetes", diabetes_reference.head(20), version="1")
    assert _resolve_version(reg, tmp_path, "diabetes", None, until) == "1"


def test_time_stratified_sample_is_deterministic_and_covers_the_window() -> None:
    rng = np.random.default_rng(0)
    times = rng.permutation(np.arange(1_000_000, dtype=np.int64))
    picked = time_stratified_positions(times, 1000, seed=42)
    assert np.array_equal(picked, time_stratified_positions(times, 1000, seed=42))
    assert not np.array_equal(picked, time_stratified_positions(times, 1000, seed=43))
    strata = times[picked] // 1000  # each stratum holds 1,000 consecutive times: one row from each
    assert np.array_equal(strata, np.arange(1000))
    assert len(time_stratified_positions(times[:500], 1000, seed=1)) == 500


@pytest.mark.integration
@pytest.mark.slow  # two Evidently runs over 200k rows: ~10 s here, most of the in-process tiers' time
def test_sampled_verdicts_match_evidently_on_the_whole_200k_window(
        tmp_path: Path, example_registry: Path, diabetes_reference: pd.DataFrame) -> None:
    """200k rows whose second half drifts on two features: the 50k time-stratified sample agrees with Evidently
    run on every row, feature by feature and on the prediction."""
    rows = 200_000
    frame = same_distribution(diabetes_reference, rows, seed=8)
    late = shift(frame.iloc[rows // 2:], diabetes_reference, {"bmi": "top", "s5": "scale"}, seed=9)
    frame = pd.concat([frame.iloc[: rows // 2], late], ignore_index=True)
    write_log(tmp_path, example_registry, "diabetes", frame, batch=500)

    sampled = run_drift(tmp_path, example_registry, "diabetes", out=tmp_path / "sampled")
    full = run_drift(tmp_path, example_registry, "diabetes", out=tmp_path / "full", max_rows=None)

    assert sampled.rows.window == full.rows.window == full.rows.current == rows
    assert sampled.rows.current == 50_000 and sampled.rows.current_sampling == "time-stratified"
    assert {n: f.drifted for n, f in sampled.features.items()} == {n: f.drifted for n, f in full.features.items()}
    assert {n: f.stat_test for n, f in sampled.features.items()} == {n: f.stat_test for n, f in full.features.items()}
    assert sorted(sampled.drifted_features) == ["bmi", "s5"]
    assert sampled.prediction.drifted == full.prediction.drifted
    for name, feature in sampled.features.items():
        assert feature.missing_share == full.features[name].missing_share  # computed on the whole window
