"""The fleet test of issue 21 on one machine: three ``vigil serve`` replicas, haproxy, Prometheus, one S3 store.

Each replica has its own ``VIGIL_DATA_DIR`` (as a pod would) and reads the same
deploy.yaml (a ConfigMap); they share a moto S3 store. Debian's haproxy balances
them round robin, with health checks on ``/readyz``; a real Prometheus scrapes all
three every second, and the fleet-wide counts are read from it as a dashboard would.

Models (deploy.yaml is fixed for the whole module, so each scenario has its own model):

- ``diabetes``: stable 1, canary 3 answering 80 higher (biased): rolled back once for the fleet;
- ``promo``: the diabetes model as 1 and, again, as 2 (healthy), with ``promote_when``: promoted once;
- ``steady-00`` .. ``steady-19``: 20 independent healthy canaries without ``promote_when``: none rolled back;
- ``cancer``: no canary: feedback, the drift job, and the SIGKILL under load (last: it kills a replica).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import httpx
import pandas as pd
import pytest
import yaml

from monitoring.canary import CanaryPool
from monitoring.feedback import read_feedback
from monitoring.predlog import read_log
from monitoring.store import S3Store
from service.registry.register import register_model
from tests.fleet.conftest import ADMIN_TOKEN, reference_rows, truths
from tests.fleet.test_failures import kill_replica
from tests.onnx_graphs import modified_regressor
from tests.s3server import CREDENTIALS, S3Server
from tests.servers import (VIGIL, PrometheusServer, VigilServer, _stop, _wait_http, free_port, looping,
                           prometheus_server, vigil_server, wait_for)

pytestmark = pytest.mark.integration

REPLICAS = 3
CONTROL_SECONDS = 0.3
FLUSH_SECONDS = 0.5
"""The prediction log's flush interval: what a SIGKILLed replica may lose of the rows it answered."""
RULES = {"min_requests": 40, "error_rate_increase": 0.02, "p95_latency_ratio": 1.5,
         "fallback_rate_increase": 0.05, "prediction_shift": 0.2}
STEADY = [f"steady-{i:02d}" for i in range(20)]
STEADY_RULES = dict(RULES, min_requests=20)
STEADY_LOOKS = 3
"""Looks each steady canary must reach (at 20, 30 and 45 pooled canary requests) without a rollback."""
PROMOTE_WHEN = {"min_requests": 150, "min_duration_seconds": 1.0}


# ----------------------------------------------------------------------------- the fleet


@dataclass
class Fleet:
    replicas: list[VigilServer]
    lb: str
    """haproxy's URL."""
    prom: PrometheusServer
    store_url: str
    s3: S3Server
    registry: Path
    env: dict[str, str]
    lb_client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=30.0))

    def store(self) -> S3Store:
        return S3Store(self.store_url, endpoint_url=self.s3.endpoint)

    def lb_post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.lb_client.post(f"{self.lb}{path}", **kwargs)

    def prom_sum(self, expr: str) -> float:
        """A fleet-wide sum from Prometheus (0 when no replica has the series yet)."""
        return self.prom.value(f"sum({expr})") or 0.0

    def scraped(self) -> None:
        """Block until Prometheus has scraped every live replica after now."""
        since = time.time()
        for i, replica in enumerate(self.replicas):
            if replica.proc.poll() is None:
                self.prom.wait_for_scrape_after(since, job=f"vigil-{i}")


