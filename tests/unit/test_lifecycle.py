"""Lifecycles: versions no role uses are unloaded (gauges cleared, sessions closed after a grace period),
and a worker is ready only while it has started and its control loop runs."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import yaml
from prometheus_client import CollectorRegistry

from monitoring.metrics import VigilMetrics
from service.core.predictor import Batch
from service.core.settings import Settings
from service.serving.deploy import load_deploy
from service.serving.server import ModelServer
from service.serving.worker import Worker


def _second_version(registry: Path, model: str = "cancer") -> None:
    """Register version 1 again as version 2 (same model file, so the card's sha256 still holds)."""
    shutil.copytree(registry / model / "1", registry / model / "2")
    card_path = registry / model / "2" / "card.yaml"
    card = yaml.safe_load(card_path.read_text())
    card["version"] = "2"
    card_path.write_text(yaml.safe_dump(card))


def _info(registry: CollectorRegistry, version: str, sha256: str) -> float | None:
    return registry.get_sample_value("vigil_model_info", {"model": "cancer", "version": version, "sha256": sha256})


def test_a_version_no_role_uses_is_unloaded_and_closed_after_its_grace_period(registry_copy: Path,
                                                                              tmp_path: Path) -> None:
    _second_version(registry_copy)
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text("models:\n  cancer:\n    stable: '1'\n")
    prometheus = CollectorRegistry()
    settings = Settings(registry=registry_copy, data_dir=tmp_path / "var", deploy=deploy, request_timeout_seconds=5)
    server = ModelServer(settings, VigilMetrics(registry=prometheus), None, load_deploy(deploy))
    server.load_all()
    try:
        _, old = server.route("cancer")
        sha256 = old.card.sha256
        assert _info(prometheus, "1", sha256) == 1
        assert old.predictor is not None

        deploy.write_text("models:\n  cancer:\n    stable: '2'\n")
        server.reload()

        assert [s.card.version for s in server.served_versions() if s.card.name == "cancer"] == ["2"]
        assert _info(prometheus, "2", sha256) == 1
        assert not _info(prometheus, "1", sha256)  # cleared: gone in one process, 0 in multiprocess files
        # A request that took version 1 just before the switch still gets its answer ...
        row = np.array([[spec.min if spec.min is not None else 0.0 for spec in old.card.features]])
        assert len(old.predictor.predict(Batch(size=1, matrix=row)).labels or []) == 1
        assert server.loader.close_retired(time.monotonic()) == 0
        # ... and once the request timeout is past, its session is closed.
        assert server.loader.close_retired(time.monotonic() + settings.request_timeout_seconds + 1) == 1
        assert getattr(old.predictor, "session") is None
        assert server.loader.close_retired(time.monotonic() + 3600) == 0  # closed once
    finally:
        server.close()


def test_a_version_still_used_by_the_canary_stays_loaded(registry_copy: Path, tmp_path: Path) -> None:
    _second_version(registry_copy)
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text("models:\n  cancer:\n    stable: '1'\n    canary: {version: '2', traffic: 0.5}\n")
    settings = Settings(registry=registry_copy, data_dir=tmp_path / "var", deploy=deploy)
    server = ModelServer(settings, None, None, load_deploy(deploy))
    server.load_all()
    try:
        deploy.write_text("models:\n  cancer:\n    stable: '2'\n    canary: {version: '1', traffic: 0.5}\n")
        server.reload()
        versions = sorted(s.card.version for s in server.served_versions() if s.card.name == "cancer")
        assert versions == ["1", "2"]
        assert server.loader.close_retired(time.monotonic() + 3600) == 0
    finally:
        server.close()


def test_a_worker_is_ready_only_between_start_and_stop(example_registry: Path, tmp_path: Path) -> None:
    settings = Settings(registry=example_registry, data_dir=tmp_path / "var", deploy=tmp_path / "none.yaml",
                        metrics_enabled=False, predlog_enabled=False)
    worker = Worker(settings)
    assert not worker.is_ready()
    worker.start()
    try:
        assert worker.is_ready()
        assert worker.readiness()["ready"] is True
        assert {"cancer", "diabetes"} <= set(worker.readiness()["models"])
    finally:
        worker.stop()
    assert not worker.is_ready()


def test_a_worker_whose_control_loop_died_is_not_ready(example_registry: Path, tmp_path: Path) -> None:
    settings = Settings(registry=example_registry, data_dir=tmp_path / "var", deploy=tmp_path / "none.yaml",
                        metrics_enabled=False, predlog_enabled=False, control_interval_seconds=0.05)
    worker = Worker(settings)
    worker.start()
    try:
        assert worker.is_ready()
        worker.control.stop()  # the thread ends at its next wake-up, as it would after a fatal error
        deadline = time.monotonic() + 30
        while worker.is_ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not worker.is_ready()
        assert worker.readiness()["ready"] is False
    finally:
        worker.stop()
