"""Adaptive batching across requests: the model calls of concurrent requests to one version, merged.

Off unless a model's ``deploy.yaml`` policy says ``batching: {max_batch_size: N}``. The design is
chosen so that batching never makes a request wait for nothing and never refuses one:

- **No call in flight, no wait.** A request whose version has no call running on the model
  threads calls the model at once, exactly as it would without batching: on the event loop when
  the model is fast (nothing else can arrive while the loop is busy, so there is nothing to merge),
  on a model thread otherwise. There is no timer and no ``max_latency`` to wait for company: a
  lone request, and so every request at one connection, is answered as before.
- **Queue only behind a running call.** While a call of that version runs on a thread, arriving
  requests queue. When it returns, everything queued (up to ``max_batch_size`` rows; the rest
  waits for the call after) goes into one call on a thread, and its output is split back by row
  offsets. So a version has at most one call in flight per worker, and the requests that arrive
  during one call are what the next one merges: the busier the version, the larger its calls, and
  the model's own batching (one call of 64 rows costs far less than 64 calls of one row) pays for
  the wait behind the running call. A slow model's requests would have waited for a thread anyway.
- **No limit of its own.** The queue holds only requests the service already admitted, so the
  edge's concurrency limit (429) bounds it, and batching answers no 503 of its own.
- **Each request keeps its own answer.** A merged call that raises is retried per request, alone,
  so a request the model cannot take fails by itself and its batch-mates get the model's answers.
  A merged call's budget is the model's timeout less the longest wait among its requests, so no
  request is held past its own budget; a request whose budget ran out while it queued times out
  alone, without a call.

:class:`Batcher` is plain asyncio: it is given how to run a call on the model threads and whom to
tell about each call it makes (:class:`CallReport`), and knows nothing of metrics, routing or HTTP.
Everything a request does with its answer (its output check, fallback, breaker record, metrics and
log rows) stays with that request, in :mod:`service.serving.answer`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from service.core.predictor import Batch, ModelTimeout, Predictions

RunOnThread = Callable[[Batch, float], Awaitable[tuple[Predictions, float]]]
"""Runs one model call on the model threads within a budget (seconds): (predictions, seconds it took)."""


class BudgetSpent(ModelTimeout):
    """A request's time budget ran out while it waited for a model call; no call was made for it."""


@dataclass(slots=True, frozen=True)
class CallReport:
    """One model call a :class:`Batcher` made: what its owner records (call time, metrics)."""

    started: float
    """The batcher's clock when the call started."""
    seconds: float
    rows: int
    requests: int
    """Requests whose rows the call carried (1: a request alone)."""
    error: Exception | None = None
    """Why the call failed; None when it answered."""


@dataclass(slots=True, frozen=True)
class Answer:
    """What one request gets from a :class:`Batcher`: its own rows of a call's output, or why not."""

    predictions: Predictions | None
    """The request's rows, in order (None when ``error`` is set)."""
    error: Exception | None
    """Why no call answered it: the exception of its call alone, or :class:`BudgetSpent`."""
    seconds: float
    """Duration of the call that answered or failed (0 when none was made)."""
    rows: int
    """Rows in that call."""
    requests: int
    """Requests in that call: 1 alone, more when merged, 0 when none was made."""


@dataclass(slots=True, eq=False)
class _Waiting:
    batch: Batch
    budget: float
    arrived: float
    max_rows: int
    future: asyncio.Future[Answer]


