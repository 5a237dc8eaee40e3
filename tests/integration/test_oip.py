"""The Open Inference Protocol (/v2) against the real service, with Triton's own client, JSON and binary tensors.

The registry holds the examples (cancer: a classifier over one [N, 30] tensor;
diabetes: a regressor over one [N, 10] tensor), ``wine`` (one input per
feature, one of them a string), cancer:2 (an identical copy, the canary at half
the traffic), diabetes:4 (fails for ``sex`` > 2, served as a canary without
traffic, so only a pinned call reaches it) and ``glacial`` (a loop far longer
than any budget here). Every answer is compared with onnxruntime on the same
rows.
"""

from __future__ import annotations

import shutil
import struct
import threading
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pandas as pd
import pytest
import tritonclient.http as triton
import yaml
from tritonclient.utils import InferenceServerException

from service.registry.register import register_model
from tests import fixtures as fx
from tests.onnx_graphs import modified_regressor
from tests.servers import VigilServer, metric_value, vigil_server, wait_for

pytestmark = pytest.mark.integration

WINE_INPUTS = [fx.WINE_CATEGORICAL, *fx.WINE_NUMERIC]
NEVER_JUDGED = {"min_requests": 1_000_000}
"""Canary rules that never roll back within a test: the split itself is under test here."""
INFER = "/v2/models/{name}/infer"


@pytest.fixture(scope="module")
def registry(example_registry: Path, trained_examples: dict[str, Path],
             tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("oip")
    root = work / "models"
    shutil.copytree(example_registry, root)
    cancer = trained_examples["cancer"]
    register_model("cancer", cancer / "model.onnx", cancer / "reference.parquet", target=fx.TARGET, registry=root,
                   version="2")
    diabetes = trained_examples["diabetes"]
    failing = modified_regressor(diabetes / "model.onnx", work / "failing.onnx", fail_feature=1)
    register_model("diabetes", failing, diabetes / "reference.parquet", target=fx.TARGET, registry=root, version="4")
    wine = fx.fit_per_feature_classifier()
    reference = wine.reference.copy()
    reference.loc[0, fx.WINE_CATEGORICAL] = None  # the category is nullable
    model = fx.export(wine.estimator, fx.per_feature_types(WINE_INPUTS, {fx.WINE_CATEGORICAL}), zipmap=False)
    files = fx.write_artefacts(work / "wine", model, reference)
    register_model("wine", files.model, files.reference, target=fx.TARGET, registry=root)
    glacial = modified_regressor(diabetes / "model.onnx", work / "glacial.onnx", delay_iterations=100_000_000)
    register_model("glacial", glacial, diabetes / "reference.parquet", target=fx.TARGET, registry=root)
    return root


@pytest.fixture(scope="module")
def server(registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VigilServer]:
    deploy = tmp_path_factory.mktemp("oip-deploy") / "deploy.yaml"
    deploy.write_text(yaml.safe_dump({"models": {
        "cancer": {"stable": "1", "canary": {"version": "2", "traffic": 0.5, "sticky": True,
                                             "rollback_when": NEVER_JUDGED}},
        "diabetes": {"stable": "1", "canary": {"version": "4", "traffic": 0.0, "rollback_when": NEVER_JUDGED}},
    }}))
    with vigil_server(registry, env={"VIGIL_DEPLOY": str(deploy)}) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: VigilServer) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(server.url.removeprefix("http://")) as c:
        yield c


def features(registry: Path, model: str, n: int) -> pd.DataFrame:
    frame = pd.read_parquet(registry / model / "1" / "reference.parquet")
    return frame.drop(columns=[c for c in ("target", "prediction", "prediction_score") if c in frame]).head(n)


