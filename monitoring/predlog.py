"""The prediction log: every answered instance, kept in the store as Parquet, written off the request path.

Writing: :meth:`PredictionLog.append` puts one small record per request in a
bounded in-memory buffer (no I/O, no lock held for long, never blocks); a
daemon thread flushes the buffer at least every ``flush_interval`` seconds.
When the buffer is full, new rows are dropped and counted.

In the store (:mod:`monitoring.store`: ``<data_dir>/predlog/`` by default, or
``s3://bucket/prefix/predlog/``), Hive-partitioned so pandas, DuckDB or Spark
read it without Vigil::

    predlog/model=<name>/date=<YYYY-MM-DD>/hour=<HH>/part-<ms>-w<worker>-<pid>-<token>-<seq>.parquet

Each flush writes complete segments, each under a key that is new (an
exclusive write: a taken key is never replaced), so readers never see part of
a segment. With a journal (:mod:`monitoring.journal`), every row is on the
local disk before its answer leaves, and a ``kill -9`` loses nothing: the
next process to start on that directory writes the dead one's rows. ``<ms>`` is the time of the segment's newest row (Unix
milliseconds) and ``<token>`` the writing process's random token, the same
one its request ids start with (:mod:`service.core.requestid`): two hosts'
processes with the same worker number and pid still write different keys,
and the feedback join finds a request's row among a few segments of one hour
and one token (:func:`candidate_segments`) instead of reading the log.

Columns: ``time`` (UTC), ``request_id``, ``index`` (instance position in its
request), ``version``, ``variant``, ``reason`` (why the fallback answered, or
null), ``prediction`` (label or value), ``prediction_score`` (positive-class
score of a binary classifier, else the top probability), then one column per
feature (PII features dropped or hashed as the card says). ``model``,
``date`` and ``hour`` come from the partition path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from monitoring.journal import Journal, Sealed, Writer, orphans
from monitoring.store import Store, as_store
from service.core.requestid import new_token, parse_request_id

if TYPE_CHECKING:
    import pandas as pd

    from monitoring.metrics import VigilMetrics
    from service.core.card import ModelCard

log = logging.getLogger("vigil.predlog")

LOG_DIR = "predlog"
RECOVER_SECONDS = 60.0
"""How often the flusher looks for journals of dead processes (a worker its replica respawned)."""
DICTIONARY_PAGE_BYTES = 32 * 1024
"""Where a segment column's Parquet dictionary gives up and the column is written plain. Ids, versions, variants
and labels stay well inside it; a continuous feature outgrows it within a few thousand rows, where arrow's
default (1 MB) kept building a dictionary of every distinct value of a flush (``benchmarks/README.md``)."""


@dataclass(slots=True)
class LoggedRequest:
    """What the request path hands over: references only, expanded into rows at flush time."""

    time: float
    request_id: str
    card: ModelCard
    variant: str
    instances: list[dict[str, Any]] | None
    """The request's instances as sent; None when ``matrix`` holds everything the log keeps."""
    prediction: list[Any]
    score: list[float] | None
    reasons: list[str | None] | None
    matrix: np.ndarray | None = None
    """The validated numeric features (rows x the card's features, NaN for null), when the model takes only numbers.

    With it the flush builds feature columns with numpy instead of reading every
    value out of the instance dicts, a Python loop that holds the interpreter lock
    while requests wait. It also lets the request path drop its instance dicts at
    once, so the flush thread never frees a second's worth of them in one go, which
    stops the worker while it lasts.
    """

    def journal_record(self) -> tuple[dict[str, Any], np.ndarray | None]:
        """The record as the journal keeps it: the card as its model and version; the matrix as its shape in the
        line and its float64 bytes as the payload."""
        matrix = self.matrix
        line = {"t": self.time, "id": self.request_id, "model": self.card.name, "version": self.card.version,
                "variant": self.variant, "instances": self.instances, "prediction": self.prediction,
                "score": self.score, "reasons": self.reasons, "matrix": None if matrix is None else list(matrix.shape)}
        return line, None if matrix is None else np.ascontiguousarray(matrix, dtype="<f8")

    @classmethod
    def from_journal(cls, line: dict[str, Any], payload: memoryview | None, cards: dict[tuple[str, str], ModelCard],
                     card_for: Callable[[str, str], ModelCard]) -> LoggedRequest:
        """A record from its journal line and payload; ``cards`` caches ``card_for``.

        A line of the earlier journal format carries the matrix as nested lists, NaN written as null.
        """
        key = (line["model"], line["version"])
        if key not in cards:
            cards[key] = card_for(*key)
        stored = line["matrix"]  # the shape; in the earlier format the values
        if stored is None:
            matrix = None
        elif payload is not None:
            matrix = np.frombuffer(payload, dtype="<f8").reshape(stored)
        else:
            matrix = np.array(stored, dtype=np.float64).reshape(len(stored), -1)
        return cls(time=line["t"], request_id=line["id"], card=cards[key], variant=line["variant"],
                   instances=line["instances"], prediction=line["prediction"], score=line["score"],
                   reasons=line["reasons"], matrix=matrix)

    @property
    def size(self) -> int:
        """Instances in the request."""
        return len(self.matrix) if self.matrix is not None else len(self.instances or ())

    def feature_values(self, name: str) -> list[Any]:
        """One feature's value per instance (None where null or absent)."""
        if self.instances is not None:
            return [inst.get(name) for inst in self.instances]
        assert self.matrix is not None
        try:
            position = self.card.feature_names.index(name)
        except ValueError:
            return [None] * len(self.matrix)
        return [None if v != v else v for v in self.matrix[:, position].tolist()]  # NaN is a null input


