"""The drift job: compare a window of the prediction log with a version's reference data, with Evidently.

:func:`run_drift` reads the logged rows of one model version in a time window
(:func:`monitoring.predlog.read_log`, only the columns it needs), compares each
feature and the prediction with ``reference.parquet`` using Evidently's
``DataDriftPreset`` and ``ValueDrift``, and writes::

    <data_dir>/drift/<model>/<version>/<UTC timestamp>/report.html   Evidently's own report
    <data_dir>/drift/<model>/<version>/<UTC timestamp>/result.json   a DriftResult
    <data_dir>/drift/<model>/<version>/latest.json                   the newest DriftResult (atomic)

Large windows are compared through a sample. Evidently's cost grows with the
rows it is given (~56 s and 1.5 GB for 1M rows of 30 features), while its
verdicts do not need them all: the default tests are either distances
(Wasserstein, Jensen-Shannon), whose estimate from 50k rows is within a few
thousandths of the full-window value, or two-sample p-value tests on a small
reference (K-S, Z), whose p-value depends on the sizes through
``n_ref * n_cur / (n_ref + n_cur)``, which stops moving once the current side is
much larger than the reference. So the window is reduced to a deterministic,
time-stratified sample of :data:`DEFAULT_MAX_ROWS` rows, and to
:data:`P_VALUE_REFERENCE_FACTOR` times the reference size when a p-value test
is involved; ``benchmarks/results/drift.md`` has the measurement behind the
numbers. The stat test of every column is chosen by Evidently's own default
rule on the *full* window before sampling and passed explicitly, so the sample
is always judged with the test Evidently would use on the whole window.

Evidently takes seconds to import, so it is imported only once a window has
enough rows to be compared.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from monitoring.predlog import read_log, segment_files
from service.errors import ModelNotFound
from service.registry import PREDICTION_COLUMN, REFERENCE_FILE, SCORE_COLUMN, FeatureSpec, ModelCard, Registry

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("vigil.drift")

DRIFT_DIR = "drift"
REPORT_FILE = "report.html"
RESULT_FILE = "result.json"
LATEST_FILE = "latest.json"

DEFAULT_MAX_ROWS = 50_000
"""Rows of the current window (and of the reference) given to Evidently; larger windows are sampled."""
P_VALUE_REFERENCE_FACTOR = 50
"""With a p-value test, the sample keeps at least this many times the reference rows.

The p-value of a two-sample test depends on ``n_ref * n_cur / (n_ref + n_cur)``;
at 50x the reference that is within 2% of its full-window value.
"""
DISTANCE_TESTS = frozenset({"wasserstein", "jensenshannon", "kl_div", "psi", "hellinger", "ed"})
"""Evidently stat tests whose score is a distance (it does not grow with the number of rows).
Any other test is treated as a p-value, which does."""
PREDICTION_KEY = "prediction"
"""Key of ``stattests`` that overrides the prediction drift test (no feature can be called this)."""

STAGES = ("reading the prediction log", "loading Evidently", "computing drift", "writing the report")
"""What :func:`run_drift` reports to its ``progress`` callback, in order."""


# ----------------------------------------------------------------------------- errors


class DriftError(Exception):
    """The drift job cannot run; the message says why."""


class DriftConfigError(DriftError):
    """The job was asked for something that does not exist or cannot work (stat test, feature, window)."""


class NotEnoughRows(DriftError):
    """The window holds fewer logged rows than the job needs for a verdict."""

    def __init__(self, model: str, version: str, rows: int, min_rows: int,
                 since: datetime | None, until: datetime) -> None:
        window = f"{since.isoformat() if since else 'the start of the log'} to {until.isoformat()}"
        super().__init__(f"{model}:{version} has {rows} logged row(s) from {window}; "
                         f"at least {min_rows} are needed for a drift verdict")
        self.model = model
        self.version = version
        self.rows = rows
        self.min_rows = min_rows
        self.since = since
        self.until = until


# ----------------------------------------------------------------------------- result


class StatTestOverride(BaseModel):
    """A stat test and/or threshold to use for one feature instead of Evidently's default choice."""

    model_config = ConfigDict(extra="forbid")

    stattest: str | None = None
    """Name of an Evidently stat test (``ks``, ``wasserstein``, ``psi``, ``jensenshannon``, ``chisquare``, ...)."""
    threshold: float | None = Field(None, gt=0)
    """Drift threshold of the test (p-value below it, or distance at or above it, means drift)."""


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
    """The test's value (None when Evidently could not compute it): a p-value (drift when below the threshold) or a distance (drift when at or above it)."""
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
    """The verdict: ``drift_share >= drift_share_threshold`` (Evidently's dataset drift rule)."""
    prediction: PredictionDrift | None
    notes: list[str] = Field(default_factory=list)
    evidently_version: str
    duration_seconds: float
    created_at: datetime
    report_html: str
    result_json: str


