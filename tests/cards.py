"""Hand-written model cards for unit tests that need a card but no model file."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Sequence

from service.core.card import FeatureSpec, ModelCard

_ELEMENT = {"string": "string", "int": "int64", "float": "float"}


def card(features: Sequence[FeatureSpec | str] = ("x0", "x1"), *, task: str = "regression",
         labels: list[Any] | None = None, prediction_range: tuple[float, float] | None = (0.0, 1.0),
         output_range: tuple[float, float] | None = None, fallback: dict[str, Any] | None = None,
         per_feature: bool = False) -> ModelCard:
    """A card named ``m:1`` over ``features`` (names become float features), valid unless the arguments clash.

    Regression cards answer from ``value``; classification cards (``labels`` given) from ``probabilities``.
    ``per_feature``: one ONNX input per feature instead of one 2-D tensor.
    """
    specs = [FeatureSpec(name=f) if isinstance(f, str) else f for f in features]
    inputs = {f.name: _ELEMENT[f.type] for f in specs} if per_feature else {"input": "float"}
    outputs = {"value_output": "value"} if task == "regression" else {
        "label_output": "label", "probability_output": "probabilities", "probability_format": "tensor"}
    return ModelCard.model_validate({
        "name": "m", "version": "1", "task": task, "features": [f.model_dump() for f in specs],
        "signature": {"input_mode": "per_feature" if per_feature else "tensor", "inputs": inputs, **outputs},
        "labels": labels,
        "prediction_range": None if prediction_range is None or task != "regression"
        else {"min": prediction_range[0], "max": prediction_range[1]},
        "output_range": None if output_range is None else {"min": output_range[0], "max": output_range[1]},
        "fallback": fallback,
        "training": {"dataset_fingerprint": "sha256:0", "rows": 1, "created_at": datetime.now(timezone.utc)},
        "sha256": "0" * 64,
    })
