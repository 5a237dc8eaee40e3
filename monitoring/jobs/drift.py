"""The drift job: compare a window of the prediction log with a version's reference data, with Evidently.

:func:`run_drift` reads the logged rows of one model version in a time window
(:func:`monitoring.predlog.read_log`, only the columns it needs), compares each
feature and the prediction with ``reference.parquet`` using Evidently's
``DataDriftPreset`` and ``ValueDrift``, and writes::

    drift/<model>/<version>/<UTC timestamp>/report.html   Evidently's own report
    drift/<model>/<version>/<UTC timestamp>/result.json   a DriftResult
    drift/<model>/<version>/latest.json                   the newest DriftResult (atomic)

in the store (``$VIGIL_DATA_DIR``, or ``VIGIL_STORE`` such as ``s3://bucket/prefix``),
where every replica's log segments are too. From object storage the window's
segments are downloaded once, in parallel, before they are read.

Large windows are compared through a sample. Evidently's time and memory grow
with the rows it is given, while its verdicts do not need them all: the default
tests are either distances (Wasserstein, Jensen-Shannon; reference over 1,000
rows), which a large sample estimates closely, or two-sample p-value tests on a
small reference (K-S, Z, chi-square), whose p-value hardly moves once the
current side is much larger than the reference. So the window is reduced to a
deterministic, time-stratified sample of :data:`DEFAULT_MAX_ROWS` rows, or
:data:`P_VALUE_REFERENCE_FACTOR` times the reference when a p-value test needs
more. A sample can change a verdict only for a feature whose whole-window score
lies within sampling noise of its threshold; ``benchmarks/drift_bench.py``
measures that band and what each sample size costs (``benchmarks/results/drift.md``).

Evidently picks each column's test itself (the default rule, unless overridden).
Its rule looks at the current data only through the number of distinct values of
a column whose reference has few of them, so the sample keeps one row of each
rare value it would miss, and the job checks afterwards that Evidently used, for
every column, the test its rule gives on the whole window.

The window is read a few columns at a time (:data:`READ_CELLS`) and aligned on
the ``time`` column, so the peak memory does not grow with the number of features.

Evidently takes seconds to import, so it is imported only once a window has
enough rows to be compared.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from monitoring.jobs.files import RunOutput, TooFewRows
from monitoring.predlog import read_log, segment_keys
from monitoring.store import Store, as_store
from monitoring.verdicts import (
    DRIFT_DIR,
    DriftResult,
    FeatureDrift,
    PredictionDrift,
    Rows,
    SkippedFeature,
    VerdictError,
    Window,
)
from service.core.card import PREDICTION_COLUMN, SCORE_COLUMN, FeatureSpec, ModelCard
from service.core.errors import ModelNotFound, describe_validation
from service.core.settings import Settings
from service.registry.store import REFERENCE_FILE, Registry

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("vigil.drift")

REPORT_FILE = "report.html"
RESULT_FILE = "result.json"

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


class DriftError(VerdictError):
    """The drift job cannot run; the message says why."""


class DriftConfigError(DriftError):
    """The job was asked for something that does not exist or cannot work (stat test, feature, window)."""


class NotEnoughRows(TooFewRows, DriftError):
    """The window holds fewer logged rows than the job needs for a verdict."""

    def __init__(self, model: str, version: str, rows: int, min_rows: int,
                 since: datetime | None, until: datetime, outside: tuple[int, int] | None = None) -> None:
        super().__init__(model, version, rows, min_rows, since, until, "logged row(s)", "drift", outside=outside)


# ----------------------------------------------------------------------------- configuration


class StatTestOverride(BaseModel):
    """A stat test and/or threshold to use for one feature instead of Evidently's default choice."""

    model_config = ConfigDict(extra="forbid")

    stattest: str | None = None
    """Name of an Evidently stat test (``ks``, ``wasserstein``, ``psi``, ``jensenshannon``, ``chisquare``, ...)."""
    threshold: float | None = Field(None, gt=0)
    """Drift threshold of the test (p-value below it, or distance at or above it, means drift)."""


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


def _parse_overrides(stattests: Mapping[str, Any] | None) -> dict[str, StatTestOverride]:
    parsed: dict[str, StatTestOverride] = {}
    for name, value in (stattests or {}).items():
        try:
            parsed[name] = value if isinstance(value, StatTestOverride) else StatTestOverride.model_validate(value)
        except ValidationError as exc:
            raise DriftConfigError(f"stat test override for '{name}': {describe_validation(exc, top='value')}") from exc
    return parsed


