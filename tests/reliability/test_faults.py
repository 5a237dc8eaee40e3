"""Bad input, oversize bodies, saturation, a broken disk and SIGTERM: every answer is a clean one, nothing is lost."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
from pathlib import Path
from typing import Iterator

import httpx
import psutil
import pytest
import yaml

from monitoring.predlog import read_log
from service.registry.register import register_model
from tests.onnx_graphs import modified_regressor
from tests.servers import DEADLINE, Running, VigilServer, looping, metric_value, vigil_server, wait_for

pytestmark = pytest.mark.integration

ROW = {"age": 50.0, "sex": 1.0, "bmi": 25.0, "bp": 90.0, "s1": 180.0, "s2": 100.0, "s3": 50.0, "s4": 4.0,
       "s5": 4.5, "s6": 90.0}


@pytest.fixture(scope="module")
def registry(example_registry: Path, trained_examples: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The examples plus 'sluggish': the diabetes model behind a loop of 2.5M steps on every call.

    About 2 s here. The tests below need it to outlast what they do while it runs (a 429, a probe,
    a SIGTERM: milliseconds) and a 0.2 s request timeout, and to end within its 10 s model budget:
    margins that hold on a machine 10 times faster and on one 4 times slower (stress-ng beside it).
    """
    work = tmp_path_factory.mktemp("faults")
    root = work / "models"
    shutil.copytree(example_registry, root)
    slow = modified_regressor(trained_examples["diabetes"] / "model.onnx", work / "slow.onnx",
                              delay_iterations=2_500_000)
    register_model("sluggish", slow, trained_examples["diabetes"] / "reference.parquet", target="target",
                   registry=root)
    return root


@pytest.fixture(scope="module")
def server(registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VigilServer]:
    deploy = tmp_path_factory.mktemp("deploy") / "deploy.yaml"
    deploy.write_text(yaml.safe_dump({"models": {"sluggish": {"timeout_ms": 10_000}}}))
    with vigil_server(registry, env={"VIGIL_DEPLOY": str(deploy)}) as srv:
        yield srv


def predictions_total(server: VigilServer) -> float:
    return metric_value(server.metrics_text(), "vigil_predictions_total") or 0.0


BAD_BODIES: list[tuple[str, bytes, int, str]] = [
    ("nan literal", b'{"model": "diabetes", "instances": [{"age": NaN}]}', 422, "age"),
    ("infinity", b'{"model": "diabetes", "instances": [{"age": -Infinity}]}', 422, "age"),
    ("overflow", b'{"model": "diabetes", "instances": [{"age": 1e400}]}', 422, "age"),
    ("string number", b'{"model": "diabetes", "instances": [{"age": "50"}]}', 422, "age"),
    ("nan string", b'{"model": "diabetes", "instances": [{"age": "nan"}]}', 422, "age"),
    ("extra field", b'{"model": "diabetes", "instances": [{"colour": 1}]}', 422, "colour"),
    ("missing fields", b'{"model": "diabetes", "instances": [{}]}', 422, "bmi"),
    ("empty batch", b'{"model": "diabetes", "instances": []}', 400, "instances"),
    ("oversize batch", b'{"model": "diabetes", "instances": [' + b",".join([b"{}"] * 1001) + b"]}", 413, "1000"),
    ("wrong type: list body", b"[1, 2]", 400, "body"),
    ("wrong type: instances object", b'{"model": "diabetes", "instances": {"age": 1}}', 400, "instances"),
    ("wrong type: model number", b'{"model": 7, "instances": [{}]}', 400, "model"),
    ("unknown envelope field", b'{"model": "diabetes", "instances": [{}], "debug": true}', 400, "debug"),
    ("huge string", b'{"model": "diabetes", "instances": [{"age": "' + b"x" * 500_000 + b'"}]}', 422, "age"),
    ("deeply nested", b'{"model": "diabetes", "instances": [' + b"[" * 10_000 + b"]" * 10_000 + b"]}", 400,
     "depth limit"),
    ("truncated", b'{"model": "diabetes", "inst', 400, "JSON"),
    ("not utf-8", b'{"model": "\xff\xfe"}', 400, "UTF-8"),
]


