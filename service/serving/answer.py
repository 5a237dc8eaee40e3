"""One request's answer: which rows the model answers and which the fallback does, and why.

Rows with a null the model cannot take, rows whose output is non-finite or out
of range, and every row of a call that failed or timed out go to the
fallback, each with its reason; a model that is degraded (failed to load, drift
or quality verdict, open breaker) sends the whole request there. Fast model
calls run on the event loop, slow ones on the model threads, within the
model's time budget either way. With the model's ``batching`` policy, the
calls of concurrent requests to a version on the model threads are merged
(:mod:`service.serving.batching`); each request still checks its own rows,
takes its own fallbacks and records its own breaker outcome, metrics and log
rows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from monitoring.predlog import LoggedRequest
from service.core.predictor import Batch, ModelTimeout, Predictions, Predictor, binary_or_top_score
from service.serving.batching import Answer, Batcher, CallReport
from service.serving.deploy import ModelPolicy
from service.serving.routing import ModelEntry, ServedVersion, degraded_reason, invalid_rows, merge

log = logging.getLogger("vigil.serving")


@dataclass
class Outcome:
    """What answered each row of a request, and what its metrics need."""

    predictions: Predictions
    reasons: list[str | None]
    errored: bool = False  # the model raised or timed out
    # What the request's metrics need (recorded once, at its end): the model call that answered
    # (seconds, instances; 0 instances: no call answered, or a merged call, which is recorded once
    # on its own rather than with each of its requests) and its valid outputs.
    call_seconds: float = 0.0
    call_size: int = 0
    answered: Predictions | None = None


CallResult = tuple[Predictions | None, str | None, float, int]
"""A model call's result: (predictions, None, seconds, instances the request records the call with), or
(None, the fallback reason, 0.0, 0) when it failed."""


class Answerer:
    """Answers validated batches for one worker; owns the threads that slow model calls run on."""

    def __init__(self, threads: int = 4) -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vigil-model")

    async def answer(self, entry: ModelEntry, served: ServedVersion, batch: Batch) -> Outcome:
        """Answer every row of a validated batch: the model where it may, the fallback (with a reason) elsewhere."""
        n = batch.size
        everything = np.arange(n)
        reason = degraded_reason(served, entry.policy)
        if reason is not None:
            return Outcome(self.call_fallback(served, batch, reason), [reason] * n)
        # Rows with a null go to the fallback when the model cannot take NaN.
        to_fallback: dict[str, np.ndarray] = {}
        model_rows = everything
        if batch.has_nulls and not served.card.handles_missing:
            nulls = _null_rows(batch)
            to_fallback["missing_input"] = everything[nulls]
            model_rows = everything[~nulls]
        parts: list[tuple[np.ndarray, Predictions]] = []
        call_seconds, call_size = 0.0, 0
        answered: Predictions | None = None
        if len(model_rows):
            sub = batch if len(model_rows) == n else _take(batch, model_rows)
            started, policy = time.perf_counter(), entry.policy
            # On the event loop when the version's calls are fast and (when it batches) its batcher has no call
            # on the threads, which a request then queues for. A fast call has no coroutine of its own.
            if (policy.batching is None or not self._batcher(served).busy) and served.calls_inline(started):
                result = self._call_inline(served, policy, sub, started)
            else:
                result = await self._call_off_loop(served, policy, sub, started)
            predictions, failure, call_seconds, call_size = result
            if failure is not None:
                to_fallback[failure] = model_rows
                served.breaker.record(False)
            else:
                assert predictions is not None
                bad = invalid_rows(served.card, predictions, policy.output_range_margin)
                # One count serves both the breaker and the check (any() and sum() would be two passes).
                bad_count = int(np.count_nonzero(bad))
                served.breaker.record(bad_count == 0)
                if bad_count:
                    if served.metrics is not None:
                        served.metrics.record_invalid_outputs(bad_count)
                    to_fallback["invalid_output"] = model_rows[bad]
                    keep = ~bad
                    predictions = _subset(predictions, keep)
                    model_rows = model_rows[keep]
                if len(model_rows):
                    parts.append((model_rows, predictions))
                    answered = predictions
        reasons: list[str | None] = [None] * n
        for why, rows in to_fallback.items():
            if len(rows) == 0:
                continue
            sub = _take(batch, rows)
            fallback_predictions = self.call_fallback(served, sub, why)
            parts.append((rows, fallback_predictions))
            for i in rows.tolist():
                reasons[i] = why
        errored = "model_error" in to_fallback or "timeout" in to_fallback
        return Outcome(merge(n, parts), reasons, errored, call_seconds, call_size, answered)

    def _call_inline(self, served: ServedVersion, policy: ModelPolicy, batch: Batch, started: float) -> CallResult:
        """Call the model on the event loop within its time budget: (predictions, None, seconds, instances the
        request records the call with) or (None, failure reason, 0.0, 0).

        A failed call is recorded here; a successful one by the request's
        :meth:`BoundModelMetrics.record_request` once the request ends.
        """
        assert served.predictor is not None
        try:
            predictions, seconds = _timed_predict(served.predictor, batch, policy.timeout_ms / 1000)
        except Exception as exc:  # noqa: BLE001 - any model failure is answered by the fallback
            return self._failed(served, exc, started, batch.size, inline=True)
        served.note_call(seconds, started, True)
        return predictions, None, seconds, batch.size

    async def _call_off_loop(self, served: ServedVersion, policy: ModelPolicy, batch: Batch,
                             started: float) -> CallResult:
        """:meth:`_call_inline` for a slow model: on a thread, so the worker keeps answering health checks and
        other models meanwhile (the watchdog still cancels it at the budget).

        With batching, the call goes through the version's batcher, which merges
        it with the calls of concurrent requests; a merged call is recorded once
        when it returns (:meth:`_batched_call`).
        """
        assert served.predictor is not None
        budget = policy.timeout_ms / 1000
        if policy.batching is not None:
            answer = await self._batcher(served).call(batch, budget, policy.batching.max_batch_size)
            return self._batched(served, answer)
        try:
            predictions, seconds = await asyncio.get_running_loop().run_in_executor(
                self._executor, _timed_predict, served.predictor, batch, budget)
        except Exception as exc:  # noqa: BLE001 - any model failure is answered by the fallback
            return self._failed(served, exc, started, batch.size, inline=False)
        served.note_call(seconds, started, False)
        return predictions, None, seconds, batch.size

    def _failed(self, served: ServedVersion, exc: Exception, started: float, size: int, inline: bool) -> CallResult:
        """Record a failed call (a timeout, or the model raised) and say which fallback reason answers it."""
        timed_out = isinstance(exc, ModelTimeout)
        self._model_failed(served, "ModelTimeout" if timed_out else type(exc).__name__, time.perf_counter() - started,
                           size, inline, timed_out)
        if timed_out:
            return None, "timeout", 0.0, 0
        _log_failure(served, exc)
        return None, "model_error", 0.0, 0

    def _batcher(self, served: ServedVersion) -> Batcher:
        """The version's batcher, made on its first batched call; its calls run on this answerer's threads."""
        batcher = served.batcher
        if batcher is None:
            predictor, executor = served.predictor, self._executor
            assert predictor is not None

            def run(batch: Batch, budget: float) -> asyncio.Future[tuple[Predictions, float]]:
                return asyncio.get_running_loop().run_in_executor(executor, _timed_predict, predictor, batch, budget)

            batcher = served.batcher = Batcher(run, partial(self._batched_call, served))
        return batcher

    def _batched(self, served: ServedVersion, answer: Answer) -> CallResult:
        """:meth:`_call_off_loop`'s result from a batcher's answer (the call is noted by :meth:`_batched_call`)."""
        if answer.error is None:
            assert answer.predictions is not None
            return answer.predictions, None, answer.seconds, answer.rows if answer.requests == 1 else 0
        timed_out = isinstance(answer.error, ModelTimeout)
        if served.metrics is not None:
            served.metrics.record_error("ModelTimeout" if timed_out else type(answer.error).__name__)
            if answer.requests == 1:  # its own call, recorded with it as without batching
                served.metrics.record_call(answer.seconds, answer.rows)
        if timed_out:
            return None, "timeout", 0.0, 0
        _log_failure(served, answer.error)
        return None, "model_error", 0.0, 0

    def _batched_call(self, served: ServedVersion, report: CallReport) -> None:
        """Note a call a batcher made: its time for the inline decision, its requests, and a merged call's metrics.

        A merged call is one model call, so it is recorded once, with its real
        size; its requests record no call of their own. A merged call that
        failed is recorded as a call but not as an error: each of its requests
        is retried alone, and those calls count their own errors.
        """
        served.note_call(report.seconds, report.started, False, isinstance(report.error, ModelTimeout))
        if served.metrics is not None:
            served.metrics.record_batched(report.requests)
            if report.requests > 1:
                served.metrics.record_call(report.seconds, report.rows)
        if report.error is not None and report.requests > 1:
            log.info("merged call of %d requests to %s:%s raised %s; each is retried alone", report.requests,
                     served.card.name, served.card.version, type(report.error).__name__)

    def _model_failed(self, served: ServedVersion, kind: str, seconds: float, size: int, inline: bool,
                      timed_out: bool = False) -> None:
        served.note_call(seconds, time.perf_counter(), inline, timed_out)
        if served.metrics is not None:
            served.metrics.record_error(kind)
            served.metrics.record_call(seconds, size)

    def call_fallback(self, served: ServedVersion, batch: Batch, reason: str) -> Predictions:
        started = time.perf_counter()
        predictions = served.fallback.predict(batch)
        if served.fallback_metrics is not None:
            served.fallback_metrics.record_call(time.perf_counter() - started, batch.size, predictions)
            served.fallback_metrics.record_fallback(reason, batch.size)
        return predictions

    def close(self) -> None:
        """Release the model-call threads."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def _log_failure(served: ServedVersion, exc: Exception) -> None:
    log.warning("model %s:%s raised %s: %s", served.card.name, served.card.version,
                type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "")


