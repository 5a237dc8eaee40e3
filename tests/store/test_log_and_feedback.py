"""The prediction log and the feedback join on a shared store: unique segment keys, feedback never lost, counted once.

Several :class:`PredictionLog` writers and :class:`FeedbackService` instances on
one store stand for the workers of several replicas; each test runs on a
local directory and on a real S3-API server.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from monitoring.feedback import CLAIMS_DIR, WorkerDirectory, read_feedback
from monitoring.metrics import VigilMetrics
from monitoring.predlog import LoggedRequest, PredictionLog, candidate_segments, read_log, segment_keys
from monitoring.store import Store
from service.core.requestid import RequestIds, new_token
from service.feedback import DEAD_AFTER_SECONDS, FeedbackItems, FeedbackService, FeedbackWhole, UnknownRequest
from tests.servers import wait_for
from tests.unit.test_predlog import card

pytestmark = pytest.mark.integration

CARD = card()


class Replica:
    """One worker of one replica: its token, its request ids, its log writer and its feedback service."""

    def __init__(self, store: Store, label: str = "0", match_seconds: float = 60.0, settle_seconds: float = 0.5) -> None:
        self.registry = CollectorRegistry()
        self.metrics = VigilMetrics(self.registry)
        self.token = new_token()
        self.ids = RequestIds(self.token)
        self.log = PredictionLog(store, label, token=self.token)
        self.feedback = FeedbackService(store, self.metrics, self.token, match_seconds=match_seconds,
                                        window_seconds=15, targets=lambda: ({CARD.name: CARD}, {}), label=label,
                                        settle_seconds=settle_seconds)
        self.feedback.register()

    def serve(self, n: int, t: float | None = None) -> tuple[str, list[int]]:
        """Answer one request of ``n`` instances (buffered in the log); returns its id and predicted labels."""
        rid = self.ids.next()
        labels = [i % 2 for i in range(n)]
        self.log.append(LoggedRequest(time=t or time.time(), request_id=rid, card=CARD, variant="stable",
                                      instances=[{"age": 40.0, "email": "e", "city": None}] * n,
                                      prediction=labels, score=[0.5] * n, reasons=None))
        return rid, labels

    def send(self, rid: str, actuals: list[Any]) -> dict[str, Any]:
        return self.feedback.accept(FeedbackWhole(model=CARD.name, request_id=rid, actuals=actuals),
                                    {CARD.name: CARD})

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, {"model": CARD.name, **labels}) or 0.0


def counted(*replicas: Replica) -> float:
    return sum(r.value("vigil_feedback_total", version=CARD.version) for r in replicas)


def test_segment_keys_are_unique_across_hosts_with_the_same_pid_and_worker(store: Store) -> None:
    """Two replicas whose workers share a label and a pid, flushing in the same millisecond, keep every row."""
    first, second = Replica(store, label="1"), Replica(store, label="1")
    first.log.pid = second.log.pid = 4242  # containers often run their server with the same pid
    t = 1_700_000_000.123
    for replica in (first, second):
        for _ in range(3):
            replica.serve(2, t=t)
    assert first.log.flush() == second.log.flush() == 6
    keys = segment_keys(store, CARD.name)
    assert len(keys) == 2 and all("-4242-" in key and "-w1-" in key for key in keys)
    assert {key.split("-")[-2] for key in keys} == {first.token, second.token}
    assert len(read_log(store, CARD.name)) == 12
    # Even one token on two hosts (it is random: practically never) replaces nothing: the write is exclusive.
    second.log.token = first.log.token
    second.log._seq = first.log._seq - 1
    second.serve(2, t=t)
    assert second.log.flush() == 2
    assert len(segment_keys(store, CARD.name)) == 3 and len(read_log(store, CARD.name)) == 14


def test_the_log_is_hour_partitioned_and_a_request_is_found_in_its_segments_only(store: Store) -> None:
    replica, other = Replica(store), Replica(store)
    for _ in range(20):  # other workers' segments in the same hour are never read for this request
        other.serve(1)
        other.log.flush()
    rid, _ = replica.serve(3)
    replica.log.flush()
    key = segment_keys(store, CARD.name)[-1]
    hour = datetime.now(timezone.utc).strftime("date=%Y-%m-%d/hour=%H")
    assert hour in key or replica.token in key  # (the hour may have turned between serving and listing)
    assert candidate_segments(store, CARD.name, rid, 15) == [k for k in segment_keys(store, CARD.name)
                                                             if replica.token in k]
    assert candidate_segments(store, CARD.name, "not-an-id", 15) == []
    found = replica.feedback.lookup.find(CARD.name, rid)
    assert found is not None and sorted(found) == [0, 1, 2] and found[1].prediction == 1


def test_feedback_right_after_the_response_is_accepted_and_counted_once_its_row_is_written(store: Store) -> None:
    server, other = Replica(store), Replica(store)
    rid, labels = server.serve(4)
    answer = other.send(rid, [0, 0, 1, 1])  # at once, to another replica: the row is still in server's buffer
    assert answer == {"model": CARD.name, "accepted": 4, "duplicates": 0, "pending": 4}
    assert other.feedback.settle() == 0 and counted(server, other) == 0  # nothing to match yet
    assert len(read_feedback(store, CARD.name)) == 4  # stored before the answer
    server.log.flush()
    assert other.feedback.settle() == 4
    assert other.value("vigil_feedback_total", version=CARD.version) == 4
    # predicted 0,1,0,1 against actuals 0,0,1,1: two right
    assert other.value("vigil_feedback_correct_total", version=CARD.version, variant="stable") == 2
    assert other.feedback.settle() == 0 and other.feedback.pending_count() == 0
    assert store.list("feedback/pending/") == []
    # Sent again, to either replica: a duplicate, known at once, never counted again.
    for replica in (server, other):
        assert replica.send(rid, [1, 1, 1, 1]) == {"model": CARD.name, "accepted": 0, "duplicates": 4, "pending": 0}
    assert counted(server, other) == 4
    frame = read_feedback(store, CARD.name)
    assert sorted(frame["actual"].tolist()) == ["0", "0", "1", "1"]  # the first actuals stand


def test_the_settling_thread_counts_pending_feedback_by_itself(store: Store) -> None:
    """Started, a worker's feedback service matches its pending feedback every ``settle_seconds``, unasked."""
    server, other = Replica(store), Replica(store, settle_seconds=0.05)
    rid, _ = server.serve(2)
    assert other.send(rid, [0, 1])["pending"] == 2
    other.feedback.start()
    try:
        server.log.flush()
        # Counted first, then no longer pending: wait for both.
        wait_for(lambda: counted(other) == 2 and other.feedback.pending_count() == 0)
        assert counted(server, other) == 2
    finally:
        other.feedback.stop()


