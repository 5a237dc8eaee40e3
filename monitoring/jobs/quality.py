"""The quality ("performance") job: how good a model version's served predictions were, once the truth arrived.

:func:`run_performance` joins the ground truth stored by ``POST /feedback``
(:func:`monitoring.feedback.read_feedback`) with the prediction log
(:func:`monitoring.predlog.read_log`) by request id and instance index, computes
the model's quality on the joined rows with Evidently, compares it with the
training metrics of the version's card, and writes::

    performance/<model>/<version>/<UTC timestamp>/report.html   Evidently's own report (in the store)
    performance/<model>/<version>/<UTC timestamp>/result.json   a PerformanceResult
    performance/<model>/<version>/latest.json                   the newest PerformanceResult (atomic)

Choices, and why:

- **The window is on prediction time.** ``since <= time < until`` selects the
  *served* predictions (the log's ``time``); their feedback counts whenever it
  arrived, because labels come late (a churn is known a month later). A run over
  the last 7 days therefore grows more complete as feedback keeps arriving.
- **Rows the fallback answered are left out** of the model's quality (and of
  the prediction bias): the log's ``reason`` says the heuristic answered them,
  so they say nothing about the model. They are counted in ``rows.fallback``
  and named in the notes.
- **Classification** quality is Evidently's ``ClassificationPreset`` on the
  served labels (accuracy, precision, recall, F1). A binary model's precision,
  recall and F1 are those of its positive class (the card's second label, whose
  probability the log keeps as ``prediction_score``); a multiclass model's are
  macro averages. ROC AUC comes from the positive-class score (binary models
  only: the log keeps only the top probability of a multiclass model). The score
  is a separate Evidently task on purpose: given a score, Evidently re-derives
  labels by thresholding it at 0.5, while the quality of what was *served* is
  that of the labels the model answered.
- **Regression** quality is Evidently's ``RegressionPreset``: MAE, RMSE, MAPE
  and R². MAPE is stored as a fraction, like scikit-learn's
  ``mean_absolute_percentage_error`` and training scripts' card metrics
  (Evidently reports percent), and is left out when an actual is 0 or negative,
  where it is undefined.
- **Prediction bias**: for classification, per class, the share of rows
  predicted as the class minus the share observed; for regression, the mean
  error ``actual - predicted`` (positive: the model under-predicts), exported
  under the class ``value``.
- **Degraded** is judged against the card's ``training.metrics`` for every
  metric present in both: a score (accuracy, precision, recall, F1, ROC AUC,
  R²) that dropped by more than ``tolerance`` (absolute: 0.05 is five points of
  accuracy), or an error (MAE, RMSE, MAPE) that grew by more than
  ``error_tolerance`` of the baseline (relative: 0.10 is 10% worse). Errors are
  in the target's unit, so no absolute number fits every model; scores are on
  [0, 1], where an absolute drop reads naturally.

Evidently takes seconds to import, so it is imported only once the window has
enough joined rows.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from monitoring.feedback import read_feedback
from monitoring.jobs.drift import FALLBACK_REASON, _registered_versions, _utc, default_until, rows_outside
from monitoring.jobs.files import RunOutput, TooFewRows
from monitoring.predlog import read_log, segment_keys
from monitoring.store import Store, as_store
from monitoring.verdicts import (
    PERFORMANCE_DIR,
    BaselineCheck,
    ClassShare,
    FeedbackRows,
    PerformanceResult,
    VerdictError,
    Window,
)
from service.core.card import PREDICTION_COLUMN, SCORE_COLUMN, ModelCard
from service.registry.store import Registry

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("vigil.performance")

REPORT_FILE = "report.html"
RESULT_FILE = "result.json"

DEFAULT_TOLERANCE = 0.05
"""Largest allowed absolute drop of a score metric below the card's baseline."""
DEFAULT_ERROR_TOLERANCE = 0.10
"""Largest allowed rise of an error metric above the card's baseline, as a share of the baseline."""

STAGES = ("joining feedback to the prediction log", "loading Evidently", "computing quality", "writing the report")
"""What :func:`run_performance` reports to its ``progress`` callback, in order."""

