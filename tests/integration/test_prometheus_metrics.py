"""Every ``vigil_`` family, scraped by a real Prometheus from the service running with 2 workers.

A known mix of requests goes in; Prometheus's HTTP API must then show exact
counts (summed over both workers) for every family.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pytest

from service.registry.register import register_model
from tests.onnx_graphs import index_lookup_reference, index_lookup_regressor
from tests.servers import PrometheusServer, VigilServer, prometheus_server, vigil_server, wait_for, wait_for_value

pytestmark = pytest.mark.integration

META = ["target", "prediction", "prediction_score"]


@pytest.fixture(scope="module")
def registry(example_registry: Path, trained_examples: dict[str, Path],
             tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The examples, a 'lookup' model that fails for some inputs, and 'cancer_gaps' with a nullable feature."""
    work = tmp_path_factory.mktemp("metrics-registry")
    root = work / "models"
    shutil.copytree(example_registry, root)
    register_model("lookup", index_lookup_regressor(work / "lookup.onnx"),
                   index_lookup_reference(work / "lookup.parquet"), target="target", registry=root)
    reference = pd.read_parquet(trained_examples["cancer"] / "reference.parquet")
    reference.loc[reference.index[::7], "mean texture"] = np.nan
    reference.to_parquet(work / "gaps.parquet", index=False)
    register_model("cancer_gaps", trained_examples["cancer"] / "model.onnx", work / "gaps.parquet",
                   target="target", registry=root)
    return root


@pytest.fixture(scope="module")
def stack(registry: Path) -> Iterator[tuple[VigilServer, PrometheusServer]]:
    with vigil_server(registry, workers=2) as server:
        with prometheus_server({"vigil": f"127.0.0.1:{server.port}"}) as prom:
            yield server, prom


def rows(registry: Path, model: str, n: int, start: int = 0) -> list[dict[str, Any]]:
    frame = pd.read_parquet(registry / model / "1" / "reference.parquet")
    return frame.drop(columns=[c for c in META if c in frame]).iloc[start:start + n].to_dict(orient="records")


@pytest.fixture(scope="module")
def traffic(stack: tuple[VigilServer, PrometheusServer], registry: Path) -> dict[str, Any]:
    """Send the known mix once; return what was sent and answered."""
    server, prom = stack
    sent: dict[str, Any] = {"classes": Counter(), "requests": Counter(), "instances": Counter(), "posts": 0}

    def predict(model: str, instances: list[dict[str, Any]], status: int = 200) -> Any:
        response = server.post("/predict", json={"model": model, "instances": instances})
        sent["posts"] += 1
        assert response.status_code == status, response.text
        if status == 200:
            sent["requests"][model] += 1
            sent["instances"][model] += len(instances)
            if model == "cancer":
                sent["classes"].update(str(p["label"]) for p in response.json()["predictions"])
        return response

    for i in range(7):
        predict("cancer", rows(registry, "cancer", 1, start=i))
    for i in range(3):
        predict("cancer", rows(registry, "cancer", 5, start=10 + 5 * i))
    wide = rows(registry, "cancer", 2, start=40)
    for row in wide:
        row["mean radius"] = 1000.0  # far above the reference max: accepted, counted
    predict("cancer", wide)
    for i in range(4):
        predict("diabetes", rows(registry, "diabetes", 2, start=2 * i))
    gaps = rows(registry, "cancer_gaps", 3, start=1)
    gaps[0]["mean texture"] = None
    del gaps[1]["mean texture"]
    predict("cancer_gaps", gaps)
    predict("lookup", [{"idx": 3.0, "x": 0.5}])
    # Rejections: two invalid instances, one unknown model, one malformed body.
    predict("cancer", [{"mean radius": "big"}], status=422)
    predict("cancer", [{}], status=422)
    predict("nope", [{"a": 1}], status=404)
    assert server.post("/predict", content=b"{", headers={"content-type": "application/json"}).status_code == 400
    sent["posts"] += 1
    # A model error (the lookup table has 10 entries): the fallback answers, with the reason.
    failed = server.post("/predict", json={"model": "lookup", "instances": [{"idx": 42.0, "x": 0.0}]})
    sent["posts"] += 1
    assert failed.status_code == 200, failed.text
    assert failed.json()["predictions"][0]["variant"] == "fallback"
    assert failed.json()["predictions"][0]["reason"] == "model_error"
    # Each worker writes everything it recorded in one flush (an idle one within about twice the
    # flush interval): once Prometheus has scraped every /predict request, it has every family's counts.
    wait_for_value(lambda: prom.value('sum(vigil_http_requests_total{endpoint="/predict"})'), sent["posts"])
    return sent


def test_request_and_inference_families(stack: tuple[VigilServer, PrometheusServer], traffic: dict[str, Any]) -> None:
    _, prom = stack
    assert traffic["requests"]["cancer"] == 11
    assert prom.value('sum(vigil_request_duration_seconds_count{model="cancer",version="1"})') == 11
    assert prom.value('sum(vigil_inference_duration_seconds_count{model="cancer",variant="stable"})') == 11
    assert prom.value('sum(vigil_batch_size_count{model="cancer"})') == 11
    assert prom.value('sum(vigil_batch_size_sum{model="cancer"})') == 24
    assert prom.value('sum(vigil_request_duration_seconds_count{model="diabetes"})') == 4
    p99 = prom.value('histogram_quantile(0.99, sum by (le) (vigil_request_duration_seconds_bucket{model="cancer"}))')
    assert p99 is not None and 0 < p99 < 10