def onnx_run(registry: Path, model: str, feeds: dict[str, np.ndarray], version: str = "1") -> list[np.ndarray]:
    """onnxruntime's own answer, with the service's one intra-op thread (more threads sum trees in another order)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(registry / model / version / "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def tensor_input(x: np.ndarray, binary: bool, name: str = "input", datatype: str = "FP32") -> triton.InferInput:
    tensor = triton.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def outputs(names: list[str], binary: bool) -> list[triton.InferRequestedOutput]:
    return [triton.InferRequestedOutput(name, binary_data=binary) for name in names]


def metrics(server: VigilServer, name: str, **labels: str) -> float:
    return metric_value(server.metrics_text(), name, **labels) or 0.0


def oip_error(response: httpx.Response, status: int) -> str:
    """The error string of an OIP refusal, after checking its status and shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body["error"], str) and body["error"]
    return body["error"]


def post_binary(server: VigilServer, path: str, header: dict[str, Any], binary: bytes,
                header_length: int | None = None) -> httpx.Response:
    head = orjson.dumps(header)
    length = len(head) if header_length is None else header_length
    return server.post(path, content=head + binary, headers={"Inference-Header-Content-Length": str(length),
                                                             "Content-Type": "application/octet-stream"})


# --------------------------------------------------------------------------- metadata and health


def test_server_and_model_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    cancer = client.get_model_metadata("cancer")
    assert cancer["versions"] == ["1", "2"] and cancer["platform"] == "onnxruntime_onnx"
    assert [(i["name"], i["datatype"], i["shape"]) for i in cancer["inputs"]] == [("input", "FP32", [-1, 30])]
    assert [(o["name"], o["datatype"], o["shape"]) for o in cancer["outputs"]] == [
        ("label", "INT64", [-1]), ("probabilities", "FP32", [-1, 2])]
    assert cancer["outputs"][1]["parameters"]["labels"] == ["0", "1"]
    assert client.get_model_metadata("cancer", "2")["parameters"]["version"] == "2"
    wine = client.get_model_metadata("wine")
    assert [(i["name"], i["datatype"]) for i in wine["inputs"]] == [
        (fx.WINE_CATEGORICAL, "BYTES"), *[(c, "FP64") for c in fx.WINE_NUMERIC]]
    assert client.get_model_metadata("diabetes")["outputs"] == [{"name": "value", "datatype": "FP64", "shape": [-1]}]
    assert client.is_model_ready("cancer") and client.is_model_ready("diabetes", "4")
    assert not client.is_model_ready("diabetes", "3")
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("nope")
    assert info.value.status() == "404" and "no model named 'nope'" in info.value.message()


# --------------------------------------------------------------------------- predictions equal onnxruntime


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_classifier_through_tritonclient_equals_onnxruntime(client: triton.InferenceServerClient, registry: Path,
                                                            binary: bool) -> None:
    x = features(registry, "cancer", 40).to_numpy(np.float32)
    result = client.infer("cancer", [tensor_input(x, binary)], outputs=outputs(["label", "probabilities"], binary),
                          request_id="cancer-run")
    labels, probabilities = onnx_run(registry, "cancer", {"input": x})
    np.testing.assert_array_equal(result.as_numpy("label"), labels)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)
    answer = result.get_response()
    assert answer["id"] == "cancer-run" and answer["model_name"] == "cancer"
    assert set(answer["parameters"]["variants"]) <= {"stable", "canary"}
    assert answer["parameters"]["reasons"] == [None] * 40


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_regressor_through_tritonclient_equals_onnxruntime(client: triton.InferenceServerClient, registry: Path,
                                                           binary: bool) -> None:
    x = features(registry, "diabetes", 64).to_numpy(np.float64)  # FP64 in; the model takes float32
    result = client.infer("diabetes", [tensor_input(x, binary, datatype="FP64")])  # no outputs: all, binary
    (values,) = onnx_run(registry, "diabetes", {"input": x.astype(np.float32)})
    np.testing.assert_array_equal(result.as_numpy("value"), values[:, 0].astype(np.float64))
    answer = result.get_response()
    assert answer["model_version"] == "1" and answer["parameters"]["variants"] == ["stable"] * 64
    assert answer["id"] == answer["parameters"]["request_id"]  # the worker's own request id when the client sends none


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_string_feature_model_one_input_per_feature(client: triton.InferenceServerClient, registry: Path,
                                                    binary: bool) -> None:
    frame = features(registry, "wine", 12)
    inputs = [tensor_input(frame[fx.WINE_CATEGORICAL].fillna("").to_numpy(object), binary,
                           fx.WINE_CATEGORICAL, "BYTES")]
    inputs += [tensor_input(frame[c].to_numpy(np.float32), binary, c) for c in fx.WINE_NUMERIC]
    result = client.infer("wine", inputs, outputs=outputs(["label", "probabilities"], binary),
                          parameters={"content_type": "pd"})
    feeds = {fx.WINE_CATEGORICAL: frame[[fx.WINE_CATEGORICAL]].fillna("").to_numpy(object)}
    feeds.update({c: frame[[c]].to_numpy(np.float32) for c in fx.WINE_NUMERIC})
    labels, probabilities = onnx_run(registry, "wine", feeds)
    np.testing.assert_array_equal(result.as_numpy("label"), labels)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)