def test_duplicates_pending_on_two_replicas_are_counted_once(store: Store) -> None:
    server, a, b = Replica(store), Replica(store), Replica(store)
    rid, _ = server.serve(3)
    first, second = a.send(rid, [0, 1, 0]), b.send(rid, [1, 1, 1])
    assert first["accepted"] == 3 and second == {"model": CARD.name, "accepted": 0, "duplicates": 3, "pending": 0}
    server.log.flush()
    assert a.feedback.settle() + b.feedback.settle() == 3
    assert counted(server, a, b) == 3


def test_prediction_already_written_is_counted_at_once(store: Store) -> None:
    server = Replica(store)
    rid, _ = server.serve(2)
    server.log.flush()
    assert server.send(rid, [0, 1]) == {"model": CARD.name, "accepted": 2, "duplicates": 0, "pending": 0}
    assert counted(server) == 2


def test_ids_never_issued_are_refused_at_once_and_nothing_is_stored(store: Store) -> None:
    replica = Replica(store)
    rid, _ = replica.serve(1)
    replica.log.flush()
    never = [
        "f" * 32,                                                        # an unknown worker token
        "nope",                                                          # not an id at all
        f"{replica.token}{int((time.time() + 3600) * 1000):011x}000000",  # from an hour ahead
        f"{replica.token}{int((time.time() - 86400) * 1000):011x}000000",  # before that worker started
    ]
    for bad in never:
        with pytest.raises(UnknownRequest) as refused:
            replica.feedback.accept(FeedbackItems(model=CARD.name, items=[
                {"request_id": rid, "index": 0, "actual": 1}, {"request_id": bad, "index": 0, "actual": 1}]),
                {CARD.name: CARD})
        assert refused.value.details[0]["instance"] == 1
    with pytest.raises(UnknownRequest):  # a real request, but no such instance
        replica.send(rid, [0, 1])
    assert replica.value("vigil_feedback_unmatched_total") == len(never) + 1
    assert len(read_feedback(store, CARD.name)) == 0 and store.list(f"{CLAIMS_DIR}/") == []


