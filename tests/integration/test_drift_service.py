"""End to end: requests through the real service, `vigil drift run` on the log, verdicts back in the service.

With ``on_drift: fallback`` a drift verdict flips the model to fallback answers
without a restart, and back when a later run clears it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.servers import VigilServer, clean_env, metric_value, vigil_server, wait_for

pytestmark = pytest.mark.integration

VIGIL = Path(sys.executable).with_name("vigil")


@pytest.fixture(scope="module")
def setup(example_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VigilServer, Path]]:
    work = tmp_path_factory.mktemp("drift-e2e")
    deploy = work / "deploy.yaml"
    deploy.write_text(yaml.safe_dump({"models": {"diabetes": {"on_drift": "fallback"}}}))
    data_dir = work / "var"
    env = {"VIGIL_DEPLOY": str(deploy), "VIGIL_DATA_DIR": str(data_dir), "VIGIL_CONTROL_INTERVAL_SECONDS": "0.2"}
    with vigil_server(example_registry, env=env) as server:
        yield server, data_dir


def reference(example_registry: Path, model: str) -> pd.DataFrame:
    frame = pd.read_parquet(example_registry / model / "1" / "reference.parquet")
    return frame.drop(columns=[c for c in ("target", "prediction", "prediction_score") if c in frame])


def send_window(server: VigilServer, rows: pd.DataFrame) -> list[dict[str, Any]]:
    """Predict every row, 25 to a request; returns once every answer is in the prediction log."""
    answers, request_ids = [], []
    records = rows.to_dict(orient="records")
    for start in range(0, len(records), 25):
        response = server.post("/predict", json={"model": "diabetes", "instances": records[start:start + 25]})
        assert response.status_code == 200, response.text
        answers.extend(response.json()["predictions"])
        request_ids.append(response.json()["request_id"])
    server.wait_until_logged("diabetes", request_ids)
    return answers


def run_drift(registry: Path, data_dir: Path, since: datetime) -> subprocess.CompletedProcess[str]:
    until = datetime.now(timezone.utc) + timedelta(seconds=1)
    return subprocess.run(
        [str(VIGIL), "drift", "run", "--model", "diabetes", "--since", since.isoformat(), "--until", until.isoformat(),
         "--min-rows", "200", "--data-dir", str(data_dir), "--registry", str(registry)],
        capture_output=True, text=True, timeout=300, env=clean_env())


def state(server: VigilServer, model: str) -> dict[str, Any]:
    return {m["name"]: m for m in server.get("/models").json()["models"]}[model]


def test_drift_verdicts_reach_metrics_and_routing(setup: tuple[VigilServer, Path], example_registry: Path) -> None:
    server, data_dir = setup
    rng = np.random.default_rng(11)
    ref = reference(example_registry, "diabetes")

    # 1. Traffic from the reference distribution: no drift, the model answers.
    since = datetime.now(timezone.utc)
    same = ref.sample(250, replace=True, random_state=1).reset_index(drop=True)
    assert {a["variant"] for a in send_window(server, same)} == {"stable"}
    ran_at = time.time()
    result = run_drift(example_registry, data_dir, since)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for(lambda: metric_value(server.metrics_text(), "vigil_drift_rows", model="diabetes") == 250)
    text = server.metrics_text()
    assert metric_value(text, "vigil_drift_detected", model="diabetes", version="1") == 0
    assert metric_value(text, "vigil_drift_last_run_timestamp_seconds", model="diabetes") >= ran_at - 1
    assert metric_value(text, "vigil_feature_drift_score", model="diabetes", feature="bmi") is not None
    assert metric_value(text, "vigil_prediction_drift_score", model="diabetes") is not None

    # 2. Shifted traffic: half the features (Evidently's dataset rule is a drifted share of 0.5),
    #    some scaled by 1.5, the others drawn from the top 20% of their reference range only.
    since = datetime.now(timezone.utc)
    shifted = ref.sample(250, replace=True, random_state=2).reset_index(drop=True)
    for feature in ("bmi", "bp", "s1"):
        shifted[feature] = shifted[feature] * 1.5
    for feature in ("s5", "s6"):
        top = ref[feature].quantile(0.8)
        shifted[feature] = rng.uniform(top, ref[feature].max(), len(shifted))
    send_window(server, shifted)
    result = run_drift(example_registry, data_dir, since)
    assert result.returncode == 3, result.stdout + result.stderr
    for feature in ("bmi", "bp", "s1", "s5", "s6"):
        assert f"drifted: {feature} " in result.stdout
    assert "drifted: age " not in result.stdout
    wait_for(lambda: state(server, "diabetes")["state"] == "degraded_by_drift")
    answers = send_window(server, same.head(25))
    assert {(a["variant"], a.get("reason")) for a in answers} == {("fallback", "drift")}
    text = server.metrics_text()
    assert metric_value(text, "vigil_drift_detected", model="diabetes", version="1") == 1
    assert metric_value(text, "vigil_feature_drift_detected", model="diabetes", feature="bmi") == 1
    assert metric_value(text, "vigil_feature_drift_detected", model="diabetes", feature="age") == 0
    assert metric_value(text, "vigil_drift_share", model="diabetes") >= 0.5  # 5 of its 10 features shifted
    # A model whose policy only alerts keeps answering from its model.
    cancer = reference(example_registry, "cancer").head(3).to_dict(orient="records")
    answer = server.post("/predict", json={"model": "cancer", "instances": cancer}).json()
    assert {p["variant"] for p in answer["predictions"]} == {"stable"}

    # 3. The verdict clears on a later run over healthy traffic: the model answers again.
    since = datetime.now(timezone.utc)
    send_window(server, ref.sample(250, replace=True, random_state=3).reset_index(drop=True))
    result = run_drift(example_registry, data_dir, since)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for(lambda: state(server, "diabetes")["state"] == "serving")
    assert {a["variant"] for a in send_window(server, same.head(25))} == {"stable"}
    assert metric_value(server.metrics_text(), "vigil_drift_detected", model="diabetes", version="1") == 0