def test_nulls_where_the_card_allows_them(server: VigilServer, registry: Path) -> None:
    frame = features(registry, "wine", 2)
    inputs = [{"name": fx.WINE_CATEGORICAL, "datatype": "BYTES", "shape": [2, 1], "data": [None, "low"]}]
    inputs += [{"name": c, "datatype": "FP64", "shape": [2], "data": frame[c].tolist()} for c in fx.WINE_NUMERIC]
    response = server.post("/v2/models/wine/infer", json={"inputs": inputs})
    assert response.status_code == 200, response.text
    assert response.json()["parameters"]["reasons"] == [None, None]  # the model takes a missing category
    inputs[1]["data"] = [None, 1.0]
    assert "row 0 'alcohol': expected a number, got null" in oip_error(
        server.post("/v2/models/wine/infer", json={"inputs": inputs}), 400)


def test_both_conventions_give_the_same_answer(server: VigilServer, registry: Path) -> None:
    frame = features(registry, "cancer", 5)
    tensor = {"name": "input", "datatype": "FP64", "shape": [5, 30], "data": frame.to_numpy().ravel().tolist()}
    columns = [{"name": c, "datatype": "FP64", "shape": [5], "data": frame[c].tolist()} for c in frame.columns]
    answers = [server.post("/v2/models/cancer/versions/1/infer", json=body).json()["outputs"]
               for body in ({"inputs": [tensor]}, {"inputs": columns, "parameters": {"content_type": "pd"}})]
    assert answers[0] == answers[1]


# --------------------------------------------------------------------------- every /predict guarantee


def nan_row(registry: Path) -> np.ndarray:
    x = features(registry, "cancer", 3).to_numpy(np.float32)
    x[2, 4] = np.nan
    return x


BAD_TENSORS = [
    ("wrong shape", {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 29], "data": [0.0] * 29}]},
     "input 'input' has shape [1, 29]; it takes [N, 30]"),
    ("wrong datatype", {"inputs": [{"name": "input", "datatype": "INT64", "shape": [1, 30], "data": [0] * 30}]},
     "input 'input' has datatype INT64; it takes FP32 or FP64"),
    ("wrong name", {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 30], "data": [0.0] * 30}]},
     "unknown input 'x'"),
    ("count", {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 30], "data": [0.0] * 30}]},
     "input 'input': data has 30 elements; its shape needs 60"),
    ("unknown output", {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 30], "data": [0.0] * 30}],
                        "outputs": [{"name": "score"}]}, "unknown output(s) ['score']"),
]


@pytest.mark.parametrize(("body", "says"), [b[1:] for b in BAD_TENSORS], ids=[b[0] for b in BAD_TENSORS])
def test_bad_tensors_are_400_naming_the_problem(server: VigilServer, body: dict[str, Any], says: str) -> None:
    before = metrics(server, "vigil_input_rejected_total", model="cancer")
    assert says in oip_error(server.post("/v2/models/cancer/infer", json=body), 400)
    assert metrics(server, "vigil_input_rejected_total", model="cancer") == before + 1


