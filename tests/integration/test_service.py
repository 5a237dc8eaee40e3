"""The real service over HTTP: predictions match onnxruntime, every bad request gets its 4xx."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest

from tests.servers import VigilServer, metric_value, vigil_server

pytestmark = pytest.mark.integration

META_COLUMNS = ("target", "prediction", "prediction_score")


@pytest.fixture(scope="module")
def registry_with_broken(example_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The examples plus two copies of cancer that cannot load.

    'broken': its model file changed after registration (sha256 mismatch).
    'truncated': its model file cut in half and its card's sha256 edited to
    match, so the file passes the checksum and onnxruntime itself refuses it.
    """
    import hashlib

    root = tmp_path_factory.mktemp("registry-broken") / "models"
    shutil.copytree(example_registry, root)
    for name in ("broken", "truncated"):
        shutil.copytree(root / "cancer", root / name)
        card = root / name / "1" / "card.yaml"
        card.write_text(card.read_text().replace("name: cancer", f"name: {name}"))
    with open(root / "broken" / "1" / "model.onnx", "ab") as fh:
        fh.write(b"tampered")
    model = root / "truncated" / "1" / "model.onnx"
    original = hashlib.sha256(model.read_bytes()).hexdigest()
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    card = root / "truncated" / "1" / "card.yaml"
    card.write_text(card.read_text().replace(original, hashlib.sha256(model.read_bytes()).hexdigest()))
    return root


@pytest.fixture(scope="module")
def server(registry_with_broken: Path) -> Iterator[VigilServer]:
    with vigil_server(registry_with_broken) as srv:
        yield srv


def reference_rows(registry: Path, model: str, n: int) -> list[dict[str, Any]]:
    frame = pd.read_parquet(registry / model / "1" / "reference.parquet")
    return frame.drop(columns=[c for c in META_COLUMNS if c in frame]).head(n).to_dict(orient="records")