@pytest.mark.parametrize(("name", "body", "status", "named"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_input_is_a_named_4xx_and_predicts_nothing(server: VigilServer, name: str, body: bytes, status: int,
                                                       named: str) -> None:
    before = predictions_total(server)
    response = server.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert named in error["message"] + str(error["details"])
    assert predictions_total(server) == before


def test_malformed_content_types_are_415(server: VigilServer) -> None:
    for content_type in ("multipart/form-data", "multipart/form-data; boundary=", "text/plain", "application/xml"):
        response = server.post("/predict", content=b'{"model": "diabetes"}', headers={"content-type": content_type})
        assert response.status_code == 415, (content_type, response.text)


def _rss(server: VigilServer) -> int:
    return sum(p.memory_info().rss for p in server.workers())


def test_two_mib_body_is_refused_unread_without_memory_growth(server: VigilServer) -> None:
    assert server.workers(), "no worker process found"
    before = _rss(server)
    probes: list[int] = []

    def probe(stop: threading.Event) -> None:  # /livez keeps answering while the big bodies arrive
        with httpx.Client(base_url=server.url, timeout=DEADLINE) as client:
            while not stop.is_set():
                status = client.get("/livez").status_code
                assert status == 200, status
                probes.append(status)
                stop.wait(0.02)

    with looping(probe, name="livez-probe"):
        body = b'{"model": "diabetes", "instances": [' + b'{"age": 1.0},' * 170_000 + b'{}]}'
        assert len(body) > 2 * 1024 * 1024
        for _ in range(5):
            response = server.post("/predict", content=body, headers={"content-type": "application/json"})
            assert response.status_code == 413, response.text
        # Without a Content-Length (chunked), reading stops past the limit too.
        response = server.post("/predict", content=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                               headers={"content-type": "application/json"})
        assert response.status_code == 413
        # A declared size over the limit is refused from the headers: the answer comes though the
        # body is never sent (a server waiting for it would leave recv() to time out).
        with socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE) as sock:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: vigil\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n{\"model\": " % len(body))
            assert sock.recv(4096).startswith(b"HTTP/1.1 413")
        wait_for(lambda: len(probes) >= 1, what="no /livez probe answered")
    # Measured here: refused unread, the worker's RSS grows by under 1 MiB over these requests; read
    # and parsed (VIGIL_MAX_BODY_BYTES at 16 MiB), the five bodies grow it by about 20 MiB. The limit
    # sits between the two with a 10x margin above the first.
    assert _rss(server) - before < 10 * 1024 * 1024


def test_saturation_answers_429_with_retry_after_and_probes_still_answer(registry: Path, tmp_path: Path) -> None:
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text(yaml.safe_dump({"models": {"sluggish": {"timeout_ms": 10_000}}}))
    env = {"VIGIL_DEPLOY": str(deploy), "VIGIL_MAX_CONCURRENCY": "2", "VIGIL_REQUEST_TIMEOUT_SECONDS": "30"}
    with vigil_server(registry, env=env) as server:
        body = {"model": "sluggish", "instances": [ROW]}

        def call() -> int:
            with httpx.Client(base_url=server.url, timeout=DEADLINE) as client:
                return client.post("/predict", json=body).status_code

        admitted = [Running(call, name=f"sluggish-{i}") for i in range(2)]
        # Both in flight: the worker is at its limit (/metrics itself is exempt from it).
        server.wait_for_metric("vigil_http_requests_in_progress", 2, endpoint="/predict")
        refused = [server.post("/predict", json=body) for _ in range(4)]
        assert server.get("/metrics").status_code == 200
        assert server.get("/readyz").status_code == 200
        assert server.get("/livez").status_code == 200
        assert server.metric("vigil_http_requests_in_progress", endpoint="/predict") == 2  # still at the limit
        assert [r.status_code for r in refused] == [429] * 4, [r.text for r in refused]
        assert all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded" for r in refused)
        assert [a.result() for a in admitted] == [200, 200]
        assert server.metric("vigil_requests_overloaded_total") == 4


def test_request_past_the_timeout_is_504_and_counted(registry: Path, tmp_path: Path) -> None:
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text(yaml.safe_dump({"models": {"sluggish": {"timeout_ms": 10_000}}}))
    with vigil_server(registry, env={"VIGIL_DEPLOY": str(deploy), "VIGIL_REQUEST_TIMEOUT_SECONDS": "0.2"}) as server:
        response = server.post("/predict", json={"model": "sluggish", "instances": [ROW]})
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        assert metric_value(server.metrics_text(), "vigil_request_timeouts_total") == 1
        assert server.post("/predict", json={"model": "diabetes", "instances": [ROW]}).status_code == 200


def test_unwritable_prediction_log_never_fails_predictions(example_registry: Path, tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("the data directory is a file: every write fails")
    with vigil_server(example_registry, env={"VIGIL_DATA_DIR": str(blocked)}) as server:
        for _ in range(20):
            assert server.post("/predict", json={"model": "diabetes", "instances": [ROW, ROW]}).status_code == 200
        server.wait_for_metric("vigil_predlog_dropped_total", 40, model="diabetes")  # the flush that failed
        wait_for(lambda: "prediction log write failed" in server.log.read_text(), what="no log line")
        assert server.metric("vigil_predlog_write_errors_total", model="diabetes") >= 1
        assert server.log.read_text().count("prediction log write failed") == 1  # logged once per interval


def test_sigterm_lets_the_slow_request_finish_and_flushes_the_log(registry: Path, tmp_path: Path) -> None:
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text(yaml.safe_dump({"models": {"sluggish": {"timeout_ms": 10_000}}}))
    data_dir = tmp_path / "var"
    with vigil_server(registry, env={"VIGIL_DEPLOY": str(deploy), "VIGIL_DATA_DIR": str(data_dir),
                                     "VIGIL_PREDLOG_FLUSH_SECONDS": "30"}) as server:
        def slow_call() -> httpx.Response:
            with httpx.Client(base_url=server.url, timeout=DEADLINE) as client:
                return client.post("/predict", json={"model": "sluggish", "instances": [ROW]})

        caller = Running(slow_call, name="slow-call")
        server.wait_for_metric("vigil_http_requests_in_progress", 1, endpoint="/predict")
        assert _worker_listens(server)
        os.kill(server.proc.pid, signal.SIGTERM)
        wait_for(lambda: not _worker_listens(server), what="the worker still accepts connections after SIGTERM")
        assert caller.is_alive()  # it stopped accepting while the slow request is still being answered
        assert not _answer_to_a_new_request(server.port).startswith(b"HTTP")  # never served, only closed
        assert caller.result().status_code == 200
        server.proc.wait(timeout=DEADLINE)
        assert server.proc.returncode == 0
    # The flush interval was 30 s: the row is on disk only because shutdown flushed it.
    assert len(read_log(data_dir, "sluggish")) == 1


def _worker_listens(server: VigilServer) -> bool:
    """Whether a worker process still has a listening socket on the server's port."""
    pids = {worker.pid for worker in server.workers()}
    # psutil.net_connections spells the same on psutil 5 (which KServe's client pins) and 6+, Process's does not.
    return any(c.pid in pids and c.status == psutil.CONN_LISTEN and c.laddr.port == server.port
               for c in psutil.net_connections(kind="tcp"))


def _answer_to_a_new_request(port: int) -> bytes:
    """What a new connection to ``port`` is answered until it closes (nothing if it is refused or reset)."""
    received = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: vigil\r\n\r\n")
            while chunk := sock.recv(4096):
                received += chunk
    except OSError:
        pass
    return received