def test_nan_in_a_binary_tensor_names_row_and_feature(client: triton.InferenceServerClient, registry: Path) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.infer("cancer", [tensor_input(nan_row(registry), True)])
    assert info.value.status() == "400"
    assert "row 2 'mean smoothness': expected a finite number, got nan" in info.value.message()


def test_binary_sizes_that_do_not_match_the_body(server: VigilServer, registry: Path) -> None:
    raw = features(registry, "cancer", 2).to_numpy(np.float32).tobytes()
    header = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 30],
                          "parameters": {"binary_data_size": len(raw)}}]}
    path = "/v2/models/cancer/infer"
    assert "only 232 bytes of binary data are left" in oip_error(post_binary(server, path, header, raw[:-8]), 400)
    assert "add up to 240" in oip_error(post_binary(server, path, header, raw + b"\0" * 4), 400)
    assert "the body has" in oip_error(post_binary(server, path, header, raw, header_length=10**6), 400)
    header["inputs"][0]["parameters"]["binary_data_size"] = 10**9  # oversize
    assert "binary_data_size is 1000000000 bytes" in oip_error(post_binary(server, path, header, raw), 400)
    header["inputs"][0]["parameters"]["binary_data_size"] = 236  # fits the body, not the shape
    assert "shape [2, 30] of FP32 takes 240" in oip_error(post_binary(server, path, header, raw[:236]), 400)
    assert post_binary(server, path, {**header, "inputs": [{**header["inputs"][0], "parameters": {
        "binary_data_size": 240}}]}, raw).status_code == 200


def test_limits_413_and_415(server: VigilServer) -> None:
    rows = np.zeros((1001, 10), dtype=np.float32).tobytes()
    header = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1001, 10],
                          "parameters": {"binary_data_size": len(rows)}}]}
    assert "1001 rows; the limit is 1000" in oip_error(post_binary(server, "/v2/models/diabetes/infer", header, rows),
                                                        413)
    big = server.post("/v2/models/diabetes/infer", content=b" " * (1 << 20 | 1),
                      headers={"Content-Type": "application/json"})
    assert "over the 1048576-byte limit" in oip_error(big, 413)
    text = server.post("/v2/models/diabetes/infer", content=b"{}", headers={"Content-Type": "text/csv"})
    assert "expected Content-Type application/json or application/octet-stream" in oip_error(text, 415)
    assert "no model named 'nope'" in oip_error(server.post("/v2/models/nope/infer", json={}), 404)
    assert "does not serve version '9'" in oip_error(server.post("/v2/models/diabetes/versions/9/infer", json={}), 404)


def test_fallback_answers_with_its_reason(server: VigilServer, registry: Path) -> None:
    x = features(registry, "diabetes", 1).to_numpy(np.float64)
    x[0, 1] = 3.0  # sex 3: diabetes:4 fails on it
    before = metrics(server, "vigil_fallback_total", model="diabetes", version="4", reason="model_error")
    body = {"inputs": [{"name": "input", "datatype": "FP64", "shape": [1, 10], "data": x.ravel().tolist()}]}
    answer = server.post("/v2/models/diabetes/versions/4/infer", json=body).json()
    assert answer["model_version"] == "4"
    assert answer["parameters"] == {"request_id": answer["id"], "versions": ["4"], "variants": ["fallback"],
                                    "reasons": ["model_error"]}
    median = yaml.safe_load((registry / "diabetes" / "4" / "card.yaml").read_text())["fallback"]["value"]
    assert answer["outputs"][0]["data"] == [pytest.approx(median)]
    assert metrics(server, "vigil_fallback_total", model="diabetes", version="4", reason="model_error") == before + 1
    stable = server.post("/v2/models/diabetes/infer", json=body).json()  # unversioned: stable (the canary has 0%)
    assert stable["parameters"]["variants"] == ["stable"]


