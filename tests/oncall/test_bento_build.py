"""`bentoml build` from a copy of the project, with the example models registered into its registry.

The copy is what a checkout has (no virtualenv, caches, build output or local
registry) plus the examples registered by ``examples/train.py --register`` and a
deploy.yaml. The build uses its own BENTOML_HOME and no network:

- bentofile.yaml sets ``lock_packages: false``; locking would resolve every
  package against the index (``uv pip compile``);
- BentoML 1.4 looks uv up on every build (``_bentoml_sdk/images.py`` calls
  ``get_uv_command()`` before it knows whether it needs it) and, when the ``uv``
  package is missing, pip-installs it into the running environment. The test
  extra installs it, so the build never changes the environment it runs in.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.oncall import kit
from tests.servers import clean_env

pytestmark = pytest.mark.integration

NOT_IN_A_CHECKOUT = (".git", ".venv", "build", "var", "models", "__pycache__", ".pytest_cache", ".ruff_cache",
                     "*.egg-info")
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def bento(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the bento; returns its directory in the private BENTOML_HOME."""
    try:
        importlib.metadata.version("uv")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("the uv package is missing: `bentoml build` would pip-install it from the index "
                    "(pyproject.toml's test extra installs it)")
    work = tmp_path_factory.mktemp("bento")
    project = work / "project"
    shutil.copytree(kit.ROOT, project, ignore=shutil.ignore_patterns(*NOT_IN_A_CHECKOUT))
    env = clean_env({"BENTOML_HOME": str(work / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"})
    subprocess.run([str(BIN / "python"), "examples/train.py", "--register", "--registry", str(project / "models"),
                    "--out", str(work / "trained")], cwd=project, env=env, check=True, capture_output=True,
                   timeout=300)
    (project / "deploy.yaml").write_text(yaml.safe_dump({"models": {"cancer": {"stable": "1"}}}))
    built = subprocess.run([str(BIN / "bentoml"), "build", "--output", "tag"], cwd=project, env=env,
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, _, version = tag.partition(":")
    path = work / "bentoml" / "bentos" / name / version
    assert path.is_dir(), (tag, built.stdout)
    return path


def files_under(root: Path) -> set[str]:
    """Relative paths of every file under ``root``, compiled bytecode left out."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_bento_holds_the_service_monitoring_registry_and_deploy_config(bento: Path) -> None:
    packed = files_under(bento / "src")
    for package in ("service", "monitoring"):
        sources = {str(p.relative_to(kit.ROOT)) for p in (kit.ROOT / package).glob("*.py")}
        assert sources <= packed, sources - packed
    for model in ("cancer", "diabetes"):
        assert {f"models/{model}/1/{name}" for name in ("model.onnx", "card.yaml", "reference.parquet")} <= packed
    assert "deploy.yaml" in packed
    assert not {p for p in packed if p.startswith(("tests/", "benchmarks/", "examples/"))}


def test_bento_describes_the_vigil_service_and_its_requirements(bento: Path) -> None:
    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    assert manifest["service"] == "service.app:Vigil" and manifest["name"] == "vigil"
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    for package in ("onnxruntime", "evidently", "prometheus-client", "ruamel.yaml", "bentoml=="):
        assert package in requirements, package
    assert not (bento / "env" / "python" / "requirements.lock.txt").exists()
