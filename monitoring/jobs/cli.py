"""``vigil drift`` and ``vigil predlog``: the drift job and prediction log retention, for people and schedulers.

Exit codes of ``vigil drift run`` (what a scheduler branches on):
0 no drift, 3 drift detected (dataset drift by Evidently's share rule, or
drift of the model's output: ``DriftResult.drift_detected``), 4 too few logged
rows for a verdict, 2 usage error (bad time or duration, unknown model,
version, feature or stat test), 1 anything else.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Optional

import typer

from monitoring.store import Store, command_store
from service.core.errors import ModelNotFound, VigilError

if TYPE_CHECKING:
    from monitoring.verdicts import DriftResult

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DRIFT = 3
EXIT_TOO_FEW_ROWS = 4

DEFAULT_LAST = "24h"
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

drift_app = typer.Typer(help="Data drift jobs: compare logged inputs and predictions with the reference data.",
                        no_args_is_help=True, pretty_exceptions_enable=False)
predlog_app = typer.Typer(help="The prediction log: retention.", no_args_is_help=True,
                          pretty_exceptions_enable=False)



@drift_app.callback()
def _drift_group() -> None:
    """Data drift jobs: compare logged inputs and predictions with the reference data."""
    # A callback keeps `run` a subcommand even while it is the group's only command.


@predlog_app.callback()
def _predlog_group() -> None:
    """The prediction log: retention."""


DataDirOption = typer.Option(None, "--data-dir", help="Data directory (default: the store of $VIGIL_STORE, else "
                                                         "$VIGIL_DATA_DIR, else ./var).")
StoreOption = typer.Option(None, "--store", help="The store, e.g. s3://bucket/prefix or a directory "
                                                 "(default: $VIGIL_STORE, else the data directory).")


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def job_store(data_dir: Path | None, store: str | None = None) -> Store:
    """Where the job reads and writes: ``--store``, else ``--data-dir``, else ``VIGIL_STORE``, else
    ``VIGIL_DATA_DIR``."""
    try:
        return command_store(data_dir, store)
    except ValueError as exc:
        _fail(str(exc), EXIT_USAGE)


def parse_duration(text: str, option: str) -> timedelta:
    """``30m``, ``24h``, ``7d``, ``2w``, ``90s`` as a timedelta; a usage error naming ``option`` otherwise."""
    match = _DURATION_RE.match(text.strip())
    if not match:
        _fail(f"{option} expects a duration such as 30m, 24h, 7d or 2w, got '{text}'", EXIT_USAGE)
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        _fail(f"{option} must be a positive duration, got '{text}'", EXIT_USAGE)
    return timedelta(seconds=seconds)


def parse_time(text: str | None, option: str) -> datetime | None:
    """An ISO 8601 time (``Z`` or an offset; none means UTC) as an aware datetime; a usage error otherwise."""
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        _fail(f"{option} expects an ISO 8601 time such as 2024-05-01T00:00:00Z, got '{text}'", EXIT_USAGE)
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def parse_stattests(items: list[str]) -> dict[str, dict[str, Any]]:
    """``FEATURE=TEST``, ``FEATURE=TEST:THRESHOLD`` or ``FEATURE=:THRESHOLD`` into run_drift's overrides."""
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        feature, sep, spec = item.partition("=")
        test, _, threshold = spec.partition(":")
        if not sep or not feature or not (test or threshold):
            _fail(f"--stattest expects FEATURE=TEST[:THRESHOLD] (e.g. bmi=psi:0.2), got '{item}'", EXIT_USAGE)
        entry: dict[str, Any] = {"stattest": test or None}
        if threshold:
            try:
                entry["threshold"] = float(threshold)
            except ValueError:
                _fail(f"--stattest {item}: the threshold '{threshold}' is not a number", EXIT_USAGE)
        overrides[feature] = entry
    return overrides


def job_window(since: str | None, last: str | None, until: str | None, default_last: str) -> tuple[datetime, datetime]:
    """(since, until) of a job's window: ``--since``, or ``--last`` (else ``default_last``) back from ``--until``.

    ``--until`` defaults to now less the log's flush interval and a few seconds, so rows the service
    still buffers are not half-counted.
    """
    from monitoring.jobs.drift import default_until

    if since is not None and last is not None:
        _fail("give either --since or --last, not both", EXIT_USAGE)
    until_time = parse_time(until, "--until") or default_until()
    since_time = parse_time(since, "--since")
    if since_time is None:
        since_time = until_time - parse_duration(last or default_last, "--last")
    return since_time, until_time


def window_lines(result: Any) -> list[str]:
    """The closing lines of a job summary: the window it judged and where its report is."""
    since = result.window.since.isoformat() if result.window.since else "start of the log"
    return [f"  window: {since} to {result.window.until.isoformat()} ({result.duration_seconds:.1f}s)",
            f"  report: {result.report_html}"]