def onnx_outputs(registry: Path, model: str, rows: list[dict[str, Any]]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(registry / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = pd.DataFrame(rows).to_numpy(dtype=np.float32)
    return session.run(None, {session.get_inputs()[0].name: x})


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return body["error"]


def test_classifier_predictions_match_onnxruntime(server: VigilServer, registry_with_broken: Path) -> None:
    rows = reference_rows(registry_with_broken, "cancer", 25)
    response = server.post("/predict", json={"model": "cancer", "instances": rows})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "cancer" and len(body["request_id"]) >= 16
    labels, probabilities = onnx_outputs(registry_with_broken, "cancer", rows)
    assert len(body["predictions"]) == 25
    for item, label, probs in zip(body["predictions"], labels, probabilities):
        assert item["version"] == "1" and item["variant"] == "stable"
        assert item["label"] == int(label)
        assert item["probabilities"]["0"] == pytest.approx(float(probs[0]), abs=1e-6)
        assert item["probabilities"]["1"] == pytest.approx(float(probs[1]), abs=1e-6)


def test_regressor_predictions_match_onnxruntime(server: VigilServer, registry_with_broken: Path) -> None:
    rows = reference_rows(registry_with_broken, "diabetes", 10)
    response = server.post("/predict", json={"model": "diabetes", "instances": rows, "key": "user-1"})
    assert response.status_code == 200, response.text
    (values,) = onnx_outputs(registry_with_broken, "diabetes", rows)
    got = [item["value"] for item in response.json()["predictions"]]
    assert got == pytest.approx(values[:, 0].astype(float).tolist(), rel=1e-6)


def test_unknown_model_is_404(server: VigilServer) -> None:
    error = assert_error(server.post("/predict", json={"model": "nope", "instances": [{"a": 1}]}), 404, "model_not_found")
    assert "nope" in error["message"] and "cancer" in error["message"]


def test_model_that_failed_to_load_answers_from_its_fallback(server: VigilServer, registry_with_broken: Path) -> None:
    response = server.post("/predict", json={"model": "broken", "instances": reference_rows(registry_with_broken, "cancer", 2)})
    assert response.status_code == 200, response.text
    for item in response.json()["predictions"]:
        assert item["variant"] == "fallback" and item["reason"] == "load_failed"
        assert item["label"] == 1  # the majority class of the reference data
    listed = {m["name"]: m for m in server.get("/models").json()["models"]}
    assert listed["broken"]["state"] == "load_failed" and "sha256" in listed["broken"]["error"]
    assert listed["cancer"]["state"] == "serving"


@pytest.mark.parametrize(
    ("mutate", "field", "problem"),
    [
        (lambda row: row.pop("mean radius"), "mean radius", "missing feature"),
        (lambda row: row.update({"colour": "red"}), "colour", "unknown feature"),
        (lambda row: row.update({"mean radius": "abc"}), "mean radius", "expected a number, got 'abc'"),
        (lambda row: row.update({"mean radius": None}), "mean radius", "expected a number, got null"),
        (lambda row: row.update({"mean radius": True}), "mean radius", "expected a number, got True"),
        (lambda row: row.update({"mean radius": [1, 2]}), "mean radius", "expected a number, got list"),
    ],
    ids=["missing", "unknown", "string", "null", "bool", "list"],
)
def test_invalid_instance_names_instance_and_field(server: VigilServer, registry_with_broken: Path,
                                                   mutate: Any, field: str, problem: str) -> None:
    rows = reference_rows(registry_with_broken, "cancer", 3)
    mutate(rows[2])
    error = assert_error(server.post("/predict", json={"model": "cancer", "instances": rows}), 422, "invalid_input")
    assert error["details"] == [{"instance": 2, "field": field, "problem": problem}]


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_non_finite_numbers_name_the_field(server: VigilServer, registry_with_broken: Path, literal: bytes) -> None:
    import orjson

    row = reference_rows(registry_with_broken, "cancer", 1)[0]
    row["mean radius"] = 123456789.0
    body = orjson.dumps({"model": "cancer", "instances": [row]}).replace(b"123456789.0", literal)
    error = assert_error(server.post("/predict", content=body, headers={"content-type": "application/json"}),
                         422, "invalid_input")
    assert error["details"] == [{"instance": 0, "field": "mean radius", "problem": error["details"][0]["problem"]}]
    assert "finite" in error["details"][0]["problem"]


def test_empty_instances_and_bad_envelope_are_400(server: VigilServer) -> None:
    error = assert_error(server.post("/predict", json={"model": "cancer", "instances": []}), 400, "invalid_request")
    assert error["details"][0]["field"] == "instances"
    error = assert_error(server.post("/predict", json={"model": "cancer", "instances": [{}], "extra": 1}),
                         400, "invalid_request")
    assert error["details"][0]["field"] == "extra"
    assert_error(server.post("/predict", json=[1, 2, 3]), 400, "invalid_request")


def test_malformed_json_is_400(server: VigilServer) -> None:
    error = assert_error(server.post("/predict", content=b'{"model": "cancer", "instances": [',
                                     headers={"content-type": "application/json"}), 400, "malformed_json")
    assert "JSON" in error["message"]


def test_too_many_instances_is_413(server: VigilServer) -> None:
    error = assert_error(server.post("/predict", json={"model": "cancer", "instances": [{}] * 1001}),
                         413, "too_many_instances")
    assert "1000" in error["message"]


def test_body_over_limit_is_413(server: VigilServer) -> None:
    body = b'{"model": "cancer", "instances": [' + b" " * (1 << 20) + b"]}"
    assert_error(server.post("/predict", content=body, headers={"content-type": "application/json"}),
                 413, "body_too_large")


def test_chunked_body_over_limit_is_413(server: VigilServer) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "cancer", "instances": ['
        for _ in range(40):
            yield b" " * 65536
        yield b"]}"

    assert_error(server.post("/predict", content=chunks(), headers={"content-type": "application/json"}),
                 413, "body_too_large")


def test_non_json_content_type_is_415(server: VigilServer) -> None:
    assert_error(server.post("/predict", content=b"a=1", headers={"content-type": "application/x-www-form-urlencoded"}),
                 415, "unsupported_media_type")
    assert_error(server.post("/predict", content=b"--x", headers={"content-type": "multipart/form-data"}),
                 415, "unsupported_media_type")


def test_models_lists_every_loaded_model(server: VigilServer) -> None:
    response = server.get("/models")
    assert response.status_code == 200
    models = {m["name"]: m for m in response.json()["models"]}
    cancer = models["cancer"]
    assert cancer["version"] == "1" and cancer["task"] == "classification" and cancer["state"] == "serving"
    assert len(cancer["features"]) == 30 and cancer["features"][0]["name"] == "mean radius"
    assert len(cancer["sha256"]) == 64 and cancer["loaded_at"]
    assert models["diabetes"]["task"] == "regression" and "prediction_range" in models["diabetes"]


def test_health_endpoints_and_openapi(server: VigilServer) -> None:
    assert server.get("/livez").status_code == 200
    assert server.get("/readyz").status_code == 200
    spec = server.get("/docs.json").json()
    assert "/predict" in spec["paths"] and "/models" in spec["paths"]
    assert "vigil_predictions_total" in server.metrics_text()


def test_answered_instances_reach_the_prediction_log(server: VigilServer, registry_with_broken: Path) -> None:
    from monitoring.predlog import read_log

    rows = reference_rows(registry_with_broken, "cancer", 4)
    answer = server.post("/predict", json={"model": "cancer", "instances": rows}).json()
    server.wait_until_logged("cancer", [answer["request_id"]])
    logged = read_log(server.data_dir, "cancer")
    mine = logged[logged["request_id"] == answer["request_id"]].sort_values("index")
    assert mine["index"].tolist() == [0, 1, 2, 3]
    assert mine["prediction"].tolist() == [p["label"] for p in answer["predictions"]]
    assert mine["mean radius"].tolist() == [r["mean radius"] for r in rows]
    assert mine["prediction_score"].tolist() == pytest.approx([p["probabilities"]["1"] for p in answer["predictions"]])


def test_readyz_names_the_model_that_is_not_ready(server: VigilServer, registry_with_broken: Path) -> None:
    response = server.get("/readyz")
    assert response.status_code == 200  # the other models serve
    body = response.json()
    assert body["ready"] is True and "sha256" in body["not_ready"]["broken"]
    assert "sha256" not in body["not_ready"]["truncated"] and body["not_ready"]["truncated"]
    assert body["models"]["cancer"] == "serving" and "cancer" not in body["not_ready"]
    fallback = server.post("/predict", json={"model": "truncated", "instances": reference_rows(
        registry_with_broken, "cancer", 1)})
    assert fallback.status_code == 200  # answered by the card's fallback while the model cannot load
    assert fallback.json()["predictions"][0]["reason"] == "load_failed"


def test_unknown_paths_create_no_label_values(server: VigilServer) -> None:
    import uuid

    from prometheus_client.parser import text_string_to_metric_families

    def series() -> tuple[set[tuple[str, tuple[tuple[str, str], ...]]], set[str]]:
        """The HTTP families' series, and every label value of every family."""
        samples = [s for f in text_string_to_metric_families(server.metrics_text()) for s in f.samples]
        http = {(s.name, tuple(sorted(s.labels.items()))) for s in samples if "endpoint" in s.labels}
        return http, {v for s in samples for v in s.labels.values()}

    paths = [uuid.uuid4().hex for _ in range(100)]
    for path in paths[:50]:
        assert server.get(f"/{path}").status_code == 404
        assert server.post(f"/predict/{path}", json={}).status_code in (404, 405)
    http, values = series()
    assert {dict(labels)["endpoint"] for _, labels in http} <= {
        "/predict", "/models", "/docs.json", "/admin/reload", "/admin/rollback", "/admin/promote", "/feedback", "/",
        "/v2/models/{name}/infer", "other"}
    for path in paths[50:]:
        server.get(f"/{path}")
    # Only the HTTP families are compared: another family may gain a series meanwhile from an earlier
    # test's state (the prediction log's flush), which is no label value made of a path.
    assert series()[0] == http
    assert not {v for v in values | series()[1] if any(p in v for p in paths)}


def test_admin_endpoints_are_disabled_without_a_token(server: VigilServer) -> None:
    for path in ("/admin/reload", "/admin/rollback", "/admin/promote"):
        response = server.post(path, json={"model": "cancer"}, headers={"Authorization": "Bearer anything"})
        assert response.status_code == 403 and response.json()["error"]["code"] == "admin_disabled"


def test_cors_enabled_in_bentoml_config_answers_with_cors_headers(example_registry: Path) -> None:
    """With CORS on, /predict takes BentoML's full path (its CORS middleware) and is still counted."""
    # The v2 configuration's service defaults; a BENTOML_CONFIG file in the v1 layout never reaches a 1.4 service.
    cors = ("services.http.cors.enabled=true services.http.cors.access_control_allow_origins=[https://dashboard.example]"
            " services.http.cors.access_control_allow_methods=[GET,POST]"
            " services.http.cors.access_control_allow_headers=[content-type]")
    origin = {"origin": "https://dashboard.example"}
    with vigil_server(example_registry, env={"BENTOML_CONFIG_OPTIONS": cors}) as srv:
        preflight = srv.client.options("/predict", headers={**origin, "access-control-request-method": "POST",
                                                            "access-control-request-headers": "content-type"})
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == "https://dashboard.example"
        assert "POST" in preflight.headers["access-control-allow-methods"]
        rows = reference_rows(example_registry, "cancer", 2)
        answer = srv.post("/predict", json={"model": "cancer", "instances": rows}, headers=origin)
        assert answer.status_code == 200, answer.text
        assert answer.headers["access-control-allow-origin"] == "https://dashboard.example"
        assert len(answer.json()["predictions"]) == 2
        refused = srv.post("/predict", json={"model": "cancer", "instances": rows},
                           headers={"origin": "https://elsewhere.example"})
        assert refused.status_code == 200 and "access-control-allow-origin" not in refused.headers
        text = srv.metrics_text()
        assert metric_value(text, "vigil_http_requests_total", endpoint="/predict", method="POST", code="200") == 2
        assert metric_value(text, "vigil_predictions_total", model="cancer", version="1", variant="stable") == 4
