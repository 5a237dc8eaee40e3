"""What every model runtime shares: ``Predictor.predict(batch) -> Predictions``.

:class:`~service.runtime.onnx.OnnxPredictor` wraps an onnxruntime session; the
heuristic fallback (:class:`~service.runtime.heuristic.HeuristicPredictor`)
implements the same interface, so routing never special-cases either.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.core.card import ModelCard

VARIANTS = ("stable", "canary", "fallback")
"""Who answers an instance: the stable version, the canary, or the heuristic fallback (the ``variant`` label)."""
FALLBACK_REASONS = ("model_error", "timeout", "invalid_output", "missing_input", "breaker_open", "load_failed",
                    "drift", "quality")
"""Why the fallback answers an instance: the ``reason`` of an answer and of ``vigil_fallback_total``."""
BREAKER_STATES = ("closed", "open", "half_open")
"""The states of a version's circuit breaker (the ``to`` label of ``vigil_breaker_transitions_total``)."""


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

    def scores(self) -> np.ndarray:
        """One number per row: the value (regression), else the positive-class (binary) or top-class score.

        What the canary compares, the prediction log keeps as ``prediction_score``
        and registration records as the reference distribution.
        """
        if self.values is not None:
            return self.values
        assert self.probabilities is not None
        return binary_or_top_score(self.probabilities)


def binary_or_top_score(probabilities: np.ndarray) -> np.ndarray:
    """The positive-class column of a binary classifier's probabilities, else each row's top-class probability."""
    return probabilities[:, 1] if probabilities.shape[1] == 2 else probabilities.max(axis=1)


class ModelTimeout(Exception):
    """The model call outlived its time budget and was cancelled."""


class Predictor(ABC):
    """A loaded model version that turns a :class:`Batch` into :class:`Predictions`."""

    card: ModelCard
    load_seconds: float = 0.0

    @abstractmethod
    def predict(self, batch: Batch, budget_seconds: float | None = None) -> Predictions:
        """Predict every row of the batch in one call, within ``budget_seconds`` when given."""

    def close(self) -> None:
        """Release what the predictor holds (a session, its memory); it is not called again after this."""
