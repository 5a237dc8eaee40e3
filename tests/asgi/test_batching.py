"""Adaptive batching through the whole app: concurrent /predict and /v2 requests to a slow model with batching on.

The model takes a fixed time per call whatever its rows (a loop in the graph), so its calls run on
the model threads and the requests that arrive meanwhile are merged; it raises for an ``idx``
outside its table, which is how one request poisons a merged call.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
import httpx
import numpy as np
import onnxruntime as ort
import pytest

from monitoring.predlog import read_log
from service.registry.register import register_model
from tests.asgi.conftest import AppFactory
from tests.onnx_graphs import index_lookup_reference, index_lookup_regressor, modified_regressor
from tests.servers import metric_value

pytestmark = pytest.mark.anyio

REQUESTS = 32
POISONED = 7   # the request whose row the model cannot take
DEPLOY = """\
models:
  lookup:
    batching: {max_batch_size: 64}
    timeout_ms: 60000
"""


@pytest.fixture
def slow_lookup(registry_copy: Path, tmp_path: Path) -> Path:
    """``table[int(idx)] + x`` after a fixed delay per call, registered as ``lookup`` with batching on."""
    work = tmp_path / "lookup"
    work.mkdir()
    model = modified_regressor(index_lookup_regressor(work / "fast.onnx"), work / "slow.onnx", delay_iterations=20_000)
    register_model("lookup", model, index_lookup_reference(work / "reference.parquet"), target="target",
                   registry=registry_copy)
    (tmp_path / "deploy.yaml").write_text(DEPLOY)
    return model


def request_rows(i: int) -> list[dict[str, float]]:
    """Distinct rows per request: one to three of them, each ``idx`` in the table but the poisoned one."""
    if i == POISONED:
        return [{"idx": 99.0, "x": 0.5}]
    return [{"idx": float((i + r) % 10), "x": round(i * 0.01 + r * 0.001, 6)} for r in range(1 + i % 3)]


async def send(client: httpx.AsyncClient, i: int) -> tuple[str, list[float | None], list[str | None]]:
    """Request ``i`` by /predict (even) or /v2 (odd): its request id, values and fallback reasons."""
    rows = request_rows(i)
    if i % 2 == 0:
        response = await client.post("/predict", json={"model": "lookup", "instances": rows})
        assert response.status_code == 200, response.text
        body = response.json()
        return (body["request_id"], [p["value"] for p in body["predictions"]],
                [p.get("reason") for p in body["predictions"]])
    tensor = {"name": "input", "datatype": "FP64", "shape": [len(rows), 2],
              "data": [v for row in rows for v in (row["idx"], row["x"])]}
    response = await client.post("/v2/models/lookup/infer", json={"inputs": [tensor]})
    assert response.status_code == 200, response.text
    body = response.json()
    (output,) = body["outputs"]
    return body["parameters"]["request_id"], list(output["data"]), body["parameters"]["reasons"]


async def test_concurrent_requests_each_get_their_own_rows_and_a_poisoned_one_fails_alone(
        vigil_app: AppFactory, slow_lookup: Path, tmp_path: Path) -> None:
    session = ort.InferenceSession(str(slow_lookup), providers=["CPUExecutionProvider"])

    def direct(rows: list[dict[str, float]]) -> list[float]:
        x = np.array([[row["idx"], row["x"]] for row in rows], dtype=np.float32)
        return session.run(None, {"input": x})[0][:, 0].tolist()

    async with vigil_app(REQUEST_TIMEOUT_SECONDS="120") as client:
        answers = await asyncio.gather(*(send(client, i) for i in range(REQUESTS)))
        metrics = (await client.get("/metrics")).text
        fallback_median = (await client.post("/predict", json={
            "model": "lookup", "instances": [{"idx": 99.0, "x": 0.0}]})).json()["predictions"][0]["value"]

    for i, (_, values, reasons) in enumerate(answers):
        rows = request_rows(i)
        if i == POISONED:
            assert reasons == ["model_error"] and values == [fallback_median]
        else:
            assert reasons == [None] * len(rows), i
            assert values == pytest.approx(direct(rows), rel=1e-6), i

    def metric(name: str, **labels: str) -> float:
        return metric_value(metrics, name, model="lookup", version="1", **labels) or 0.0

    # Merging happened: the calls on the model threads carried more requests than there were calls.
    calls, requests = metric("vigil_batched_requests_count"), metric("vigil_batched_requests_sum")
    assert 0 < calls < requests
    assert metric("vigil_batched_requests_bucket", le="1.0") < calls   # some call merged more than one request
    assert model_errors(metrics) == 1   # the poisoned request's own call; the merged call it failed is not counted
    assert metric("vigil_fallback_total", reason="model_error") == 1

    # Each request's own log rows: its features, its answer and its reason, under its own id.
    logged = read_log(tmp_path / "var", "lookup")
    for i, (request_id, values, reasons) in enumerate(answers):
        mine = logged[logged["request_id"] == request_id].sort_values("index")
        rows = request_rows(i)
        assert mine["index"].tolist() == list(range(len(rows))), i
        assert mine["idx"].tolist() == [row["idx"] for row in rows]
        assert mine["x"].tolist() == pytest.approx([row["x"] for row in rows])
        assert mine["prediction"].tolist() == pytest.approx(values)
        assert [None if r is None or r != r else r for r in mine["reason"].tolist()] == reasons


def model_errors(metrics: str) -> float:
    """``vigil_model_errors_total`` of the lookup model, whatever exception class onnxruntime raised."""
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("vigil_model_errors_total{") and 'model="lookup"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total