def test_canary_split_is_sticky_by_key_exactly_like_predict(server: VigilServer, registry: Path) -> None:
    frame = features(registry, "cancer", 1)
    body = {"inputs": [{"name": "input", "datatype": "FP64", "shape": [1, 30], "data": frame.iloc[0].tolist()}]}
    seen = {}
    for i in range(24):
        key = f"user-{i}"
        variants = {server.post("/v2/models/cancer/infer", json={**body, "parameters": {"key": key}}).json()[
            "parameters"]["variants"][0] for _ in range(2)}
        predicted = server.post("/predict", json={"model": "cancer", "instances": frame.to_dict(orient="records"),
                                                  "key": key}).json()["predictions"][0]["variant"]
        assert variants == {predicted}  # the same key, the same variant, whichever route
        seen[key] = predicted
    assert set(seen.values()) == {"stable", "canary"}
    for version, variant in (("1", "stable"), ("2", "canary")):
        pinned = server.post(f"/v2/models/cancer/versions/{version}/infer", json=body).json()
        assert pinned["model_version"] == version and pinned["parameters"]["variants"] == [variant]


def test_feedback_by_the_request_id(server: VigilServer, registry: Path) -> None:
    """The client's own ``id`` is echoed; feedback takes the id Vigil issued (``parameters.request_id``)."""
    frame = pd.read_parquet(registry / "diabetes" / "1" / "reference.parquet").head(3)
    x = frame.drop(columns=["target", "prediction"]).to_numpy(np.float32)
    header = {"id": "oip-feedback-1", "inputs": [{"name": "input", "datatype": "FP32", "shape": [3, 10],
                                                  "parameters": {"binary_data_size": x.nbytes}}]}
    answer = post_binary(server, "/v2/models/diabetes/infer", header, x.tobytes())
    assert answer.status_code == 200
    length = int(answer.headers.get("inference-header-content-length", len(answer.content)))
    echoed = orjson.loads(answer.content[:length])
    issued = echoed["parameters"]["request_id"]
    assert echoed["id"] == "oip-feedback-1" and answer.headers["x-request-id"] == issued != "oip-feedback-1"
    refused = server.post("/feedback", json={"model": "diabetes", "request_id": "oip-feedback-1",
                                             "actuals": frame["target"].tolist()})
    assert refused.status_code == 404 and "parameters.request_id" in refused.text
    generated = server.post("/v2/models/diabetes/infer", json={"inputs": [
        {"name": "input", "datatype": "FP32", "shape": [1, 10], "data": x[0].tolist()}]}).json()["id"]
    for request_id, actuals in ((issued, frame["target"].tolist()), (generated, [100.0])):
        response = server.post("/feedback", json={"model": "diabetes", "request_id": request_id, "actuals": actuals})
        assert response.status_code == 200  # accepted at once, before the prediction log has flushed
        answer = response.json()
        assert (answer["accepted"], answer["duplicates"]) == (len(actuals), 0) and answer["pending"] <= len(actuals)


def test_metrics_are_exact_and_labels_bounded(server: VigilServer, registry: Path) -> None:
    x = features(registry, "diabetes", 3).to_numpy(np.float32)
    header = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [3, 10],
                          "parameters": {"binary_data_size": x.nbytes}}],
              "outputs": [{"name": "value", "parameters": {"binary_data": True}}]}
    labels = {"model": "diabetes", "version": "1"}
    http = {"endpoint": INFER, "method": "POST", "code": "200"}
    before = (metrics(server, "vigil_predictions_total", variant="stable", **labels),
              metrics(server, "vigil_request_duration_seconds_count", **labels),
              metrics(server, "vigil_http_requests_total", **http))
    for _ in range(7):
        response = post_binary(server, "/v2/models/diabetes/infer", header, x.tobytes())
        assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
        length = int(response.headers["inference-header-content-length"])
        assert orjson.loads(response.content[:length])["outputs"][0]["parameters"] == {"binary_data_size": 24}
        assert len(response.content) == length + 24
    text = server.metrics_text()
    after = (metric_value(text, "vigil_predictions_total", variant="stable", **labels),
             metric_value(text, "vigil_request_duration_seconds_count", **labels),
             metric_value(text, "vigil_http_requests_total", **http))
    assert after == (before[0] + 21, before[1] + 7, before[2] + 7)
    endpoints = {line.split('endpoint="')[1].split('"')[0] for line in text.splitlines()
                 if line.startswith("vigil_http_requests_total{")}
    assert {e for e in endpoints if e.startswith("/v2")} <= {
        "/v2", INFER, "/v2/models/{name}", "/v2/models/{name}/ready", "/v2/models/{name}/versions/{version}",
        "/v2/models/{name}/versions/{version}/ready", "/v2/models/{name}/versions/{version}/infer"}


