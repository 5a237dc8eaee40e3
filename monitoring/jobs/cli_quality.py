"""``vigil performance``: the quality job, for people and schedulers.

Exit codes of ``vigil performance run`` (what a scheduler branches on):
0 quality within tolerance of the card's training metrics, 3 degraded
(``PerformanceResult.quality_degraded``), 4 too few predictions with feedback
for a verdict, 2 usage error (bad time, duration or tolerance, unknown model or
version), 1 anything else.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from monitoring.jobs.cli import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_TOO_FEW_ROWS,
    EXIT_USAGE,
    DataDirOption,
    StoreOption,
    _fail,
    _progress,
    job_store,
    job_window,
    window_lines,
)
from service.core.errors import ModelNotFound, VigilError

if TYPE_CHECKING:
    from monitoring.verdicts import PerformanceResult

EXIT_DEGRADED = 3
DEFAULT_LAST = "7d"
"""Labels arrive late: a week of predictions is the default window (drift's default is a day)."""

performance_app = typer.Typer(help="Model quality on ground truth: feedback joined to the prediction log.",
                              no_args_is_help=True, pretty_exceptions_enable=False)


@performance_app.callback()
def _performance_group() -> None:
    """Model quality on ground truth: feedback joined to the prediction log."""
    # A callback keeps `run` a subcommand even while it is the group's only command.


def _number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def summary(result: PerformanceResult) -> str:
    """A few lines for a person: the verdict, each metric against its baseline, the bias, the rows, the report."""
    verdict = "DEGRADED" if result.quality_degraded else "quality ok"
    why = f" ({', '.join(result.degraded_metrics)})" if result.degraded_metrics else ""
    lines = [f"{result.model}:{result.version}: {verdict}{why} on {result.rows.evaluated:,} predictions with feedback"]
    for name, value in result.metrics.items():
        check = result.baseline.get(name)
        against = ""
        if check is not None:
            mark = "DEGRADED" if check.degraded else "ok"
            bound = ">=" if check.kind == "score" else "<="
            against = f" vs baseline {_number(check.baseline)} (must be {bound} {_number(check.limit)}: {mark})"
        lines.append(f"  {name}: {_number(value)}{against}")
    if result.task == "regression":
        lines.append(f"  mean error (actual - predicted): {result.prediction_bias['value']:+.4g}")
    else:
        shares = ", ".join(f"{label} {bias:+.3f}" for label, bias in result.prediction_bias.items())
        lines.append(f"  prediction bias (predicted - observed share): {shares}")
    for note in result.notes:
        lines.append(f"  note: {note}")
    rows = result.rows
    lines.append(f"  rows: {rows.evaluated:,} evaluated, {rows.fallback:,} fallback, {rows.with_feedback:,} of "
                 f"{rows.logged:,} logged predictions have feedback ({rows.feedback_coverage:.0%})")
    lines.extend(window_lines(result))
    return "\n".join(lines)


@performance_app.command("run")
def run(
    model: str = typer.Option(..., "--model", help="Model name."),
    version: Optional[str] = typer.Option(None, "--version",
                                          help="Version (default: the newest with feedback in the window)."),
    since: Optional[str] = typer.Option(None, "--since", help="Window start on prediction time, ISO 8601 (UTC when "
                                                              "no offset)."),
    last: Optional[str] = typer.Option(None, "--last", help=f"Window length back from --until, e.g. 24h, 7d, 4w "
                                                            f"(default {DEFAULT_LAST} unless --since is given)."),
    until: Optional[str] = typer.Option(None, "--until", help="Window end, ISO 8601 (default: now less the log's "
                                                              "flush interval and 5 s)."),
    min_rows: int = typer.Option(50, "--min-rows", min=1,
                                 help="Fewest predictions with feedback for a verdict (exit 4 below)."),
    tolerance: float = typer.Option(0.05, "--tolerance", min=0.0,
                                    help="Largest absolute drop of a score (accuracy, F1, ROC AUC, R2...) below "
                                         "the card's training metric."),
    error_tolerance: float = typer.Option(0.10, "--error-tolerance", min=0.0,
                                          help="Largest rise of an error (MAE, RMSE, MAPE) above the card's training "
                                               "metric, as a share of it (0.10: 10% worse)."),
    out: Optional[Path] = typer.Option(None, "--out",
                                       help="Directory for report.html and result.json "
                                            "(default: <data-dir>/performance/<model>/<version>/<UTC time>/)."),
    data_dir: Optional[Path] = DataDirOption,
    store: Optional[str] = StoreOption,
    registry: Optional[Path] = typer.Option(None, "--registry",
                                            help="Registry directory (default: $VIGIL_REGISTRY, else ./models)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON instead of a summary."),
) -> None:
    """Judge a window of served predictions on their feedback (Evidently), against the card's training metrics."""
    from monitoring.jobs.quality import NotEnoughFeedback, PerformanceConfigError, PerformanceError, run_performance

    since_time, until_time = job_window(since, last, until, DEFAULT_LAST)
    try:
        # The job has as many stages as the drift job, whose progress bar it shares.
        with _progress() as progress:
            result = run_performance(job_store(data_dir, store), registry, model, version, since_time, until_time,
                                     min_rows=min_rows, out=out, tolerance=tolerance,
                                     error_tolerance=error_tolerance, progress=progress)
    except NotEnoughFeedback as exc:
        typer.echo(f"too few rows: {exc}", err=True)
        raise typer.Exit(EXIT_TOO_FEW_ROWS) from None
    except (ModelNotFound, PerformanceConfigError) as exc:
        _fail(str(exc), EXIT_USAGE)
    except (VigilError, PerformanceError) as exc:
        _fail(str(exc), EXIT_ERROR)
    typer.echo(result.model_dump_json(indent=2) if as_json else summary(result))
    raise typer.Exit(EXIT_DEGRADED if result.quality_degraded else EXIT_OK)
