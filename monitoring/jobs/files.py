"""Where the batch jobs (drift, quality) keep their results, and what both raise for a window too thin.

Each job writes ``<data_dir>/<job>/<model>/<version>/<UTC timestamp>/`` (the
report and ``result.json``) and keeps ``<data_dir>/<job>/<model>/<version>/latest.json``
current. Every file is written under a temporary name and renamed into place
(:func:`service.core.files.atomic_write`, which the service's own files use too),
so a reader never sees half a file; the service reads ``latest.json`` through
:mod:`monitoring.verdicts`. :class:`TooFewRows` is what both jobs raise when a
window is too thin for a verdict.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path


class TooFewRows(Exception):
    """A batch job's window holds fewer rows than it needs for a verdict (the CLI exits 4).

    Mixed into each job's own error class, so callers can catch either.
    """

    def __init__(self, model: str, version: str, rows: int, min_rows: int, since: datetime | None,
                 until: datetime, what: str, verdict: str, detail: str = "") -> None:
        window = f"{since.isoformat() if since else 'the start of the log'} to {until.isoformat()}"
        super().__init__(f"{model}:{version} has {rows} {what} from {window}{detail}; "
                         f"at least {min_rows} are needed for a {verdict} verdict")
        self.model = model
        self.version = version
        self.rows = rows
        self.min_rows = min_rows
        self.since = since
        self.until = until


def version_dir(data_dir: Path, job: str, model: str, version: str) -> Path:
    """``<data_dir>/<job>/<model>/<version>``, created when missing."""
    path = Path(data_dir) / job / model / version
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_dir(data_dir: Path, job: str, model: str, version: str, created_at: datetime, out: Path | None,
            error: type[Exception]) -> Path:
    """``out``, else a new ``<data_dir>/<job>/<model>/<version>/<UTC timestamp>`` (suffixed if taken)."""
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        return Path(out)
    base = version_dir(data_dir, job, model, version)
    stamp = created_at.strftime("%Y%m%dT%H%M%SZ")
    for attempt in range(1, 1000):
        candidate = base / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise error(f"cannot create a run directory under {base}: {stamp} and 998 suffixes are taken")

