"""Small model builders for the tests: scikit-learn models exported with skl2onnx, and hand-made ONNX graphs.

Everything is built from data bundled with scikit-learn; nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

TARGET = "target"
"""Name of the target column in every reference frame built here."""
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
"""The opsets examples/train.py exports with (newer ones break skl2onnx 1.20 with onnx 1.23)."""
SEED = 7

WINE_NUMERIC = ["alcohol", "malic_acid", "flavanoids", "color_intensity", "proline"]
"""Numeric wine columns used as features."""
WINE_CATEGORICAL = "hue_band"
"""A string feature derived from the wine 'hue' column: 'low', 'mid' or 'high'."""

NonFinite = Literal["divide_by_zero", "log_of_negative"]
"""How :func:`nonfinite_model` breaks its output."""


@dataclass(frozen=True)
class Fitted:
    """A fitted estimator, the rows it was fitted on, and held-out reference rows (features + target)."""

    estimator: Any
    train: pd.DataFrame
    reference: pd.DataFrame

    @property
    def features(self) -> pd.DataFrame:
        """The reference rows without the target column."""
        return self.reference.drop(columns=[TARGET])


@dataclass(frozen=True)
class Artefacts:
    """A model file and a reference file on disk, ready for ``register_model``."""

    model: Path
    reference: Path


def wine_frame(string_labels: bool = False) -> pd.DataFrame:
    """Wine data: the numeric feature columns, a categorical string column, and the target.

    The target is the class index (0, 1, 2), or the class name ('class_0', …) with ``string_labels``.
    """
    from sklearn.datasets import load_wine

    bunch = load_wine(as_frame=True)
    data = bunch.frame
    frame = data[WINE_NUMERIC].copy()
    frame[WINE_CATEGORICAL] = pd.qcut(data["hue"], 3, labels=["low", "mid", "high"]).astype(str)
    target = data["target"].to_numpy()
    frame[TARGET] = np.asarray(bunch.target_names)[target] if string_labels else target
    return frame


def _split(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A stratified 70/30 train/reference split with a fixed seed; indexes are reset."""
    from sklearn.model_selection import train_test_split

    train, reference = train_test_split(frame, test_size=0.3, random_state=SEED, stratify=frame[TARGET])
    return train.reset_index(drop=True), reference.reset_index(drop=True)


def fit_per_feature_classifier() -> Fitted:
    """One-hot + scaling in a ColumnTransformer, then logistic regression, on the wine data (int labels)."""
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    train, reference = _split(wine_frame())
    pipeline = Pipeline([
        ("prepare", ColumnTransformer([
            ("onehot", OneHotEncoder(handle_unknown="ignore"), [WINE_CATEGORICAL]),
            ("scale", StandardScaler(), WINE_NUMERIC),
        ])),
        ("classify", LogisticRegression(max_iter=2000)),
    ])
    pipeline.fit(train.drop(columns=[TARGET]), train[TARGET])
    return Fitted(pipeline, train, reference)


def fit_tensor_classifier(string_labels: bool) -> Fitted:
    """Scaling + logistic regression on the numeric wine columns only (one 2-D input once exported)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    train, reference = _split(wine_frame(string_labels).drop(columns=[WINE_CATEGORICAL]))
    pipeline = Pipeline([("scale", StandardScaler()), ("classify", LogisticRegression(max_iter=2000))])
    pipeline.fit(train[WINE_NUMERIC], train[TARGET])
    return Fitted(pipeline, train, reference)


def tensor_types(n_features: int) -> list[tuple[str, Any]]:
    """skl2onnx initial types for one 2-D float input named ``input``."""
    from skl2onnx.common.data_types import FloatTensorType

    return [("input", FloatTensorType([None, n_features]))]


def per_feature_types(columns: list[str], strings: set[str]) -> list[tuple[str, Any]]:
    """skl2onnx initial types for one ``[None, 1]`` input per column, string-typed for ``strings``."""
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    return [(c, StringTensorType([None, 1]) if c in strings else FloatTensorType([None, 1])) for c in columns]


def export(estimator: Any, initial_types: list[tuple[str, Any]], *, zipmap: bool = True) -> bytes:
    """Serialised ONNX for a fitted estimator; ``zipmap=False`` gives classifiers a probability tensor."""
    from skl2onnx import to_onnx

    options = None if zipmap else {id(estimator): {"zipmap": False}}
    onx = to_onnx(estimator, initial_types=initial_types, options=options, target_opset=TARGET_OPSET)
    return onx.SerializeToString()


def nonfinite_model(n_features: int, kind: NonFinite) -> bytes:
    """A hand-made regressor over a ``[None, n]`` float input whose every output is NaN or inf.

    ``divide_by_zero`` computes ``X / 0``; ``log_of_negative`` computes ``Log(-|X| - 1)``.
    """
    from onnx import TensorProto, checker, helper, numpy_helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, n_features])
    y = helper.make_tensor_value_info("variable", TensorProto.FLOAT, [None, n_features])
    if kind == "divide_by_zero":
        initializers = [numpy_helper.from_array(np.zeros(n_features, dtype=np.float32), "zero")]
        nodes = [helper.make_node("Div", ["input", "zero"], ["variable"])]
    else:
        initializers = [numpy_helper.from_array(np.ones(n_features, dtype=np.float32), "one")]
        nodes = [
            helper.make_node("Abs", ["input"], ["abs"]),
            helper.make_node("Neg", ["abs"], ["negative"]),
            helper.make_node("Sub", ["negative", "one"], ["below_zero"]),
            helper.make_node("Log", ["below_zero"], ["variable"]),
        ]
    graph = helper.make_graph(nodes, kind, [x], [y], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", TARGET_OPSET[""])])
    model.ir_version = 8
    checker.check_model(model)
    return model.SerializeToString()


def write_reference(dest: Path, frame: pd.DataFrame, suffix: str = ".parquet") -> Path:
    """Write ``reference<suffix>`` under ``dest``: parquet, csv, or (any other suffix) JSON."""
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"reference{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        path.write_text(frame.to_json())
    return path


def write_artefacts(dest: Path, model: bytes | Path, reference: pd.DataFrame, suffix: str = ".parquet") -> Artefacts:
    """Write ``model.onnx`` (bytes, or a copy of a file) and ``reference<suffix>`` under ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    model_path = dest / "model.onnx"
    model_path.write_bytes(model.read_bytes() if isinstance(model, Path) else model)
    return Artefacts(model_path, write_reference(dest, reference, suffix))