class Batcher:
    """Merges the model calls of one version's concurrent requests (see the module docstring).

    Usage, from the event loop::

        batcher = Batcher(run_on_thread, on_call=report)
        answer = await batcher.call(batch, budget_seconds, max_rows=64)
        if answer.error is None:
            ...  # answer.predictions are this request's rows

    ``clock`` (``time.perf_counter`` by default) measures waits against budgets.
    """

    def __init__(self, run: RunOnThread, on_call: Callable[[CallReport], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self._run = run
        self._on_call = on_call
        self._clock = clock
        self._queue: deque[_Waiting] = deque()
        self._busy = False
        self._tasks: set[asyncio.Task[None]] = set()  # the running merged call (asyncio keeps weak references)

    @property
    def busy(self) -> bool:
        """Whether a call of this version is on the model threads (a request now queues for the next one)."""
        return self._busy

    @property
    def waiting(self) -> int:
        """Requests queued for the next call."""
        return len(self._queue)

    async def call(self, batch: Batch, budget: float, max_rows: int) -> Answer:
        """Answer one request's rows: at once when no call is in flight, else in the next merged call.

        ``budget``: the request's time budget in seconds, counted from now; ``max_rows``: most rows
        a merged call takes. Never raises for a model failure: the :class:`Answer` says it.
        """
        if self._busy:
            future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
            self._queue.append(_Waiting(batch, budget, self._clock(), max_rows, future))
            return await future
        self._busy = True
        try:
            return await self._alone(batch, budget)
        finally:
            self._next()

    # ------------------------------------------------------------------ the calls

    def _next(self) -> None:
        """Start the call that merges the queue's head (up to its ``max_rows``), or go idle."""
        queue = self._queue
        while queue and queue[0].future.done():  # its request was cancelled (timed out at the edge)
            queue.popleft()
        if not queue:
            self._busy = False
            return
        members = [queue.popleft()]
        head = members[0].batch
        rows, limit = head.size, members[0].max_rows
        while queue:
            waiting = queue[0]
            if waiting.future.done():
                queue.popleft()
                continue
            if rows + waiting.batch.size > limit or not mergeable(head, waiting.batch):
                break
            members.append(queue.popleft())
            rows += waiting.batch.size
        task = asyncio.get_running_loop().create_task(self._serve(members))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, members: list[_Waiting]) -> None:
        try:
            now = self._clock()
            live: list[tuple[_Waiting, float]] = []
            for waiting in members:
                left = waiting.budget - (now - waiting.arrived)
                if left > 0:
                    live.append((waiting, left))
                else:
                    _settle(waiting, _spent(waiting))
            if len(live) == 1:
                waiting, left = live[0]
                _settle(waiting, await self._alone(waiting.batch, left))
            elif live:
                await self._merged(live)
        except BaseException as exc:
            # Nothing above raises for a model failure; this is shutdown (cancelled) or a bug: no
            # request may be left waiting for an answer that will not come.
            for waiting in members:
                if not waiting.future.done():
                    if isinstance(exc, Exception):
                        waiting.future.set_exception(exc)
                    else:
                        waiting.future.cancel()
            if not isinstance(exc, Exception):
                raise
        finally:
            self._next()

    async def _merged(self, live: list[tuple[_Waiting, float]]) -> None:
        """One call for every request in ``live``, split back; per request, alone, if it fails."""
        batches = [waiting.batch for waiting, _ in live]
        merged = merge_batches(batches)
        budget = min(left for _, left in live)  # the model's timeout less the oldest request's wait
        predictions, error, seconds = await self._invoke(merged, budget, len(live))
        if error is None:
            assert predictions is not None
            try:
                parts = split_predictions(predictions, [b.size for b in batches])
            except ValueError as exc:  # the model answered another number of rows than it was given
                error = exc
            else:
                for (waiting, _), part in zip(live, parts):
                    _settle(waiting, Answer(part, None, seconds, merged.size, len(live)))
                return
        # One of them may be what the model cannot take: each goes alone, side by side, with what
        # is left of its own budget, so that one fails by itself.
        await asyncio.gather(*(self._retry(waiting) for waiting, _ in live))

    async def _retry(self, waiting: _Waiting) -> None:
        if waiting.future.done():
            return
        left = waiting.budget - (self._clock() - waiting.arrived)
        _settle(waiting, await self._alone(waiting.batch, left) if left > 0 else _spent(waiting))

    async def _alone(self, batch: Batch, budget: float) -> Answer:
        predictions, error, seconds = await self._invoke(batch, budget, 1)
        return Answer(predictions, error, seconds, batch.size, 1)

    async def _invoke(self, batch: Batch, budget: float,
                      requests: int) -> tuple[Predictions | None, Exception | None, float]:
        started = self._clock()
        try:
            predictions, seconds = await self._run(batch, budget)
        except Exception as exc:  # noqa: BLE001 - any model failure is the request's answer, not the batcher's
            seconds = self._clock() - started
            self._report(CallReport(started, seconds, batch.size, requests, exc))
            return None, exc, seconds
        self._report(CallReport(started, seconds, batch.size, requests))
        return predictions, None, seconds

    def _report(self, report: CallReport) -> None:
        if self._on_call is not None:
            self._on_call(report)


def _settle(waiting: _Waiting, answer: Answer) -> None:
    if not waiting.future.done():
        waiting.future.set_result(answer)


def _spent(waiting: _Waiting) -> Answer:
    spent = BudgetSpent(f"waited past the model's budget of {waiting.budget * 1000:.0f} ms for a model call")
    return Answer(None, spent, 0.0, 0, 0)


# ---------------------------------------------------------------------- merging and splitting


def mergeable(a: Batch, b: Batch) -> bool:
    """Whether two batches can go in one call: both numeric matrices of one width, or the same columns."""
    if a.matrix is not None and b.matrix is not None:
        return a.matrix.shape[1:] == b.matrix.shape[1:]
    if a.columns is not None and b.columns is not None:
        return a.columns.keys() == b.columns.keys()
    return False


def merge_batches(batches: Sequence[Batch]) -> Batch:
    """One batch holding every row of ``batches`` in order (each must be :func:`mergeable` with the first)."""
    if len(batches) == 1:
        return batches[0]
    size = sum(b.size for b in batches)
    has_nulls = any(b.has_nulls for b in batches)
    first = batches[0]
    if first.matrix is not None:
        matrices = [b.matrix for b in batches]
        if any(m is None for m in matrices):
            raise ValueError("cannot merge a numeric matrix with per-feature columns")
        return Batch(size=size, matrix=np.concatenate(matrices), has_nulls=has_nulls)  # type: ignore[arg-type]
    assert first.columns is not None
    columns: dict[str, list[object]] = {name: [] for name in first.columns}
    for batch in batches:
        if batch.columns is None or batch.columns.keys() != columns.keys():
            raise ValueError("cannot merge batches with different columns")
        for name, values in batch.columns.items():
            columns[name].extend(values)
    return Batch(size=size, columns=columns, has_nulls=has_nulls)


def split_predictions(predictions: Predictions, sizes: Sequence[int]) -> list[Predictions]:
    """Cut a merged call's predictions back into one part per request, by row offsets.

    :class:`ValueError` when the predictions do not have exactly ``sum(sizes)`` rows.
    """
    total = sum(sizes)
    for name, rows in (("values", predictions.values), ("labels", predictions.labels),
                       ("probabilities", predictions.probabilities)):
        if rows is not None and len(rows) != total:
            raise ValueError(f"the model answered {len(rows)} rows of {name} for {total} rows")
    parts = []
    start = 0
    for size in sizes:
        end = start + size
        parts.append(Predictions(
            labels=None if predictions.labels is None else predictions.labels[start:end],
            probabilities=None if predictions.probabilities is None else predictions.probabilities[start:end],
            values=None if predictions.values is None else predictions.values[start:end]))
        start = end
    return parts
