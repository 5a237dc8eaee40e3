"""Tiny ONNX graphs built with ``onnx.helper`` for fault-injection tests, and helpers to register them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pandas as pd
from onnx import TensorProto, helper

OPSET = [helper.make_opsetid("", 18)]


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=OPSET, producer_name="vigil-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def index_lookup_regressor(path: Path, table_size: int = 10) -> Path:
    """A regressor on features ``[idx, x]`` answering ``table[int(idx)] + x``.

    onnxruntime raises at run time when ``idx`` is outside ``[0, table_size)``:
    a model that fails for some inputs only.
    """
    table = helper.make_tensor("table", TensorProto.FLOAT, [table_size], np.arange(table_size, dtype=np.float32) * 10)
    nodes = [
        helper.make_node("Split", ["input"], ["idx_f", "x"], axis=1, num_outputs=2),
        helper.make_node("Cast", ["idx_f"], ["idx"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "idx"], ["looked_up"], axis=0),
        helper.make_node("Add", ["looked_up", "x"], ["variable"]),
    ]
    graph = helper.make_graph(
        nodes, "index_lookup",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("variable", TensorProto.FLOAT, [None, 1])],
        initializer=[table],
    )
    return _save(graph, path)


def index_lookup_reference(path: Path, rows: int = 50, table_size: int = 10) -> Path:
    """Reference data for :func:`index_lookup_regressor` with a ``target`` column."""
    rng = np.random.default_rng(3)
    frame = pd.DataFrame({"idx": rng.integers(0, table_size, rows).astype(float), "x": rng.normal(0, 1, rows)})
    frame["target"] = frame["idx"] * 10 + frame["x"]
    frame.to_parquet(path, index=False)
    return path
