"""Adaptive batching as plain objects: merging and splitting, the batcher's queue, and answers per request."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from monitoring.metrics import VigilMetrics
from service.core.predictor import Batch, Predictions, Predictor
from service.runtime.heuristic import HeuristicPredictor
from service.serving.answer import Answerer, Outcome
from service.serving.batching import (
    Answer,
    Batcher,
    BudgetSpent,
    merge_batches,
    mergeable,
    split_predictions,
)
from service.serving.deploy import BatchingConfig, BreakerConfig, ModelPolicy
from service.serving.routing import Breaker, ModelEntry, ServedVersion
from tests.cards import card

T = TypeVar("T")


def matrix(*rows: list[float]) -> Batch:
    data = np.array(rows, dtype=np.float64)
    return Batch(size=len(rows), matrix=data, has_nulls=bool(np.isnan(data).any()))


def run(main: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(main())  # type: ignore[arg-type]


async def until(condition: Callable[[], bool], what: str) -> None:
    """Let the event loop run until ``condition`` holds; fails naming ``what`` if it never does."""
    for _ in range(1_000_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


# ---------------------------------------------------------------------- merging and splitting


def test_matrix_batches_merge_in_order_and_carry_their_nulls() -> None:
    merged = merge_batches([matrix([1, 2]), matrix([3, np.nan], [5, 6]), matrix([7, 8])])
    assert merged.size == 4 and merged.columns is None and merged.has_nulls
    assert merged.matrix is not None
    assert np.array_equal(merged.matrix, np.array([[1, 2], [3, np.nan], [5, 6], [7, 8]]), equal_nan=True)
    assert not merge_batches([matrix([1, 2]), matrix([3, 4])]).has_nulls


def test_column_batches_merge_feature_by_feature() -> None:
    a = Batch(size=2, columns={"colour": ["red", None], "size": [1, 2]}, has_nulls=True)
    b = Batch(size=1, columns={"colour": ["blue"], "size": [3]})
    merged = merge_batches([a, b])
    assert merged.size == 3 and merged.matrix is None and merged.has_nulls
    assert merged.columns == {"colour": ["red", None, "blue"], "size": [1, 2, 3]}


def test_only_batches_of_one_shape_merge() -> None:
    columns = Batch(size=1, columns={"x0": [1.0], "x1": [2.0]})
    assert mergeable(matrix([1, 2]), matrix([3, 4], [5, 6]))
    assert not mergeable(matrix([1, 2]), matrix([1, 2, 3]))
    assert not mergeable(matrix([1, 2]), columns)
    assert not mergeable(columns, Batch(size=1, columns={"x0": [1.0]}))
    with pytest.raises(ValueError):
        merge_batches([matrix([1, 2]), columns])


def test_regression_values_split_back_by_row_offsets() -> None:
    parts = split_predictions(Predictions(values=np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])), [1, 3, 2])
    assert [p.values.tolist() for p in parts if p.values is not None] == [[0.0], [1.0, 2.0, 3.0], [4.0, 5.0]]
    assert all(p.labels is None and p.probabilities is None for p in parts)


def test_classifier_labels_and_probabilities_split_back_together() -> None:
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    parts = split_predictions(Predictions(labels=["a", "b", "a"], probabilities=probabilities), [2, 1])
    assert [p.labels for p in parts] == [["a", "b"], ["a"]]
    assert [p.probabilities.tolist() for p in parts if p.probabilities is not None] == [
        [[0.9, 0.1], [0.2, 0.8]], [[0.6, 0.4]]]
    assert all(p.values is None for p in parts)


def test_predictions_with_another_row_count_than_asked_are_refused() -> None:
    with pytest.raises(ValueError, match="answered 2 rows of values for 3 rows"):
        split_predictions(Predictions(values=np.array([1.0, 2.0])), [1, 2])
    with pytest.raises(ValueError, match="labels"):
        split_predictions(Predictions(labels=["a"], probabilities=np.array([[1.0], [1.0]])), [2])


# ---------------------------------------------------------------------- the batcher's queue


class SlowModel:
    """A fake model call on the "threads": each call waits until the test lets it finish.

    It answers each row's first feature as its value, and raises for a row whose first feature is
    negative (a request the model cannot take).
    """

    def __init__(self) -> None:
        self.calls: list[tuple[list[float], float]] = []
        self.gates: list[asyncio.Event] = []

    async def __call__(self, batch: Batch, budget: float) -> tuple[Predictions, float]:
        assert batch.matrix is not None
        gate = asyncio.Event()
        self.calls.append((batch.matrix[:, 0].tolist(), budget))
        self.gates.append(gate)
        await gate.wait()
        if (batch.matrix[:, 0] < 0).any():
            raise ValueError("the model cannot take a negative x0")
        return Predictions(values=batch.matrix[:, 0].copy()), 0.001 * batch.size

    def finish(self, call: int) -> None:
        self.gates[call].set()

    def finish_all(self) -> None:
        for gate in self.gates:
            gate.set()

    def rows(self) -> list[list[float]]:
        return [rows for rows, _ in self.calls]


def values_of(answer: Answer) -> list[float]:
    assert answer.error is None and answer.predictions is not None and answer.predictions.values is not None
    return answer.predictions.values.tolist()


async def behind_a_first_call(batcher: Batcher, started: Callable[[], bool], batches: list[Batch],
                              max_rows: int = 64) -> tuple[asyncio.Task[Answer], list[asyncio.Task[Answer]]]:
    """A first request (``x0 = 1``) that calls at once, and ``batches`` (budget 1 s each) queued behind its call."""
    first = asyncio.create_task(batcher.call(matrix([1, 0]), 1.0, max_rows))
    await until(started, "the first call started")
    assert batcher.busy and batcher.waiting == 0
    queued = [asyncio.create_task(batcher.call(batch, 1.0, max_rows)) for batch in batches]
    await until(lambda: batcher.waiting == len(batches), "the others queued")
    return first, queued


def test_a_lone_request_calls_at_once_and_those_arriving_meanwhile_share_the_next_call() -> None:
    async def main() -> None:
        model, reports = SlowModel(), []
        batcher = Batcher(model, reports.append)
        first, others = await behind_a_first_call(
            batcher, lambda: len(model.calls) == 1, [matrix([10 + i, 0], [20 + i, 0]) for i in range(5)])
        assert len(model.calls) == 1   # nobody joined the running call
        model.finish(0)
        assert values_of(await first) == [1.0]
        await until(lambda: len(model.calls) == 2, "the merged call started")
        assert model.rows()[1] == [10, 20, 11, 21, 12, 22, 13, 23, 14, 24]
        model.finish(1)
        answers = await asyncio.gather(*others)
        assert [values_of(a) for a in answers] == [[10 + i, 20 + i] for i in range(5)]
        assert {(a.requests, a.rows) for a in answers} == {(5, 10)}
        assert [(r.requests, r.rows, r.error) for r in reports] == [(1, 1, None), (5, 10, None)]
        await until(lambda: not batcher.busy, "idle once the queue is empty")
        # Idle again: the next request calls at once, alone.
        again = asyncio.create_task(batcher.call(matrix([7, 0]), 1.0, 64))
        await until(lambda: len(model.calls) == 3, "a call at once")
        model.finish(2)
        assert values_of(await again) == [7.0] and model.rows()[2] == [7.0]

    run(main)


def test_a_merged_call_takes_at_most_max_rows_and_the_rest_waits_for_the_next() -> None:
    async def main() -> None:
        model = SlowModel()
        batcher = Batcher(model)
        sizes = [2, 2, 2, 6, 1]   # the 6-row request is larger than a merged call: it goes alone
        first, queued = await behind_a_first_call(
            batcher, lambda: len(model.calls) == 1,
            [matrix(*[[100 * i + r, 0] for r in range(n)]) for i, n in enumerate(sizes)], max_rows=5)
        for call in range(4):
            model.finish(call)
            await until(lambda: len(model.calls) == call + 2, f"call {call + 2} started")
        model.finish_all()
        answers = await asyncio.gather(first, *queued)
        assert [len(rows) for rows in model.rows()] == [1, 4, 2, 6, 1]
        assert model.rows()[1:] == [[0, 1, 100, 101], [200, 201], [300, 301, 302, 303, 304, 305], [400]]
        assert [values_of(a) for a in answers[1:]] == [[100 * i + r for r in range(n)] for i, n in enumerate(sizes)]
        assert [a.requests for a in answers] == [1, 2, 2, 1, 1, 1]

    run(main)


def test_a_request_the_model_cannot_take_fails_alone_and_its_batch_mates_are_answered() -> None:
    async def main() -> None:
        model, reports = SlowModel(), []
        batcher = Batcher(model, reports.append)
        xs = [2.0, 3.0, -1.0, 4.0]
        first, queued = await behind_a_first_call(batcher, lambda: len(model.calls) == 1, [matrix([x, 0]) for x in xs])
        model.finish(0)
        await until(lambda: len(model.calls) == 2, "the merged call started")
        model.finish(1)
        await until(lambda: len(model.calls) == 6, "each retried alone")
        model.finish_all()
        answers = await asyncio.gather(*queued)
        await first
        assert model.rows()[1] == xs and sorted(model.rows()[2:]) == [[-1.0], [2.0], [3.0], [4.0]]
        for x, answer in zip(xs, answers):
            if x < 0:
                assert isinstance(answer.error, ValueError) and answer.predictions is None
                assert (answer.requests, answer.rows) == (1, 1)
            else:
                assert values_of(answer) == [x] and answer.requests == 1
        merged = [r for r in reports if r.requests > 1]
        assert len(merged) == 1 and merged[0].rows == 4 and isinstance(merged[0].error, ValueError)
        assert sum(1 for r in reports if r.requests == 1 and r.error is not None) == 1

    run(main)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def queued_at(times: list[float], release_at: float) -> tuple[SlowModel, list[Answer]]:
    """Requests ``x0 = 2, 3, ...`` (budget 1 s each) queued behind a first call at the clock's ``times``;
    the first call returns at ``release_at``. The model and the queued requests' answers."""
    model, clock = SlowModel(), Clock()
    batcher = Batcher(model, clock=clock)
    first = asyncio.create_task(batcher.call(matrix([1, 0]), 1.0, 64))
    await until(lambda: len(model.calls) == 1, "the first call started")
    queued = []
    for n, at in enumerate(times, start=1):
        clock.now = at
        queued.append(asyncio.create_task(batcher.call(matrix([1.0 + n, 0]), 1.0, 64)))
        await until(lambda: batcher.waiting == n, "queued")  # noqa: B023 - awaited at once
    clock.now = release_at
    model.finish(0)
    await until(lambda: len(model.calls) == 2, "the next call started")
    model.finish(1)
    answers = await asyncio.gather(*queued)
    assert values_of(await first) == [1.0] and model.calls[0][1] == 1.0   # alone, at once: the whole budget
    return model, answers