def hash_value(value: Any, salt: str) -> str | None:
    """Salted sha256 of a PII value (first 16 hex digits); None stays None."""
    if value is None:
        return None
    return hashlib.sha256(f"{salt}\x00{value}".encode()).hexdigest()[:16]


class PredictionLog:
    """Buffered, crash-safe writer of the prediction log for one worker process."""

    def __init__(
        self,
        store: Store | Path,
        worker: str,
        metrics: VigilMetrics | None = None,
        flush_interval: float = 1.0,
        max_buffer_rows: int = 100_000,
        pii_salt: str | None = None,
        sample_rate: float = 1.0,
        token: str | None = None,
        journal_dir: Path | None = None,
    ) -> None:
        self.store = as_store(store)
        self.worker = worker
        self.token = token or new_token()
        """This process's token: in every segment key (and in the worker's request ids)."""
        self.pid = os.getpid()
        self.metrics = metrics
        self.flush_interval = flush_interval
        self.max_buffer_rows = max_buffer_rows
        self.pii_salt = pii_salt
        self.sample_rate = sample_rate
        self._buffer: deque[LoggedRequest] = deque()
        self._buffered_rows = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seq = 0
        self._last_error_log = 0.0
        self._counters: dict[str, tuple[Any, Any]] = {}
        self.journal_dir = journal_dir
        self._journal = self._open_journal(journal_dir, Writer(worker, self.pid, self.token))
        self._card_for: Callable[[str, str], ModelCard] | None = None

    @staticmethod
    def _open_journal(directory: Path | None, writer: Writer) -> Journal | None:
        """The journal, or None without a directory or when it cannot be made there (logged: the log still runs)."""
        if directory is None:
            return None
        try:
            return Journal(directory, writer)
        except OSError as exc:
            log.error("prediction log journal unavailable, rows are not kept across a crash: %s", exc)
            return None

    # ------------------------------------------------------------------ request path

    def sampled(self, rate: float | None = None) -> bool:
        """Whether to log the next request: drawn at ``rate`` (a model's own), else at the log's ``sample_rate``.

        Requests are sampled whole, so every logged request keeps all its instances.
        """
        share = self.sample_rate if rate is None else rate
        return share >= 1.0 or random.random() < share

    def append(self, record: LoggedRequest) -> bool:
        """Queue one request's rows; returns False when they were dropped (the buffer is full)."""
        rows = record.size
        with self._lock:
            if self._buffered_rows + rows > self.max_buffer_rows:
                full = True
            else:
                full = False
                self._buffer.append(record)
                self._buffered_rows += rows
                if self._journal is not None:
                    self._journal_write(record)
        if full:
            self._count(record.card.name, dropped=rows)
            return False
        return True

    # ------------------------------------------------------------------ background flushing

    def _journal_write(self, record: LoggedRequest) -> None:
        assert self._journal is not None
        try:
            self._journal.write(*record.journal_record())
        except OSError as exc:  # disk full: the row is still buffered, only its crash safety is lost
            self._log_error(f"prediction log journal write failed: {exc}")

    def start(self, card_for: Callable[[str, str], ModelCard] | None = None) -> None:
        """Warm the writer up, then start the background flusher (a daemon thread).

        With a journal and ``card_for`` (a model's card by name and version), the
        flusher first writes the rows of every dead process's journal in the same
        directory, and looks for more each :data:`RECOVER_SECONDS`.
        """
        _warm_up_arrow()
        self._card_for = card_for
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vigil-predlog", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        recovered_at = -RECOVER_SECONDS
        while True:
            if self._card_for is not None and time.monotonic() - recovered_at >= RECOVER_SECONDS:
                recovered_at = time.monotonic()
                self.recover(self._card_for)
            if self._stop.wait(self.flush_interval):
                break
            self.flush()

    def close(self) -> None:
        """Stop the flusher and write what is buffered; the journal, all written, is removed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.flush()
        if self._journal is not None:
            self._journal.close()

    def recover(self, card_for: Callable[[str, str], ModelCard]) -> int:
        """Write the rows of every journal in this log's directory whose writer is dead; returns the rows written.

        They go to the store under the dead writer's token and worker, as it
        would have written them. A journal whose rows cannot be written now
        (the store is down) is left for the next try.
        """
        if self.journal_dir is None:
            return 0
        written = 0
        cards: dict[tuple[str, str], ModelCard] = {}
        for writer, lines, sealed in orphans(self.journal_dir):
            records = []
            for line, payload in lines:
                try:
                    records.append(LoggedRequest.from_journal(line, payload, cards, card_for))
                except Exception as exc:  # noqa: BLE001 - a version gone from the registry, a foreign line
                    log.warning("journal %s: a record skipped: %s", sealed.path.name, exc)
            by_model = _by_model(records)
            try:
                for model, model_records in by_model.items():
                    self._write(model, model_records, writer)
            except Exception as exc:  # noqa: BLE001 - the store is down: keep the journal for the next try
                self._log_error(f"prediction log recovery of {sealed.path.name} failed, kept for later: {exc}")
                sealed.release()
                continue
            for model, model_records in by_model.items():
                rows = sum(r.size for r in model_records)
                self._count(model, written=rows)
                written += rows
            log.info("prediction log: wrote %d rows of dead writer %s from its journal", len(records), writer.token)
            sealed.done()
        return written

    def flush(self) -> int:
        """Write every buffered row now; returns the number of rows written."""
        with self._lock:
            if not self._buffer:
                return 0
            batch = list(self._buffer)
            self._buffer.clear()
            self._buffered_rows = 0
            sealed = self._seal_journal()
        try:
            return self._write_batch(batch)
        finally:
            if sealed is not None:
                sealed.done()

    def _seal_journal(self) -> Sealed | None:
        """Seal the journal's current file (under the lock); if no next file can be opened, the journal stops."""
        if self._journal is None:
            return None
        try:
            return self._journal.seal()
        except OSError as exc:
            log.error("prediction log journal stopped, rows are not kept across a crash: %s", exc)
            sealed, self._journal = self._journal.detach(), None
            return sealed

    def _write_batch(self, batch: list[LoggedRequest]) -> int:
        started = time.perf_counter()
        written = 0
        for model, records in _by_model(batch).items():
            rows = sum(r.size for r in records)
            try:
                self._write(model, records)
            except Exception as exc:  # noqa: BLE001 - disk full, permissions: never reach the request path
                self._count(model, errors=1, dropped=rows)
                self._log_error(f"prediction log write failed for {model} ({rows} rows dropped): {exc}")
                continue
            written += rows
            self._count(model, written=rows)
        if self.metrics is not None:
            self.metrics.predlog_flush_seconds.observe(time.perf_counter() - started)
        return written

    def _log_error(self, message: str) -> None:
        """Log an error at most once a minute: a failing disk or store must not flood the log."""
        now = time.monotonic()
        if now - self._last_error_log > 60:
            self._last_error_log = now
            log.error("%s", message)

    def _count(self, model: str, written: int = 0, dropped: int = 0, errors: int = 0) -> None:
        if self.metrics is None:
            return
        if written:
            self.metrics.predlog_rows.labels(model).inc(written)
        if dropped:
            self.metrics.predlog_dropped.labels(model).inc(dropped)
        if errors:
            self.metrics.predlog_write_errors.labels(model).inc(errors)

    def _write(self, model: str, records: list[LoggedRequest], writer: Writer | None = None) -> None:
        """Write ``records`` as one segment per UTC hour, under this process's keys or those of ``writer``."""
        who = writer or Writer(self.worker, self.pid, self.token)
        import pyarrow as pa
        import pyarrow.parquet as pq

        by_hour: dict[datetime, list[LoggedRequest]] = {}
        for record in records:
            hour = datetime.fromtimestamp(record.time, timezone.utc).replace(minute=0, second=0, microsecond=0)
            by_hour.setdefault(hour, []).append(record)
        for hour, hour_records in by_hour.items():
            table = pa.Table.from_pydict(self._columns(hour_records))
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, compression="zstd", dictionary_pagesize_limit=DICTIONARY_PAGE_BYTES)
            data = sink.getvalue().to_pybytes()
            newest = int(max(r.time for r in hour_records) * 1000)
            while True:
                self._seq += 1
                key = segment_key(model, hour, newest, who.worker, who.pid, who.token, self._seq)
                if self.store.put(key, data, exclusive=True):
                    break

    def _columns(self, records: list[LoggedRequest]) -> dict[str, Any]:
        import pyarrow as pa

        card = records[-1].card
        sizes = [r.size for r in records]
        micros = (np.array([r.time for r in records]) * 1_000_000).astype(np.int64)
        times = np.repeat(micros, sizes).view("datetime64[us]")
        # Per-request values are repeated per row by arrow's take(), not by Python lists: this
        # runs under the interpreter lock while the worker answers requests.
        owner = pa.array(np.repeat(np.arange(len(records)), sizes))
        starts = np.repeat(np.cumsum(sizes) - sizes, sizes)
        predictions: list[Any] = []
        scores: list[float | None] = []
        for record, k in zip(records, sizes):
            predictions.extend(record.prediction)
            scores.extend(record.score if record.score is not None else [None] * k)
        if any(r.reasons is not None for r in records):
            reasons: list[str | None] = []
            variants: list[str] = []
            for record, k in zip(records, sizes):
                if record.reasons is None:
                    variants.extend([record.variant] * k)
                    reasons.extend([None] * k)
                else:
                    variants.extend("fallback" if why else record.variant for why in record.reasons)
                    reasons.extend(record.reasons)
            variant_column = pa.array(variants, type=pa.string())
            reason_column = pa.array(reasons, type=pa.string())
        else:
            variant_column = pa.array([r.variant for r in records], type=pa.string()).take(owner)
            reason_column = pa.nulls(len(owner), type=pa.string())
        columns: dict[str, Any] = {
            "time": pa.array(times, type=pa.timestamp("us", tz="UTC")),
            "request_id": pa.array([r.request_id for r in records], type=pa.string()).take(owner),
            "index": pa.array((np.arange(len(owner)) - starts).astype(np.int32)),
            "version": pa.array([r.card.version for r in records], type=pa.string()).take(owner),
            "variant": variant_column,
            "reason": reason_column,
            "prediction": predictions,
            "prediction_score": pa.array(scores, type=pa.float64()),
        }
        names = card.feature_names
        by_feature = None
        if all(r.matrix is not None and (r.card is card or r.card.feature_names == names) for r in records):
            # One feature per row, so each column is contiguous and arrow takes it without a copy
            # (a strided column is copied value by value). NaN is a null input (inputs are finite
            # otherwise); a null mask is made only for a column that has one.
            by_feature = np.concatenate([r.matrix.T for r in records], axis=1)  # type: ignore[union-attr]
            nan = np.isnan(by_feature)
            has_null = nan.any(axis=1)
        for position, spec in enumerate(card.features):
            if spec.pii == "drop":
                continue
            if by_feature is not None and spec.pii != "hash":
                mask = nan[position] if has_null[position] else None
                column = pa.array(by_feature[position], mask=mask, type=pa.float64())
                columns[spec.name] = column.cast(pa.int64()) if spec.type == "int" else column
                continue
            values = [v for r in records for v in r.feature_values(spec.name)]
            if spec.pii == "hash":
                if not self.pii_salt:
                    continue  # hashing without a secret salt is reversible for small domains: drop instead
                values = [hash_value(v, self.pii_salt) for v in values]
                columns[spec.name] = pa.array(values, type=pa.string())
            elif spec.type == "string":
                columns[spec.name] = pa.array(values, type=pa.string())
            elif spec.type == "int":
                columns[spec.name] = pa.array(values, type=pa.int64())
            else:
                columns[spec.name] = pa.array(values, type=pa.float64())
        return columns


