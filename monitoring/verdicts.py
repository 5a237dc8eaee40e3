"""What the online service reads of the batch jobs' results: the verdict models, where they are, and their readers.

The drift and quality jobs (:mod:`monitoring.jobs`) write each run's result as
``<job>/<model>/<version>/<UTC timestamp>/result.json`` in the store
(:mod:`monitoring.store`) and keep ``<job>/<model>/<version>/latest.json``
current, atomically. Every
worker's control loop polls ``latest.json`` and applies the verdict to routing
and gauges, so this module holds only what that takes: the pydantic models of
the results, the paths, and :func:`read_latest_drift` and
:func:`read_latest_quality`. It imports no job, so the online path does not
load Evidently's or pandas' side of the jobs to read a JSON file.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError

from monitoring.store import Store, as_store

DRIFT_DIR = "drift"
"""Directory of the drift job's results under the data directory."""
PERFORMANCE_DIR = "performance"
"""Directory of the quality job's results under the data directory (the CLI calls the job ``performance``)."""
LATEST_FILE = "latest.json"
"""The newest result of a model version, next to its runs' directories."""

R = TypeVar("R", bound=BaseModel)


class VerdictError(Exception):
    """A job's verdict cannot be had: its stored result cannot be read, or the job cannot produce one.

    The readers raise it for an unreadable or invalid ``latest.json``; the jobs' own errors
    (``DriftError``, ``PerformanceError``) are subclasses.
    """


# ----------------------------------------------------------------------------- drift


class Window(BaseModel):
    """The time window compared: ``since <= time < until`` (UTC)."""

    since: datetime | None
    """Start of the window; None means from the oldest retained row."""
    until: datetime
    first_row: datetime | None = None
    """Time of the oldest logged row in the window."""
    last_row: datetime | None = None
    """Time of the newest logged row in the window."""


class Rows(BaseModel):
    """How many rows were compared, and how they were chosen."""

    window: int
    """Logged rows of this model version in the window."""
    current: int
    """Rows of the window given to Evidently."""
    current_sampling: Literal["none", "time-stratified"]
    """``time-stratified``: rows sorted by time, cut into ``current`` equal strata, one row drawn from each."""
    reference_available: int
    """Rows in the version's reference data."""
    reference: int
    """Reference rows given to Evidently."""
    reference_sampling: Literal["none", "random"]
    seed: int | None = None
    """Seed of the sampling (derived from model, version and window, so a re-run draws the same rows)."""
    sample_rule: str
    """Why ``current`` rows were compared."""


class FeatureDrift(BaseModel):
    """The verdict on one feature."""

    type: Literal["numerical", "categorical"]
    stat_test: str
    """Evidently's name of the test used (``ks``, ``wasserstein``, ...)."""
    stat_test_display: str
    """Evidently's display name of the test (``K-S p_value``, ...)."""
    score: float | None
    """The test's value: a p-value (drift when below the threshold) or a distance (drift when at or above it);
    None when Evidently could not compute it."""
    threshold: float
    drifted: bool
    missing_share: float
    """Share of the window's rows without a value (whole window, not the sample)."""
    out_of_range_share: float | None
    """Share of the window's values outside the card's reference [min, max] (numbers) or categories (strings);
    None when the card has no range for the feature."""


class PredictionDrift(BaseModel):
    """The verdict on the model's output."""

    column: str
    """``prediction_score`` (binary classifiers), else ``prediction`` (value, or label of a multiclass model)."""
    type: Literal["numerical", "categorical"]
    stat_test: str
    stat_test_display: str
    score: float | None
    threshold: float
    drifted: bool
    rows: int
    """Compared rows the model answered: rows the fallback answered carry its output, not the model's."""


class SkippedFeature(BaseModel):
    """A card feature that was not compared, and why."""

    feature: str
    reason: str


class DriftResult(BaseModel):
    """What one drift run concluded; stored as ``result.json`` and ``latest.json``."""

    schema_version: int = 1
    model: str
    version: str
    task: str
    window: Window
    rows: Rows
    features: dict[str, FeatureDrift]
    """Compared features, in the card's order."""
    skipped_features: list[SkippedFeature] = Field(default_factory=list)
    drifted_features: list[str]
    drift_share: float
    """Share of compared features that drifted (Evidently's ``DriftedColumnsCount``)."""
    drift_share_threshold: float
    dataset_drift: bool
    """Evidently's dataset drift rule: ``drift_share >= drift_share_threshold``."""
    prediction: PredictionDrift | None
    drift_detected: bool
    """The job's verdict (``vigil drift run`` exits 3): dataset drift, or drift of the model's output.

    Per-feature tests at a 5% level flag some feature of a wide model in most healthy windows, which is why
    Evidently asks for a share of them; a drifted output is one test, and the change that matters.
    """
    notes: list[str] = Field(default_factory=list)
    evidently_version: str
    duration_seconds: float
    created_at: datetime
    report_html: str
    result_json: str


