"""Two ``vigil serve`` replicas behind no balancer but the test, each with its own local directory, on one S3 store.

Feedback goes to the replica that did not answer, right after each response;
duplicates go to both at once; the jobs read both replicas' rows; a rollback
on one replica reaches the other through the store.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from monitoring.journal import JOURNAL_DIR, SUFFIX
from monitoring.feedback import read_feedback
from monitoring.predlog import read_log, segment_keys
from tests.fleet.conftest import ADMIN_TOKEN, Fleet, reference_rows, truths
from tests.servers import VIGIL, VigilServer, metric_value, wait_for

pytestmark = pytest.mark.integration


def total(fleet: Fleet, name: str, **labels: str) -> float:
    """A counter summed over every replica (what Prometheus sums over the fleet)."""
    return sum(metric_value(replica.metrics_text(), name, **labels) or 0.0 for replica in fleet.replicas)


def predict(server: VigilServer, rows: list[dict[str, Any]]) -> dict[str, Any]:
    response = server.post("/predict", json={"model": "cancer", "instances": rows})
    assert response.status_code == 200, response.text
    return response.json()


def give(server: VigilServer, request_id: str, actuals: list[Any]) -> dict[str, Any]:
    response = server.post("/feedback", json={"model": "cancer", "request_id": request_id, "actuals": actuals})
    assert response.status_code == 200, response.text
    return response.json()


def test_feedback_sent_at_once_to_the_other_replica_is_accepted_and_counted_once(fleet: Fleet) -> None:
    rows, truth = reference_rows(fleet.registry, "cancer"), truths(fleet.registry, "cancer")
    a, b = fleet.replicas
    before = total(fleet, "vigil_feedback_total", model="cancer")
    correct_before = total(fleet, "vigil_feedback_correct_total", model="cancer")
    sent = correct = pending = 0
    for i in range(30):
        served_by, other = (a, b) if i % 2 == 0 else (b, a)
        batch = rows[2 * i:2 * i + 2]
        answer = predict(served_by, batch)
        actuals = truth[2 * i:2 * i + 2]
        reply = give(other, answer["request_id"], actuals)  # no wait: the row is still in served_by's buffer
        assert reply["accepted"] == 2 and reply["duplicates"] == 0
        pending += reply["pending"]
        sent += 2
        correct += sum(p["label"] == t for p, t in zip(answer["predictions"], actuals))
    assert pending > 0  # most of them could not be matched yet, and were accepted all the same
    wait_for(lambda: total(fleet, "vigil_feedback_total", model="cancer") == before + sent, timeout=60, interval=0.5)
    assert total(fleet, "vigil_feedback_correct_total", model="cancer") == correct_before + correct
    assert total(fleet, "vigil_feedback_unmatched_total", model="cancer") == 0


def test_duplicates_sent_to_both_replicas_at_once_are_counted_once(fleet: Fleet) -> None:
    rows, truth = reference_rows(fleet.registry, "cancer"), truths(fleet.registry, "cancer")
    a, b = fleet.replicas
    answers = [predict(a if i % 2 else b, rows[100 + 3 * i:103 + 3 * i]) for i in range(10)]
    before = total(fleet, "vigil_feedback_total", model="cancer")
    replies: list[dict[str, Any]] = []
    failures: list[BaseException] = []

    def send(server: VigilServer, answer: dict[str, Any], actuals: list[Any]) -> None:
        try:
            replies.append(give(server, answer["request_id"], actuals))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    for i, answer in enumerate(answers):
        actuals = truth[100 + 3 * i:103 + 3 * i]
        threads = [threading.Thread(target=send, args=(server, answer, actuals)) for server in (a, b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not failures, failures
    assert sum(r["accepted"] for r in replies) == 30 and sum(r["duplicates"] for r in replies) == 30
    wait_for(lambda: total(fleet, "vigil_feedback_total", model="cancer") == before + 30, timeout=60, interval=0.5)
    # A later duplicate (the prediction is in the store by now) is refused from counting too.
    assert give(b, answers[0]["request_id"], truth[100:103])["duplicates"] == 3
    # One more instance, counted: by then every earlier one has been counted, and none twice.
    extra = predict(a, rows[150:151])
    give(b, extra["request_id"], truth[150:151])
    wait_for(lambda: total(fleet, "vigil_feedback_total", model="cancer") == before + 31, timeout=60, interval=0.5)
    stored = read_feedback(fleet.store(), "cancer")
    ids = {answer["request_id"] for answer in answers}
    assert len(stored[stored["request_id"].isin(ids)]) == 30  # one stored actual per instance


def test_both_replicas_write_segments_of_their_own_and_only_their_journal_locally(fleet: Fleet) -> None:
    rows = reference_rows(fleet.registry, "cancer")
    for server in fleet.replicas:
        predict(server, rows[:1])
    store = fleet.store()
    wait_for(lambda: len({key.split("-")[-2] for key in segment_keys(store, "cancer")}) == 2, timeout=30)
    assert len(store.list("workers/")) == 2
    for server in fleet.replicas:
        local = server.home / "var"
        files = [p.relative_to(local) for p in local.rglob("*") if p.is_file()]
        assert files and all(p.parts[0] == JOURNAL_DIR and p.suffix == SUFFIX for p in files), files


def test_jobs_read_every_replicas_rows_and_every_replica_takes_the_verdict(fleet: Fleet) -> None:
    rows, truth = reference_rows(fleet.registry, "cancer"), truths(fleet.registry, "cancer")
    store = fleet.store()
    since = datetime.now(timezone.utc)
    ids = set()
    for i in range(40):  # each replica answers half, and takes the other half's feedback
        rid = predict(fleet.replicas[i % 2], rows[4 * i:4 * i + 5])["request_id"]
        give(fleet.replicas[(i + 1) % 2], rid, truth[4 * i:4 * i + 5])
        ids.add(rid)
    until = datetime.now(timezone.utc) + timedelta(seconds=1)

    def logged_rows() -> Any:
        return read_log(store, "cancer", since=since, until=until)

    wait_for(lambda: logged_rows()["request_id"].isin(ids).sum() == 200, timeout=30, interval=0.5)
    logged = logged_rows()
    assert Counter(logged["request_id"].str[:12]).keys() == {r[:12] for r in ids}  # both replicas' workers

    def job(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(VIGIL), *args, "--model", "cancer", "--version", "1", "--store", fleet.store_url,
                               "--registry", str(fleet.registry), "--since", since.isoformat(),
                               "--until", until.isoformat(), "--json"],
                              capture_output=True, text=True, timeout=600, env={**os.environ, **fleet.env})

    drift = job("drift", "run", "--min-rows", "50", "--prune-days", "0")
    assert drift.returncode in (0, 3), drift.stderr
    result = json.loads(drift.stdout)
    assert result["rows"]["window"] == len(logged[logged["version"] == "1"]) > 50
    assert result["report_html"].startswith(fleet.store_url)
    # The verdict is in the store: both replicas take it within a control interval.
    created = datetime.fromisoformat(result["created_at"])
    for server in fleet.replicas:
        wait_for(lambda: _drift_checked_at(server) == created, timeout=30)

    quality = job("performance", "run", "--min-rows", "1")
    assert quality.returncode in (0, 3), quality.stderr
    judged = json.loads(quality.stdout)["rows"]
    assert judged["logged"] == judged["with_feedback"] == len(logged[logged["version"] == "1"])


def _drift_checked_at(server: VigilServer) -> datetime | None:
    cancer = {m["name"]: m for m in server.get("/models").json()["models"]}["cancer"]
    checked = cancer["drift"]["checked_at"]
    return datetime.fromisoformat(checked) if checked else None


def test_too_few_rows_says_how_many_fall_after_the_window(fleet: Fleet) -> None:
    rows = reference_rows(fleet.registry, "cancer")
    until = datetime.now(timezone.utc) - timedelta(minutes=10)
    ids = {predict(fleet.replicas[i % 2], rows[:2])["request_id"] for i in range(3)}
    store = fleet.store()
    # These rows, not just any 6: the earlier tests' rows fall after ``until`` too.
    wait_for(lambda: ids <= set(read_log(store, "cancer", since=until)["request_id"]), timeout=30, interval=0.5)
    after = len(read_log(store, "cancer", version="1", since=until))
    run = subprocess.run([str(VIGIL), "drift", "run", "--model", "cancer", "--version", "1", "--store",
                          fleet.store_url, "--registry", str(fleet.registry), "--last", "5m", "--until",
                          until.isoformat(), "--prune-days", "0"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, **fleet.env})
    assert run.returncode == 4, run.stderr
    # Rows of earlier tests may still reach the log while the job runs: the count it reports lies
    # between what the log held before it and after it.
    reported = re.search(r"\(0 before it, (\d+) after its end", run.stderr)
    assert reported is not None, run.stderr
    assert after <= int(reported.group(1)) <= len(read_log(store, "cancer", version="1", since=until))


def test_a_rollback_on_one_replica_reaches_the_other_through_the_store(fleet: Fleet) -> None:
    a, b = fleet.replicas

    def canary(server: VigilServer) -> dict[str, Any]:
        return {m["name"]: m for m in server.get("/models").json()["models"]}["cancer"]["canary"]

    assert canary(a)["traffic"] == canary(b)["traffic"] == 0.5
    response = a.post("/admin/rollback", json={"model": "cancer"}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 200, response.text
    wait_for(lambda: canary(b)["traffic"] == 0.0, timeout=30)
    state = json.loads(fleet.store().get("deploy_state.json"))
    assert state["rollbacks"]["cancer"]["version"] == "2"


def test_an_operators_promote_and_rollback_reach_every_replica_and_leave_deploy_yaml_alone(fleet: Fleet) -> None:
    a, b = fleet.replicas
    deploy = Path(fleet.env["VIGIL_DEPLOY"])
    config = deploy.read_bytes()  # a ConfigMap: read-only in the pod
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def served(server: VigilServer) -> dict[str, Any]:
        return {m["name"]: m for m in server.get("/models").json()["models"]}["cancer"]

    response = a.post("/admin/promote", json={"model": "cancer"}, headers=auth)
    assert response.status_code == 200 and response.json() == {"model": "cancer", "stable": "2"}, response.text
    wait_for(lambda: served(b)["version"] == "2" and served(b).get("canary") is None, timeout=30,
             what=lambda: f"replica b serves {served(b)}")
    promotion = served(b)["promotion"]
    assert (promotion["version"], promotion["previous"], promotion["by"], promotion["kind"]) == (
        "2", "1", "operator", "promotion")

    response = b.post("/admin/rollback", json={"model": "cancer", "to": "1"}, headers=auth)
    assert response.status_code == 200 and response.json() == {"model": "cancer", "stable": "1"}, response.text
    wait_for(lambda: served(a)["version"] == "1" and served(a)["canary"]["traffic"] == 0.0, timeout=30,
             what=lambda: f"replica a serves {served(a)}")
    assert served(a)["promotion"]["kind"] == "rollback"
    rows = reference_rows(fleet.registry, "cancer")
    for server in (a, b):
        versions = {p["version"] for p in predict(server, rows[:20])["predictions"]}
        assert versions == {"1"}
    unknown = a.post("/admin/rollback", json={"model": "cancer", "to": "9"}, headers=auth)
    assert unknown.status_code == 404 and "no version '9'" in unknown.json()["error"]["message"]
    assert deploy.read_bytes() == config