def _by_model(records: list[LoggedRequest]) -> dict[str, list[LoggedRequest]]:
    by_model: dict[str, list[LoggedRequest]] = {}
    for record in records:
        by_model.setdefault(record.card.name, []).append(record)
    return by_model


def _warm_up_arrow() -> None:
    """Import and exercise pyarrow once, before traffic.

    The first conversion and Parquet write of a process pay for imports and
    lazy initialisation while holding the interpreter lock; done here, they do
    not stall the worker's requests during its first flush under load.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pydict({"i": [1], "s": ["x"], "f": pa.array(np.array([0.5]), from_pandas=True)})
    pq.write_table(table, pa.BufferOutputStream(), compression="zstd")


# ---------------------------------------------------------------------- keys


def segment_key(model: str, hour: datetime, newest_ms: int, worker: str, pid: int, token: str, seq: int) -> str:
    """The key of a segment: its model, the UTC hour of its rows, its newest row's time and who wrote it."""
    return (f"{LOG_DIR}/model={model}/date={hour.date().isoformat()}/hour={hour.hour:02d}/"
            f"part-{newest_ms}-w{worker}-{pid}-{token}-{seq:06d}.parquet")


def segment_parts(key: str) -> tuple[int, str] | None:
    """(newest row's Unix milliseconds, writer's token) of a segment key; None for other names."""
    parts = key.rpartition("/")[2].removesuffix(".parquet").split("-")
    if len(parts) != 6 or parts[0] != "part" or not parts[1].isdigit():
        return None
    return int(parts[1]), parts[4]


