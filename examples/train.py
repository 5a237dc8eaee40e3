"""Train the example models from datasets shipped inside scikit-learn.

Writes, for each example, ``<out>/<name>/model.onnx``, ``reference.parquet``
(a held-out sample of the inputs with the target column) and
``metadata.json`` (parameters and held-out metrics), ready for
``vigil models register``. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
from sklearn.datasets import load_breast_cancer, load_diabetes
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, r2_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

SEED = 7


@dataclass(frozen=True)
class Example:
    """One example model: how to load its data and fit it."""

    name: str
    task: str
    load: Callable[[], Any]
    build: Callable[[], Pipeline]


EXAMPLES = [
    Example(
        name="cancer",
        task="classification",
        load=lambda: load_breast_cancer(as_frame=True),
        build=lambda: Pipeline(
            [("scale", StandardScaler()),
             ("forest", RandomForestClassifier(n_estimators=100, max_depth=8, random_state=SEED))]
        ),
    ),
    Example(
        name="diabetes",
        task="regression",
        load=lambda: load_diabetes(as_frame=True, scaled=False),
        build=lambda: Pipeline(
            [("scale", StandardScaler()),
             ("forest", RandomForestRegressor(n_estimators=100, max_depth=8, random_state=SEED))]
        ),
    ),
]


def _metrics(task: str, model: Pipeline, x: pd.DataFrame, y: pd.Series) -> dict[str, float]:
    pred = model.predict(x)
    if task == "classification":
        return {
            "accuracy": float(accuracy_score(y, pred)),
            "f1": float(f1_score(y, pred)),
            "roc_auc": float(roc_auc_score(y, model.predict_proba(x)[:, 1])),
        }
    return {"mae": float(mean_absolute_error(y, pred)), "r2": float(r2_score(y, pred))}


def export_onnx(model: Pipeline, n_features: int, task: str) -> bytes:
    """Convert a fitted pipeline to ONNX with one 2-D float input."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    options = {id(model): {"zipmap": False}} if task == "classification" else None
    onx = to_onnx(
        model,
        initial_types=[("input", FloatTensorType([None, n_features]))],
        options=options,
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    return onx.SerializeToString()


def train(example: Example, out: Path) -> Path:
    """Fit one example and write its artefacts; returns the directory written."""
    bunch = example.load()
    frame: pd.DataFrame = bunch.frame
    target = "target"
    x = frame.drop(columns=[target])
    y = frame[target]
    x_train, x_ref, y_train, y_ref = train_test_split(
        x, y, test_size=0.3, random_state=SEED,
        stratify=y if example.task == "classification" else None,
    )
    model = example.build().fit(x_train, y_train)
    dest = out / example.name
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "model.onnx").write_bytes(export_onnx(model, x.shape[1], example.task))
    reference = x_ref.copy()
    reference[target] = y_ref.to_numpy()
    reference.reset_index(drop=True).to_parquet(dest / "reference.parquet", index=False)
    metadata = {
        "dataset": f"sklearn.datasets.load_{'breast_cancer' if example.name == 'cancer' else example.name}",
        "parameters": {k: v for k, v in model.get_params().items() if isinstance(v, (int, float, str, bool)) or v is None},
        "metrics": _metrics(example.task, model, x_ref, y_ref),
        "train_rows": int(len(x_train)),
    }
    (dest / "metadata.json").write_text(json.dumps(metadata, indent=2, default=str))
    return dest


def register(example: Example, trained: Path, registry: Path | None) -> str:
    """Register a trained example with the registry; returns ``name:version``."""
    from service.registry.register import register_model

    card = register_model(
        example.name, trained / "model.onnx", trained / "reference.parquet",
        target="target", task=example.task, registry=registry,
        metadata=json.loads((trained / "metadata.json").read_text()),
    )
    return f"{card.name}:{card.version}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("build/examples"))
    parser.add_argument("--only", choices=[e.name for e in EXAMPLES])
    parser.add_argument("--register", action="store_true",
                        help="register each example that has no version yet (skips training for those)")
    parser.add_argument("--registry", type=Path, default=None, help="registry directory (default: $VIGIL_REGISTRY or ./models)")
    args = parser.parse_args(argv)
    for example in EXAMPLES:
        if args.only and example.name != args.only:
            continue
        if args.register:
            from service.registry.store import Registry

            existing = Registry(args.registry).versions(example.name)
            if existing:
                print(f"{example.name}: already registered (versions {', '.join(existing)}), not retraining")
                continue
        trained = train(example, args.out)
        print(f"trained {example.name} -> {trained}")
        if args.register:
            print(f"registered {register(example, trained, args.registry)}")


if __name__ == "__main__":
    main()