def _timed_predict(predictor: Predictor, batch: Batch, budget: float) -> tuple[Predictions, float]:
    started = time.perf_counter()
    return predictor.predict(batch, budget), time.perf_counter() - started


def _null_rows(batch: Batch) -> np.ndarray:
    if batch.matrix is not None:
        return np.isnan(batch.matrix).any(axis=1)
    assert batch.columns is not None
    nulls = np.zeros(batch.size, dtype=bool)
    for values in batch.columns.values():
        nulls |= np.fromiter((v is None for v in values), dtype=bool, count=batch.size)
    return nulls


def _take(batch: Batch, rows: np.ndarray) -> Batch:
    if batch.matrix is not None:
        sub = batch.matrix[rows]
        return Batch(size=len(rows), matrix=sub, has_nulls=bool(np.isnan(sub).any()))
    assert batch.columns is not None
    picked = rows.tolist()
    columns = {name: [values[i] for i in picked] for name, values in batch.columns.items()}
    return Batch(size=len(rows), columns=columns,
                 has_nulls=any(v is None for values in columns.values() for v in values))


def _subset(predictions: Predictions, keep: np.ndarray) -> Predictions:
    if predictions.values is not None:
        return Predictions(values=predictions.values[keep])
    assert predictions.labels is not None and predictions.probabilities is not None
    return Predictions(labels=[label for label, k in zip(predictions.labels, keep.tolist()) if k],
                       probabilities=predictions.probabilities[keep])


