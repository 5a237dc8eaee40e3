"""Every handler through the service's ASGI app in this process: answers, each 4xx class, feedback, probes, admin.

Quick (no server, no port): the same requests the integration tests send to a
real ``vigil serve``, answered by the same app object a worker serves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pandas as pd
import pytest

from service.core.requestid import parse_request_id
from tests.asgi.conftest import AppFactory
from tests.servers import DEADLINE, metric_value

pytestmark = pytest.mark.anyio

META = ("target", "prediction", "prediction_score")
JSON = {"content-type": "application/json"}


def rows(registry: Path, model: str, n: int) -> list[dict[str, Any]]:
    frame = pd.read_parquet(registry / model / "1" / "reference.parquet")
    return frame.drop(columns=[c for c in META if c in frame]).head(n).to_dict(orient="records")


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The error of a refused request, after checking its status, code and the one body shape."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["code"] == code and body["error"]["message"], body
    return body["error"]


async def metric(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return metric_value(response.text, name, **labels) or 0.0


async def test_predict_answers_every_instance_with_the_request_id(vigil_app: AppFactory, registry_copy: Path) -> None:
    async with vigil_app() as client:
        response = await client.post("/predict", json={"model": "cancer", "instances": rows(registry_copy, "cancer", 3)})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == "cancer" and response.headers["x-request-id"] == body["request_id"]
        assert len(body["predictions"]) == 3
        for item in body["predictions"]:
            assert item["version"] == "1" and item["variant"] == "stable" and item["label"] in (0, 1)
            assert sum(item["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert await metric(client, "vigil_predictions_total", model="cancer", variant="stable") == 3
        regression = await client.post("/predict", json={"model": "diabetes",
                                                         "instances": rows(registry_copy, "diabetes", 2)})
        assert regression.status_code == 200, regression.text
        assert all(isinstance(p["value"], float) for p in regression.json()["predictions"])


REFUSED: list[Any] = [
    pytest.param(b'{"model": "cancer", "instances": [', JSON, 400, "malformed_json", id="400-malformed-json"),
    pytest.param(b'{"model": "cancer", "instances": [{}], "debug": 1}', JSON, 400, "invalid_request",
                 id="400-unknown-envelope-field"),
    pytest.param(b'{"model": "nope", "instances": [{"a": 1}]}', JSON, 404, "model_not_found", id="404-unknown-model"),
    pytest.param(b'{"model": "cancer", "instances": [' + b",".join([b"{}"] * 1001) + b"]}", JSON, 413,
                 "too_many_instances", id="413-too-many-instances"),
    pytest.param(b'{"model": "cancer", "instances": [' + b" " * (1 << 20) + b"]}", JSON, 413, "body_too_large",
                 id="413-body-too-large"),
    pytest.param(b"model=cancer", {"content-type": "application/x-www-form-urlencoded"}, 415,
                 "unsupported_media_type", id="415-form"),
]


@pytest.mark.parametrize(("body", "headers", "status", "code"), REFUSED)
async def test_refused_requests_have_their_status_and_code_and_predict_nothing(
        vigil_app: AppFactory, body: bytes, headers: dict[str, str], status: int, code: str) -> None:
    async with vigil_app() as client:
        refused = await client.post("/predict", content=body, headers=headers)
        error_of(refused, status, code)
        assert parse_request_id(refused.headers["x-request-id"]) is not None  # a refusal carries its id too
        assert await metric(client, "vigil_predictions_total") == 0


async def test_a_refused_v2_inference_carries_a_request_id_of_its_own(vigil_app: AppFactory) -> None:
    async with vigil_app() as client:
        ids = set()
        for _ in range(2):
            refused = await client.post("/v2/models/cancer/infer", content=b'{"inputs": [', headers=JSON)
            assert refused.status_code == 400 and "error" in refused.json(), refused.text
            assert parse_request_id(refused.headers["x-request-id"]) is not None
            ids.add(refused.headers["x-request-id"])
        assert len(ids) == 2


async def test_chunked_body_past_the_limit_is_413_before_it_is_read_whole(vigil_app: AppFactory) -> None:
    sent = []

    async def chunks() -> Any:
        yield b'{"model": "cancer", "instances": ['
        for _ in range(64):  # 4 MiB in all, four times the limit
            sent.append(1)
            yield b" " * 65536
        yield b"]}"

    async with vigil_app() as client:
        error_of(await client.post("/predict", content=chunks(), headers=JSON), 413, "body_too_large")
    assert len(sent) < 64  # reading stopped past the limit


async def test_invalid_instance_is_422_naming_the_instance_and_the_field(vigil_app: AppFactory,
                                                                         registry_copy: Path) -> None:
    instances = rows(registry_copy, "cancer", 3)
    instances[2]["mean radius"] = "abc"
    del instances[1]["mean texture"]
    async with vigil_app() as client:
        error = error_of(await client.post("/predict", json={"model": "cancer", "instances": instances}),
                         422, "invalid_input")
        assert {"instance": 1, "field": "mean texture", "problem": "missing feature"} in error["details"]
        assert {"instance": 2, "field": "mean radius", "problem": "expected a number, got 'abc'"} in error["details"]
        assert await metric(client, "vigil_input_rejected_total", model="cancer", reason="invalid_input") == 1


async def wait_for_metric(client: httpx.AsyncClient, name: str, value: float, **labels: str) -> None:
    """Wait until ``name`` reaches ``value`` (pending feedback is counted once its prediction is logged)."""
    with anyio.fail_after(DEADLINE):
        while await metric(client, name, **labels) != value:
            await anyio.sleep(0.05)


async def test_feedback_is_joined_counted_once_and_refused_when_wrong(vigil_app: AppFactory,
                                                                      registry_copy: Path) -> None:
    frame = pd.read_parquet(registry_copy / "cancer" / "1" / "reference.parquet").head(4)
    async with vigil_app(PREDLOG_FLUSH_SECONDS="0.05") as client:
        served = (await client.post("/predict", json={"model": "cancer",
                                                      "instances": rows(registry_copy, "cancer", 4)})).json()
        predicted = [p["label"] for p in served["predictions"]]
        actuals = frame["target"].tolist()
        body = {"model": "cancer", "request_id": served["request_id"], "actuals": actuals}
        accepted = await client.post("/feedback", json=body)  # at once: before the log has flushed
        assert accepted.status_code == 200, accepted.text
        answer = accepted.json()
        assert (answer["model"], answer["accepted"], answer["duplicates"]) == ("cancer", 4, 0)
        assert 0 <= answer["pending"] <= 4
        await wait_for_metric(client, "vigil_feedback_total", 4, model="cancer")
        again = await client.post("/feedback", json=body)
        assert again.json()["accepted"] == 0 and again.json()["duplicates"] == 4
        correct = sum(p == a for p, a in zip(predicted, actuals))
        assert await metric(client, "vigil_feedback_correct_total", model="cancer") == correct
        unknown = await client.post("/feedback", json={"model": "cancer", "request_id": "f" * 32, "actuals": [1]})
        assert error_of(unknown, 404, "unknown_request_id")["details"][0]["instance"] == 0
        wrong = await client.post("/feedback", json={**body, "actuals": ["1", 0, 1, 0]})
        assert error_of(wrong, 422, "invalid_input")["details"][0] == {
            "instance": 0, "field": "actual", "problem": wrong.json()["error"]["details"][0]["problem"]}
        error_of(await client.post("/feedback", json={"model": "cancer", "actuals": [1]}), 400, "invalid_request")
        error_of(await client.post("/feedback", json={**body, "model": "nope"}), 404, "model_not_found")
        assert await metric(client, "vigil_feedback_total", model="cancer") == 4


async def test_models_lists_each_model_and_what_it_serves(vigil_app: AppFactory) -> None:
    async with vigil_app() as client:
        response = await client.get("/models")
        assert response.status_code == 200
        models = {m["name"]: m for m in response.json()["models"]}
        assert set(models) == {"cancer", "diabetes"}
        assert models["cancer"]["state"] == "serving" and models["cancer"]["task"] == "classification"
        assert models["cancer"]["version"] == "1" and len(models["cancer"]["sha256"]) == 64
        assert models["diabetes"]["task"] == "regression" and len(models["diabetes"]["features"]) == 10


async def test_readyz_names_a_model_that_cannot_load(vigil_app: AppFactory, registry_copy: Path) -> None:
    with open(registry_copy / "diabetes" / "1" / "model.onnx", "ab") as fh:
        fh.write(b"tampered")  # no longer matches the card's sha256
    async with vigil_app() as client:
        assert (await client.get("/livez")).status_code == 200
        response = await client.get("/readyz")
        assert response.status_code == 200  # cancer serves
        body = response.json()
        assert body["ready"] is True and body["models"] == {"cancer": "serving", "diabetes": "load_failed"}
        assert "sha256" in body["not_ready"]["diabetes"] and "cancer" not in body["not_ready"]


async def test_metrics_are_prometheus_text_with_bounded_endpoint_labels(vigil_app: AppFactory) -> None:
    async with vigil_app() as client:
        for path in ("/nowhere", "/predict/extra", "/models"):
            await client.get(path)
        response = await client.get("/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        assert metric_value(response.text, "vigil_http_requests_total", endpoint="other", code="404") == 2
        assert metric_value(response.text, "vigil_http_requests_total", endpoint="/models", code="200") == 1
        # Known label sets start at 0: the model's families exist before its first request.
        assert metric_value(response.text, "vigil_model_ready", model="cancer") == 1
        assert metric_value(response.text, "vigil_predictions_total", model="cancer") == 0


ADMIN = ("/admin/reload", "/admin/rollback", "/admin/promote")


async def test_admin_endpoints_are_403_without_a_configured_token(vigil_app: AppFactory) -> None:
    async with vigil_app() as client:
        for path in ADMIN:
            response = await client.post(path, json={"model": "cancer"}, headers={"authorization": "Bearer x"})
            error_of(response, 403, "admin_disabled")


async def test_admin_endpoints_need_the_configured_token(vigil_app: AppFactory) -> None:
    async with vigil_app(ADMIN_TOKEN="s3cret") as client:
        for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "s3cret"}):
            for path in ADMIN:
                error_of(await client.post(path, json={"model": "cancer"}, headers=headers), 401, "unauthorized")
        reloaded = await client.post("/admin/reload", headers={"authorization": "Bearer s3cret"})
        assert reloaded.status_code == 200 and reloaded.json()["reloaded"] is True
        nothing = await client.post("/admin/promote", json={"model": "cancer"},
                                    headers={"authorization": "Bearer s3cret"})
        error_of(nothing, 409, "conflict")  # no canary to promote


async def test_non_finite_literals_name_the_field(vigil_app: AppFactory, registry_copy: Path) -> None:
    row = rows(registry_copy, "cancer", 1)[0]
    row["mean radius"] = 123456789.0
    body = orjson.dumps({"model": "cancer", "instances": [row]}).replace(b"123456789.0", b"NaN")
    async with vigil_app() as client:
        error = error_of(await client.post("/predict", content=body, headers=JSON), 422, "invalid_input")
        assert error["details"][0]["instance"] == 0 and error["details"][0]["field"] == "mean radius"


async def test_canary_verdict_of_a_model_without_canary_and_of_an_unknown_one(vigil_app: AppFactory) -> None:
    async with vigil_app() as client:
        verdict = await client.get("/canary/cancer")
        assert verdict.status_code == 200, verdict.text
        assert verdict.json() | {"stable_version": None} == {"model": "cancer", "stable_version": None,
                                                             "phase": "none", "canary_version": None,
                                                             "healthy": True, "promotion": None}
        assert (await client.post("/canary/cancer/gate")).status_code == 200
        error_of(await client.get("/canary/nope"), 404, "model_not_found")


async def test_an_empty_admin_token_keeps_the_admin_endpoints_closed(vigil_app: AppFactory) -> None:
    async with vigil_app(ADMIN_TOKEN="") as client:
        for header in ({"Authorization": "Bearer "}, {"Authorization": "Bearer"}, {}):
            error_of(await client.post("/admin/reload", headers=header), 403, "admin_disabled")
