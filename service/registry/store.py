"""The registry's reading side: find, read and verify registered model versions.

Layout: ``<registry>/<name>/<version>/`` holding ``model.onnx``, ``card.yaml``
and ``reference.parquet``. A version directory is immutable once written
(:mod:`service.registry.register` builds it under a temporary name and renames
it into place), so a reader never sees half a version.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import yaml
from pydantic import ValidationError

from service.core.card import ModelCard
from service.core.errors import ModelNotFound, RegistryError, describe_validation

MODEL_FILE = "model.onnx"
CARD_FILE = "card.yaml"
REFERENCE_FILE = "reference.parquet"

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""What a model name may look like (it becomes a directory name and a metric label)."""


def registry_root(path: str | os.PathLike[str] | None = None) -> Path:
    """The registry directory: the argument, else ``VIGIL_REGISTRY``, else ``./models``."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get("VIGIL_REGISTRY", "models"))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _version_key(version: str) -> tuple[int, int | str]:
    # Integers sort numerically and after nothing else; other names sort after them, lexically.
    return (0, int(version)) if version.isdigit() else (1, version)


class Registry:
    """Read access to ``<root>/<name>/<version>/``."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = registry_root(root)

    def names(self) -> list[str]:
        """Registered model names, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and NAME_RE.match(p.name) and self.versions(p.name))

    def versions(self, name: str) -> list[str]:
        """Versions of a model, oldest first (numeric versions in numeric order)."""
        model_dir = self.root / name
        if not model_dir.is_dir():
            return []
        found = [p.name for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return sorted(found, key=_version_key)

    def latest(self, name: str) -> str:
        """Newest version of a model; :class:`ModelNotFound` when there is none."""
        versions = self.versions(name)
        if not versions:
            raise ModelNotFound(f"model '{name}' is not registered in {self.root}")
        return versions[-1]

    def path(self, name: str, version: str) -> Path:
        """Directory of one version."""
        return self.root / name / version

    def card(self, name: str, version: str | None = None) -> ModelCard:
        """Read and validate a version's card (the newest version when none is given)."""
        version = version or self.latest(name)
        card_path = self.path(name, version) / CARD_FILE
        if not card_path.is_file():
            raise ModelNotFound(f"model '{name}' has no version '{version}' in {self.root}")
        return read_card(card_path)

    def verify(self, card: ModelCard) -> Path:
        """Check that the model file matches the card's sha256; returns its path."""
        model_path = self.path(card.name, card.version) / MODEL_FILE
        if not model_path.is_file():
            raise RegistryError(f"{card.name}:{card.version}: {MODEL_FILE} is missing")
        actual = sha256_file(model_path)
        if actual != card.sha256:
            raise RegistryError(
                f"{card.name}:{card.version}: sha256 of {MODEL_FILE} is {actual[:12]}…, "
                f"the card says {card.sha256[:12]}… (file changed after registration)"
            )
        return model_path


def read_card(path: Path) -> ModelCard:
    """Parse a ``card.yaml``, with an error naming the file and the key on failure."""
    try:
        raw = yaml.safe_load(path.read_text())
        return ModelCard.model_validate(raw)
    except (OSError, yaml.YAMLError) as exc:
        raise RegistryError(f"cannot read {path}: {exc}") from exc
    except ValidationError as exc:
        raise RegistryError(f"invalid card {path}: {describe_validation(exc)}") from exc