def test_a_merged_call_gets_the_budget_left_to_its_oldest_request() -> None:
    model, answers = run(lambda: queued_at([0.0, 0.3], release_at=0.5))
    assert [values_of(a) for a in answers] == [[2.0], [3.0]]
    assert model.calls[1] == ([2.0, 3.0], pytest.approx(0.5))


def test_a_request_whose_budget_ran_out_while_queued_times_out_alone() -> None:
    model, (spent, answered) = run(lambda: queued_at([0.0, 0.6], release_at=1.2))
    assert isinstance(spent.error, BudgetSpent) and spent.requests == 0 and spent.predictions is None
    assert values_of(answered) == [3.0] and answered.requests == 1
    assert model.calls[1] == ([3.0], pytest.approx(0.4))   # alone, with what is left of its budget


def test_a_merged_call_that_times_out_retries_those_with_budget_left() -> None:
    async def main() -> None:
        clock = Clock()
        seen: list[list[float]] = []

        async def model(batch: Batch, budget: float) -> tuple[Predictions, float]:
            assert batch.matrix is not None
            seen.append(batch.matrix[:, 0].tolist())
            if len(seen) == 1:
                await started.wait()
            if len(seen) == 2:   # the merged call runs past its budget
                clock.now = 1.0
                raise BudgetSpent("cut")
            return Predictions(values=batch.matrix[:, 0].copy()), 0.001

        started = asyncio.Event()
        batcher = Batcher(model, clock=clock)
        first = asyncio.create_task(batcher.call(matrix([1, 0]), 1.0, 64))
        await until(lambda: len(seen) == 1, "the first call started")
        oldest = asyncio.create_task(batcher.call(matrix([2, 0]), 1.0, 64))
        await until(lambda: batcher.waiting == 1, "queued")
        clock.now = 0.5
        younger = asyncio.create_task(batcher.call(matrix([3, 0]), 1.0, 64))
        await until(lambda: batcher.waiting == 2, "queued")
        started.set()
        timed_out, answered = await asyncio.gather(oldest, younger)
        await first
        assert isinstance(timed_out.error, BudgetSpent)
        assert values_of(answered) == [3.0] and seen == [[1.0], [2.0, 3.0], [3.0]]

    run(main)


