"""``POST /feedback``: ground truth for served predictions, accepted at once by any worker, stored, counted once.

Two body shapes:

- ``{"model", "request_id", "actuals": [a0, a1, ...]}`` — one actual per instance of that request, in order;
- ``{"model", "items": [{"request_id", "index", "actual"}, ...]}`` — partial feedback.

Decisions (documented in the README):

- A request id names the worker that served it and when
  (:mod:`service.core.requestid`). An id no worker issued (not an id, an
  unknown worker token, a time that worker did not serve at), or an id older
  than ``feedback_match_seconds`` whose prediction is not in the log (never
  served, not logged, past retention), is refused with 404 and counted in
  ``vigil_feedback_unmatched_total``; nothing of a refused body is stored.
- Anything else is accepted at once, from any worker of any replica, and
  stored in the store before the answer. Instances whose prediction is
  already readable are counted at once; the others are kept as pending (in the
  store, under this worker's token) and counted by :meth:`FeedbackService.settle`
  when their prediction appears, or counted as unmatched after
  ``feedback_match_seconds`` (their actuals stay stored for the jobs). A
  worker that dies leaves its pending batches to the others
  (:meth:`FeedbackService.adopt`).
- Feedback for an instance that already has feedback, sent to this or any
  other replica, is acknowledged as a duplicate and not counted again (the
  first actual stands): the store's claim records decide.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from monitoring.canary import CanaryComparison
from monitoring.feedback import (
    COUNTED,
    PENDING,
    UNMATCHED,
    Claims,
    FeedbackRow,
    LoggedPrediction,
    PendingBatch,
    PredictionLookup,
    WorkerDirectory,
    WorkerRecord,
    batch_name,
    pending_batches,
    pending_tokens,
    read_pending,
    write_feedback,
    write_pending,
)
from monitoring.metrics import FeedbackMetrics, VigilMetrics
from monitoring.store import Store
from service.core.card import ModelCard
from service.core.errors import BadRequest, InvalidInput, ModelNotFound, VigilError, validation_problems
from service.core.requestid import RequestId, parse_request_id

log = logging.getLogger("vigil.feedback")

Targets = Callable[[], tuple[dict[str, ModelCard], dict[str, tuple[CanaryComparison, float]]]]
"""What feedback is checked and counted against: each model's card, and each live canary comparison."""

HEARTBEAT_SECONDS = 5.0
"""How often a worker tells the store it is alive."""
DEAD_AFTER_SECONDS = 20.0
"""A worker silent for this long (or stopped) leaves its pending feedback to the others."""
CLOCK_SKEW_SECONDS = 60.0
"""How far another host's clock may be ahead: a request id from further in the future was never issued."""
MAX_PENDING_IN_MEMORY = 100_000
"""Pending instances a worker keeps in memory; past this it re-reads its pending batches from the store."""


class UnknownRequest(VigilError):
    """Feedback names a request id that Vigil never issued, or whose prediction the log does not hold."""

    status_code = 404
    code = "unknown_request_id"


class StoreUnavailable(VigilError):
    """The store could not be reached: nothing of the body was accepted, and the client should send it again."""

    status_code = 503
    code = "store_unavailable"
    headers = {"Retry-After": "1"}


class FeedbackItem(BaseModel):
    """Ground truth for one instance of a served request."""

    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(min_length=1, max_length=64)
    index: int = Field(ge=0, le=99_999)
    actual: Any


class FeedbackWhole(BaseModel):
    """Feedback for every instance of one request, in order."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=64)
    request_id: str = Field(min_length=1, max_length=64)
    actuals: list[Any] = Field(min_length=1, max_length=10_000)

    def flat(self) -> list[FeedbackItem]:
        """Every (request id, index, actual) of the body."""
        return [FeedbackItem(request_id=self.request_id, index=i, actual=a) for i, a in enumerate(self.actuals)]


class FeedbackItems(BaseModel):
    """Feedback for chosen instances, possibly of several requests."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=64)
    items: list[FeedbackItem] = Field(min_length=1, max_length=10_000)

    def flat(self) -> list[FeedbackItem]:
        """Every (request id, index, actual) of the body."""
        return self.items


