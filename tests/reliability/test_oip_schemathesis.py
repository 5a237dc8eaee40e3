"""Schemathesis against the official Open Inference Protocol OpenAPI (vendored): zero 5xx, responses as published.

The vendored copy (``oip/open_inference_rest.yaml``) only lists the
versioned model paths; the protocol also defines them without
``/versions/{model_version}`` ("the server may choose a version"), so the
test adds those as copies of the versioned operations. The path parameters
are fixed to a registered model and version: with random names every call
would be a 404, which the official document does not list, and the
decoder would never see a body. A body valid for the protocol's generic
schema is rarely one the model can take, so ``positive_data_acceptance``
also accepts 400 (the protocol's status for a request that cannot be
inferred); every other check runs as schemathesis defines it. So that
successful answers are checked against the document too, the infer
operations get an example body of two of the model's reference rows (the
document has none), which schemathesis sends in its examples phase.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.servers import metric_value, vigil_server

pytestmark = pytest.mark.integration

SPEC = Path(__file__).resolve().parent / "oip" / "open_inference_rest.yaml"
VERSIONED = "/versions/{model_version}"


def with_unversioned_paths(spec: dict) -> dict:  # type: ignore[type-arg]
    """The document plus each versioned model path without its version (and without that parameter)."""
    out = copy.deepcopy(spec)
    for path, item in spec["paths"].items():
        if VERSIONED not in path:
            continue
        unversioned = copy.deepcopy(item)
        unversioned["parameters"] = [p for p in item["parameters"] if p["name"] != "model_version"]
        for operation in unversioned.values():
            if isinstance(operation, dict) and "operationId" in operation:
                operation["operationId"] += "-unversioned"
        out["paths"][path.replace(VERSIONED, "")] = unversioned
    return out


def with_example_body(spec: dict, body: dict) -> dict:  # type: ignore[type-arg]
    """The document with ``body`` as the example request of every infer operation."""
    for path, item in spec["paths"].items():
        if path.endswith("/infer"):
            item["post"]["requestBody"]["content"]["application/json"]["example"] = body
    return spec


def example_body(registry: Path, model: str) -> dict:  # type: ignore[type-arg]
    frame = pd.read_parquet(registry / model / "1" / "reference.parquet").drop(columns=["target", "prediction"])
    rows = frame.head(2).drop(columns=[c for c in ("prediction_score",) if c in frame]).to_numpy()
    return {"id": "schemathesis", "inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP64",
                                              "data": rows.ravel().tolist()}]}


@pytest.mark.parametrize("model", ["cancer", "diabetes"])
def test_official_openapi_against_each_example_model(example_registry: Path, tmp_path: Path, model: str) -> None:
    spec = tmp_path / "open_inference_rest.yaml"
    document = with_example_body(with_unversioned_paths(yaml.safe_load(SPEC.read_text())),
                                 example_body(example_registry, model))
    spec.write_text(yaml.safe_dump(document, allow_unicode=True))
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        f'[parameters]\n"path.model_name" = "{model}"\n"path.model_version" = "1"\n\n'
        "[checks.positive_data_acceptance]\nexpected-statuses = [\"2xx\", 400]\n")
    with vigil_server(example_registry, env={"VIGIL_DEPLOY": str(tmp_path / "d.yaml")}) as server:
        result = subprocess.run(
            [str(Path(sys.executable).with_name("schemathesis")), "--config-file", str(config), "run", str(spec),
             "--url", server.url, "--max-examples", "150", "--seed", "20261203", "--checks", "all", "--no-color"],
            capture_output=True, text=True, timeout=900, cwd=tmp_path)
        summary = result.stdout[-6000:]
        assert result.returncode == 0, summary
        assert "9 selected" in summary or "9 total" in summary or "/9" in summary, summary  # all nine operations ran
        assert server.get("/v2/health/live").status_code == 200
        text = server.metrics_text()
        for endpoint in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
            assert metric_value(text, "vigil_http_requests_total", endpoint=endpoint, code="200"), endpoint
