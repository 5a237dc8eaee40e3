"""The ground-truth join: feedback stored in the store, matched to logged predictions by request id and index.

Everything here lives in the store (:mod:`monitoring.store`), so any worker of
any replica can take feedback for a request another one served::

    feedback/model=<name>/date=<YYYY-MM-DD>/fb-<ms>-<token>-<seq>.parquet   what the jobs read (one file per body)
    feedback/claims/model=<name>/date=<YYYY-MM-DD>/<request id>.json         who holds each instance, and its state
    feedback/pending/<token>/<batch>.json                                     instances waiting for their prediction
    workers/<token>.json                                                      every worker that ever served

Finding a prediction (:class:`PredictionLookup`) reads only the few segments
the request id's worker token and serving time allow
(:func:`monitoring.predlog.candidate_segments`): no scan of the log, no index
in memory. A small cache keeps the segments read last, bounded in rows.

Each instance is counted once in the whole fleet because it is *claimed*
(:class:`Claims`): the claim record of a request id maps each instance to the
batch that holds it and its state (``pending``, ``counted``, ``unmatched``),
and changes only by compare-and-swap. The first batch to claim an instance
holds it (the others are duplicates), and only the worker whose swap moves it
from ``pending`` to ``counted`` counts it, whichever worker holds the batch.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

from monitoring.predlog import candidate_segments
from monitoring.store import Store, as_store
from service.core.requestid import RequestId, new_token

FEEDBACK_DIR = "feedback"
CLAIMS_DIR = f"{FEEDBACK_DIR}/claims"
PENDING_DIR = f"{FEEDBACK_DIR}/pending"
WORKERS_DIR = "workers"

PENDING, COUNTED, UNMATCHED = "pending", "counted", "unmatched"
"""States of a claimed instance: waiting for its prediction, counted with it, given up on."""

LOOKUP_COLUMNS = ["request_id", "index", "version", "variant", "reason", "prediction", "prediction_score"]


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
    """One accepted actual, with its prediction when that is readable yet."""

    request_id: str
    index: int
    actual: Any
    prediction: LoggedPrediction | None = None


# ---------------------------------------------------------------------- finding predictions


class PredictionLookup:
    """Finds the logged predictions of request ids, reading only the segments each id can be in.

    ``window_seconds`` bounds how long after its serving time a request's row
    reaches a segment (the request timeout plus the flush interval, with a
    margin). The last segments read are cached, at most ``cache_rows`` rows.
    """

    def __init__(self, store: Store, window_seconds: float, cache_rows: int = 200_000) -> None:
        self.store = store
        self.window_seconds = window_seconds
        self.cache_rows = cache_rows
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cached_rows = 0
        self._lock = threading.Lock()

    def find(self, model: str, request_id: str,
             listings: dict[str, list[str]] | None = None) -> dict[int, LoggedPrediction] | None:
        """The logged predictions of one request by instance index, or None when no segment holds it (yet).

        ``listings`` keeps the listings this call makes for the next calls that pass it (one round over
        many pending instances of the same second lists each prefix once).
        """
        import pyarrow.compute as pc

        def list_keys(prefix: str) -> list[str]:
            if listings is None:
                return self.store.list(prefix)
            if prefix not in listings:
                listings[prefix] = self.store.list(prefix)
            return listings[prefix]

        for key in candidate_segments(self.store, model, request_id, self.window_seconds, list_keys):
            table = self._segment(key)
            if table is None:
                continue
            rows = table.filter(pc.equal(table["request_id"], request_id))
            if rows.num_rows:
                columns = rows.to_pydict()
                return {index: LoggedPrediction(version, variant, prediction, score, reason)
                        for index, version, variant, reason, prediction, score in zip(
                            columns["index"], columns["version"], columns["variant"], columns["reason"],
                            columns["prediction"], columns["prediction_score"])}
        return None

    def _segment(self, key: str) -> Any:
        with self._lock:
            table = self._cache.get(key)
            if table is not None:
                self._cache.move_to_end(key)
                return table
        try:
            table = self.store.read_table(key, columns=LOOKUP_COLUMNS)
        except Exception:  # noqa: BLE001 - an unreadable segment must not break feedback (the jobs skip it too)
            return None
        with self._lock:
            self._cache[key] = table
            self._cached_rows += table.num_rows
            while self._cached_rows > self.cache_rows and len(self._cache) > 1:
                _, dropped = self._cache.popitem(last=False)
                self._cached_rows -= dropped.num_rows
        return table


# ---------------------------------------------------------------------- claims


class Claims:
    """Which batch holds each instance of a request id, and whether it was counted: one record per request id."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @staticmethod
    def key(model: str, request_id: str, parsed: RequestId) -> str:
        day = datetime.fromtimestamp(parsed.seconds, timezone.utc).date().isoformat()
        return f"{CLAIMS_DIR}/model={model}/date={day}/{request_id}.json"

    def claim(self, model: str, request_id: str, parsed: RequestId, states: dict[int, str],
              batch: str) -> dict[int, tuple[str, str]]:
        """Claim instances for ``batch`` with their initial state; returns (holder, state) of each asked instance."""
        result: dict[int, tuple[str, str]] = {}

        def change(current: bytes | None) -> bytes | None:
            record = _record(current)
            changed = False
            result.clear()
            for index, state in states.items():
                held = record.get(str(index))
                if held is None:
                    held = record[str(index)] = [batch, state]
                    changed = True
                result[index] = (held[0], held[1])
            return json.dumps(record, separators=(",", ":")).encode() if changed else None

        self.store.update(self.key(model, request_id, parsed), change)
        return result

    def settle(self, model: str, request_id: str, parsed: RequestId, indices: list[int], batch: str,
               state: str) -> list[int]:
        """Move ``batch``'s pending instances to ``state``; returns those this call moved (the caller counts them)."""
        moved: list[int] = []

        def change(current: bytes | None) -> bytes | None:
            record = _record(current)
            moved.clear()
            for index in indices:
                held = record.get(str(index))
                if held is None:  # the holder stored its batch but died before claiming: claim it now
                    held = record[str(index)] = [batch, PENDING]
                if held[0] == batch and held[1] == PENDING:
                    held[1] = state
                    moved.append(index)
            return json.dumps(record, separators=(",", ":")).encode() if moved else None

        self.store.update(self.key(model, request_id, parsed), change)
        return moved