FeedbackRequest = FeedbackWhole | FeedbackItems
FEEDBACK_BODY: TypeAdapter[FeedbackRequest] = TypeAdapter(FeedbackRequest)


def _check_actual(card: ModelCard, value: Any) -> str | None:
    """Why ``value`` cannot be an actual for this model, or None."""
    if card.task == "regression":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {value!r}"
        if not math.isfinite(float(value)):
            return f"expected a finite number, got {value!r}"
        return None
    labels = card.labels or []
    if isinstance(value, bool) or not any(type(value) is type(label) and value == label for label in labels):
        return f"expected one of the labels {labels}, got {value!r}"
    return None


class FeedbackService:
    """Accepts feedback for the models of one worker, and settles the feedback it (or a dead worker) left pending.

    Usage::

        service = FeedbackService(store, metrics, token, targets=server.feedback_targets)
        service.start()                      # registers the worker, starts the settling thread
        service.accept(service.parse(body), *server.feedback_targets())
        service.stop()
    """

    def __init__(self, store: Store, metrics: VigilMetrics | None, token: str, match_seconds: float = 60.0,
                 window_seconds: float = 30.0, targets: Targets | None = None, label: str = "0",
                 settle_seconds: float = 0.5) -> None:
        self.store = store
        self.metrics = metrics
        self.token = token
        self.label = label
        self.match_seconds = match_seconds
        self.settle_seconds = settle_seconds
        """How often the settling thread looks again for pending predictions (and beats, every 5 s at most)."""
        self.targets = targets
        self.lookup = PredictionLookup(store, window_seconds)
        self.claims = Claims(store)
        self.workers = WorkerDirectory(store)
        self.record: WorkerRecord | None = None
        self._recorders: dict[tuple[str, str], FeedbackMetrics] = {}
        self._seq = itertools.count(1)
        self._pending: dict[str, PendingBatch] = {}
        self._pending_items = 0
        self._overflow = False
        self._adopted: set[str] = set()
        self._lock = threading.Lock()
        self._settle_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def register(self) -> bool:
        """Record this worker's token in the store: from now on its request ids are known to every replica.

        Returns False when the store cannot be reached: the settling thread tries again (meanwhile other
        replicas refuse feedback for this worker's requests, and the worker itself keeps serving).
        """
        if self.record is None:
            try:
                self.record = self.workers.register(self.token, self.label)
            except Exception as exc:  # noqa: BLE001 - the store may be away at start; serving must not wait for it
                log.error("cannot register worker %s in the store %s (retrying): %s", self.token, self.store.url, exc)
                return False
        return True

    def start(self) -> None:
        """Register (when not yet done) and start settling pending feedback in a daemon thread."""
        self.register()
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="vigil-feedback", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Settle what can be settled now, then say in the store that this worker stopped (others adopt the rest)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        try:
            self.settle()
        finally:
            if self.record is not None:
                self.record.stopped = self.record.heartbeat = time.time()
                self.workers.write(self.record)

    def _run(self) -> None:
        last_beat = time.monotonic()
        while not self._stop.wait(self.settle_seconds):
            try:
                if not self.register():
                    continue
                self.settle()
                now = time.monotonic()
                if now - last_beat >= HEARTBEAT_SECONDS:  # say this worker is alive, take over the silent ones
                    last_beat = now
                    self.heartbeat()
                    self.adopt()
            except Exception:  # noqa: BLE001 - the store may be away for a while; pending feedback stays stored
                log.exception("settling pending feedback failed; retrying")

    def heartbeat(self) -> None:
        """Tell the store this worker is alive."""
        if self.record is not None:
            self.record.heartbeat = time.time()
            self.workers.write(self.record)

    # ------------------------------------------------------------------ accepting

    def parse(self, payload: Any) -> FeedbackRequest:
        """Validate the body's shape."""
        try:
            return FEEDBACK_BODY.validate_python(payload)
        except ValidationError as exc:
            details = [{"field": key, "problem": problem} for key, problem in validation_problems(exc, top="body")]
            raise BadRequest("the body is not {model, request_id, actuals} or {model, items}", details,
                             code="invalid_request") from None

    def accept(self, request: FeedbackRequest, cards: dict[str, ModelCard],
               comparisons: dict[str, tuple[CanaryComparison, float]] | None = None) -> dict[str, Any]:
        """Validate, store, claim and count; returns what was accepted, what was a duplicate, what waits.

        ``comparisons``: model -> (live canary comparison, its regression tolerance), fed with the
        ground truth of both variants' answers. When the store cannot be reached the body is refused with
        503 (:class:`StoreUnavailable`): a 2xx always means it is stored.
        """
        try:
            return self._accept(request, cards, comparisons)
        except VigilError:
            raise
        except Exception as exc:  # noqa: BLE001 - the store's errors differ by backend (OSError, botocore, aiohttp)
            log.error("feedback refused, the store %s is unavailable: %s", self.store.url, exc)
            raise StoreUnavailable(f"the store is unavailable ({type(exc).__name__}); nothing was stored, "
                                   "send the feedback again") from None

    def _accept(self, request: FeedbackRequest, cards: dict[str, ModelCard],
                comparisons: dict[str, tuple[CanaryComparison, float]] | None) -> dict[str, Any]:
        card = cards.get(request.model)
        if card is None:
            raise ModelNotFound(f"no model named '{request.model}'")
        items = request.flat()
        problems = [{"instance": i, "field": "actual", "problem": why}
                    for i, item in enumerate(items) if (why := _check_actual(card, item.actual)) is not None]
        if problems:
            raise InvalidInput(f"{len(problems)} actual(s) do not fit model '{card.name}' ({card.task})", problems[:100])
        now = time.time()
        ids: dict[str, RequestId | None] = {}
        logged: dict[str, dict[int, LoggedPrediction] | None] = {}
        unknown: list[dict[str, Any]] = []
        for i, item in enumerate(items):
            rid = item.request_id
            if rid not in ids:
                ids[rid] = self._issued(rid, now)
                logged[rid] = self.lookup.find(card.name, rid) if ids[rid] is not None else None
            parsed, found = ids[rid], logged[rid]
            if parsed is None:
                problem = (f"{rid} is not a request id Vigil issued (a /v2 request's own id is echoed, not "
                           "issued: send the response's parameters.request_id or its X-Request-ID header)")
            elif found is not None and item.index not in found:
                problem = f"request {rid} has no instance {item.index} in the prediction log"
            elif found is None and now > parsed.seconds + self.match_seconds:
                problem = (f"no logged prediction {rid}[{item.index}]: not logged, or past the log's retention "
                           f"(served {now - parsed.seconds:.0f} s ago)")
            else:
                continue
            unknown.append({"instance": i, "field": "request_id", "problem": problem})
        if unknown:
            if self.metrics is not None:
                self.metrics.feedback_unmatched.labels(card.name).inc(len(unknown))
            raise UnknownRequest(
                f"{len(unknown)} item(s) name requests that Vigil never served, or whose predictions are not in the "
                "prediction log (not logged, or past its retention); nothing was stored", unknown[:100])

        rows: list[FeedbackRow] = []
        duplicates = 0
        seen: set[tuple[str, int]] = set()
        for item in items:
            key = (item.request_id, item.index)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            found = logged[item.request_id]
            rows.append(FeedbackRow(item.request_id, item.index, item.actual,
                                    found[item.index] if found is not None else None))
        # Stored before anything is claimed or answered: a crash from here on loses no accepted actual.
        batch = batch_name(self.token, next(self._seq), now)
        data_key = write_feedback(self.store, card.name, card.task, rows, batch, now)
        waiting = [(r.request_id, r.index, r.actual) for r in rows if r.prediction is None]
        pending = write_pending(self.store, self.token, batch, card.name, card.task, waiting) if waiting else None

        won: list[FeedbackRow] = []
        by_request: dict[str, list[FeedbackRow]] = {}
        for row in rows:
            by_request.setdefault(row.request_id, []).append(row)
        for rid, group in by_request.items():
            parsed = ids[rid]
            assert parsed is not None
            held = self.claims.claim(card.name, rid, parsed,
                                     {r.index: COUNTED if r.prediction is not None else PENDING for r in group}, batch)
            won.extend(r for r in group if held[r.index][0] == batch)
        duplicates += len(rows) - len(won)
        if len(won) < len(rows):  # the jobs keep the actual that was counted
            if won:
                write_feedback(self.store, card.name, card.task, won, batch, now)
            else:
                self.store.delete([data_key])
        waiting_won = [(r.request_id, r.index, r.actual) for r in won if r.prediction is None]
        if pending is not None:
            if waiting_won:
                if len(waiting_won) < len(waiting):
                    pending = write_pending(self.store, self.token, batch, card.name, card.task, waiting_won)
                self._remember(pending)
            else:
                self.store.delete([pending.key])
        counted = [r for r in won if r.prediction is not None]
        self._count(card, counted)
        if counted and comparisons and card.name in comparisons:
            self._compare(card, counted, *comparisons[card.name])
        return {"model": card.name, "accepted": len(won), "duplicates": duplicates, "pending": len(waiting_won)}

    def _issued(self, request_id: str, now: float) -> RequestId | None:
        """The parts of ``request_id`` when a registered worker can have issued it, else None."""
        parsed = parse_request_id(request_id)
        if parsed is None:
            return None
        record = self.workers.known(parsed.token)
        if record is None or not record.issued(parsed, now, CLOCK_SKEW_SECONDS):
            return None
        return parsed

    def _remember(self, pending: PendingBatch) -> None:
        with self._lock:
            if self._pending_items + len(pending.items) > MAX_PENDING_IN_MEMORY:
                self._overflow = True  # still in the store: settle() lists it from there
                return
            self._pending[pending.key] = pending
            self._pending_items += len(pending.items)

    # ------------------------------------------------------------------ settling

    def pending_count(self) -> int:
        """Instances this worker holds pending in memory."""
        with self._lock:
            return self._pending_items

    def settle(self, now: float | None = None) -> int:
        """Count the pending instances whose prediction appeared, give up on those past the limit; returns both."""
        with self._settle_lock:
            now = time.time() if now is None else now
            with self._lock:
                batches = dict(self._pending)
                overflow = self._overflow
                self._overflow = False
            keys = list(batches)
            if overflow:
                keys = sorted(set(keys) | set(pending_batches(self.store, self.token)))
            keys += sorted(self._adopted - set(keys))
            settled = 0
            listings: dict[str, list[str]] = {}  # one listing per prefix for the whole round
            for key in keys:
                batch = batches.get(key) or read_pending(self.store, key)
                if batch is None:
                    self._forget(key)
                    continue
                settled += self._settle_batch(batch, now, listings)
            return settled

    def _settle_batch(self, batch: PendingBatch, now: float, listings: dict[str, list[str]]) -> int:
        found: dict[str, dict[int, LoggedPrediction] | None] = {}
        matched: dict[str, list[tuple[int, Any, LoggedPrediction]]] = {}
        expired: dict[str, list[int]] = {}
        waiting: list[tuple[str, int, Any]] = []
        for rid, index, actual in batch.items:
            parsed = parse_request_id(rid)
            if parsed is None:  # not written by accept(); nothing to wait for
                continue
            if rid not in found:
                found[rid] = self.lookup.find(batch.model, rid, listings)
            logged = found[rid]
            if logged is not None and index in logged:
                matched.setdefault(rid, []).append((index, actual, logged[index]))
            elif logged is not None or now > parsed.seconds + self.match_seconds:
                expired.setdefault(rid, []).append(index)
            else:
                waiting.append((rid, index, actual))
        counted: list[FeedbackRow] = []
        for rid, entries in matched.items():
            parsed = parse_request_id(rid)
            assert parsed is not None
            moved = set(self.claims.settle(batch.model, rid, parsed, [e[0] for e in entries], batch.batch, COUNTED))
            counted.extend(FeedbackRow(rid, index, actual, prediction)
                           for index, actual, prediction in entries if index in moved)
        given_up = 0
        for rid, indices in expired.items():
            parsed = parse_request_id(rid)
            assert parsed is not None
            given_up += len(self.claims.settle(batch.model, rid, parsed, indices, batch.batch, UNMATCHED))
        if counted or given_up:
            cards, comparisons = self.targets() if self.targets is not None else ({}, {})
            card = cards.get(batch.model)
            if card is not None:
                self._count(card, counted)
                if comparisons and batch.model in comparisons:
                    self._compare(card, counted, *comparisons[batch.model])
            if given_up and self.metrics is not None:
                self.metrics.feedback_unmatched.labels(batch.model).inc(given_up)
        if len(waiting) == len(batch.items):
            return 0
        if waiting:
            batch.items = waiting
            self.store.put(batch.key, batch.dump())
            with self._lock:
                if batch.key in self._pending:
                    self._pending_items -= len(self._pending[batch.key].items) - len(waiting)
                    self._pending[batch.key] = batch
        else:
            self.store.delete([batch.key])
            self._forget(batch.key)
        return len(counted) + given_up

    def _forget(self, key: str) -> None:
        with self._lock:
            gone = self._pending.pop(key, None)
            if gone is not None:
                self._pending_items -= len(gone.items)
        self._adopted.discard(key)

    def adopt(self, now: float | None = None) -> list[str]:
        """Take over the pending batches of workers that stopped or went silent; returns the keys taken.

        Several workers may adopt the same batch: the claims let only one of them count each instance.
        """
        now = time.time() if now is None else now
        taken = []
        for token in pending_tokens(self.store):
            if token == self.token:
                continue
            record = self.workers.read(token)
            if record is not None and record.stopped is None and now - record.heartbeat < DEAD_AFTER_SECONDS:
                continue
            for key in pending_batches(self.store, token):
                if key not in self._adopted:
                    self._adopted.add(key)
                    taken.append(key)
        if taken:
            log.info("adopted %d pending feedback batch(es) of stopped or silent workers", len(taken))
        return taken

    # ------------------------------------------------------------------ counting

    def _compare(self, card: ModelCard, rows: list[FeedbackRow], comparison: CanaryComparison,
                 regression_tolerance: float) -> None:
        """Feed ground truth of a live canary's and its stable's answers to their comparison."""
        versions = {"stable": comparison.stable_version, "canary": comparison.canary_version}
        span = 1.0
        if card.prediction_range is not None:
            span = max(card.prediction_range.max - card.prediction_range.min, 1e-9)
        for row in rows:
            prediction = row.prediction
            assert prediction is not None
            if prediction.reason is not None or versions.get(prediction.variant) != prediction.version:
                continue  # fallback answers and other versions say nothing about this pair
            if card.task == "regression":
                missed = abs(float(row.actual) - float(prediction.prediction)) > regression_tolerance * span
            else:
                missed = str(row.actual) != str(prediction.prediction)
            comparison.variant(prediction.variant).record_feedback(missed)

    def _count(self, card: ModelCard, rows: list[FeedbackRow]) -> None:
        if self.metrics is None:
            return
        for row in rows:
            prediction = row.prediction
            assert prediction is not None
            key = (card.name, prediction.version)
            recorder = self._recorders.get(key)
            if recorder is None:
                version_card = card if card.version == prediction.version else card.model_copy(
                    update={"version": prediction.version})
                recorder = self._recorders[key] = self.metrics.feedback_recorder(version_card)
            recorder.record(prediction.variant, prediction.prediction, row.actual)
