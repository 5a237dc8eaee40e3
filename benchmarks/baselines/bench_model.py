"""The prediction every baseline performs, written once.

``build float32 array -> InferenceSession.run -> one dict per row`` with the
same session options as Vigil (one intra-op and one inter-op thread), so the
baselines differ from Vigil only in what surrounds the model call. The model
version directory (``<registry>/cancer/<version>``, holding ``card.yaml`` and
``model.onnx``) comes from ``$BENCH_MODEL_DIR``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import yaml

MODEL_DIR_ENV = "BENCH_MODEL_DIR"
"""Environment variable naming the model version directory."""

WORKERS_ENV = "BENCH_WORKERS"
"""Environment variable the BentoML baselines read their worker count from."""


def workers_from_env() -> int:
    """Worker count for a BentoML baseline (``$BENCH_WORKERS``, default 1)."""
    return int(os.environ.get(WORKERS_ENV, "1"))


def session_options() -> ort.SessionOptions:
    """The options Vigil uses: one intra-op and one inter-op thread, quiet logs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


@dataclass
class BenchModel:
    """An ONNX binary classifier with its feature order and labels taken from the Vigil card."""

    session: ort.InferenceSession
    input_name: str
    output_name: str
    features: list[str]
    labels: list[Any]

    def run(self, matrix: np.ndarray) -> np.ndarray:
        """Class probabilities for a ``(rows, features)`` float32 matrix."""
        (probabilities,) = self.session.run([self.output_name], {self.input_name: matrix})
        return probabilities

    def predict(self, instances: list[dict[str, float]]) -> list[dict[str, Any]]:
        """One ``{label, probabilities}`` answer per instance (no validation beyond a missing key)."""
        matrix = np.array([[row[name] for name in self.features] for row in instances], dtype=np.float32)
        probabilities = self.run(matrix)
        keys = [str(label) for label in self.labels]
        labels = self.labels
        return [
            {"label": labels[index], "probabilities": dict(zip(keys, row, strict=True))}
            for index, row in zip(probabilities.argmax(axis=1).tolist(), probabilities.tolist(), strict=True)
        ]


def load_model(model_dir: str | Path | None = None) -> BenchModel:
    """Load the model version in ``model_dir`` (default ``$BENCH_MODEL_DIR``)."""
    directory = Path(model_dir if model_dir is not None else os.environ[MODEL_DIR_ENV])
    card = yaml.safe_load((directory / "card.yaml").read_text())
    signature = card["signature"]
    session = ort.InferenceSession(str(directory / "model.onnx"), session_options(),
                                   providers=["CPUExecutionProvider"])
    return BenchModel(
        session=session,
        input_name=next(iter(signature["inputs"])),
        output_name=signature["probability_output"],
        features=[feature["name"] for feature in card["features"]],
        labels=list(card["labels"]),
    )