def _record(data: bytes | None) -> dict[str, list[str]]:
    return json.loads(data) if data else {}


# ---------------------------------------------------------------------- stored feedback


def batch_name(token: str, seq: int, now: float) -> str:
    """The name of one accepted body's files: when, which worker, its sequence number."""
    return f"fb-{int(now * 1000)}-{token}-{seq:06d}"


_seq = itertools.count(1)
_TOKEN = new_token()


def write_feedback(store: Store | Path, model: str, task: str, rows: list[FeedbackRow], batch: str | None = None,
                   now: float | None = None) -> str:
    """Store one body's accepted actuals as one Parquet file (one atomic write, synced); returns its key.

    ``batch`` names the file (:func:`batch_name`); by default a new name of this process.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = as_store(store)
    now = time.time() if now is None else now
    batch = batch or batch_name(_TOKEN, next(_seq), now)
    day = datetime.fromtimestamp(now, timezone.utc).date().isoformat()
    columns: dict[str, Any] = {
        "time": pa.array(np.full(len(rows), np.datetime64(int(now * 1_000_000), "us")),
                         type=pa.timestamp("us", tz="UTC")),
        "request_id": pa.array([r.request_id for r in rows], type=pa.string()),
        "index": pa.array([r.index for r in rows], type=pa.int32()),
        "version": pa.array([r.prediction.version if r.prediction else None for r in rows], type=pa.string()),
        "variant": pa.array([r.prediction.variant if r.prediction else None for r in rows], type=pa.string()),
    }
    if task == "classification":
        columns["actual"] = pa.array([str(r.actual) for r in rows], type=pa.string())
    else:
        columns["actual_value"] = pa.array([float(r.actual) for r in rows], type=pa.float64())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pydict(columns), sink)
    key = f"{FEEDBACK_DIR}/model={model}/date={day}/{batch}.parquet"
    store.put(key, sink.getvalue().to_pybytes(), durable=True)
    return key


def read_feedback(store: Store | Path, model: str) -> Any:
    """Every stored feedback row of a model as a DataFrame (the first actual of a repeated instance stands)."""
    import pandas as pd
    import pyarrow as pa

    store = as_store(store)
    keys = [k for k in store.list(f"{FEEDBACK_DIR}/model={model}/") if k.endswith(".parquet")]
    tables = [store.read_table(key) for key in keys]
    if not tables:
        return pd.DataFrame(columns=["time", "request_id", "index", "version", "variant"])
    frame = pa.concat_tables(tables, promote_options="permissive").to_pandas()
    frame = frame.sort_values("time", kind="stable")
    return frame.drop_duplicates(["request_id", "index"], keep="first").reset_index(drop=True)


@dataclass
class PendingBatch:
    """Instances of one accepted body whose prediction was not readable yet: kept in the store until settled."""

    key: str
    batch: str
    model: str
    task: str
    items: list[tuple[str, int, Any]]
    """(request id, index, actual) of each instance still waiting."""

    def dump(self) -> bytes:
        return json.dumps({"batch": self.batch, "model": self.model, "task": self.task,
                           "items": self.items}).encode()


def pending_key(token: str, batch: str) -> str:
    return f"{PENDING_DIR}/{token}/{batch}.json"


def write_pending(store: Store, token: str, batch: str, model: str, task: str,
                  items: list[tuple[str, int, Any]]) -> PendingBatch:
    """Store a body's waiting instances under the accepting worker's token (before the answer).

    Not synced to disk: it outlives a crash of the worker, and only a power cut, which also takes the
    live counts it feeds, could lose it (the actuals themselves are in the synced feedback file).
    """
    pending = PendingBatch(pending_key(token, batch), batch, model, task, [list(i) for i in items])  # type: ignore[misc]
    store.put(pending.key, pending.dump())
    return pending


def read_pending(store: Store, key: str) -> PendingBatch | None:
    """A stored pending batch, or None when it is gone (settled by another worker) or unreadable."""
    try:
        body = json.loads(store.get(key))
    except (FileNotFoundError, ValueError):
        return None
    return PendingBatch(key, body["batch"], body["model"], body["task"],
                        [(str(r), int(i), a) for r, i, a in body["items"]])


def pending_tokens(store: Store) -> list[str]:
    """Tokens of the workers that have pending batches in the store."""
    return store.children(PENDING_DIR)


def pending_batches(store: Store, token: str) -> list[str]:
    """Keys of one worker's pending batches."""
    return [k for k in store.list(f"{PENDING_DIR}/{token}/") if k.endswith(".json")]


