"""Schemathesis against the service's own OpenAPI document: zero 5xx, responses as published."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import vigil_server

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
TOKEN = "schemathesis-token"


@pytest.mark.timeout(900)  # ~110 s here; the run itself is cut at 600 s
def test_every_operation_with_300_examples(example_registry: Path, tmp_path: Path) -> None:
    with vigil_server(example_registry, env={"VIGIL_ADMIN_TOKEN": TOKEN, "VIGIL_DEPLOY": str(tmp_path / "d.yaml")}) \
            as server:
        result = subprocess.run(
            [str(Path(sys.executable).with_name("schemathesis")), "--config-file", str(HERE / "schemathesis.toml"),
             "run", f"{server.url}/docs.json", "--max-examples", "300", "--seed", "20261123", "--checks", "all",
             "-H", f"Authorization: Bearer {TOKEN}", "--no-color"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path)
        summary = result.stdout[-6000:]
        assert result.returncode == 0, summary
        assert server.get("/livez").status_code == 200