def _partitions(store: Store, base: str, name: str, first: Any, last: Any,
                parse: Any) -> list[tuple[Any, str]]:
    """Sub-directories ``<name>=<value>`` of ``base`` whose value is within [first, last] (None: open)."""
    found = []
    for child in store.children(base):
        if not child.startswith(f"{name}="):
            continue
        try:
            value = parse(child.removeprefix(f"{name}="))
        except ValueError:
            continue
        if (first is None or value >= first) and (last is None or value <= last):
            found.append((value, f"{base}/{child}"))
    return sorted(found)


def segment_keys(store: Store | Path, model: str, since: datetime | None = None,
                 until: datetime | None = None) -> list[str]:
    """Keys of a model's complete segments whose date and hour partitions overlap [since, until], every writer's."""
    store = as_store(store)
    start = since.astimezone(timezone.utc) if since is not None else None
    end = until.astimezone(timezone.utc) if until is not None else None
    keys: list[str] = []
    for day, day_prefix in _partitions(store, f"{LOG_DIR}/model={model}", "date", start and start.date(),
                                       end and end.date(), date.fromisoformat):
        first_hour = start.hour if start is not None and day == start.date() else None
        last_hour = end.hour if end is not None and day == end.date() else None
        hours = _partitions(store, day_prefix, "hour", first_hour, last_hour, int)
        for _, hour_prefix in hours:
            keys.extend(k for k in store.list(f"{hour_prefix}/") if k.endswith(".parquet"))
        # Segments written before hour partitions sit directly in the day's directory.
        keys.extend(f"{day_prefix}/{name}" for name in store.children(day_prefix)
                    if name.endswith(".parquet") and not name.startswith("hour="))
    return keys