def test_an_old_request_whose_row_is_not_in_the_log_is_refused(store: Store) -> None:
    replica = Replica(store, match_seconds=5)
    directory = WorkerDirectory(store)
    record = directory.read(replica.token)
    assert record is not None
    record.started -= 3600  # it has served for an hour
    directory.write(record)
    replica.feedback.workers = WorkerDirectory(store)
    old = f"{replica.token}{int((time.time() - 600) * 1000):011x}000001"  # issued, but never logged (sampled out)
    with pytest.raises(UnknownRequest, match="not logged"):
        replica.send(old, [1])


def test_pending_feedback_past_the_limit_is_counted_unmatched_and_kept(store: Store) -> None:
    replica = Replica(store, match_seconds=60)
    rid, _ = replica.serve(2)  # its row never reaches the store: the worker was killed before its flush
    assert replica.send(rid, [1, 0])["pending"] == 2
    assert replica.feedback.settle(now=time.time() + 30) == 0  # still within the limit
    assert replica.feedback.settle(now=time.time() + 61) == 2
    assert replica.value("vigil_feedback_unmatched_total") == 2 and counted(replica) == 0
    assert len(read_feedback(store, CARD.name)) == 2  # kept for the jobs
    assert store.list("feedback/pending/") == []


def test_a_dead_workers_pending_feedback_is_adopted_and_counted_once(store: Store) -> None:
    """The worker holding pending feedback dies (no stop, no flush of anything): others settle its batches."""
    server, holder, a, b = Replica(store), Replica(store), Replica(store), Replica(store)
    rids = [server.serve(2)[0] for _ in range(5)]
    for rid in rids:
        assert holder.send(rid, [1, 1])["pending"] == 2
    del holder  # SIGKILLed: its memory is gone, its batches are in the store
    server.log.flush()
    assert a.feedback.adopt() == []  # its heartbeat is fresh: not yet taken over
    later = time.time() + DEAD_AFTER_SECONDS + 1
    assert len(a.feedback.adopt(now=later)) == 5 and len(b.feedback.adopt(now=later)) == 5
    assert a.feedback.settle() + b.feedback.settle() == 10  # both adopted; the claims let each instance count once
    assert counted(server, a, b) == 10
    assert store.list("feedback/pending/") == []


def test_a_stopped_worker_leaves_its_pending_feedback_at_once(store: Store) -> None:
    server, holder, other = Replica(store), Replica(store), Replica(store)
    rid, _ = server.serve(2)
    holder.send(rid, [0, 0])
    holder.feedback.stop()  # nothing to match yet: the batch stays stored
    assert len(other.feedback.adopt()) == 1
    server.log.flush()
    assert other.feedback.settle() == 2 and counted(other) == 2


def test_without_the_store_feedback_is_refused_with_503_and_nothing_is_counted(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.feedback import StoreUnavailable

    replica = Replica(store)
    rid, _ = replica.serve(1)

    def unreachable(*args: Any, **kwargs: Any) -> bool:
        raise ConnectionError("the store is down")

    monkeypatch.setattr(store, "put", unreachable)
    with pytest.raises(StoreUnavailable) as refused:
        replica.send(rid, [1])
    assert refused.value.status_code == 503 and refused.value.headers["Retry-After"] == "1"
    monkeypatch.undo()
    assert replica.send(rid, [1])["accepted"] == 1  # sent again once the store is back: accepted, once


def test_prune_forgets_old_claims_and_silent_workers_but_keeps_feedback(store: Store) -> None:
    from datetime import timedelta

    from monitoring.feedback import WORKERS_DIR, prune_feedback

    replica = Replica(store)
    rid, _ = replica.serve(1)
    replica.log.flush()
    replica.send(rid, [1])
    assert prune_feedback(store, older_than_days=30) == []
    later = datetime.now(timezone.utc) + timedelta(days=40)
    removed = prune_feedback(store, older_than_days=30, now=later)
    assert any(key.startswith(CLAIMS_DIR) for key in removed) and store.list(f"{CLAIMS_DIR}/") == []
    assert store.list(f"{WORKERS_DIR}/") == [] and len(read_feedback(store, CARD.name)) == 1