# ----------------------------------------------------------------------------- quality


class FeedbackRows(BaseModel):
    """How many predictions of the window had feedback, and which of them were judged."""

    logged: int
    """Predictions of this version in the window (the log's rows)."""
    with_feedback: int
    """Of those, predictions that have feedback."""
    fallback: int
    """Predictions with feedback that the fallback answered: not the model's, left out of quality and bias."""
    evaluated: int
    """Predictions with feedback answered by the model: what quality and bias are computed on."""
    by_variant: dict[str, int]
    """Evaluated rows per variant the version served as (``stable``, ``canary``)."""
    feedback_coverage: float
    """``with_feedback / logged``: how much of the window the truth covers so far."""


class ClassShare(BaseModel):
    """One class: how often it was predicted and observed among the evaluated rows."""

    predicted: float
    observed: float
    bias: float
    """``predicted - observed``: positive when the model predicts the class more often than it happens."""


class BaselineCheck(BaseModel):
    """One live metric against the card's training metric."""

    kind: Literal["score", "error"]
    """``score``: higher is better, absolute tolerance; ``error``: lower is better, relative tolerance."""
    baseline: float
    live: float
    change: float
    """``live - baseline``."""
    limit: float
    """The worst live value still accepted: ``baseline - tolerance`` or ``baseline * (1 + error_tolerance)``."""
    degraded: bool


class PerformanceResult(BaseModel):
    """What one quality run concluded; stored as ``result.json`` and ``latest.json``."""

    schema_version: int = 1
    model: str
    version: str
    task: str
    window: Window
    """The prediction-time window (``first_row``/``last_row``: the version's logged predictions in it)."""
    rows: FeedbackRows
    metrics: dict[str, float | None]
    """Classification: accuracy, precision, recall, f1, roc_auc; regression: mae, rmse, mape (fraction), r2.
    None when a metric cannot be computed on the window (the notes say why)."""
    averaging: Literal["binary", "macro"] | None = None
    """How precision, recall and F1 were averaged (classification)."""
    positive_label: str | None = None
    """The class whose precision/recall/F1/ROC AUC a binary model is judged on (the card's second label)."""
    class_shares: dict[str, ClassShare] = Field(default_factory=dict)
    """Per class (the card's labels, as text), classification only."""
    prediction_bias: dict[str, float]
    """What ``vigil_prediction_bias{class}`` exports: class -> predicted minus observed share (classification),
    or ``value`` -> mean of ``actual - predicted`` (regression)."""
    baseline: dict[str, BaselineCheck]
    """Metrics of the card's ``training.metrics`` that were also computed live."""
    unchecked_baseline: list[str] = Field(default_factory=list)
    """Card metrics that could not be compared (not computed live, or not known to be a score or an error)."""
    tolerance: float
    error_tolerance: float
    degraded_metrics: list[str]
    quality_degraded: bool
    """The job's verdict (``vigil performance run`` exits 3): some baseline metric is beyond its tolerance."""
    notes: list[str] = Field(default_factory=list)
    evidently_version: str
    duration_seconds: float
    created_at: datetime
    report_html: str
    result_json: str


# ----------------------------------------------------------------------------- readers


def latest_key(job: str, model: str, version: str) -> str:
    """The store key of a model version's newest result of ``job``."""
    return f"{job}/{model}/{version}/{LATEST_FILE}"


def read_latest_result(store: Store | Path, job: str, model: str, version: str | None, result: type[R]) -> R | None:
    """The newest ``latest.json`` of a model version (of any version when None), or None.

    ``store`` is the store (or a local data directory). Raises :class:`VerdictError` naming
    the file when one cannot be read or is not a ``result``.
    """
    store = as_store(store)
    keys = ([latest_key(job, model, version)] if version
            else [latest_key(job, model, v) for v in store.children(f"{job}/{model}")])
    results = []
    for key in keys:
        try:
            text = store.get(key)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            raise VerdictError(f"cannot read {store.url_of(key)}: {exc}") from exc
        try:
            results.append(result.model_validate_json(text))
        except ValidationError as exc:
            raise VerdictError(f"{store.url_of(key)} is not a {job} result: {exc.errors()[0]['msg']}") from exc
    return max(results, key=lambda r: r.created_at, default=None)  # type: ignore[attr-defined]


def read_latest_drift(store: Store | Path, model: str, version: str | None = None) -> DriftResult | None:
    """The newest drift result of a model version (of any version when None); None when there is none."""
    return read_latest_result(store, DRIFT_DIR, model, version, DriftResult)


def read_latest_quality(store: Store | Path, model: str, version: str | None = None) -> PerformanceResult | None:
    """The newest quality result of a model version (of any version when None); None when there is none."""
    return read_latest_result(store, PERFORMANCE_DIR, model, version, PerformanceResult)
