"""Tiny hand-made ONNX graphs whose inputs and outputs exercise each branch of card inference.

Each builder writes ``model.onnx`` into a directory and returns its path; the
graphs are linear, so the expected predictions can be worked out by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
ELEMENT = {"float": TensorProto.FLOAT, "double": TensorProto.DOUBLE, "int64": TensorProto.INT64,
           "int32": TensorProto.INT32, "string": TensorProto.STRING, "bool": TensorProto.BOOL}
NUMPY = {"float": np.float32, "double": np.float64}


def save(dest: Path, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
         outputs: list[onnx.ValueInfoProto], initializers: Sequence[onnx.TensorProto] = ()) -> Path:
    """Check and write a graph as ``dest/model.onnx``."""
    model = helper.make_model(helper.make_graph(nodes, "card_inference", inputs, outputs, list(initializers)),
                              opset_imports=OPSET, producer_name="vigil-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def tensor_input(width: int | str | None, elem: str = "float", name: str = "input") -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, ELEMENT[elem], [None, width])


def linear_regressor(dest: Path, weights: Sequence[float], elem: str = "float", *, width: int | str | None = None,
                     ignore_nulls: bool = False) -> Path:
    """``input @ weights`` over one ``[None, len(weights)]`` input; with ``ignore_nulls`` a NaN counts as 0."""
    w = numpy_helper.from_array(np.asarray(weights, dtype=NUMPY[elem]).reshape(-1, 1), "weights")
    nodes = []
    source = "input"
    if ignore_nulls:
        zero = numpy_helper.from_array(np.zeros(1, dtype=NUMPY[elem]), "zero")
        nodes += [helper.make_node("IsNaN", ["input"], ["missing"]),
                  helper.make_node("Where", ["missing", "zero", "input"], ["filled"])]
        source = "filled"
    nodes.append(helper.make_node("MatMul", [source, "weights"], ["value"]))
    inits = [w] + ([zero] if ignore_nulls else [])
    return save(dest, nodes, [tensor_input(width if width is not None else len(weights), elem)],
                [helper.make_tensor_value_info("value", ELEMENT[elem], [None, 1])], inits)


def tensor_classifier(dest: Path, weights: Sequence[Sequence[float]], labels: Sequence[int | str] | None = None, *,
                      zipmap: bool = False, label_output: bool = True, ignore_nulls: bool = False) -> Path:
    """Softmax of ``input @ weights`` (one column per class), with the argmax's label when ``label_output``.

    ``labels`` maps class columns to labels (default: the column index); ``zipmap`` outputs the
    probabilities as a sequence of label -> probability maps, like skl2onnx does by default;
    with ``ignore_nulls`` a NaN input counts as 0.
    """
    w = np.asarray(weights, dtype=np.float32)
    classes = w.shape[1]
    labels = list(range(classes)) if labels is None else list(labels)
    strings = isinstance(labels[0], str)
    table = helper.make_tensor("labels", TensorProto.STRING if strings else TensorProto.INT64, [classes],
                               [s.encode() for s in labels] if strings else labels)  # type: ignore[misc]
    nodes, inits = [], [numpy_helper.from_array(w, "weights"), table]
    source = "input"
    if ignore_nulls:
        inits.append(numpy_helper.from_array(np.zeros(1, dtype=np.float32), "zero"))
        nodes += [helper.make_node("IsNaN", ["input"], ["missing"]),
                  helper.make_node("Where", ["missing", "zero", "input"], ["filled"])]
        source = "filled"
    nodes += [helper.make_node("MatMul", [source, "weights"], ["logits"]),
              helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)]
    outputs = []
    if label_output:
        nodes += [helper.make_node("ArgMax", ["probabilities"], ["column"], axis=1, keepdims=0),
                  helper.make_node("Gather", ["labels", "column"], ["label"], axis=0)]
        outputs.append(helper.make_tensor_value_info("label", TensorProto.STRING if strings else TensorProto.INT64,
                                                     [None]))
    if zipmap:
        key = {"classlabels_strings": labels} if strings else {"classlabels_int64s": labels}
        nodes.append(helper.make_node("ZipMap", ["probabilities"], ["probability_maps"], domain="ai.onnx.ml", **key))
        key_type = TensorProto.STRING if strings else TensorProto.INT64
        outputs.append(helper.make_value_info("probability_maps", helper.make_sequence_type_proto(
            helper.make_map_type_proto(key_type, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))))
    else:
        outputs.append(helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, classes]))
    return save(dest, nodes, [tensor_input(w.shape[0])], outputs, inits)


def per_feature_sum(dest: Path, inputs: dict[str, str], output: str = "float",
                    codes: dict[str, float] | None = None) -> Path:
    """One ``[None, 1]`` input per feature (element types as given); the value is the sum of all of them.

    A string counts as its number in ``codes`` (0 when it is not there). ``output`` is the
    element type of the one output.
    """
    codes = codes or {"": 0.0}
    nodes, summed = [], []
    for name, elem in inputs.items():
        if elem == "string":
            nodes.append(helper.make_node("LabelEncoder", [name], [f"{name}_f"], domain="ai.onnx.ml",
                                          keys_strings=list(codes), values_floats=list(codes.values()),
                                          default_float=0.0))
        else:
            nodes.append(helper.make_node("Cast", [name], [f"{name}_f"], to=TensorProto.FLOAT))
        summed.append(f"{name}_f")
    nodes.append(helper.make_node("Sum", summed, ["total"]))
    nodes.append(helper.make_node("Cast", ["total"], ["value"], to=ELEMENT[output]))
    return save(dest, nodes, [helper.make_tensor_value_info(n, ELEMENT[e], [None, 1]) for n, e in inputs.items()],
                [helper.make_tensor_value_info("value", ELEMENT[output], [None, 1])])


def two_outputs(dest: Path, first: str, second: str) -> Path:
    """``input`` [None, 1] float, passed through as two outputs cast to the given element types."""
    nodes = [helper.make_node("Cast", ["input"], ["a"], to=ELEMENT[first]),
             helper.make_node("Cast", ["input"], ["b"], to=ELEMENT[second])]
    return save(dest, nodes, [tensor_input(1)], [helper.make_tensor_value_info("a", ELEMENT[first], [None, 1]),
                                                 helper.make_tensor_value_info("b", ELEMENT[second], [None, 1])])