# ----------------------------------------------------------------------------- helpers


def _utc(value: datetime | None) -> datetime | None:
    """A timezone-aware UTC datetime; naive values are taken to be UTC already."""
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _seed(*parts: object) -> int:
    # A stable hash (not Python's salted hash()) so the same window always draws the same sample.
    return int.from_bytes(hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


def time_stratified_positions(times: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Positions of ``size`` rows stratified by time: one row drawn from each of ``size`` equal time-ordered strata.

    Every part of the window is represented in proportion to its traffic, so a
    drift that starts late in the window is seen in the sample as in the whole.
    Deterministic for a given seed. Returns positions sorted by time.
    """
    order = np.argsort(times, kind="stable")
    n = len(order)
    if size >= n:
        return order
    width = n / size
    rng = np.random.default_rng(seed)
    picks = (np.arange(size) * width + rng.random(size) * width).astype(np.int64)
    return order[np.minimum(picks, n - 1)]


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same directory and rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text_atomic(path: Path, text: str) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _parse_overrides(stattests: Mapping[str, Any] | None) -> dict[str, StatTestOverride]:
    parsed: dict[str, StatTestOverride] = {}
    for name, value in (stattests or {}).items():
        try:
            parsed[name] = value if isinstance(value, StatTestOverride) else StatTestOverride.model_validate(value)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())
            raise DriftConfigError(f"stat test override for '{name}': {problems}") from exc
    return parsed


def _resolve_version(reg: Registry, data_dir: Path, model: str, since: datetime | None, until: datetime) -> str:
    """The newest registered version with logged rows in the window, else the newest version."""
    versions = reg.versions(model)
    if not versions:
        raise ModelNotFound(f"model '{model}' is not registered in {reg.root}")
    if len(versions) == 1:
        return versions[0]
    logged = read_log(data_dir, model, since=since, until=until, columns=["time", "version"])
    present = set(logged["version"].unique()) if len(logged) else set()
    with_rows = [v for v in versions if v in present]
    return (with_rows or versions)[-1]


def _log_columns(data_dir: Path, model: str, version: str, since: datetime | None,
                 until: datetime) -> tuple[set[str], dict[str, int], int]:
    """Columns present in every log segment that may hold rows of ``version``.

    Returns (columns in all such segments, segments holding each other column, number of such segments).
    ``read_log`` skips a segment that lacks a requested column, so only columns
    every relevant segment has can be requested without losing rows. Segments
    whose ``version`` statistics exclude the version are left out of the count.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    common: set[str] | None = None
    seen: dict[str, int] = {}
    relevant = 0
    for path in segment_files(data_dir, model, since, until):
        try:
            meta = pq.read_metadata(path)
        except (OSError, pa.ArrowException):
            continue  # read_log skips it too
        names = meta.schema.to_arrow_schema().names
        if not _may_hold_version(meta, names, version):
            continue
        relevant += 1
        for name in names:
            seen[name] = seen.get(name, 0) + 1
        common = set(names) if common is None else common & set(names)
    return common or set(), {k: v for k, v in seen.items() if k not in (common or set())}, relevant


def _may_hold_version(meta: Any, names: list[str], version: str) -> bool:
    if "version" not in names:
        return True
    col = names.index("version")
    for i in range(meta.num_row_groups):
        stats = meta.row_group(i).column(col).statistics
        if stats is None or not stats.has_min_max or stats.min <= version <= stats.max:
            return True
    return False


def _quality(column: pd.Series, ftype: str, spec: FeatureSpec) -> tuple[float, float | None]:
    """(missing share, out-of-range share) of one logged column over the whole window."""
    n = len(column)
    present = column.notna().to_numpy()
    missing = 1.0 - present.sum() / n
    n_present = int(present.sum())
    if n_present == 0:
        return missing, None
    if ftype == "categorical":
        if not spec.categories:
            return missing, None
        outside = ~column.isin(spec.categories).to_numpy() & present
    else:
        if spec.min is None or spec.max is None:
            return missing, None
        values = column.to_numpy(dtype=np.float64, na_value=np.nan)
        with np.errstate(invalid="ignore"):
            outside = ((values < spec.min) | (values > spec.max)) & present
    return float(missing), float(outside.sum() / n_present)


def _clean(column: pd.Series) -> pd.Series:
    # What Evidently compares: the column without nulls and infinities.
    return column.replace([-np.inf, np.inf], np.nan).dropna()



# ----------------------------------------------------------------------------- the job

DISTINCT_VALUES_THAT_MATTER = 6
"""Evidently's default test choice depends on a column's distinct values only up to 5 (<=2, 3-5, >5)."""


@dataclass(frozen=True, slots=True)
class _Column:
    """One column to compare, and the stat test Evidently picks for it on the whole window."""

    name: str
    type: Literal["numerical", "categorical"]
    override: StatTestOverride | None
    test: Any
    """Evidently's ``StatTest``."""
    threshold: float


def _plan_column(name: str, ftype: Literal["numerical", "categorical"], reference: pd.Series, current: pd.Series,
                 override: StatTestOverride | None) -> _Column:
    """The test Evidently will use for a column, by Evidently's own rule, on the reference and the whole window."""
    from evidently.legacy.calculations.stattests.registry import get_stattest
    from evidently.legacy.core import ColumnType

    col_type = ColumnType.Numerical if ftype == "numerical" else ColumnType.Categorical
    ref = _clean(reference)
    # The rule looks at the current data only through the distinct values, and only when the
    # reference has few of them; skip the full column otherwise (it can be a million rows).
    cur = _clean(current) if ref.nunique() < DISTINCT_VALUES_THAT_MATTER else ref.iloc[:0]
    try:
        test = get_stattest(ref, cur, col_type, override.stattest if override else None)
    except ValueError as exc:
        raise DriftConfigError(f"stat test for '{name}': {exc}") from exc
    threshold = override.threshold if override and override.threshold is not None else test.default_threshold
    return _Column(name, ftype, override, test, float(threshold))


def _check_stattest_names(card: ModelCard, overrides: dict[str, StatTestOverride], prediction_type: str) -> None:
    """Refuse an override naming a test Evidently does not have, or one that does not fit the column's type.

    Checked before the log is read, so a typo is a usage error rather than a late failure.
    """
    named = {k: o.stattest for k, o in overrides.items() if o.stattest}
    if not named:
        return
    from evidently.legacy.calculations.stattests.registry import get_registered_stattest
    from evidently.legacy.core import ColumnType

    types = {spec.name: "categorical" if spec.type == "string" else "numerical" for spec in card.features}
    types[PREDICTION_KEY] = prediction_type
    for column, test in named.items():
        col_type = ColumnType.Categorical if types[column] == "categorical" else ColumnType.Numerical
        try:
            get_registered_stattest(test, col_type)
        except ValueError as exc:
            raise DriftConfigError(f"stat test '{test}' for '{column}': {exc}") from exc


def _sample_size(n_window: int, columns: list[_Column], reference: pd.DataFrame,
                 max_rows: int | None) -> tuple[int, str]:
    """How many window rows Evidently gets, and why."""
    if max_rows is None:
        return n_window, "sampling disabled: the whole window"
    needed, rule = max_rows, f"cap of {max_rows} rows"
    sensitive = [c for c in columns if c.test.name not in DISTANCE_TESTS]
    if sensitive:
        ref_rows = max(int(reference[c.name].notna().sum()) for c in sensitive)
        floor = P_VALUE_REFERENCE_FACTOR * ref_rows
        if floor > needed:
            tests = ", ".join(sorted({c.test.name for c in sensitive}))
            needed, rule = floor, (f"{P_VALUE_REFERENCE_FACTOR}x the {ref_rows} reference rows, "
                                   f"for the p-value test(s) {tests}")
    if n_window <= needed:
        return n_window, f"whole window (under the {rule})"
    return needed, rule


def _keep_distinct_values(window: pd.DataFrame, positions: np.ndarray, columns: list[_Column],
                          reference: pd.DataFrame) -> np.ndarray:
    """Add the first row of rare values the sample missed, so Evidently picks the same test as on the whole window.

    Only columns with few distinct values are concerned, and at most 5 rows per column are added.
    """
    extra: list[int] = []
    for column in columns:
        ref_values = set(_clean(reference[column.name]).unique())
        if len(ref_values) >= DISTINCT_VALUES_THAT_MATTER:
            continue
        in_sample = ref_values | set(_clean(window[column.name].iloc[positions]).unique())
        if len(in_sample) >= DISTINCT_VALUES_THAT_MATTER:
            continue
        firsts = _clean(window[column.name]).drop_duplicates()
        for position, value in firsts.items():
            if len(in_sample) >= DISTINCT_VALUES_THAT_MATTER:
                break
            if value not in in_sample:
                in_sample.add(value)
                extra.append(int(position))
    if not extra:
        return positions
    return np.concatenate([positions, np.array(extra, dtype=positions.dtype)])


def _check_overrides_used(overrides: dict[str, StatTestOverride], compared: set[str]) -> list[str]:
    return [f"the stat test override for '{name}' is unused: the column is not compared"
            for name in overrides if name not in compared]


def run_drift(
    data_dir: Path,
    registry: Path | None,
    model: str,
    version: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    min_rows: int = 200,
    out: Path | None = None,
    stattests: Mapping[str, StatTestOverride | Mapping[str, Any]] | None = None,
    drift_share: float = 0.5,
    max_rows: int | None = DEFAULT_MAX_ROWS,
    progress: Callable[[str], None] | None = None,
) -> DriftResult:
    """Compare the logged window of one model version with its reference data; write the reports.

    ``version`` defaults to the newest registered version with logged rows in the
    window (else the newest version). The window is ``since <= time < until``
    (UTC; naive datetimes are taken as UTC; ``until`` defaults to now, ``since`` to
    the start of the log). ``stattests`` maps a feature (or ``"prediction"``) to
    ``{"stattest": name, "threshold": value}`` (either may be left out); other
    columns use Evidently's default choice. ``drift_share`` is the share of
    drifted features at which the dataset counts as drifted. ``max_rows=None``
    gives Evidently the whole window. ``progress`` is called with each of
    :data:`STAGES` as it starts.

    Raises :class:`NotEnoughRows` when the window has fewer than ``min_rows`` rows,
    :class:`~service.errors.ModelNotFound` for an unknown model or version,
    :class:`DriftConfigError` for an unusable override or window, and
    :class:`DriftError` when nothing can be compared.
    """
    import pandas as pd

    started = time.perf_counter()
    created_at = datetime.now(timezone.utc)
    report_stage = progress or (lambda stage: None)
    data_dir = Path(data_dir)
    since = _utc(since)
    until = _utc(until) or created_at
    if since is not None and since >= until:
        raise DriftConfigError(f"the window is empty: since ({since.isoformat()}) is not before "
                               f"until ({until.isoformat()})")
    if not 0 < drift_share <= 1:
        raise DriftConfigError(f"drift_share must be in (0, 1], got {drift_share}")
    if max_rows is not None and max_rows < 1:
        raise DriftConfigError(f"max_rows must be at least 1 (or None for no sampling), got {max_rows}")
    overrides = _parse_overrides(stattests)

    # What to compare: the version's card, its reference data, and the columns the log holds.
    reg = Registry(registry)
    if not reg.versions(model):
        raise ModelNotFound(f"model '{model}' is not registered in {reg.root}")
    report_stage(STAGES[0])
    version = version or _resolve_version(reg, data_dir, model, since, until)
    card = reg.card(model, version)
    unknown = sorted(set(overrides) - set(card.feature_names) - {PREDICTION_KEY})
    if unknown:
        raise DriftConfigError(f"stat test override(s) for {unknown}, which are not features of {model}:{version} "
                               f"(features: {', '.join(card.feature_names)}; or '{PREDICTION_KEY}')")
    prediction_column, prediction_type = _prediction_column(card)
    _check_stattest_names(card, overrides, prediction_type)
    reference = _read_reference(reg, model, version)
    in_all, in_some, n_segments = _log_columns(data_dir, model, version, since, until)
    features, skipped = _comparable_features(card, in_all, in_some, n_segments, reference)
    notes: list[str] = []
    if n_segments and prediction_column not in in_all:
        notes.append(f"prediction drift not computed: '{prediction_column}' is missing from some log segments")
        prediction_column = None
    elif prediction_column not in reference.columns:
        notes.append(f"prediction drift not computed: the reference data has no '{prediction_column}' column")
        prediction_column = None

    # The window, whole: it decides the verdict threshold (min_rows), data quality and the tests.
    wanted = [name for name, _ in features] + ([prediction_column] if prediction_column else [])
    window = read_log(data_dir, model, version=version, since=since, until=until, columns=["time", "version", *wanted])
    n_window = len(window)
    if n_window < min_rows:
        raise NotEnoughRows(model, version, n_window, min_rows, since, until)
    specs = {spec.name: spec for spec in card.features}
    quality: dict[str, tuple[float, float | None]] = {}
    usable: list[tuple[str, Literal["numerical", "categorical"]]] = []
    for name, ftype in features:
        if window[name].notna().any():
            usable.append((name, ftype))
            quality[name] = _quality(window[name], ftype, specs[name])
        else:
            skipped.append(SkippedFeature(feature=name, reason="no values in the window"))
    if not usable:
        raise DriftError(f"no feature of {model}:{version} can be compared: "
                         + "; ".join(f"{s.feature}: {s.reason}" for s in skipped))
    if prediction_column and not window[prediction_column].notna().any():
        notes.append(f"prediction drift not computed: '{prediction_column}' has no values in the window")
        prediction_column = None
    notes += _check_overrides_used(overrides, {n for n, _ in usable} | ({PREDICTION_KEY} if prediction_column else set()))

    report_stage(STAGES[1])
    import evidently

    columns = [_plan_column(n, t, reference[n], window[n], overrides.get(n)) for n, t in usable]
    prediction = (_plan_column(prediction_column, prediction_type, reference[prediction_column],
                               window[prediction_column], overrides.get(PREDICTION_KEY))
                  if prediction_column else None)
    compared = columns + ([prediction] if prediction else [])

    # Reduce both sides to what the verdicts need (module docstring); the same window draws the same rows.
    seed = _seed(model, version, since, until, n_window)
    n_reference = len(reference)
    if max_rows is not None and n_reference > max_rows:
        reference = reference.sample(n=max_rows, random_state=seed % 2**32).reset_index(drop=True)
    size, rule = _sample_size(n_window, compared, reference, max_rows)
    times = window["time"].array.asi8
    positions = time_stratified_positions(times, size, seed)
    if size < n_window:
        positions = _keep_distinct_values(window, positions, compared, reference)
        positions = positions[np.argsort(times[positions], kind="stable")]
    first_row, last_row = window["time"].min().to_pydatetime(), window["time"].max().to_pydatetime()
    keep = [c.name for c in compared]
    current = window.take(positions)[keep].reset_index(drop=True)
    del window  # Evidently makes copies of its own; the whole window need not stay alongside them

    report_stage(STAGES[2])
    snapshot, verdicts, share = _evidently_report(current, reference[keep], columns, prediction, drift_share)
    drifted = [c.name for c in columns if verdicts[c.name][1]]
    if round(share * len(columns)) != len(drifted):
        notes.append(f"Evidently counted {round(share * len(columns))} drifted columns but flagged {len(drifted)}")

    report_stage(STAGES[3])
    run_dir = _run_dir(data_dir, model, version, created_at, out)
    html_path, json_path = run_dir / REPORT_FILE, run_dir / RESULT_FILE
    _atomic_write(html_path, lambda tmp: snapshot.save_html(str(tmp)))
    sampled_current, sampled_reference = len(current) < n_window, len(reference) < n_reference
    result = DriftResult(
        model=model,
        version=version,
        task=card.task,
        window=Window(since=since, until=until, first_row=first_row, last_row=last_row),
        rows=Rows(
            window=n_window, current=len(current),
            current_sampling="time-stratified" if sampled_current else "none",
            reference_available=n_reference, reference=len(reference),
            reference_sampling="random" if sampled_reference else "none",
            seed=seed if sampled_current or sampled_reference else None,
            sample_rule=rule + (f"; {len(current) - size} row(s) added to keep rare values"
                                if len(current) > size else ""),
        ),
        features={
            c.name: FeatureDrift(
                type=c.type, stat_test=c.test.name, stat_test_display=c.test.display_name,
                score=verdicts[c.name][0], threshold=c.threshold, drifted=verdicts[c.name][1],
                missing_share=quality[c.name][0], out_of_range_share=quality[c.name][1],
            )
            for c in columns
        },
        skipped_features=skipped,
        drifted_features=drifted,
        drift_share=share,
        drift_share_threshold=drift_share,
        dataset_drift=share >= drift_share,
        prediction=PredictionDrift(
            column=prediction.name, type=prediction.type, stat_test=prediction.test.name,
            stat_test_display=prediction.test.display_name, score=verdicts[prediction.name][0],
            threshold=prediction.threshold, drifted=verdicts[prediction.name][1],
        ) if prediction else None,
        notes=notes,
        evidently_version=evidently.__version__,
        duration_seconds=0.0,
        created_at=created_at,
        report_html=str(html_path.resolve()),
        result_json=str(json_path.resolve()),
    )
    result.duration_seconds = round(time.perf_counter() - started, 3)
    text = result.model_dump_json(indent=2)
    _write_text_atomic(json_path, text)
    _write_text_atomic(_version_dir(data_dir, model, version) / LATEST_FILE, text)
    log.info("drift %s:%s: %d/%d features drifted, dataset drift %s (%.1fs)", model, version, len(drifted),
             len(columns), result.dataset_drift, result.duration_seconds)
    return result


def _read_reference(reg: Registry, model: str, version: str) -> pd.DataFrame:
    import pandas as pd

    path = reg.path(model, version) / REFERENCE_FILE
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise DriftError(f"cannot read the reference data of {model}:{version} ({path}): {exc}") from exc


def _comparable_features(card: ModelCard, in_all: set[str], in_some: dict[str, int], n_segments: int,
                         reference: pd.DataFrame) -> tuple[list[tuple[str, Literal["numerical", "categorical"]]],
                                                           list[SkippedFeature]]:
    """Card features that the log and the reference both hold, with their Evidently type; the others, with why."""
    features: list[tuple[str, Literal["numerical", "categorical"]]] = []
    skipped: list[SkippedFeature] = []
    for spec in card.features:
        if spec.pii == "drop":
            reason = "PII: dropped from the prediction log"
        elif spec.pii == "hash":
            reason = "PII: hashed (or dropped) in the prediction log, so not comparable with the reference"
        elif n_segments and spec.name in in_some:
            reason = (f"missing from {n_segments - in_some[spec.name]} of {n_segments} log segments in the window "
                      "(the logged features changed); reading it would skip those segments")
        elif n_segments and spec.name not in in_all:
            reason = "not in the prediction log"
        elif spec.name not in reference.columns:
            reason = "not in the reference data"
        else:
            features.append((spec.name, "categorical" if spec.type == "string" else "numerical"))
            continue
        skipped.append(SkippedFeature(feature=spec.name, reason=reason))
    return features, skipped


def _prediction_column(card: ModelCard) -> tuple[str, Literal["numerical", "categorical"]]:
    # A binary classifier's positive-class score shows a shift long before the labels flip;
    # a multiclass model's labels are its only per-class output in the log; a regressor's value is numeric.
    if card.task == "classification":
        if card.labels is not None and len(card.labels) == 2:
            return SCORE_COLUMN, "numerical"
        return PREDICTION_COLUMN, "categorical"
    return PREDICTION_COLUMN, "numerical"


def _evidently_report(current: pd.DataFrame, reference: pd.DataFrame, columns: list[_Column],
                      prediction: _Column | None, drift_share: float
                      ) -> tuple[Any, dict[str, tuple[float | None, bool]], float]:
    """Run DataDriftPreset on the features (+ ValueDrift on the prediction); read each result by its metric id.

    Returns (snapshot, {column: (score, drifted)}, share of drifted features). Only overridden columns get an
    explicit test: the others are left to Evidently's default choice, which the sample was built to keep the
    same as on the whole window (and which is checked here).
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import DriftedColumnsCount, ValueDrift
    from evidently.presets import DataDriftPreset

    compared = columns + ([prediction] if prediction else [])
    definition = DataDefinition(
        numerical_columns=[c.name for c in compared if c.type == "numerical"],
        categorical_columns=[c.name for c in compared if c.type == "categorical"],
    )
    names = [c.name for c in columns]
    methods = {c.name: c.override.stattest for c in columns if c.override and c.override.stattest} or None
    thresholds = {c.name: c.override.threshold for c in columns
                  if c.override and c.override.threshold is not None} or None

    def value_drift(column: _Column) -> Any:
        # Exactly the ValueDrift the preset generates for the column, so the ids (config fingerprints) match.
        override = column.override or StatTestOverride()
        return ValueDrift(column=column.name, method=override.stattest, threshold=override.threshold)

    metrics: list[Any] = [DataDriftPreset(columns=names, drift_share=drift_share,
                                          per_column_method=methods, per_column_threshold=thresholds)]
    if prediction:
        metrics.append(value_drift(prediction))
    count_id = DriftedColumnsCount(columns=names, drift_share=drift_share, per_column_method=methods,
                                   per_column_threshold=thresholds).metric_id
    with warnings.catch_warnings():
        # Evidently's legacy code trips pandas/numpy deprecation warnings that say nothing about the data.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        snapshot = Report(metrics, include_tests=True).run(
            Dataset.from_pandas(current, data_definition=definition),
            Dataset.from_pandas(reference, data_definition=definition),
        )
    results = snapshot.metric_results

    verdicts: dict[str, tuple[float | None, bool]] = {}
    for column in compared:
        metric_id = value_drift(column).metric_id
        result = results.get(metric_id)
        if result is None:
            raise DriftError(f"Evidently's report has no ValueDrift result for '{column.name}' (metric {metric_id})")
        used = (result.metric_value_location.metric.params.get("method")
                if result.metric_value_location is not None else None)
        if used not in (column.test.name, column.test.display_name):
            raise DriftError(f"Evidently compared '{column.name}' with '{used}', not '{column.test.display_name}' "
                             "as chosen on the whole window")
        statuses = {t.status.value for t in result.tests if t.id == "drift"}
        if not statuses:
            raise DriftError(f"Evidently's ValueDrift for '{column.name}' carries no drift test result")
        score = float(result.value)
        verdicts[column.name] = (score if math.isfinite(score) else None), "FAIL" in statuses
    count = results.get(count_id)
    if count is None:
        raise DriftError(f"Evidently's report has no DriftedColumnsCount result (metric {count_id})")
    return snapshot, verdicts, float(count.share.value)

def _version_dir(data_dir: Path, model: str, version: str) -> Path:
    path = Path(data_dir) / DRIFT_DIR / model / version
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run_dir(data_dir: Path, model: str, version: str, created_at: datetime, out: Path | None) -> Path:
    """``out``, else a new ``<data_dir>/drift/<model>/<version>/<UTC timestamp>`` (suffixed if taken)."""
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        return Path(out)
    base = _version_dir(data_dir, model, version)
    stamp = created_at.strftime("%Y%m%dT%H%M%SZ")
    for attempt in range(1, 1000):
        candidate = base / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise DriftError(f"cannot create a run directory under {base}: {stamp} and 998 suffixes are taken")


def read_latest(data_dir: Path, model: str, version: str | None = None) -> DriftResult | None:
    """The newest drift result of a model version (of any version when None); None when there is none."""
    base = Path(data_dir) / DRIFT_DIR / model
    paths = [base / version / LATEST_FILE] if version else sorted(base.glob(f"*/{LATEST_FILE}"))
    results = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise DriftError(f"cannot read {path}: {exc}") from exc
        try:
            results.append(DriftResult.model_validate_json(text))
        except ValidationError as exc:
            raise DriftError(f"{path} is not a drift result: {exc.errors()[0]['msg']}") from exc
    return max(results, key=lambda r: r.created_at, default=None)