def _registered_versions(reg: Registry, model: str) -> list[str]:
    versions = reg.versions(model)
    if not versions:
        raise ModelNotFound(f"model '{model}' is not registered in {reg.root}")
    return versions


def _resolve_version(reg: Registry, data_dir: Store, model: str, since: datetime | None, until: datetime) -> str:
    """The newest registered version with logged rows in the window, else the newest version."""
    versions = _registered_versions(reg, model)
    if len(versions) == 1:
        return versions[0]
    logged = read_log(data_dir, model, since=since, until=until, columns=["time", "version"])
    present = set(logged["version"].unique()) if len(logged) else set()
    with_rows = [v for v in versions if v in present]
    return (with_rows or versions)[-1]


def _log_columns(data_dir: Store, model: str, version: str, since: datetime | None,
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
    for key in segment_keys(data_dir, model, since, until):
        path = data_dir.local_path(key)
        try:
            meta = pq.read_metadata(path if path is not None else pa.BufferReader(data_dir.get(key)))
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
        if stats is None or not stats.has_min_max:
            return True
        low, high = (v.decode() if isinstance(v, bytes) else str(v) for v in (stats.min, stats.max))
        if low <= version <= high:
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
READ_CELLS = 8_000_000
"""Values read from the log at a time (~64 MB of float64): the window is read a few columns at a time, because
``read_log`` holds about three copies of what it reads: read whole, a wide window would take three times its size."""
FALLBACK_REASON = "reason"
"""Prediction log column saying why the fallback answered a row (null when the model did)."""
SETTLE_MARGIN = timedelta(seconds=5)
"""``until`` defaults to the log's flush interval and this much before now: rows younger than that may
still sit in a worker's buffer or be on their way to the store, and only some of them would be compared."""
OUTSIDE_LOOKBACK = timedelta(hours=24)
"""How far before the window a too-thin window's message counts the rows it left out."""


@dataclass(frozen=True, slots=True)
class _Column:
    """One column to compare, and the stat test Evidently picks for it on the whole window."""

    name: str
    type: Literal["numerical", "categorical"]
    override: StatTestOverride | None
    test: Any
    """Evidently's ``StatTest``."""
    threshold: float


def _few_values(reference: pd.Series) -> bool:
    """Whether Evidently's test choice for the column can depend on the current data's distinct values."""
    return _clean(reference).nunique() < DISTINCT_VALUES_THAT_MATTER


def _plan_column(name: str, ftype: Literal["numerical", "categorical"], reference: pd.Series,
                 current: pd.Series | None, override: StatTestOverride | None) -> _Column:
    """The test Evidently will use for a column, by Evidently's own rule, on the reference and the whole window.

    The rule looks at the current data only through its distinct values, and only when the reference has
    few of them (:func:`_few_values`), so ``current`` is needed (and read) only for those columns.
    """
    from evidently.legacy.calculations.stattests.registry import get_stattest
    from evidently.legacy.core import ColumnType

    col_type = ColumnType.Numerical if ftype == "numerical" else ColumnType.Categorical
    ref = _clean(reference)
    cur = _clean(current) if current is not None else ref.iloc[:0]
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
    """How many window rows Evidently gets, and why (see the module docstring)."""
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
        return n_window, f"whole window (within the {rule})"
    return needed, rule


def _rare_value_rows(column: pd.Series, positions: np.ndarray, reference: pd.Series) -> list[int]:
    """First rows of values the sample missed, enough for Evidently to count the distinct values it counts
    on the whole window, and so pick the same test (at most 5 rows)."""
    in_sample = set(_clean(reference).unique()) | set(_clean(column.iloc[positions]).unique())
    extra: list[int] = []
    if len(in_sample) >= DISTINCT_VALUES_THAT_MATTER:
        return extra
    for position, value in _clean(column).drop_duplicates().items():
        if value not in in_sample:
            in_sample.add(value)
            extra.append(int(position))
            if len(in_sample) >= DISTINCT_VALUES_THAT_MATTER:
                break
    return extra


@dataclass
class _Window:
    """What the job takes from the window: its size and bounds, per-feature data quality, the compared rows."""

    rows: int
    first_row: datetime | None
    last_row: datetime | None
    quality: dict[str, tuple[float, float | None]]
    current: pd.DataFrame
    columns: list[_Column]
    prediction: _Column | None
    sample_rule: str
    skipped: list[SkippedFeature]
    notes: list[str]


class _LogReader:
    """Reads columns of one window of the log a few at a time, checking every read sees the same rows."""

    def __init__(self, data_dir: Store, model: str, version: str, since: datetime | None, until: datetime,
                 has_reason: bool) -> None:
        self.args = (data_dir, model, version, since, until)
        base = self._read([FALLBACK_REASON] if has_reason else [])
        self.times = _times(base).copy()
        self.by_model: np.ndarray | None = base[FALLBACK_REASON].isna().to_numpy() if has_reason else None
        """Rows the model answered (the fallback answered the others): None when the log does not say."""
        self.first_row = base["time"].min().to_pydatetime() if len(base) else None
        self.last_row = base["time"].max().to_pydatetime() if len(base) else None

    def _read(self, columns: list[str]) -> pd.DataFrame:
        data_dir, model, version, since, until = self.args
        return read_log(data_dir, model, version=version, since=since, until=until,
                        columns=["time", "version", *columns])

    def groups(self, columns: list[str]) -> Iterator[pd.DataFrame]:
        """Frames of the window holding a few of ``columns`` each, row-aligned with :attr:`times`."""
        per_read = max(1, READ_CELLS // max(len(self.times), 1))
        for start in range(0, len(columns), per_read):
            frame = self._read(columns[start:start + per_read])
            if not np.array_equal(_times(frame), self.times):
                _, model, version, since, until = self.args
                raise DriftError(
                    f"the prediction log of {model}:{version} changed while it was read ({len(self.times)} rows "
                    f"in the window, then {len(frame)}): rows older than {until.isoformat()} were flushed late; "
                    "run the job again, or with an earlier --until")
            yield frame
            del frame
            _release_arrow_memory()


def _times(frame: pd.DataFrame) -> np.ndarray:
    """The ``time`` column as integers (an empty window comes back from ``read_log`` untyped)."""
    return frame["time"].array.asi8 if len(frame) else np.empty(0, dtype=np.int64)


def _release_arrow_memory() -> None:
    # Arrow's allocator keeps freed memory for reuse; hand it back so Evidently's peak does not stack on it.
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def _read_window(reader: _LogReader, features: list[tuple[str, Literal["numerical", "categorical"]]],
                 prediction: tuple[str, Literal["numerical", "categorical"]] | None, specs: dict[str, FeatureSpec],
                 reference: pd.DataFrame, overrides: dict[str, StatTestOverride], max_rows: int | None,
                 seed: int) -> _Window:
    """Plan every column's test, choose the rows to compare, and take them from the log, a few columns at a time.

    1. When sampling, columns whose test choice depends on the window's distinct values are read first:
       their tests, and the rare rows the sample must keep (:func:`_rare_value_rows`).
    2. Every column is then read for its data quality on the whole window and the rows to compare.
    """
    import pandas as pd

    n = len(reader.times)
    wanted = features + ([prediction] if prediction else [])
    types = dict(wanted)
    override_of = {name: overrides.get(PREDICTION_KEY if prediction and name == prediction[0] else name)
                   for name in types}
    few = [name for name in types if _few_values(reference[name])]
    plans = {name: _plan_column(name, types[name], reference[name], None, override_of[name])
             for name in types if name not in few}
    # The p-value rule of the sample size only needs the kind of test, which the reference alone decides
    # (the window's distinct values only switch between tests of the same kind); few-valued columns get
    # their exact test in pass 1 and are planned from the reference here just for the size.
    sizing = list(plans.values()) + [_plan_column(n_, types[n_], reference[n_], None, override_of[n_]) for n_ in few]
    size, rule = _sample_size(n, sizing, reference, max_rows)
    positions = time_stratified_positions(reader.times, size, seed)

    def values(frame: pd.DataFrame, name: str) -> pd.Series:
        # The prediction column holds the fallback's answers too; only the model's are its output.
        column = frame[name]
        if prediction and name == prediction[0] and reader.by_model is not None:
            return column.where(reader.by_model)
        return column

    extra: set[int] = set()
    for frame in reader.groups(few if size < n else []):  # pass 1, only needed when sampling
        for name in frame.columns.drop(["time", "version"]):
            plans[name] = _plan_column(name, types[name], reference[name], values(frame, name), override_of[name])
            extra.update(_rare_value_rows(values(frame, name), positions, reference[name]))
    if extra:
        positions = np.concatenate([positions, np.fromiter(extra, dtype=positions.dtype)])
        positions = positions[np.argsort(reader.times[positions], kind="stable")]
        rule += f"; {len(extra)} row(s) added to keep rare values"

    quality: dict[str, tuple[float, float | None]] = {}
    parts: list[pd.DataFrame] = []
    empty: set[str] = set()
    for frame in reader.groups(list(types)):  # pass 2
        names = list(frame.columns.drop(["time", "version"]))
        for name in names:
            column = values(frame, name)
            if name not in plans:
                plans[name] = _plan_column(name, types[name], reference[name], column, override_of[name])
            if not column.notna().any():
                empty.add(name)
            elif name in specs:
                quality[name] = _quality(column, types[name], specs[name])
        parts.append(pd.DataFrame({name: values(frame, name).take(positions).reset_index(drop=True)
                                   for name in names}))

    skipped = [SkippedFeature(feature=name, reason="no values in the window") for name, _ in features if name in empty]
    notes = []
    prediction_plan = plans[prediction[0]] if prediction else None
    fallback_rows = int(n - reader.by_model.sum()) if reader.by_model is not None else 0
    if prediction and prediction[0] in empty:
        why = "the fallback answered every row" if fallback_rows == n else f"'{prediction[0]}' has no values"
        notes.append(f"prediction drift not computed: {why} in the window")
        prediction_plan = None
    elif prediction and fallback_rows:
        notes.append(f"prediction drift compares the model's answers only: the fallback answered "
                     f"{fallback_rows} of the {n} rows in the window")
    return _Window(
        rows=n, first_row=reader.first_row, last_row=reader.last_row, quality=quality,
        current=pd.concat(parts, axis=1) if parts else pd.DataFrame(index=range(len(positions))),
        columns=[plans[name] for name, _ in features if name not in empty],
        prediction=prediction_plan, sample_rule=rule, skipped=skipped, notes=notes,
    )


def default_until(now: datetime | None = None, flush_seconds: float | None = None) -> datetime:
    """The end of a window when none is given: now less the log's flush interval and :data:`SETTLE_MARGIN` (UTC).

    ``flush_seconds`` defaults to the service's ``VIGIL_PREDLOG_FLUSH_SECONDS`` (1 s unless set).
    """
    if flush_seconds is None:
        flush_seconds = Settings().predlog_flush_seconds
    return (now or datetime.now(timezone.utc)) - timedelta(seconds=flush_seconds) - SETTLE_MARGIN


def rows_outside(store: Store | Path, model: str, version: str | None, since: datetime | None,
                 until: datetime, now: datetime | None = None) -> tuple[int, int]:
    """(rows in the :data:`OUTSIDE_LOOKBACK` before ``since``, rows from ``until`` to now) of a model version.

    What a too-thin window's message says, so a window that ended before the rows came is seen as such.
    """
    now = now or datetime.now(timezone.utc)
    before = 0
    if since is not None:
        before = len(read_log(store, model, version, since - OUTSIDE_LOOKBACK, since, columns=["time", "version"]))
    after = len(read_log(store, model, version, until, now + timedelta(hours=1), columns=["time", "version"]))
    return before, after


def run_drift(
    data_dir: Store | Path,
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
    (UTC; naive datetimes are taken as UTC; ``until`` defaults to :func:`default_until`,
    ``since`` to the start of the log). ``stattests`` maps a feature (or
    ``"prediction"``) to ``{"stattest": name, "threshold": value}`` (either may be
    left out); other columns use Evidently's default choice. ``drift_share`` is the
    share of drifted features at which the dataset counts as drifted.
    ``max_rows=None`` gives Evidently the whole window. ``progress`` is called with
    each of :data:`STAGES` as it starts.

    Raises :class:`NotEnoughRows` when the window has fewer than ``min_rows`` rows,
    :class:`~service.errors.ModelNotFound` for an unknown model or version,
    :class:`DriftConfigError` for an unusable override or window, and
    :class:`DriftError` when nothing can be compared.
    """
    started = time.perf_counter()
    created_at = datetime.now(timezone.utc)
    report_stage = progress or (lambda stage: None)
    since = _utc(since)
    until = _utc(until) or default_until(created_at)
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
    _registered_versions(reg, model)
    report_stage(STAGES[0])
    store = as_store(data_dir)
    with store.local_copy(segment_keys(store, model, since, until)) as view:
        version = version or _resolve_version(reg, view, model, since, until)
        card = reg.card(model, version)
        unknown = sorted(set(overrides) - set(card.feature_names) - {PREDICTION_KEY})
        if unknown:
            raise DriftConfigError(f"stat test override(s) for {unknown}, which are not features of {model}:{version} "
                                   f"(features: {', '.join(card.feature_names)}; or '{PREDICTION_KEY}')")
        prediction_column, prediction_type = _prediction_column(card)
        _check_stattest_names(card, overrides, prediction_type)
        reference = _read_reference(reg, model, version)
        in_all, in_some, n_segments = _log_columns(view, model, version, since, until)
        features, skipped = _comparable_features(card, in_all, in_some, n_segments, reference)
        notes: list[str] = []
        if n_segments and prediction_column not in in_all:
            notes.append(f"prediction drift not computed: '{prediction_column}' is missing from some log segments")
            prediction_column = None
        elif prediction_column not in reference.columns:
            notes.append(f"prediction drift not computed: the reference data has no '{prediction_column}' column")
            prediction_column = None

        reader = _LogReader(view, model, version, since, until,
                            has_reason=not n_segments or FALLBACK_REASON in in_all)
        if len(reader.times) < min_rows:
            raise NotEnoughRows(model, version, len(reader.times), min_rows, since, until,
                                outside=rows_outside(store, model, version, since, until))
        if not features:
            raise DriftError(f"no feature of {model}:{version} can be compared: "
                             + "; ".join(f"{s.feature}: {s.reason}" for s in skipped))

        report_stage(STAGES[1])
        import evidently

        # The same window draws the same rows: the seed comes from what defines the window.
        seed = _seed(model, version, since, until, len(reader.times))
        n_reference = len(reference)
        if max_rows is not None and n_reference > max_rows:
            reference = reference.sample(n=max_rows, random_state=seed % 2**32).reset_index(drop=True)
        window = _read_window(reader, features, (prediction_column, prediction_type) if prediction_column else None,
                              {spec.name: spec for spec in card.features}, reference, overrides, max_rows, seed)
        skipped += window.skipped
        notes += window.notes
        if not window.columns:
            raise DriftError(f"no feature of {model}:{version} has values in the window")
        compared = {c.name for c in window.columns} | ({PREDICTION_KEY} if window.prediction else set())
        notes += [f"the stat test override for '{name}' is unused: the column is not compared"
                  for name in overrides if name not in compared]

        report_stage(STAGES[2])
        keep = [c.name for c in window.columns] + ([window.prediction.name] if window.prediction else [])
        snapshot, verdicts, share = _evidently_report(window.current[keep], reference[keep], window.columns,
                                                      window.prediction, drift_share)
        drifted = [c.name for c in window.columns if verdicts[c.name][1]]
        if round(share * len(window.columns)) != len(drifted):
            notes.append(f"Evidently counted {round(share * len(window.columns))} drifted columns "
                         f"but flagged {len(drifted)}")

        report_stage(STAGES[3])
        output = RunOutput(store, DRIFT_DIR, model, version, created_at, out)
        output.write_with(REPORT_FILE, lambda path: snapshot.save_html(str(path)))
        n_current = len(window.current)
        sampled_current, sampled_reference = n_current < window.rows, len(reference) < n_reference
        prediction = window.prediction
        result = DriftResult(
            model=model,
            version=version,
            task=card.task,
            window=Window(since=since, until=until, first_row=window.first_row, last_row=window.last_row),
            rows=Rows(
                window=window.rows, current=n_current,
                current_sampling="time-stratified" if sampled_current else "none",
                reference_available=n_reference, reference=len(reference),
                reference_sampling="random" if sampled_reference else "none",
                seed=seed if sampled_current or sampled_reference else None,
                sample_rule=window.sample_rule,
            ),
            features={
                c.name: FeatureDrift(
                    type=c.type, stat_test=c.test.name, stat_test_display=c.test.display_name,
                    score=verdicts[c.name][0], threshold=c.threshold, drifted=verdicts[c.name][1],
                    missing_share=window.quality[c.name][0], out_of_range_share=window.quality[c.name][1],
                )
                for c in window.columns
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
                rows=int(window.current[prediction.name].notna().sum()),
            ) if prediction else None,
            drift_detected=share >= drift_share or bool(prediction and verdicts[prediction.name][1]),
            notes=notes,
            evidently_version=evidently.__version__,
            duration_seconds=0.0,
            created_at=created_at,
            **output.urls(report_html=REPORT_FILE, result_json=RESULT_FILE),
        )
        output.publish(result, started, RESULT_FILE)
        log.info("drift %s:%s: %s; %d/%d features drifted, prediction drift %s (%.1fs)", model, version,
                 "drift" if result.drift_detected else "no drift", len(drifted), len(window.columns),
                 result.prediction.drifted if result.prediction else "n/a", result.duration_seconds)
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
        elif not reference[spec.name].notna().any():
            reason = "no values in the reference data"
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