SCORE_METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "r2")
"""Metrics where higher is better: degraded below ``baseline - tolerance``."""
ERROR_METRICS = ("mae", "rmse", "mape")
"""Metrics where lower is better: degraded above ``baseline * (1 + error_tolerance)``."""
BASELINE_ALIASES = {
    "accuracy_score": "accuracy", "precision_score": "precision", "recall_score": "recall", "f1_score": "f1",
    "roc_auc_score": "roc_auc", "auc": "roc_auc", "r2_score": "r2", "mean_absolute_error": "mae",
    "root_mean_squared_error": "rmse", "mean_absolute_percentage_error": "mape",
}
"""Card metric names as scikit-learn spells them -> the names used here."""
REGRESSION_BIAS_KEY = "value"
"""Key of a regression model's mean error in :attr:`PerformanceResult.prediction_bias` (the gauge's ``class``)."""

ACTUAL_COLUMN = "actual"
"""Feedback column of a classification actual (the label as text)."""
ACTUAL_VALUE_COLUMN = "actual_value"
"""Feedback column of a regression actual."""
LOG_COLUMNS = ["time", "request_id", "index", "version", "variant", FALLBACK_REASON, PREDICTION_COLUMN, SCORE_COLUMN]
_LABELS_TASK = "default"
"""Evidently task over the served labels (``default``: Evidently's per-label metrics relabel through it)."""
_SCORES_TASK = "scores"
"""Evidently task over the positive-class score, for ROC AUC only."""


# ----------------------------------------------------------------------------- errors


class PerformanceError(VerdictError):
    """The quality job cannot run; the message says why."""


class PerformanceConfigError(PerformanceError):
    """The job was asked for something that cannot work (window, tolerance)."""


class NotEnoughFeedback(TooFewRows, PerformanceError):
    """The window holds fewer predictions with feedback (answered by the model) than the job needs."""

    def __init__(self, model: str, version: str, rows: int, min_rows: int, since: datetime | None,
                 until: datetime, fallback: int = 0, outside: tuple[int, int] | None = None) -> None:
        excluded = f" ({fallback} more answered by the fallback, which do not count)" if fallback else ""
        super().__init__(model, version, rows, min_rows, since, until, "prediction(s) with feedback", "quality",
                         excluded, outside=outside)
        self.fallback = fallback


# ----------------------------------------------------------------------------- joining


