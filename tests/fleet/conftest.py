"""A fleet on one machine: ``vigil serve`` replicas, each with its own local directory, sharing an S3-API store."""

from __future__ import annotations

import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from monitoring.store import S3Store
from service.registry.register import register_model
from tests.s3server import CREDENTIALS, S3Server, s3_server
from tests.servers import VigilServer, vigil_server

ADMIN_TOKEN = "fleet-admin-token"


@dataclass
class Fleet:
    """Replicas sharing ``store_url`` on the S3-API server ``s3``."""

    s3: S3Server
    store_url: str
    registry: Path
    env: dict[str, str]
    replicas: list[VigilServer]

    def store(self) -> S3Store:
        """The shared store, as a job or a test sees it."""
        return S3Store(self.store_url, endpoint_url=self.s3.endpoint)


@pytest.fixture(scope="package")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


@pytest.fixture(scope="package")
def fleet_registry(example_registry: Path, trained_examples: dict[str, Path],
                   tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example models, plus cancer:2 (the same classifier) to run as a canary."""
    root = tmp_path_factory.mktemp("fleet") / "models"
    shutil.copytree(example_registry, root)
    trained = trained_examples["cancer"]
    register_model("cancer", trained / "model.onnx", trained / "reference.parquet", target="target", registry=root,
                   version="2")
    return root


def start_fleet(s3: S3Server, registry: Path, work: Path, replicas: int = 2,
                extra: dict[str, str] | None = None) -> tuple[ExitStack, Fleet]:
    """Start ``replicas`` servers on one new bucket; the ExitStack stops them."""
    url = s3.new_bucket()
    deploy = work / "deploy.yaml"  # the operator's config, mounted into every replica (a ConfigMap)
    deploy.write_text(yaml.safe_dump({"models": {"cancer": {
        "stable": "1", "canary": {"version": "2", "traffic": 0.5, "sticky": False}}}}))
    env = {**CREDENTIALS, **s3.env(), "VIGIL_STORE": url, "VIGIL_DEPLOY": str(deploy),
           "VIGIL_ADMIN_TOKEN": ADMIN_TOKEN, "VIGIL_CONTROL_INTERVAL_SECONDS": "0.2", **(extra or {})}
    stack = ExitStack()
    try:
        servers = [stack.enter_context(vigil_server(registry, env=env)) for _ in range(replicas)]
    except BaseException:
        stack.close()
        raise
    return stack, Fleet(s3, url, registry, env, servers)


@pytest.fixture(scope="module")
def fleet(s3: S3Server, fleet_registry: Path, tmp_path_factory: pytest.TempPathFactory,
          monkeypatch_module: pytest.MonkeyPatch) -> Iterator[Fleet]:
    for name, value in CREDENTIALS.items():
        monkeypatch_module.setenv(name, value)
    stack, fleet = start_fleet(s3, fleet_registry, tmp_path_factory.mktemp("fleet-run"))
    with stack:
        yield fleet


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def reference_rows(registry: Path, model: str) -> list[dict[str, Any]]:
    import pandas as pd

    frame = pd.read_parquet(registry / model / "1" / "reference.parquet")
    return frame.drop(columns=[c for c in ("target", "prediction", "prediction_score") if c in frame]).to_dict(
        orient="records")


def truths(registry: Path, model: str) -> list[Any]:
    import pandas as pd

    return pd.read_parquet(registry / model / "1" / "reference.parquet")["target"].tolist()
