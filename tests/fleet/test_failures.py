"""What a replica's death costs: a SIGKILLed replica holding pending feedback loses none of it."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any, Iterator

import pytest

from monitoring.feedback import CLAIMS_DIR, COUNTED, PENDING_DIR, read_feedback
from monitoring.predlog import read_log
from tests.fleet.conftest import Fleet, reference_rows, start_fleet, truths
from tests.s3server import CREDENTIALS, S3Server
from tests.servers import metric_value, wait_for

pytestmark = pytest.mark.integration

FLUSH_SECONDS = 30
"""The serving replica writes its log this rarely, so the feedback sent meanwhile must wait for it."""


@pytest.fixture
def slow_fleet(s3: S3Server, fleet_registry: Path, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    stack, fleet = start_fleet(s3, fleet_registry, tmp_path, extra={
        "VIGIL_PREDLOG_FLUSH_SECONDS": str(FLUSH_SECONDS), "VIGIL_FEEDBACK_MATCH_SECONDS": "300"})
    with stack:
        yield fleet


def kill_replica(pid: int) -> None:
    """SIGKILL a replica: its server and every worker (BentoML's workers run in sessions of their own)."""
    import psutil

    processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for process in processes:
        os.kill(process.pid, signal.SIGKILL)
    psutil.wait_procs(processes, timeout=30)


def test_sigkill_of_the_replica_holding_pending_feedback_loses_nothing_accepted(slow_fleet: Fleet) -> None:
    serving, holder = slow_fleet.replicas
    store = slow_fleet.store()
    rows, truth = reference_rows(slow_fleet.registry, "cancer"), truths(slow_fleet.registry, "cancer")

    def predict(instances: list[dict[str, Any]]) -> str:
        response = serving.post("/predict", json={"model": "cancer", "instances": instances})
        assert response.status_code == 200, response.text
        return str(response.json()["request_id"])

    # Right after the serving replica's flush, its next one is FLUSH_SECONDS away: the feedback
    # sent now cannot be matched before the holder is killed.
    first = predict(rows[:1])
    wait_for(lambda: first in set(read_log(store, "cancer", columns=["request_id"])["request_id"]),
             timeout=FLUSH_SECONDS + 30, interval=0.2)
    ids = []
    for i in range(10):
        rid = predict(rows[2 * i:2 * i + 2])
        response = holder.post("/feedback", json={"model": "cancer", "request_id": rid,
                                                  "actuals": truth[2 * i:2 * i + 2]})
        assert response.status_code == 200, response.text
        assert response.json() == {"model": "cancer", "accepted": 2, "duplicates": 0, "pending": 2}
        ids.append(rid)
    kill_replica(holder.proc.pid)
    holder.proc.wait(timeout=30)

    # The serving replica adopts the dead replica's pending batches, and counts them once its rows are written.
    wait_for(lambda: metric_value(serving.metrics_text(), "vigil_feedback_total", model="cancer") == 20,
             timeout=FLUSH_SECONDS + 120, interval=1.0)
    wait_for(lambda: store.list(f"{PENDING_DIR}/") == [], timeout=30, interval=0.5)
    stored = read_feedback(store, "cancer")
    assert len(stored[stored["request_id"].isin(ids)]) == 20
    for rid in ids:
        claims = [json.loads(store.get(key)) for key in store.list(f"{CLAIMS_DIR}/") if rid in key]
        assert len(claims) == 1 and sorted(claims[0]) == ["0", "1"]
        assert {state for _, state in claims[0].values()} == {COUNTED}
    assert (metric_value(serving.metrics_text(), "vigil_feedback_unmatched_total", model="cancer") or 0) == 0