def test_prediction_families(stack: tuple[VigilServer, PrometheusServer], traffic: dict[str, Any]) -> None:
    _, prom = stack
    assert prom.value('sum(vigil_predictions_total{model="cancer",variant="stable"})') == 24
    assert prom.value('sum(vigil_predictions_total{model="diabetes"})') == 8
    assert prom.value('sum(vigil_prediction_value_count{model="cancer"})') == 24
    assert prom.value('sum(vigil_prediction_value_count{model="diabetes"})') == 8
    for label, count in traffic["classes"].items():
        assert prom.value(f'sum(vigil_predicted_class_total{{model="cancer",class="{label}"}})') == count
    assert prom.value('sum(vigil_predicted_class_total{model="cancer"})') == 24
    assert prom.value('sum(vigil_prediction_out_of_range_total{model="diabetes"})') == 0
    # Buckets are the model's own, not the client's defaults.
    les = {r["metric"]["le"] for r in prom.query('vigil_prediction_value_bucket{model="diabetes"}')}
    assert "0.005" not in les and len(les) >= 5


def test_input_quality_and_rejections(stack: tuple[VigilServer, PrometheusServer], traffic: dict[str, Any]) -> None:
    _, prom = stack
    assert prom.value('sum(vigil_input_out_of_range_total{model="cancer",feature="mean radius"})') == 2
    assert prom.value('sum(vigil_input_missing_total{model="cancer_gaps",feature="mean texture"})') == 2
    assert prom.value('sum(vigil_input_missing_total{model="cancer_gaps",feature="mean radius"})') == 0
    assert prom.value('sum(vigil_input_rejected_total{model="cancer",reason="invalid_input"})') == 2
    assert prom.value('sum(vigil_input_rejected_total{model="unknown",reason="unknown_model"})') == 1
    assert prom.value('sum(vigil_input_rejected_total{model="unknown",reason="malformed_json"})') == 1


def test_model_errors_info_and_load(stack: tuple[VigilServer, PrometheusServer], traffic: dict[str, Any]) -> None:
    _, prom = stack
    assert prom.value('sum(vigil_model_errors_total{model="lookup",version="1"})') == 1
    assert prom.value('sum(vigil_fallback_total{model="lookup",version="1",reason="model_error"})') == 1
    assert prom.value('sum(vigil_predictions_total{model="lookup",variant="fallback"})') == 1
    assert prom.value('sum(vigil_predictions_total{model="lookup",variant="stable"})') == 1
    info = prom.query("vigil_model_info")
    assert {r["metric"]["model"] for r in info} == {"cancer", "cancer_gaps", "diabetes", "lookup"}
    assert all(float(r["value"][1]) == 1 for r in info)  # one series per version, not one per worker
    assert all(len(r["metric"]["sha256"]) == 64 for r in info)
    loads = prom.query("vigil_model_load_seconds")
    assert len(loads) == 4 and all(float(r["value"][1]) > 0 for r in loads)


def test_process_families_per_worker(stack: tuple[VigilServer, PrometheusServer], traffic: dict[str, Any]) -> None:
    """Each worker's figures are its own process's, as psutil reads them from outside."""
    server, prom = stack
    workers = server.workers()
    assert len(workers) == 2
    for family in ("resident_memory_bytes", "cpu_seconds_total", "open_fds", "threads"):
        assert {r["metric"]["worker"] for r in prom.query(f"vigil_process_{family}")} == {"1", "2"}, family

    def exported(family: str) -> float:
        return prom.value(f"sum(vigil_process_{family})") or 0.0

    def cpu() -> float:
        return sum(sum(p.cpu_times()[:2]) for p in workers)

    # CPU seconds: what the workers had used by now is exported within a sample and a scrape, and
    # the export is never ahead of what they have used (a wrong unit or source fails one side).
    used = cpu()
    wait_for(lambda: exported("cpu_seconds_total") >= used, what=lambda: f"{exported('cpu_seconds_total')} < {used}")
    assert exported("cpu_seconds_total") <= cpu() + 0.05
    # Gauges are samples (every 2 s) of figures that move a little: they must agree with psutil at
    # some moment within the deadline.
    wait_for(lambda: abs(exported("resident_memory_bytes") - sum(p.memory_info().rss for p in workers))
             < 0.05 * sum(p.memory_info().rss for p in workers), what="resident memory")
    wait_for(lambda: abs(exported("threads") - sum(p.num_threads() for p in workers)) <= 2, what="threads")
    wait_for(lambda: abs(exported("open_fds") - sum(p.num_fds() for p in workers)) <= 4, what="open fds")


def test_promtool_finds_no_problem_in_vigil_families(stack: tuple[VigilServer, PrometheusServer],
                                                     traffic: dict[str, Any]) -> None:
    server, _ = stack
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by make test"
    result = subprocess.run([promtool, "check", "metrics"], input=server.metrics_text().encode(),
                            capture_output=True, timeout=30)
    findings = (result.stdout + result.stderr).decode()
    vigil_findings = [line for line in findings.splitlines() if "vigil_" in line]
    assert vigil_findings == [], findings