def segment_files(data_dir: Path, model: str, since: datetime | None = None,
                  until: datetime | None = None) -> list[Path]:
    """:func:`segment_keys` of a local store, as file paths."""
    store = as_store(data_dir)
    return [path for key in segment_keys(store, model, since, until) if (path := store.local_path(key)) is not None]


def candidate_segments(store: Store, model: str, request_id: str, window_seconds: float,
                       list_keys: Callable[[str], list[str]] | None = None) -> list[str]:
    """The segments that can hold the rows of ``request_id``, oldest first; empty when it is not a Vigil id.

    A row is logged by the worker whose token starts the id, at most
    ``window_seconds`` after the serving time the id carries, in the segment of
    its hour whose newest row is at most ``window_seconds`` after that time. So
    this lists one or two hours' keys of one time prefix (a filter the S3
    server applies) and keeps that worker's: the cost does not grow with the log. ``list_keys``
    lists a prefix instead of ``store.list`` (a caller's short-lived cache of listings).
    """
    parsed = parse_request_id(request_id)
    if parsed is None:
        return []
    low = parsed.millis
    high = low + int(window_seconds * 1000)
    first = datetime.fromtimestamp(low / 1000, timezone.utc).replace(minute=0, second=0, microsecond=0)
    found = []
    hour = first
    while hour.timestamp() * 1000 <= high:
        directory = f"{LOG_DIR}/model={model}/date={hour.date().isoformat()}/hour={hour.hour:02d}"
        for prefix in _common_prefixes(str(low), str(high)):
            for key in (list_keys or store.list)(f"{directory}/part-{prefix}"):
                parts = segment_parts(key)
                if parts is not None and parts[1] == parsed.token and low <= parts[0] <= high:
                    found.append((parts[0], key))
        hour += timedelta(hours=1)
    return [key for _, key in sorted(found)]


