"""Bad input, oversize bodies, saturation, a broken disk and SIGTERM: every answer is a clean one, nothing is lost."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import httpx
import psutil
import pytest
import yaml

from monitoring.predlog import read_log
from service.registry.register import register_model
from tests.onnx_graphs import modified_regressor
from tests.servers import VigilServer, metric_value, vigil_server

pytestmark = pytest.mark.integration

ROW = {"age": 50.0, "sex": 1.0, "bmi": 25.0, "bp": 90.0, "s1": 180.0, "s2": 100.0, "s3": 50.0, "s4": 4.0,
       "s5": 4.5, "s6": 90.0}


@pytest.fixture(scope="module")
def registry(example_registry: Path, trained_examples: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The examples plus 'sluggish': the diabetes model behind a ~0.6 s loop on every call."""
    work = tmp_path_factory.mktemp("faults")
    root = work / "models"
    shutil.copytree(example_registry, root)
    slow = modified_regressor(trained_examples["diabetes"] / "model.onnx", work / "slow.onnx",
                              delay_iterations=700_000)
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
    ("deeply nested", b'{"model": "diabetes", "instances": [' + b"[" * 10_000 + b"]" * 10_000 + b"]}", 400, ""),
    ("truncated", b'{"model": "diabetes", "inst', 400, "JSON"),
    ("not utf-8", b'{"model": "\xff\xfe"}', 400, ""),
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


def _worker_pids(server: VigilServer) -> list[int]:
    return [c.pid for c in psutil.Process(server.proc.pid).children(recursive=True)
            if any("_bentoml_impl.worker" in part or "bentoml" in part for part in c.cmdline())
            and c.pid != server.proc.pid]


def _rss(pids: list[int]) -> int:
    return sum(psutil.Process(pid).memory_info().rss for pid in pids if psutil.pid_exists(pid))


def test_two_mib_body_is_refused_fast_without_memory_growth(server: VigilServer) -> None:
    pids = _worker_pids(server)
    assert pids, "no worker process found"
    before = _rss(pids)
    slowest_livez = [0.0]
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=server.url, timeout=5) as client:
            while not stop.is_set():
                started = time.perf_counter()
                assert client.get("/livez").status_code == 200
                slowest_livez[0] = max(slowest_livez[0], time.perf_counter() - started)
                time.sleep(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        body = b'{"model": "diabetes", "instances": [' + b'{"age": 1.0},' * 170_000 + b'{}]}'
        assert len(body) > 2 * 1024 * 1024
        for _ in range(5):
            started = time.perf_counter()
            response = server.post("/predict", content=body, headers={"content-type": "application/json"})
            assert response.status_code == 413 and time.perf_counter() - started < 2.0
        # Without a Content-Length (chunked), reading stops past the limit too.
        response = server.post("/predict", content=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                               headers={"content-type": "application/json"})
        assert response.status_code == 413
    finally:
        stop.set()
        prober.join()
    assert _rss(pids) - before < 20 * 1024 * 1024
    assert slowest_livez[0] < 0.2


def test_saturation_answers_429_with_retry_after_and_probes_still_answer(registry: Path, tmp_path: Path) -> None:
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text(yaml.safe_dump({"models": {"sluggish": {"timeout_ms": 10_000}}}))
    env = {"VIGIL_DEPLOY": str(deploy), "VIGIL_MAX_CONCURRENCY": "2", "VIGIL_REQUEST_TIMEOUT_SECONDS": "5"}
    with vigil_server(registry, env=env) as server:
        body = {"model": "sluggish", "instances": [ROW]}

        def call(_: int) -> httpx.Response:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                return client.post("/predict", json=body)

        with ThreadPoolExecutor(max_workers=6) as pool:
            futures = [pool.submit(call, i) for i in range(6)]
            time.sleep(0.2)
            assert server.get("/metrics").status_code == 200
            assert server.get("/readyz").status_code == 200
            assert server.get("/livez").status_code == 200
            responses = [f.result() for f in futures]
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200, 200, 429, 429, 429, 429]
        refused = [r for r in responses if r.status_code == 429]
        assert all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded" for r in refused)
        assert metric_value(server.metrics_text(), "vigil_requests_overloaded_total") == 4


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
        time.sleep(1.5)
        text = server.metrics_text()
        assert metric_value(text, "vigil_predlog_write_errors_total", model="diabetes") >= 1
        assert metric_value(text, "vigil_predlog_dropped_total", model="diabetes") == 40
        assert server.log.read_text().count("prediction log write failed") == 1  # logged once per interval


def test_sigterm_lets_the_slow_request_finish_and_flushes_the_log(registry: Path, tmp_path: Path) -> None:
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text(yaml.safe_dump({"models": {"sluggish": {"timeout_ms": 10_000}}}))
    data_dir = tmp_path / "var"
    with vigil_server(registry, env={"VIGIL_DEPLOY": str(deploy), "VIGIL_DATA_DIR": str(data_dir),
                                     "VIGIL_PREDLOG_FLUSH_SECONDS": "30"}) as server:
        result: dict[str, Any] = {}

        def slow_call() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                result["response"] = client.post("/predict", json={"model": "sluggish", "instances": [ROW]})

        caller = threading.Thread(target=slow_call)
        caller.start()
        time.sleep(0.3)
        started = time.monotonic()
        os.kill(server.proc.pid, signal.SIGTERM)
        time.sleep(0.2)
        with pytest.raises((httpx.HTTPError, OSError)):
            with socket.create_connection(("127.0.0.1", server.port), timeout=1) as sock:
                sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
                if not sock.recv(100):
                    raise OSError("closed")
        caller.join(timeout=30)
        server.proc.wait(timeout=30)
        assert time.monotonic() - started < 15
        assert result["response"].status_code == 200
        assert server.proc.returncode == 0
    # The flush interval was 30 s: the row is on disk only because shutdown flushed it.
    assert len(read_log(data_dir, "sluggish")) == 1