def response_items(served: ServedVersion, outcome: Outcome) -> list[dict[str, Any]]:
    version, variant = served.card.version, served.variant
    predictions = outcome.predictions
    items: list[dict[str, Any]]
    if predictions.values is not None:
        items = [{"version": version, "variant": variant, "value": v} for v in predictions.values.tolist()]
    else:
        assert predictions.labels is not None and predictions.probabilities is not None
        keys = [str(label) for label in served.card.labels or []]
        items = [
            {"version": version, "variant": variant, "label": label, "probabilities": dict(zip(keys, row))}
            for label, row in zip(predictions.labels, predictions.probabilities.tolist())
        ]
    for item, reason in zip(items, outcome.reasons):
        if reason is not None:
            item["variant"] = "fallback"
            item["reason"] = reason
    return items


def log_record(served: ServedVersion, instances: list[dict[str, Any]] | None, request_id: str, batch: Batch,
                outcome: Outcome) -> LoggedRequest:
    """The prediction log's record of a request; ``instances`` (as sent) are kept where the matrix does not suffice."""
    predictions = outcome.predictions
    if predictions.values is not None:
        prediction: list[Any] = predictions.values.tolist()
        score = None
    else:
        assert predictions.labels is not None and predictions.probabilities is not None
        prediction = predictions.labels
        score = binary_or_top_score(predictions.probabilities).tolist()
    has_fallback = any(r is not None for r in outcome.reasons)
    # With the numeric matrix the log needs the instance dicts only to hash PII features.
    keep_instances = batch.matrix is None or served.validator.hashes_pii
    return LoggedRequest(time=time.time(), request_id=request_id, card=served.card, variant=served.variant,
                         instances=instances if keep_instances else None, prediction=prediction, score=score,
                         reasons=outcome.reasons if has_fallback else None, matrix=batch.matrix)