def test_a_queued_request_cancelled_at_the_edge_is_dropped_from_the_next_call() -> None:
    async def main() -> None:
        model = SlowModel()
        batcher = Batcher(model)
        first, (gone, kept) = await behind_a_first_call(batcher, lambda: len(model.calls) == 1,
                                                        [matrix([2, 0]), matrix([3, 0])])
        gone.cancel()
        model.finish(0)
        await until(lambda: len(model.calls) == 2, "the next call started")
        model.finish(1)
        assert values_of(await kept) == [3.0] and model.rows()[1] == [3.0]
        await first

    run(main)


# ---------------------------------------------------------------------- answers per request


class GatedPredictor(Predictor):
    """A model on the real model threads: ``x0`` as the value; a negative ``x0`` makes it raise.

    Its first call waits for :attr:`release`, so the requests that arrive meanwhile queue.
    """

    def __init__(self) -> None:
        self.card = CARD
        self.release = threading.Event()
        self.started = threading.Event()
        self.sizes: list[int] = []
        self._lock = threading.Lock()

    def predict(self, batch: Batch, budget_seconds: float | None = None) -> Predictions:
        assert batch.matrix is not None
        with self._lock:
            self.sizes.append(batch.size)
        self.started.set()
        if not self.release.wait(timeout=60):
            raise TimeoutError("the test never released the model")
        if (batch.matrix[:, 0] < 0).any():
            raise ValueError("negative x0")
        return Predictions(values=batch.matrix[:, 0].copy())


