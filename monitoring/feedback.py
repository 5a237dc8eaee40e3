"""Ground truth that arrives late: stored beside the prediction log and joined to it by request id and index.

On disk (Parquet, Hive-partitioned like the prediction log, each file written
under a temporary name and renamed into place)::

    feedback/model=<name>/date=<YYYY-MM-DD>/fb-<unix_ms>-<pid>-<seq>.parquet

Columns: ``time`` (when the feedback arrived), ``request_id``, ``index``,
``actual`` (as text for classification labels, as a number for regression
values, in column ``actual`` / ``actual_value``), ``version`` and ``variant``
of the prediction it answers.

:class:`PredictionIndex` lets a worker find the prediction a feedback row
answers: it reads only the id and prediction columns of prediction-log
segments it has not seen yet, so a lookup costs a dict access once the index
is warm. Feedback already stored (by any worker) is indexed too, which makes
sending the same feedback twice harmless.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from service.core.files import atomic_write

FEEDBACK_DIR = "feedback"


@dataclass(frozen=True, slots=True)
class LoggedPrediction:
    """One answered instance, as the prediction log has it."""

    version: str
    variant: str
    prediction: Any
    score: float | None
    reason: str | None


@dataclass(frozen=True, slots=True)
class FeedbackRow:
    """One accepted actual, joined to its prediction."""

    request_id: str
    index: int
    actual: Any
    prediction: LoggedPrediction


class PredictionIndex:
    """request id -> logged predictions of one worker's view of the log (and the feedback already given)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self._predictions: dict[str, dict[str, dict[int, LoggedPrediction]]] = {}
        self._answered: dict[str, set[tuple[str, int]]] = {}
        self._seen_files: set[Path] = set()
        self._lock = threading.Lock()

    def refresh(self, model: str) -> None:
        """Index prediction-log and feedback files of ``model`` written since the last refresh."""
        import pyarrow.parquet as pq

        from monitoring.predlog import LOG_DIR

        with self._lock:
            predictions = self._predictions.setdefault(model, {})
            answered = self._answered.setdefault(model, set())
            for path in sorted((self.data_dir / LOG_DIR / f"model={model}").glob("date=*/*.parquet")):
                if path in self._seen_files or path.name.startswith("."):
                    continue
                try:
                    table = pq.read_table(path, columns=["request_id", "index", "version", "variant", "reason",
                                                         "prediction", "prediction_score"])
                except Exception:  # noqa: BLE001 - an unreadable segment must not break feedback
                    continue
                self._seen_files.add(path)
                columns = table.to_pydict()
                for rid, idx, version, variant, reason, prediction, score in zip(
                        columns["request_id"], columns["index"], columns["version"], columns["variant"],
                        columns["reason"], columns["prediction"], columns["prediction_score"]):
                    predictions.setdefault(rid, {})[idx] = LoggedPrediction(version, variant, prediction, score, reason)
            for path in sorted((self.data_dir / FEEDBACK_DIR / f"model={model}").glob("date=*/*.parquet")):
                if path in self._seen_files or path.name.startswith("."):
                    continue
                try:
                    table = pq.read_table(path, columns=["request_id", "index"])
                except Exception:  # noqa: BLE001
                    continue
                self._seen_files.add(path)
                answered.update(zip(table.column("request_id").to_pylist(), table.column("index").to_pylist()))

    def lookup(self, model: str, request_id: str) -> dict[int, LoggedPrediction] | None:
        """The logged predictions of a request (by instance index), or None when it is not in the log."""
        return self._predictions.get(model, {}).get(request_id)

    def already_answered(self, model: str, request_id: str, index: int) -> bool:
        """Whether feedback for this instance was stored before."""
        return (request_id, index) in self._answered.get(model, set())

    def mark_answered(self, model: str, rows: Iterable[FeedbackRow]) -> None:
        """Remember feedback this worker just stored."""
        with self._lock:
            self._answered.setdefault(model, set()).update((r.request_id, r.index) for r in rows)


_seq = 0
_seq_lock = threading.Lock()


def write_feedback(data_dir: Path, model: str, task: str, rows: list[FeedbackRow]) -> Path:
    """Store accepted feedback as one Parquet segment (atomic: temporary name, then rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    global _seq
    with _seq_lock:
        _seq += 1
        seq = _seq
    now = time.time()
    day = datetime.fromtimestamp(now, timezone.utc).date().isoformat()
    directory = Path(data_dir) / FEEDBACK_DIR / f"model={model}" / f"date={day}"
    directory.mkdir(parents=True, exist_ok=True)
    columns: dict[str, Any] = {
        "time": pa.array(np.full(len(rows), np.datetime64(int(now * 1_000_000), "us")), type=pa.timestamp("us", tz="UTC")),
        "request_id": [r.request_id for r in rows],
        "index": pa.array([r.index for r in rows], type=pa.int32()),
        "version": [r.prediction.version for r in rows],
        "variant": [r.prediction.variant for r in rows],
    }
    if task == "classification":
        columns["actual"] = pa.array([str(r.actual) for r in rows], type=pa.string())
    else:
        columns["actual_value"] = pa.array([float(r.actual) for r in rows], type=pa.float64())
    name = f"fb-{int(now * 1000)}-{os.getpid()}-{seq:06d}.parquet"
    atomic_write(directory / name, lambda tmp: pq.write_table(pa.Table.from_pydict(columns), tmp))
    return directory / name


def read_feedback(data_dir: Path, model: str) -> Any:
    """Every stored feedback row of a model as a DataFrame (the first actual of a repeated instance stands)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((Path(data_dir) / FEEDBACK_DIR / f"model={model}").glob("date=*/*.parquet"))
    tables = [pq.read_table(p) for p in files if not p.name.startswith(".")]
    if not tables:
        return pd.DataFrame(columns=["time", "request_id", "index", "version", "variant"])
    frame = pa.concat_tables(tables, promote_options="permissive").to_pandas()
    return frame.sort_values("time").drop_duplicates(["request_id", "index"], keep="first").reset_index(drop=True)
