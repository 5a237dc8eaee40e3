"""One interface for every model runtime: ``Predictor.predict(batch) -> Predictions``.

:class:`OnnxPredictor` wraps an onnxruntime session; the heuristic fallback
implements the same interface, so routing never special-cases either.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.registry import ModelCard


@dataclass(slots=True)
class Batch:
    """Validated instances of one request, in the card's feature order.

    ``matrix`` holds the numeric features as float64 (NaN for nulls) when every
    feature is numeric; ``columns`` holds each feature's values (``None`` for
    nulls) for models that take one input per feature.
    """

    size: int
    matrix: np.ndarray | None = None
    columns: dict[str, list[Any]] | None = None
    has_nulls: bool = False


@dataclass(slots=True)
class Predictions:
    """What a predictor answers for a batch, row-aligned with it."""

    labels: list[Any] | None = None
    """Predicted class label per row (classification)."""
    probabilities: np.ndarray | None = None
    """(rows, classes) probabilities in the card's label order (classification)."""
    values: np.ndarray | None = None
    """Predicted value per row (regression)."""
    extra: dict[str, Any] = field(default_factory=dict)


class Predictor(ABC):
    """A loaded model version that turns a :class:`Batch` into :class:`Predictions`."""

    card: ModelCard

    @abstractmethod
    def predict(self, batch: Batch) -> Predictions:
        """Predict every row of the batch in one call."""


class OnnxPredictor(Predictor):
    """A registered ONNX model served with onnxruntime (one session per worker)."""

    def __init__(self, card: ModelCard, model_path: Path, intra_op_threads: int = 1) -> None:
        import onnxruntime as ort

        started = time.perf_counter()
        self.card = card
        options = ort.SessionOptions()
        # One intra-op thread per worker: workers already use the cores, and thread
        # pools fighting each other cost more than they give for small tabular models.
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        sig = card.signature
        self._tensor_input = next(iter(sig.inputs)) if sig.input_mode == "tensor" else None
        self._tensor_dtype = np.float64 if sig.inputs.get(self._tensor_input or "") == "double" else np.float32
        if card.task == "classification":
            self._outputs = [sig.probability_output]
        else:
            self._outputs = [sig.value_output]
        self._labels = list(card.labels or [])
        self.load_seconds = time.perf_counter() - started

    def _feeds(self, batch: Batch) -> dict[str, np.ndarray]:
        if self._tensor_input is not None:
            assert batch.matrix is not None
            return {self._tensor_input: batch.matrix.astype(self._tensor_dtype, copy=False)}
        assert batch.columns is not None
        feeds = {}
        for name, elem in self.card.signature.inputs.items():
            column = batch.columns[name]
            if elem == "string":
                arr = np.array(["" if v is None else v for v in column], dtype=object)
            elif elem in ("int64", "int32"):
                arr = np.array([0 if v is None else v for v in column], dtype=np.int64 if elem == "int64" else np.int32)
            else:
                arr = np.array([np.nan if v is None else v for v in column],
                               dtype=np.float64 if elem == "double" else np.float32)
            feeds[name] = arr.reshape(-1, 1)
        return feeds

    def predict(self, batch: Batch) -> Predictions:
        """Run the whole batch through onnxruntime in one call."""
        (raw,) = self.session.run(self._outputs, self._feeds(batch))
        if self.card.task == "regression":
            return Predictions(values=np.asarray(raw, dtype=np.float64).reshape(batch.size, -1)[:, 0])
        if self.card.signature.probability_format == "zipmap":
            keys = self._labels
            probs = np.array([[row[k] for k in keys] for row in raw], dtype=np.float64)
        else:
            probs = np.asarray(raw, dtype=np.float64).reshape(batch.size, -1)
        labels = self._labels
        # Take the label from the probabilities so label and probabilities always agree
        # (and a NaN row shows up as non-finite probabilities, not as a silent class 0).
        return Predictions(labels=[labels[i] for i in probs.argmax(axis=1)], probabilities=probs)
