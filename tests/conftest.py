"""Shared fixtures: the example models trained once per session, registries holding them, a clean environment."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.servers import ISOLATED_PREFIXES

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's VIGIL_*/BENTOML_* variables: what runs in this process (the CLI
    through CliRunner, the jobs, the in-process app) reads only what the test sets, as servers do
    (tests/servers.py ``clean_env``)."""
    for name in list(os.environ):
        if name.startswith(ISOLATED_PREFIXES):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def trained_examples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both example models trained from scikit-learn's bundled datasets: name -> artefact dir."""
    import train  # examples/train.py

    out = tmp_path_factory.mktemp("examples")
    return {example.name: train.train(example, out) for example in train.EXAMPLES}


@pytest.fixture(scope="session")
def example_registry(tmp_path_factory: pytest.TempPathFactory, trained_examples: dict[str, Path]) -> Path:
    """A registry with cancer:1 and diabetes:1 registered (shared; copy it before changing it)."""
    import train

    root = tmp_path_factory.mktemp("registry")
    for example in train.EXAMPLES:
        train.register(example, trained_examples[example.name], root)
    return root


@pytest.fixture
def registry_copy(example_registry: Path, tmp_path: Path) -> Path:
    """A private copy of the example registry that a test may change."""
    dest = tmp_path / "models"
    shutil.copytree(example_registry, dest)
    return dest