@contextmanager
def haproxy(backends: list[int]) -> Iterator[str]:
    """Debian's haproxy in the foreground on a free port, round robin over ``backends``; yields its URL."""
    binary = shutil.which("haproxy")
    if binary is None:
        raise RuntimeError("haproxy is not installed (.ci/run installs it with apt-get)")
    home = Path(tempfile.mkdtemp(prefix="vigil-haproxy-"))
    port = free_port()
    servers = "\n".join(f"    server r{i} 127.0.0.1:{p} check" for i, p in enumerate(backends))
    (home / "haproxy.cfg").write_text(f"""
global
    maxconn 2000
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response junk-response response-timeout 502 503 504
frontend vigil
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 200ms fall 2 rise 2
{servers}
""")
    log = home / "haproxy.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([binary, "-f", str(home / "haproxy.cfg"), "-db"], cwd=home, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/readyz", proc, log, 30)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def canary_registry(example_registry: Path, trained_examples: dict[str, Path],
                    tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("canary-fleet")
    root = work / "models"
    shutil.copytree(example_registry, root)
    src, reference = trained_examples["diabetes"] / "model.onnx", trained_examples["diabetes"] / "reference.parquet"
    biased = modified_regressor(src, work / "biased.onnx", offset=80.0)
    register_model("diabetes", biased, reference, target="target", registry=root, version="3")
    for name in ["promo", *STEADY]:
        for version in ("1", "2"):  # version 2 is the same model registered again: healthy by construction
            register_model(name, src, reference, target="target", registry=root, version=version)
    return root


def deploy_config() -> dict[str, Any]:
    def canary(version: str, rules: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {"version": version, "traffic": 0.5, "sticky": False, "rollback_when": rules, **extra}

    models: dict[str, Any] = {
        "cancer": {"stable": "1"},
        "diabetes": {"stable": "1", "canary": canary("3", RULES)},
        "promo": {"stable": "1", "canary": canary("2", RULES, promote_when=PROMOTE_WHEN)},
    }
    models.update({name: {"stable": "1", "canary": canary("2", STEADY_RULES)} for name in STEADY})
    return {"models": models}


@pytest.fixture(scope="module")
def fleet(s3: S3Server, canary_registry: Path, tmp_path_factory: pytest.TempPathFactory,
          monkeypatch_module: pytest.MonkeyPatch) -> Iterator[Fleet]:
    for name, value in CREDENTIALS.items():
        monkeypatch_module.setenv(name, value)
    url = s3.new_bucket()
    deploy = tmp_path_factory.mktemp("canary-fleet-run") / "deploy.yaml"
    deploy.write_text(yaml.safe_dump(deploy_config()))
    env = {**CREDENTIALS, **s3.env(), "VIGIL_STORE": url, "VIGIL_DEPLOY": str(deploy),
           "VIGIL_ADMIN_TOKEN": ADMIN_TOKEN, "VIGIL_CONTROL_INTERVAL_SECONDS": str(CONTROL_SECONDS),
           "VIGIL_PREDLOG_FLUSH_SECONDS": str(FLUSH_SECONDS)}
    with ExitStack() as stack:
        replicas = [stack.enter_context(vigil_server(canary_registry, env=env, timeout=180)) for _ in range(REPLICAS)]
        lb = stack.enter_context(haproxy([r.port for r in replicas]))
        prom = stack.enter_context(prometheus_server(
            {f"vigil-{i}": f"127.0.0.1:{r.port}" for i, r in enumerate(replicas)}))
        fleet = Fleet(replicas, lb, prom, url, s3, canary_registry, env)
        stack.callback(fleet.lb_client.close)
        fleet.scraped()
        yield fleet


# ----------------------------------------------------------------------------- helpers


def diabetes_rows(registry: Path) -> list[dict[str, Any]]:
    frame = pd.read_parquet(registry / "diabetes" / "1" / "reference.parquet")
    return frame.drop(columns=[c for c in ("target", "prediction") if c in frame]).to_dict(orient="records")


def canary_of(server: VigilServer, model: str) -> dict[str, Any]:
    response = server.get(f"/canary/{model}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def versions_served(post: Callable[..., httpx.Response], model: str, rows: list[dict[str, Any]],
                    n: int) -> list[tuple[str, str]]:
    """``(version, variant)`` of ``n`` one-instance answers."""
    out = []
    for i in range(n):
        response = post("/predict", json={"model": model, "instances": [rows[i % len(rows)]]})
        assert response.status_code == 200, response.text
        prediction = response.json()["predictions"][0]
        out.append((prediction["version"], prediction["variant"]))
    return out


def traffic(fleet: Fleet, model: str | Callable[[int], str | None], rows: list[dict[str, Any]],
            until: Callable[[], bool], threads: int = 3, timeout: float = 300) -> int:
    """Send one-instance predictions through haproxy on ``threads`` threads until ``until()``; returns the count.

    ``model`` names the model, or picks the ``i``-th request's (None: skip that one)."""
    sent = [0]
    lock = threading.Lock()
    pick = model if callable(model) else lambda i: model

    def body(stop: threading.Event) -> None:
        with httpx.Client(base_url=fleet.lb, timeout=30.0) as client:
            i = 0
            while not stop.is_set():
                name = pick(i)
                if name is not None:
                    response = client.post("/predict", json={"model": name, "instances": [rows[i % len(rows)]]})
                    assert response.status_code == 200, response.text
                    with lock:
                        sent[0] += 1
                i += 1

    with ExitStack() as stack:
        for t in range(threads):
            stack.enter_context(looping(body, name=f"traffic-{model}-{t}"))
        wait_for(until, timeout=timeout, interval=0.3, what=lambda: f"{model}: {sent[0]} requests sent")
    return sent[0]


# ----------------------------------------------------------------------------- 1. the biased canary


def test_a_biased_canary_is_rolled_back_once_for_the_fleet_and_then_served_nowhere(fleet: Fleet) -> None:
    rows = diabetes_rows(fleet.registry)
    assert {canary_of(r, "diabetes")["phase"] for r in fleet.replicas} == {"progressing"}
    answers: list[tuple[float, str, str]] = []  # (sent at, where, version) of every answer
    lock = threading.Lock()
    targets = [("lb", fleet.lb), *((f"r{i}", r.url) for i, r in enumerate(fleet.replicas))]

    def body(stop: threading.Event) -> None:
        clients = [(name, httpx.Client(base_url=url, timeout=30.0)) for name, url in targets]
        i = 0
        try:
            while not stop.is_set():
                name, client = clients[i % len(clients)]
                sent = time.time()
                response = client.post("/predict", json={"model": "diabetes", "instances": [rows[i % len(rows)]]})
                assert response.status_code == 200, response.text
                with lock:
                    answers.append((sent, name, response.json()["predictions"][0]["version"]))
                i += 1
        finally:
            for _, client in clients:
                client.close()

    seen_rolled: dict[int, float] = {}

    def all_rolled_back() -> bool:
        for i, replica in enumerate(fleet.replicas):
            if i not in seen_rolled and canary_of(replica, "diabetes")["phase"] == "rolled_back":
                seen_rolled[i] = time.time()
        return len(seen_rolled) == REPLICAS

    decision = CanaryPool(fleet.store(), "test").decision
    with looping(body, name="biased-traffic"), looping(body, name="biased-traffic-2"):
        wait_for(all_rolled_back, timeout=120, interval=0.1, what=lambda: f"rolled back on {sorted(seen_rolled)}")
        everywhere = max(seen_rolled.values())
        # Keep the traffic going until answers sent a second after every replica said so have come back.
        wait_for(lambda: answers[-1][0] > everywhere + 1, timeout=60)
    made = decision("diabetes", "1-3")
    assert made.at is not None
    assert (made.verdict, made.reason) == ("rolled_back", "prediction_shift")
    # Each replica (one worker each) routes as its /canary says: once it said "rolled back", nothing
    # sent to it directly, and nothing sent through the balancer once all had, is answered by the
    # canary. How soon after the decision that is (issue 21: within 5 s) depends on the machine's
    # load, so it is measured by hand (benchmarks/README.md, "The fleet's canary", `fleet_rollback.py`), not asserted here.
    since = {**{f"r{i}": at for i, at in seen_rolled.items()}, "lb": everywhere}
    late = [a for a in answers if a[0] >= since[a[1]] and a[2] == "3"]
    assert not late, (since, late[:10])
    assert any(a[2] == "3" for a in answers if a[0] < made.at)  # the canary did serve before the decision
    assert {where for sent, where, _ in answers if sent >= since[where]} == {name for name, _ in targets}
    # Asked now, directly and through the balancer, every replica answers with stable.
    for post in [fleet.lb_post, *(r.post for r in fleet.replicas)]:
        assert set(versions_served(post, "diabetes", rows, 12)) == {("1", "stable")}
    for replica in fleet.replicas:
        verdict = canary_of(replica, "diabetes")
        assert (verdict["phase"], verdict["healthy"], verdict["reason"]) == ("rolled_back", False, "prediction_shift")
    fleet.scraped()
    assert fleet.prom_sum('vigil_rollbacks_total{model="diabetes"}') == 1
    assert fleet.prom_sum('vigil_rollbacks_total{model="diabetes",version="3",reason="prediction_shift"}') == 1
    assert fleet.prom.value('count(vigil_canary_phase{model="diabetes"})') is not None
    state = json.loads(fleet.store().get("deploy_state.json"))
    assert state["rollbacks"]["diabetes"]["version"] == "3"


# ----------------------------------------------------------------------------- 2. healthy canaries


def test_a_healthy_canary_with_promote_when_is_promoted_once_and_served_everywhere(fleet: Fleet) -> None:
    rows = diabetes_rows(fleet.registry)

    def promoted_everywhere() -> bool:
        return all(canary_of(r, "promo")["phase"] == "promoted" for r in fleet.replicas)

    sent = traffic(fleet, "promo", rows, promoted_everywhere, timeout=240)
    assert sent >= PROMOTE_WHEN["min_requests"]
    for replica in fleet.replicas:
        verdict = canary_of(replica, "promo")
        assert (verdict["stable_version"], verdict["healthy"]) == ("2", True)
        assert verdict["promotion"]["version"] == "2" and verdict["promotion"]["previous"] == "1"
        assert verdict["promotion"]["evidence"]["canary"]["requests"] >= PROMOTE_WHEN["min_requests"]
    for post in [fleet.lb_post, *(r.post for r in fleet.replicas)]:
        assert set(versions_served(post, "promo", rows, 9)) == {("2", "stable")}
    fleet.scraped()
    assert fleet.prom_sum('vigil_promotions_total{model="promo"}') == 1
    assert fleet.prom_sum('vigil_promotions_total{model="promo",version="2"}') == 1
    assert fleet.prom_sum('vigil_rollbacks_total{model="promo"}') == 0
    assert json.loads(fleet.store().get("deploy_state.json"))["promotions"]["promo"]["version"] == "2"


def test_twenty_healthy_canaries_are_never_rolled_back_while_their_looks_accumulate(fleet: Fleet) -> None:
    """20 independent tests (one model each, its own traffic and looks) of a canary that is the stable model."""
    rows = diabetes_rows(fleet.registry)
    first = fleet.replicas[0]
    looks: dict[str, int] = {}

    def enough_looks() -> bool:
        for name in STEADY:
            if looks.get(name, 0) < STEADY_LOOKS:
                verdict = canary_of(first, name)
                decision = CanaryPool(fleet.store(), "test").decision(name, "1-2")
                assert verdict["phase"] == "progressing", (verdict, decision)
                looks[name] = verdict["looks"]
        return all(looks.get(name, 0) >= STEADY_LOOKS for name in STEADY)

    def wanting(i: int) -> str | None:
        name = STEADY[i % len(STEADY)]
        return name if looks.get(name, 0) < STEADY_LOOKS else None  # those with their looks get no more traffic

    traffic(fleet, wanting, rows, enough_looks, timeout=400)
    for name in STEADY:
        for replica in fleet.replicas:
            verdict = canary_of(replica, name)
            assert (verdict["phase"], verdict["healthy"]) == ("progressing", True), (name, verdict)
    fleet.scraped()
    assert fleet.prom_sum('vigil_rollbacks_total{model=~"steady-.*"}') == 0
    assert sum(looks.values()) >= STEADY_LOOKS * len(STEADY)


# ----------------------------------------------------------------------------- 3. feedback through the balancer


def test_feedback_through_the_balancer_right_after_each_response_is_all_matched(fleet: Fleet) -> None:
    rows, truth = reference_rows(fleet.registry, "cancer"), truths(fleet.registry, "cancer")
    fleet.scraped()
    before = fleet.prom_sum('vigil_feedback_total{model="cancer"}')
    unmatched = fleet.prom_sum('vigil_feedback_unmatched_total{model="cancer"}')
    sent = 0
    for i in range(45):
        batch = slice(2 * i, 2 * i + 2)
        response = fleet.lb_post("/predict", json={"model": "cancer", "instances": rows[batch]})
        assert response.status_code == 200, response.text
        reply = fleet.lb_post("/feedback", json={"model": "cancer", "request_id": response.json()["request_id"],
                                                 "actuals": truth[batch]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["accepted"] == 2 and reply.json()["duplicates"] == 0
        sent += 2
    counted = 'vigil_feedback_total{model="cancer"}'
    wait_for(lambda: fleet.prom_sum(counted) == before + sent, timeout=60, interval=0.5,
             what=lambda: f"{fleet.prom_sum(counted)} counted, {before + sent} expected")
    fleet.scraped()
    assert fleet.prom_sum('vigil_feedback_total{model="cancer"}') == before + sent
    assert fleet.prom_sum('vigil_feedback_unmatched_total{model="cancer"}') == unmatched


# ----------------------------------------------------------------------------- 4. the drift job


def test_the_drift_job_reads_the_rows_of_all_three_replicas(fleet: Fleet) -> None:
    rows = reference_rows(fleet.registry, "cancer")
    store = fleet.store()
    since = datetime.now(timezone.utc)
    ids = []
    for i in range(60):  # through the balancer, and a share straight to each replica
        post = fleet.lb_post if i % 2 else fleet.replicas[(i // 2) % REPLICAS].post
        batch = [rows[(3 * i + k) % len(rows)] for k in range(3)]
        response = post("/predict", json={"model": "cancer", "instances": batch})
        assert response.status_code == 200, response.text
        ids.append(response.json()["request_id"])
    until = datetime.now(timezone.utc) + timedelta(seconds=1)

    def logged() -> pd.DataFrame:
        return read_log(store, "cancer", since=since, until=until)

    wait_for(lambda: logged()["request_id"].isin(ids).sum() == 3 * len(ids), timeout=60, interval=0.5)
    window = logged()
    assert len(window) == 3 * len(ids)  # nothing but this test's rows in the window
    assert len(set(window["request_id"].str[:12])) == REPLICAS  # one worker token per replica
    run = subprocess.run([str(VIGIL), "drift", "run", "--model", "cancer", "--version", "1", "--store",
                          fleet.store_url, "--registry", str(fleet.registry), "--since", since.isoformat(),
                          "--until", until.isoformat(), "--min-rows", "50", "--prune-days", "0", "--json"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, **fleet.env})
    assert run.returncode in (0, 3), run.stderr
    result = json.loads(run.stdout)
    assert result["rows"]["window"] == 3 * len(ids)


# ----------------------------------------------------------------------------- 5. SIGKILL under load (last)


def test_sigkill_of_one_replica_under_load_fails_at_most_1pc_and_loses_nothing_accepted(fleet: Fleet) -> None:
    rows, truth = reference_rows(fleet.registry, "cancer"), truths(fleet.registry, "cancer")
    store = fleet.store()
    # Each replica's worker token (request ids start with it), learnt from one answer each.
    token = {i: r.post("/predict", json={"model": "cancer", "instances": rows[:1]}).json()["request_id"][:12]
             for i, r in enumerate(fleet.replicas)}
    victim = 1
    results: list[tuple[float, int, str | None, int | None]] = []  # (answered at, predict status, id, feedback)
    lock = threading.Lock()
    killed_at: list[float] = []

    def body(stop: threading.Event) -> None:
        with httpx.Client(base_url=fleet.lb, timeout=30.0) as client:
            i = 0
            while not stop.is_set():
                n = i % 100
                try:
                    response = client.post("/predict", json={"model": "cancer", "instances": [rows[n]]})
                except httpx.HTTPError:
                    with lock:
                        results.append((time.time(), 0, None, None))
                    continue
                finally:
                    i += 1
                answered = time.time()
                rid = response.json()["request_id"] if response.status_code == 200 else None
                status = None
                if rid is not None:
                    try:
                        status = client.post("/feedback", json={"model": "cancer", "request_id": rid,
                                                                "actuals": [truth[n]]}).status_code
                    except httpx.HTTPError:
                        status = 0
                with lock:
                    results.append((answered, response.status_code, rid, status))

    with looping(body, name="load-0"), looping(body, name="load-1"), looping(body, name="load-2"):
        wait_for(lambda: len(results) >= 150, timeout=120)
        killed_at.append(time.time())
        kill_replica(fleet.replicas[victim].proc.pid)
        fleet.replicas[victim].proc.wait(timeout=30)
        at_kill = len(results)
        wait_for(lambda: len(results) >= at_kill + 300, timeout=180)
    # At the balancer: every /predict, and the /feedback sent for each answer.
    failed = [r for r in results if r[1] != 200] + [r for r in results if r[1] == 200 and r[3] != 200]
    requests = len(results) + sum(r[1] == 200 for r in results)
    assert len(failed) <= 0.01 * requests, (len(failed), requests, failed[:5])
    answered = [r for r in results if r[1] == 200]
    assert {r[2][:12] for r in answered} == set(token.values())  # the victim answered before its death
    assert any(r[2][:12] == token[victim] for r in answered if r[0] < killed_at[0])

    def logged_ids() -> set[str]:
        return set(read_log(store, "cancer", columns=["request_id"])["request_id"])

    # The survivors' answers are all logged at once.
    survivors = {r[2] for r in answered if r[2][:12] != token[victim]}
    wait_for(lambda: survivors <= logged_ids(), timeout=60, interval=0.5,
             what=lambda: f"{len(survivors - logged_ids())} accepted requests not logged")
    # The victim's last answers are in its journal, on its own disk. Its container restarts on the
    # same directory (a pod's emptyDir outlives its container) and writes them.
    with vigil_server(fleet.registry, env=fleet.env, timeout=180, restart=fleet.replicas[victim]):
        everything = {r[2] for r in answered}
        wait_for(lambda: everything <= logged_ids(), timeout=60, interval=0.5,
                 what=lambda: f"{len(everything - logged_ids())} accepted requests not logged")
        log = read_log(store, "cancer", columns=["request_id", "index"])
        assert not log.duplicated(["request_id", "index"]).any()
        # Every feedback accepted is stored once and counted once.
        matched = {r[2] for r in answered if r[3] == 200}
        # (Counted in the store, not from Prometheus: the victim's counters died with it.)

        def stored_once() -> bool:
            stored = read_feedback(store, "cancer")
            per_request = stored[stored["request_id"].isin(matched)].groupby("request_id").size()
            return len(per_request) == len(matched) and bool((per_request == 1).all())

        wait_for(stored_once, timeout=180, interval=1.0, what="every accepted feedback stored once")
