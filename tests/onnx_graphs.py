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


def _two_feature_regressor(path: Path, nodes: list[onnx.NodeProto], name: str,
                           initializers: list[onnx.TensorProto] | None = None) -> Path:
    """A regressor on ``input`` [None, 2] whose graph ``nodes`` read ``x0``/``x1`` and write ``variable``."""
    split = helper.make_node("Split", ["input"], ["x0", "x1"], axis=1, num_outputs=2)
    graph = helper.make_graph(
        [split, *nodes], name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("variable", TensorProto.FLOAT, [None, 1])],
        initializer=initializers or [],
    )
    return _save(graph, path)


def sqrt_regressor(path: Path) -> Path:
    """``sqrt(x0) + x1``: NaN for negative ``x0``, healthy otherwise."""
    return _two_feature_regressor(path, [helper.make_node("Sqrt", ["x0"], ["root"]),
                                         helper.make_node("Add", ["root", "x1"], ["variable"])], "sqrt")


def absurd_regressor(path: Path) -> Path:
    """``x0 + x1``, except a million times that when ``x1 > 5``: absurd values for some inputs."""
    return _two_feature_regressor(path, [
        helper.make_node("Add", ["x0", "x1"], ["sum"]),
        helper.make_node("Mul", ["sum", "million"], ["huge"]),
        helper.make_node("Greater", ["x1", "five"], ["wild"]),
        helper.make_node("Where", ["wild", "huge", "sum"], ["variable"]),
    ], "absurd", [helper.make_tensor("million", TensorProto.FLOAT, [], [1e6]),
                  helper.make_tensor("five", TensorProto.FLOAT, [], [5.0])])


def slow_regressor(path: Path, iterations_per_unit: int = 1_000_000) -> Path:
    """``x0 + x1`` after a loop of ``max(x0) * iterations_per_unit`` steps: slow for large ``x0``."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["acc_in", "zero"], ["acc_out"])],
        "spin",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [None, 1])],
        initializer=[helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    return _two_feature_regressor(path, [
        helper.make_node("Add", ["x0", "x1"], ["sum"]),
        helper.make_node("ReduceMax", ["x0"], ["peak"], keepdims=0),
        helper.make_node("Mul", ["peak", "scale"], ["trips_f"]),
        helper.make_node("Cast", ["trips_f"], ["trips"], to=TensorProto.INT64),
        helper.make_node("Loop", ["trips", "true", "sum"], ["variable"], body=body),
    ], "slow", [helper.make_tensor("scale", TensorProto.FLOAT, [], [float(iterations_per_unit)]),
                helper.make_tensor("true", TensorProto.BOOL, [], [True])])


def small_reference(path: Path, rows: int = 60, x0: tuple[float, float] = (0.0, 1.0),
                    x1: tuple[float, float] = (0.0, 1.0), target_of: str = "sum", null_x1: int = 0) -> Path:
    """Reference data with features ``x0``, ``x1`` drawn uniformly from the given ranges, and a target.

    ``null_x1`` rows have no ``x1`` (which makes the feature nullable in the card); their target is kept.
    """
    rng = np.random.default_rng(5)
    frame = pd.DataFrame({"x0": rng.uniform(*x0, rows), "x1": rng.uniform(*x1, rows)})
    frame["target"] = np.sqrt(frame["x0"]) + frame["x1"] if target_of == "sqrt" else frame["x0"] + frame["x1"]
    frame.loc[: null_x1 - 1, "x1"] = np.nan
    frame.to_parquet(path, index=False)
    return path


def modified_regressor(src: Path, dst: Path, *, offset: float = 0.0, fail_feature: int | None = None,
                       fail_above: int = 2, delay_iterations: int = 0) -> Path:
    """A copy of a one-input regressor with its output changed: shifted by ``offset``, failing when
    feature ``fail_feature`` exceeds ``fail_above`` (a Gather out of bounds), or slowed by a loop."""
    model = onnx.load(str(src))
    graph = model.graph
    out_name = graph.output[0].name
    raw = f"{out_name}_raw"
    for node in graph.node:
        node.output[:] = [raw if o == out_name else o for o in node.output]
    input_name = graph.input[0].name
    nodes: list[onnx.NodeProto] = []
    inits = [helper.make_tensor("vigil_offset", TensorProto.FLOAT, [], [offset])]
    current = raw
    if fail_feature is not None:
        inits += [helper.make_tensor("vigil_col", TensorProto.INT64, [1], [fail_feature]),
                  helper.make_tensor("vigil_table", TensorProto.FLOAT, [fail_above + 1], [0.0] * (fail_above + 1))]
        nodes += [helper.make_node("Gather", [input_name, "vigil_col"], ["vigil_picked"], axis=1),
                  helper.make_node("Cast", ["vigil_picked"], ["vigil_idx"], to=TensorProto.INT64),
                  helper.make_node("Gather", ["vigil_table", "vigil_idx"], ["vigil_zero"], axis=0),
                  helper.make_node("Add", [current, "vigil_zero"], ["vigil_checked"])]
        current = "vigil_checked"
    if delay_iterations:
        body = helper.make_graph(
            [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
             helper.make_node("Identity", ["acc_in"], ["acc_out"])],
            "vigil_spin",
            [helper.make_tensor_value_info("i", TensorProto.INT64, []),
             helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
             helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [None, 1])],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [None, 1])])
        inits += [helper.make_tensor("vigil_trips", TensorProto.INT64, [], [delay_iterations]),
                  helper.make_tensor("vigil_true", TensorProto.BOOL, [], [True])]
        nodes.append(helper.make_node("Loop", ["vigil_trips", "vigil_true", current], ["vigil_slow"], body=body))
        current = "vigil_slow"
    nodes.append(helper.make_node("Add", [current, "vigil_offset"], [out_name]))
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    onnx.checker.check_model(model)
    dst.write_bytes(model.SerializeToString())
    return dst