def _common_prefixes(low: str, high: str) -> list[str]:
    """One or two name prefixes that together cover every number from ``low`` to ``high`` (decimal, same length).

    Blocks of the smallest power of ten at least as wide as the range: each
    prefix lists at most that many milliseconds of segments.
    """
    if len(low) != len(high):
        return [""]
    digits = len(str(max(int(high) - int(low), 1)))
    if digits >= len(low):
        return [""]
    block = 10 ** digits
    return [str(head) for head in range(int(low) // block, int(high) // block + 1)]


# ---------------------------------------------------------------------- reading


def read_log(
    store: Store | Path,
    model: str,
    version: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    columns: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Logged rows of one model (optionally one version) with ``since <= time < until``, every writer's.

    Unreadable segments (which the writer never leaves, but a disk can) are
    skipped with a warning rather than failing the whole read.
    """
    import pandas as pd
    import pyarrow as pa

    store = as_store(store)
    tables = []
    for key in segment_keys(store, model, since, until):
        try:
            tables.append(store.read_table(key, columns=list(columns) if columns else None))
        except (OSError, pa.ArrowException) as exc:
            log.warning("skipping unreadable prediction log segment %s: %s", key, exc)
    if not tables:
        return pd.DataFrame(columns=list(columns) if columns else ["time", "request_id", "index", "version"])
    frame = pa.concat_tables(tables, promote_options="permissive").to_pandas()
    mask = np.ones(len(frame), dtype=bool)
    if version is not None and "version" in frame:
        mask &= (frame["version"] == version).to_numpy()
    if since is not None and "time" in frame:
        mask &= (frame["time"] >= pd.Timestamp(since)).to_numpy()
    if until is not None and "time" in frame:
        mask &= (frame["time"] < pd.Timestamp(until)).to_numpy()
    return frame.loc[mask].reset_index(drop=True)


def prune(store: Store | Path, older_than_days: int = 30, now: datetime | None = None) -> list[str]:
    """Remove date partitions older than ``older_than_days``; returns the partitions removed."""
    store = as_store(store)
    cutoff = (now or datetime.now(timezone.utc)).date() - timedelta(days=older_than_days)
    removed = []
    for model_dir in store.children(LOG_DIR):
        if not model_dir.startswith("model="):
            continue
        for _, day_prefix in _partitions(store, f"{LOG_DIR}/{model_dir}", "date", None,
                                         cutoff - timedelta(days=1), date.fromisoformat):
            store.delete_tree(day_prefix)
            removed.append(day_prefix)
    return removed