def test_binary_outputs_for_the_whole_request(server: VigilServer, registry: Path) -> None:
    """``binary_data_output`` asks for every output as binary data after the JSON header."""
    frame = features(registry, "wine", 1)
    inputs = [{"name": fx.WINE_CATEGORICAL, "datatype": "BYTES", "shape": [1], "data": ["mid"]}]
    inputs += [{"name": c, "datatype": "FP64", "shape": [1], "data": frame[c].tolist()} for c in fx.WINE_NUMERIC]
    response = server.post("/v2/models/wine/infer", json={"inputs": inputs, "parameters": {"binary_data_output": True}})
    length = int(response.headers["inference-header-content-length"])
    header = orjson.loads(response.content[:length])
    label = header["outputs"][0]
    assert label["datatype"] == "INT64" and label["parameters"]["binary_data_size"] == 8
    (value,) = struct.unpack("<q", response.content[length:length + 8])
    assert value in (0, 1, 2)


# --------------------------------------------------------------------------- concurrency limit and timeout


def test_concurrency_limit_and_timeout_apply_to_v2(registry: Path, tmp_path: Path) -> None:
    """Two calls that outlive the 3 s request timeout hold both slots: a third, by /v2 or /predict, is 429."""
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text(yaml.safe_dump({"models": {"glacial": {"timeout_ms": 6000}}}))
    env = {"VIGIL_DEPLOY": str(deploy), "VIGIL_MAX_CONCURRENCY": "2", "VIGIL_REQUEST_TIMEOUT_SECONDS": "3"}
    row = features(registry, "diabetes", 1).iloc[0].tolist()
    body = {"inputs": [{"name": "input", "datatype": "FP64", "shape": [1, 10], "data": row}]}
    with vigil_server(registry, env=env) as server:
        answers: list[httpx.Response] = []

        def slow_call() -> None:
            with httpx.Client(base_url=server.url, timeout=60) as c:
                answers.append(c.post("/v2/models/glacial/infer", json=body))

        threads = [threading.Thread(target=slow_call) for _ in range(2)]
        for thread in threads:
            thread.start()
        wait_for(lambda: metrics(server, "vigil_http_requests_in_progress", endpoint=INFER) == 2, timeout=30,
                 interval=0.05)
        refused = server.post("/v2/models/diabetes/infer", json=body)
        assert "limit" in oip_error(refused, 429) and refused.headers["retry-after"] == "1"
        assert refused.json()["code"] == "overloaded"
        assert server.post("/predict", json={"model": "diabetes", "instances": [{}]}).status_code == 429
        for thread in threads:
            thread.join()
        assert [r.status_code for r in answers] == [504, 504]
        assert all(r.json()["code"] == "timeout" and "3 s" in r.json()["error"] for r in answers)
        text = server.metrics_text()
        assert metric_value(text, "vigil_requests_overloaded_total", endpoint=INFER) == 1
        assert metric_value(text, "vigil_request_timeouts_total", endpoint=INFER) == 2
        assert server.post("/v2/models/diabetes/infer", json=body).status_code == 200