# ---------------------------------------------------------------------- workers


@dataclass
class WorkerRecord:
    """A worker process that serves (or served): its token, where it runs, when it started and last said so."""

    token: str
    host: str
    pid: int
    label: str
    started: float
    heartbeat: float
    stopped: float | None = None

    def issued(self, parsed: RequestId, now: float, skew: float) -> bool:
        """Whether this worker can have issued an id with that serving time.

        Its start and stop times come from the clock its ids do; ``now`` from this
        host's, which may be behind the other host's by up to ``skew`` seconds.
        """
        if parsed.seconds < self.started - 1:
            return False
        return parsed.seconds <= (self.stopped + 1 if self.stopped is not None else now + skew)


class WorkerDirectory:
    """``workers/<token>.json``: every worker registers before it serves, so an unknown token was never issued."""

    def __init__(self, store: Store, cache: int = 10_000) -> None:
        self.store = store
        self._known: OrderedDict[str, WorkerRecord] = OrderedDict()
        self._cache = cache
        self._lock = threading.Lock()

    @staticmethod
    def key(token: str) -> str:
        return f"{WORKERS_DIR}/{token}.json"

    def register(self, token: str, label: str, now: float | None = None) -> WorkerRecord:
        """Say this worker serves from now on (before it answers anything)."""
        now = time.time() if now is None else now
        record = WorkerRecord(token, socket.gethostname(), os.getpid(), label, now, now)
        self.write(record)
        return record

    def write(self, record: WorkerRecord) -> None:
        self.store.put(self.key(record.token), json.dumps(record.__dict__).encode())

    def read(self, token: str) -> WorkerRecord | None:
        """The stored record of ``token`` now (no cache)."""
        try:
            return WorkerRecord(**json.loads(self.store.get(self.key(token))))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def known(self, token: str) -> WorkerRecord | None:
        """The record of ``token`` as registered (cached once found; tokens only ever get added)."""
        with self._lock:
            record = self._known.get(token)
        if record is not None and record.stopped is None:
            return record
        fresh = self.read(token)
        if fresh is not None:
            with self._lock:
                self._known[token] = fresh
                while len(self._known) > self._cache:
                    self._known.popitem(last=False)
        return fresh or record


def prune_feedback(store: Store | Path, older_than_days: int = 30, now: datetime | None = None) -> list[str]:
    """Forget what only served requests older than ``older_than_days`` need; returns what was removed.

    Claim records of those requests (their predictions are pruned with the log, so feedback for them is
    refused anyway), and the records of workers silent since then (their ids are that old too). The
    feedback rows themselves stay: the quality job reads them.
    """
    store = as_store(store)
    now = now or datetime.now(timezone.utc)
    cutoff = now.date() - timedelta(days=older_than_days)
    removed: list[str] = []
    for model_dir in store.children(CLAIMS_DIR):
        for day_dir in store.children(f"{CLAIMS_DIR}/{model_dir}"):
            try:
                day = date.fromisoformat(day_dir.removeprefix("date="))
            except ValueError:
                continue
            if day < cutoff:
                store.delete_tree(f"{CLAIMS_DIR}/{model_dir}/{day_dir}")
                removed.append(f"{CLAIMS_DIR}/{model_dir}/{day_dir}")
    directory = WorkerDirectory(store)
    for name in store.children(WORKERS_DIR):
        record = directory.read(name.removesuffix(".json"))
        if record is not None and record.heartbeat < now.timestamp() - older_than_days * 86400:
            store.delete([WorkerDirectory.key(record.token)])
            removed.append(WorkerDirectory.key(record.token))
    return removed