CARD = card(fallback={"kind": "median", "value": 0.5}, output_range=(-10.0, 10.0))


def served_version(predictor: Predictor, metrics: VigilMetrics) -> ServedVersion:
    served = ServedVersion(card=CARD, validator=None, fallback=HeuristicPredictor(CARD),  # type: ignore[arg-type]
                           predictor=predictor, breaker=Breaker(BreakerConfig()),
                           metrics=metrics.bind(CARD, "stable"), fallback_metrics=metrics.bind(CARD, "fallback"))
    served.call_seconds_ewma = 1.0   # a slow model: its calls go to the model threads
    return served


def answer_concurrently(rows: list[list[list[float]]], with_batching: bool = True) -> tuple[
        list[Outcome], GatedPredictor, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = VigilMetrics(registry=registry)
    predictor = GatedPredictor()
    served = served_version(predictor, metrics)
    policy = ModelPolicy(batching=BatchingConfig(max_batch_size=64) if with_batching else None)
    entry = ModelEntry(name="m", policy=policy, stable=served)
    answerer = Answerer(threads=2)

    async def main() -> list[Outcome]:
        first = asyncio.create_task(answerer.answer(entry, served, matrix(*rows[0])))
        await until(predictor.started.is_set, "the first call runs")
        others = [asyncio.create_task(answerer.answer(entry, served, matrix(*r))) for r in rows[1:]]
        if with_batching:
            assert served.batcher is not None
            batcher = served.batcher
            await until(lambda: batcher.waiting == len(rows) - 1, "the others queued")
        predictor.release.set()
        return await asyncio.gather(first, *others)

    try:
        outcomes = asyncio.run(main())
    finally:
        answerer.close()
    metrics.flush()
    return outcomes, predictor, registry


def test_each_request_gets_its_own_rows_and_a_poisoned_one_alone_gets_the_fallback() -> None:
    rows = [[[0.5, 0.0]], [[1.0, 0.0], [1.5, 0.0]], [[-1.0, 0.0]], [[2.0, 0.0]], [[2.5, 0.0], [3.0, 0.0]]]
    outcomes, predictor, registry = answer_concurrently(rows)
    assert predictor.sizes[:2] == [1, 6]   # alone, then the four queued requests merged
    assert sorted(predictor.sizes[2:]) == [1, 1, 2, 2]   # the merged call raised: each retried alone
    for request, outcome in zip(rows, outcomes):
        assert outcome.predictions.values is not None
        if request[0][0] < 0:
            assert outcome.reasons == ["model_error"] and outcome.errored
            assert outcome.predictions.values.tolist() == [0.5]   # the fallback's median
        else:
            assert outcome.reasons == [None] * len(request) and not outcome.errored
            assert outcome.predictions.values.tolist() == [r[0] for r in request]

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"model": "m", "version": "1", **labels})

    assert value("vigil_model_errors_total", kind="ValueError") == 1   # the poisoned request's own call only
    assert value("vigil_fallback_total", reason="model_error") == 1
    # Calls on the threads: the first alone, the merged one (4 requests), then 4 alone.
    assert value("vigil_batched_requests_count") == 6 and value("vigil_batched_requests_sum") == 9