@contextmanager
def _progress() -> Iterator[Callable[[str], None] | None]:
    """A rich progress bar over the job's stages on a terminal; nothing when output goes to a file or pipe."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from monitoring.jobs.drift import STAGES

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("starting", total=len(STAGES))
        started = False

        def advance(stage: str) -> None:
            nonlocal started
            bar.update(task, description=stage, advance=1 if started else 0)
            started = True

        yield advance
        bar.update(task, completed=len(STAGES))


def _format_test(name: str, score: float | None, threshold: float) -> str:
    shown = "n/a" if score is None else f"{score:.3g}"
    return f"{name} {shown}, threshold {threshold:g}"


def summary(result: DriftResult) -> str:
    """A few lines for a person: the verdict, which features drifted, what was compared, where the report is."""
    n = len(result.features)
    comparison = ">=" if result.dataset_drift else "<"
    verdict = "DRIFT" if result.drift_detected else "no drift"
    why = []
    if result.dataset_drift:
        why.append("dataset drift")
    if result.prediction is not None and result.prediction.drifted:
        why.append("prediction drift")
    lines = [f"{result.model}:{result.version}: {verdict}{' (' + ', '.join(why) + ')' if why else ''} - "
             f"{len(result.drifted_features)} of {n} features drifted "
             f"(share {result.drift_share:.2f} {comparison} {result.drift_share_threshold:.2f})"]
    for name in result.drifted_features:
        feature = result.features[name]
        lines.append(f"  drifted: {name} ({_format_test(feature.stat_test_display, feature.score, feature.threshold)})")
    if result.prediction is not None:
        p = result.prediction
        lines.append(f"  prediction ({p.column}): {'drifted' if p.drifted else 'no drift'} "
                     f"({_format_test(p.stat_test_display, p.score, p.threshold)})")
    for skipped in result.skipped_features:
        lines.append(f"  skipped: {skipped.feature} ({skipped.reason})")
    for note in result.notes:
        lines.append(f"  note: {note}")
    rows = result.rows
    sampled = f" ({rows.current_sampling} sample)" if rows.current_sampling != "none" else ""
    lines.append(f"  rows: {rows.current:,} of {rows.window:,} in the window{sampled} vs {rows.reference:,} "
                 f"reference rows")
    lines.extend(window_lines(result))
    return "\n".join(lines)


def _prune(data_dir: Store, days: int) -> None:
    from monitoring.feedback import prune_feedback
    from monitoring.predlog import prune

    removed = prune(data_dir, older_than_days=days)
    prune_feedback(data_dir, older_than_days=days)
    if removed:
        typer.echo(f"pruned {len(removed)} prediction log partition(s) older than {days} days", err=True)


@drift_app.command("run")
def run(
    model: str = typer.Option(..., "--model", help="Model name."),
    version: Optional[str] = typer.Option(None, "--version",
                                          help="Version (default: the newest with logged rows in the window)."),
    since: Optional[str] = typer.Option(None, "--since", help="Window start, ISO 8601 (UTC when no offset)."),
    last: Optional[str] = typer.Option(None, "--last", help=f"Window length back from --until, e.g. 30m, 24h, 7d "
                                                            f"(default {DEFAULT_LAST} unless --since is given)."),
    until: Optional[str] = typer.Option(None, "--until", help="Window end, ISO 8601 (default: now less the log's "
                                                              "flush interval and 5 s, so rows still buffered by "
                                                              "the service are not half-counted)."),
    min_rows: int = typer.Option(200, "--min-rows", min=1, help="Fewest logged rows for a verdict (exit 4 below)."),
    out: Optional[Path] = typer.Option(None, "--out",
                                       help="Directory for report.html and result.json "
                                            "(default: <data-dir>/drift/<model>/<version>/<UTC time>/)."),
    data_dir: Optional[Path] = DataDirOption,
    store: Optional[str] = StoreOption,
    registry: Optional[Path] = typer.Option(None, "--registry",
                                            help="Registry directory (default: $VIGIL_REGISTRY, else ./models)."),
    prune_days: int = typer.Option(30, "--prune-days", min=0,
                                   help="Afterwards, delete prediction log days older than this (0: keep all)."),
    stattest: list[str] = typer.Option(
        [], "--stattest",
        help="FEATURE=TEST[:THRESHOLD] instead of Evidently's default test (repeatable; 'prediction' for the output)."),
    drift_share: float = typer.Option(0.5, "--drift-share", min=0.0, max=1.0,
                                      help="Share of drifted features at which the dataset counts as drifted."),
    max_rows: int = typer.Option(50_000, "--max-rows", min=0,
                                 help="Sample larger windows down to this many rows, stratified by time (0: never)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON instead of a summary."),
) -> None:
    """Compare a window of the prediction log with the model version's reference data (Evidently)."""
    from monitoring.jobs.drift import DriftConfigError, DriftError, NotEnoughRows, run_drift

    since_time, until_time = job_window(since, last, until, DEFAULT_LAST)
    data_root = job_store(data_dir, store)
    try:
        with _progress() as progress:
            result = run_drift(data_root, registry, model, version, since_time, until_time, min_rows=min_rows, out=out,
                               stattests=parse_stattests(stattest), drift_share=drift_share,
                               max_rows=max_rows or None, progress=progress)
    except NotEnoughRows as exc:
        typer.echo(f"too few rows: {exc}", err=True)
        code = EXIT_TOO_FEW_ROWS
    except (ModelNotFound, DriftConfigError) as exc:
        _fail(str(exc), EXIT_USAGE)
    except (VigilError, DriftError) as exc:
        _fail(str(exc), EXIT_ERROR)
    else:
        typer.echo(result.model_dump_json(indent=2) if as_json else summary(result))
        code = EXIT_DRIFT if result.drift_detected else EXIT_OK
    if prune_days:
        _prune(data_root, prune_days)
    raise typer.Exit(code)


@predlog_app.command("prune")
def prune_command(
    older_than_days: int = typer.Option(30, "--older-than-days", min=1, help="Delete log days older than this."),
    data_dir: Optional[Path] = DataDirOption,
    store: Optional[str] = StoreOption,
) -> None:
    """Delete prediction log partitions older than the retention period (and the feedback claims of their requests)."""
    from monitoring.feedback import prune_feedback
    from monitoring.predlog import prune

    root = job_store(data_dir, store)
    removed = prune(root, older_than_days=older_than_days)
    prune_feedback(root, older_than_days=older_than_days)
    typer.echo(f"removed {len(removed)} prediction log partition(s) older than {older_than_days} days from {root.url}")