def _join_feedback(logged: pd.DataFrame, store: Store, model: str,
                   task: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the window's logged predictions of every version, those with feedback joined: column ``actual``).

    The actual is text for classification (as feedback stores it) and a float for regression.
    """
    import pandas as pd

    feedback = read_feedback(store, model)
    column = ACTUAL_COLUMN if task == "classification" else ACTUAL_VALUE_COLUMN
    if column not in feedback.columns or not len(logged):
        return logged, logged.iloc[:0].assign(actual=pd.Series(dtype=object))
    # Feedback keeps its own version/variant copies; the log's are authoritative, so only the actual is taken.
    truth = feedback[["request_id", "index", column]].dropna(subset=[column]).rename(columns={column: "actual"})
    truth["index"] = truth["index"].astype(np.int64)
    keyed = logged.assign(index=logged["index"].astype(np.int64)).drop_duplicates(["request_id", "index"])
    joined = keyed.merge(truth, on=["request_id", "index"], how="inner", validate="one_to_one")
    return logged, joined.sort_values(["time", "index"], kind="stable").reset_index(drop=True)


def _resolve_version(reg: Registry, model: str, joined: pd.DataFrame) -> str:
    """The newest registered version with feedback in the window, else the newest version."""
    versions = _registered_versions(reg, model)
    present = set(joined["version"].unique()) if len(joined) else set()
    with_feedback = [v for v in versions if v in present]
    return (with_feedback or versions)[-1]


# ----------------------------------------------------------------------------- quality


def _class_shares(predicted: pd.Series, actual: pd.Series, labels: list[str]) -> dict[str, ClassShare]:
    """Predicted and observed share of every class (the card's labels, then any other label seen)."""
    seen = set(predicted.unique()) | set(actual.unique())
    classes = labels + sorted(seen - set(labels))
    n = len(predicted)
    shares = {}
    for label in classes:
        p = int((predicted == label).sum()) / n
        o = int((actual == label).sum()) / n
        shares[label] = ClassShare(predicted=p, observed=o, bias=p - o)
    return shares


def _run_report(metrics: list[Any], frame: pd.DataFrame, definition: Any) -> Any:
    from evidently import Dataset, Report

    with warnings.catch_warnings():
        # Evidently's legacy code trips pandas/numpy deprecation warnings that say nothing about the data.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return Report(metrics).run(Dataset.from_pandas(frame, data_definition=definition), None)


def _value(results: dict[str, Any], metric: Any, name: str) -> float | None:
    """A metric's value read from the snapshot by the metric's id (mean of a mean/std metric); None when NaN."""
    result = results.get(metric.metric_id)
    if result is None:
        raise PerformanceError(f"Evidently's report has no {name} result (metric {metric.metric_id})")
    value = float(result.mean.value if hasattr(result, "mean") else result.value)
    return value if math.isfinite(value) else None


def _classification_quality(rows: pd.DataFrame, card: ModelCard
                            ) -> tuple[Any, dict[str, float | None], str | None, list[str]]:
    """(snapshot, metrics, positive label, notes) of the served labels (and the positive-class score)."""
    import pandas as pd
    from evidently import BinaryClassification, DataDefinition, MulticlassClassification
    from evidently.metrics import Accuracy, F1Score, Precision, Recall, RocAuc
    from evidently.presets import ClassificationPreset

    labels = [str(label) for label in card.labels or []]
    binary = len(labels) == 2
    positive = labels[1] if binary else None
    # Labels as text on both sides: feedback stores them so, and it keeps int and string labels alike.
    frame = pd.DataFrame({"actual": rows["actual"].astype(str).to_numpy(),
                          PREDICTION_COLUMN: rows[PREDICTION_COLUMN].astype(str).to_numpy()})
    notes: list[str] = []
    tasks: list[Any]
    if binary:
        tasks = [BinaryClassification(name=_LABELS_TASK, target="actual", prediction_labels=PREDICTION_COLUMN,
                                      pos_label=positive)]
    else:
        tasks = [MulticlassClassification(name=_LABELS_TASK, target="actual", prediction_labels=PREDICTION_COLUMN)]
        notes.append("roc_auc not computed: the prediction log keeps only the top probability of a multiclass model")
    scores = rows[SCORE_COLUMN].to_numpy(dtype=np.float64, na_value=np.nan) if binary else None
    with_auc = False
    if scores is not None:
        if np.isnan(scores).any():
            notes.append(f"roc_auc not computed: {int(np.isnan(scores).sum())} row(s) have no {SCORE_COLUMN}")
        elif frame["actual"].nunique() < 2:
            notes.append("roc_auc not computed: the actuals hold only one class")
        else:
            with_auc = True
            frame[SCORE_COLUMN] = scores
            tasks.append(BinaryClassification(name=_SCORES_TASK, target="actual", prediction_probas=SCORE_COLUMN,
                                              pos_label=positive))
    definition = DataDefinition(classification=tasks, categorical_columns=["actual", PREDICTION_COLUMN],
                                numerical_columns=[SCORE_COLUMN] if with_auc else [])
    named = {"accuracy": Accuracy(classification_name=_LABELS_TASK),
             "precision": Precision(classification_name=_LABELS_TASK),
             "recall": Recall(classification_name=_LABELS_TASK),
             "f1": F1Score(classification_name=_LABELS_TASK)}
    metrics: list[Any] = [ClassificationPreset(classification_name=_LABELS_TASK)]
    if with_auc:
        named["roc_auc"] = RocAuc(classification_name=_SCORES_TASK)
        metrics.append(named["roc_auc"])
    snapshot = _run_report(metrics, frame, definition)
    values = {name: _value(snapshot.metric_results, metric, name) for name, metric in named.items()}
    values.setdefault("roc_auc", None)
    return snapshot, values, positive, notes


def _regression_quality(rows: pd.DataFrame) -> tuple[Any, dict[str, float | None], float, list[str]]:
    """(snapshot, metrics, mean of actual - predicted, notes) with Evidently's RegressionPreset."""
    import pandas as pd
    from evidently import DataDefinition, Regression
    from evidently.metrics import MAE, MAPE, RMSE, MeanError, R2Score
    from evidently.presets import RegressionPreset

    frame = pd.DataFrame({"actual": rows["actual"].to_numpy(dtype=np.float64),
                          PREDICTION_COLUMN: rows[PREDICTION_COLUMN].to_numpy(dtype=np.float64)})
    definition = DataDefinition(regression=[Regression(target="actual", prediction=PREDICTION_COLUMN)],
                                numerical_columns=["actual", PREDICTION_COLUMN])
    snapshot = _run_report([RegressionPreset()], frame, definition)
    results = snapshot.metric_results
    values = {"mae": _value(results, MAE(), "MAE"), "rmse": _value(results, RMSE(), "RMSE"),
              "mape": _value(results, MAPE(), "MAPE"), "r2": _value(results, R2Score(), "R2")}
    notes = []
    non_positive = int((frame["actual"] <= np.finfo(np.float64).eps).sum())
    if non_positive:
        # Evidently divides by max(actual, eps): a percentage of a zero or negative actual means nothing.
        values["mape"] = None
        notes.append(f"mape not computed: {non_positive} actual(s) are zero or negative")
    elif values["mape"] is not None:
        values["mape"] /= 100.0  # Evidently reports percent; cards and scikit-learn use a fraction
    mean_error = _value(results, MeanError(), "MeanError")
    if mean_error is None:
        raise PerformanceError("Evidently's mean error is not finite")
    return snapshot, values, -mean_error, notes  # Evidently's error is predicted - actual


def compare_with_baseline(live: dict[str, float | None], baseline: dict[str, float], tolerance: float,
                          error_tolerance: float) -> tuple[dict[str, BaselineCheck], list[str]]:
    """Judge each live metric against the card's training metric of the same name.

    Returns (checks of the metrics present in both, card metrics that could not be compared).
    """
    checks: dict[str, BaselineCheck] = {}
    unchecked: list[str] = []
    for raw_name, base in baseline.items():
        name = BASELINE_ALIASES.get(raw_name.lower(), raw_name.lower())
        value = live.get(name)
        if value is None or name in checks or not math.isfinite(base):
            unchecked.append(raw_name)
            continue
        if name in SCORE_METRICS:
            limit = base - tolerance
            checks[name] = BaselineCheck(kind="score", baseline=base, live=value, change=value - base, limit=limit,
                                         degraded=value < limit)
        elif name in ERROR_METRICS:
            limit = base * (1 + error_tolerance)
            checks[name] = BaselineCheck(kind="error", baseline=base, live=value, change=value - base, limit=limit,
                                         degraded=value > limit)
        else:
            unchecked.append(raw_name)
    return checks, unchecked


# ----------------------------------------------------------------------------- the job


def run_performance(
    data_dir: Store | Path,
    registry: Path | None,
    model: str,
    version: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    min_rows: int = 50,
    out: Path | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    error_tolerance: float = DEFAULT_ERROR_TOLERANCE,
    progress: Callable[[str], None] | None = None,
) -> PerformanceResult:
    """Judge the quality of one model version's predictions that have feedback; write the reports.

    The window is ``since <= time < until`` on the prediction's time (UTC; naive
    datetimes are taken as UTC; ``until`` defaults to :func:`monitoring.drift.default_until`,
    ``since`` to the start of the log); feedback counts whenever it arrived.
    ``version`` defaults to the newest registered version with feedback in the
    window (else the newest version). ``tolerance`` is the largest absolute drop
    of a score metric, ``error_tolerance`` the largest relative rise of an error
    metric, below/above the card's training metrics (see the module docstring).
    ``progress`` is called with each of :data:`STAGES` as it starts.

    Raises :class:`NotEnoughFeedback` when fewer than ``min_rows`` predictions
    answered by the model have feedback, :class:`~service.errors.ModelNotFound`
    for an unknown model or version, and :class:`PerformanceConfigError` for an
    empty window or a negative tolerance.
    """
    started = time.perf_counter()
    created_at = datetime.now(timezone.utc)
    report_stage = progress or (lambda stage: None)
    store = as_store(data_dir)
    since = _utc(since)
    until = _utc(until) or default_until(created_at)
    if since is not None and since >= until:
        raise PerformanceConfigError(f"the window is empty: since ({since.isoformat()}) is not before "
                                     f"until ({until.isoformat()})")
    if tolerance < 0 or error_tolerance < 0:
        raise PerformanceConfigError(f"tolerances cannot be negative (tolerance {tolerance}, "
                                     f"error_tolerance {error_tolerance})")

    reg = Registry(registry)
    _registered_versions(reg, model)
    # The task (which feedback column holds the actual) is the model's, whatever the version.
    task = reg.card(model, version).task
    report_stage(STAGES[0])
    with store.local_copy(segment_keys(store, model, since, until)) as view:
        logged = read_log(view, model, since=since, until=until, columns=LOG_COLUMNS)
    logged, joined = _join_feedback(logged, store, model, task)
    version = version or _resolve_version(reg, model, joined)
    card = reg.card(model, version)
    logged = logged[logged["version"] == version]
    joined = joined[joined["version"] == version]
    by_model = joined[FALLBACK_REASON].isna().to_numpy()
    rows = joined[by_model].reset_index(drop=True)
    n_fallback = int((~by_model).sum())
    if len(rows) < min_rows:
        raise NotEnoughFeedback(model, version, len(rows), min_rows, since, until, fallback=n_fallback,
                                outside=rows_outside(store, model, version, since, until))

    notes: list[str] = []
    if n_fallback:
        notes.append(f"{n_fallback} of the {len(joined)} predictions with feedback were answered by the fallback; "
                     "they are left out of the model's quality and prediction bias")

    report_stage(STAGES[1])
    import evidently

    report_stage(STAGES[2])
    averaging: Literal["binary", "macro"] | None = None
    positive: str | None = None
    shares: dict[str, ClassShare] = {}
    if card.task == "classification":
        snapshot, metrics, positive, task_notes = _classification_quality(rows, card)
        averaging = "binary" if positive is not None else "macro"
        shares = _class_shares(rows[PREDICTION_COLUMN].astype(str), rows["actual"].astype(str),
                               [str(label) for label in card.labels or []])
        bias = {label: share.bias for label, share in shares.items()}
    else:
        snapshot, metrics, mean_error, task_notes = _regression_quality(rows)
        bias = {REGRESSION_BIAS_KEY: mean_error}
    notes += task_notes
    checks, unchecked = compare_with_baseline(metrics, card.training.metrics, tolerance, error_tolerance)
    if not card.training.metrics:
        notes.append(f"the card of {model}:{version} has no training metrics: there is no baseline to judge against")
    elif unchecked:
        notes.append(f"card metric(s) {', '.join(unchecked)} not compared: not computed on the live window")
    degraded = [name for name, check in checks.items() if check.degraded]

    report_stage(STAGES[3])
    output = RunOutput(store, PERFORMANCE_DIR, model, version, created_at, out)
    output.write_with(REPORT_FILE, lambda path: snapshot.save_html(str(path)))
    variants = rows["variant"].value_counts()
    result = PerformanceResult(
        model=model,
        version=version,
        task=card.task,
        window=Window(since=since, until=until,
                      first_row=logged["time"].min().to_pydatetime() if len(logged) else None,
                      last_row=logged["time"].max().to_pydatetime() if len(logged) else None),
        rows=FeedbackRows(logged=len(logged), with_feedback=len(joined), fallback=n_fallback, evaluated=len(rows),
                          by_variant={str(k): int(v) for k, v in variants.items()},
                          feedback_coverage=len(joined) / len(logged) if len(logged) else 0.0),
        metrics=metrics,
        averaging=averaging,
        positive_label=positive,
        class_shares=shares,
        prediction_bias=bias,
        baseline=checks,
        unchecked_baseline=unchecked,
        tolerance=tolerance,
        error_tolerance=error_tolerance,
        degraded_metrics=degraded,
        quality_degraded=bool(degraded),
        notes=notes,
        evidently_version=evidently.__version__,
        duration_seconds=0.0,
        created_at=created_at,
        **output.urls(report_html=REPORT_FILE, result_json=RESULT_FILE),
    )
    output.publish(result, started, RESULT_FILE)
    log.info("performance %s:%s: %s on %d rows%s (%.1fs)", model, version,
             "degraded" if degraded else "not degraded", len(rows),
             f" ({', '.join(degraded)})" if degraded else "", result.duration_seconds)
    return result