def test_a_merged_call_is_recorded_once_with_its_real_size() -> None:
    rows = [[[0.5, 0.0]], [[1.0, 0.0], [1.5, 0.0]], [[2.0, 0.0]], [[2.5, 0.0], [3.0, 0.0]]]
    outcomes, predictor, registry = answer_concurrently(rows)
    assert predictor.sizes == [1, 5]
    assert [o.predictions.values.tolist() for o in outcomes if o.predictions.values is not None] == [
        [0.5], [1.0, 1.5], [2.0], [2.5, 3.0]]
    # The first call is the request's own (recorded with the request); the merged call is not counted per request.
    assert [(o.call_size, o.answered is not None) for o in outcomes] == [(1, True), (0, True), (0, True), (0, True)]

    def value(name: str) -> float | None:
        return registry.get_sample_value(name, {"model": "m", "version": "1"})

    assert value("vigil_batch_size_count") == 1 and value("vigil_batch_size_sum") == 5
    assert value("vigil_batched_requests_count") == 2 and value("vigil_batched_requests_sum") == 4


def test_without_batching_every_request_makes_its_own_call() -> None:
    rows: list[list[list[Any]]] = [[[0.5, 0.0]], [[1.0, 0.0]], [[2.0, 0.0]]]
    outcomes, predictor, registry = answer_concurrently(rows, with_batching=False)
    assert sorted(predictor.sizes) == [1, 1, 1]
    assert [o.call_size for o in outcomes] == [1, 1, 1]
    assert registry.get_sample_value("vigil_batched_requests_count", {"model": "m", "version": "1"}) == 0

