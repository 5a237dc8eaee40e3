"""The Open Inference Protocol (KServe "V2") codec: tensors in, the validator's batch out; predictions back to tensors.

Plain Python, no HTTP: ``service/http/v2.py`` reads the bytes and writes the
responses. A request is decoded in two steps. :func:`parse_request` reads the
JSON header and the binary tensor data (Triton's ``binary_data`` extension:
the body is the JSON header of ``Inference-Header-Content-Length`` bytes, then
each input that has a ``binary_data_size`` parameter, in input order) and
checks every tensor's own structure: datatype, shape, element count, sizes.
Once the request is routed, :func:`batch_for` checks the tensors against that
version's card and hands them to its validator. It accepts two conventions:

- one tensor ``[N, F]`` (FP32 or FP64) holding the card's features in card
  order (named as the model's metadata lists it); it goes to the validator as
  a matrix, without instance dicts;
- one input per feature, named after it, shape ``[N]`` or ``[N, 1]`` (the
  convention of MLServer's pandas codec, ``content_type: "pd"``), BYTES for
  string features, ``null`` (or NaN) where the card allows a null.

Outputs are ``label`` (INT64, or BYTES for string labels) and
``probabilities`` (FP32 ``[N, C]``, columns in the label order the metadata
gives) for a classifier, ``value`` (FP64 ``[N]``) for a regressor.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.core.card import ModelCard
from service.core.errors import BadRequest, InvalidInput, PayloadTooLarge, VigilError
from service.core.predictor import Batch, Predictions
from service.inputs import MAX_KEY, InputQuality, InstanceValidator, parse_json

Checked = tuple[Batch, InputQuality, "list[dict[str, Any]] | None"]
"""A request checked against one version: its batch, its input quality, the instances to log (None: the matrix)."""

EXTENSIONS = ["binary_tensor_data", "parameters"]
"""What ``GET /v2`` advertises: Triton's binary tensor data, and request ``parameters`` (``key``, ``content_type``)."""
PLATFORM = "onnxruntime_onnx"
"""The platform name Triton gives ONNX models served by onnxruntime."""
MAX_ID = 64
"""Longest request ``id`` accepted: the id is the one ``/feedback`` takes, which allows 64 characters."""

NUMPY_TYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
"""Every fixed-size datatype this codec reads, as little-endian numpy types (the binary extension's byte order)."""
NUMBERS = frozenset(NUMPY_TYPES) - {"BOOL"}
"""Datatypes a numeric feature takes in the per-feature convention."""
MATRIX_TYPES = frozenset({"FP32", "FP64"})
"""Datatypes of the one-tensor convention."""
_INTS = frozenset({"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"})
_REQUEST_KEYS = frozenset({"id", "parameters", "inputs", "outputs", "model_name"})
"""The fields of an inference request. ``model_name`` is not the spec's, but KServe's ``InferenceRESTClient`` sends
it in every body; the path names the model, so it is taken (a string) and not read, as KServe's own server does."""
_LENGTH = struct.Struct("<I")
_ABSENT: Any = object()
"""A field the request does not have (a field that is there, null included, must have its type)."""


def invalid(message: str, field: str | None = None) -> BadRequest:
    """A request OIP cannot decode: 400, naming the input (``field``) when there is one."""
    return BadRequest(message, [{"field": field, "problem": message}] if field else None, code="invalid_tensor")


@dataclass(slots=True)
class Tensor:
    """One decoded input: flat ``data`` (a numpy array, or a list of JSON values / strings) and its shape."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[Any]


@dataclass(slots=True)
class RequestedOutput:
    """An output the client asked for, and whether it wants it as binary data (None: the request's default)."""

    name: str
    binary: bool | None


@dataclass(slots=True)
class InferRequest:
    """An inference request with every tensor decoded and structurally checked, not yet checked against a card."""

    id: str | None
    parameters: dict[str, Any]
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None
    binary_outputs: bool
    """``binary_data_output``: every output not asked for otherwise goes back as binary data."""

    @property
    def key(self) -> str | None:
        """The sticky routing key (``parameters.key``): the same key always reaches the same variant."""
        return self.parameters.get("key")


# ----------------------------------------------------------------------------------- requests


def parse_request(body: bytes, header_length: str | None, max_instances: int) -> InferRequest:
    """Decode a request body: JSON only, or (with ``Inference-Header-Content-Length``) JSON then binary tensor data."""
    if header_length is None:
        header, binary = body, memoryview(b"")
    else:
        try:
            size = int(header_length)
        except ValueError:
            raise invalid(f"Inference-Header-Content-Length must be a number of bytes, got {header_length!r}") from None
        if not 0 <= size <= len(body):
            raise invalid(f"Inference-Header-Content-Length says the JSON header has {size} bytes; "
                          f"the body has {len(body)}")
        header, binary = body[:size], memoryview(body)[size:]
    payload = parse_json(header)
    if not isinstance(payload, dict):
        raise invalid("the request is not a JSON object {id, parameters, inputs, outputs}")
    unknown = sorted(str(k) for k in payload.keys() - _REQUEST_KEYS)
    if unknown:
        raise invalid(f"unknown request field(s) {unknown}; an inference request has id, parameters, inputs, outputs")
    if type(payload.get("model_name", "")) is not str:
        raise invalid("model_name must be a string (the path names the model)", "model_name")
    request_id = payload.get("id", "")  # a field that is present must have its type: null is not absent
    if type(request_id) is not str or len(request_id) > MAX_ID:
        raise invalid(f"id must be a string of at most {MAX_ID} characters (it is the id /feedback takes)", "id")
    parameters = _parameters(payload.get("parameters", _ABSENT), "parameters")
    key = parameters.get("key")
    if key is not None and (type(key) is not str or len(key) > MAX_KEY):
        raise invalid(f"parameters.key must be a string of at most {MAX_KEY} characters", "parameters.key")
    binary_outputs = parameters.get("binary_data_output", False)
    if type(binary_outputs) is not bool:
        raise invalid("parameters.binary_data_output must be true or false", "parameters.binary_data_output")
    inputs = payload.get("inputs")
    if type(inputs) is not list or not inputs:
        raise invalid("inputs must be a non-empty list of tensors", "inputs")
    tensors, offset = [], 0
    for i, item in enumerate(inputs):
        tensor, offset = _tensor(item, i, binary, offset, max_instances)
        tensors.append(tensor)
    if offset != len(binary):
        raise invalid(f"the body has {len(binary)} bytes of binary data after the JSON header; the inputs' "
                      f"binary_data_size add up to {offset}")
    outputs = _outputs(payload.get("outputs", _ABSENT))
    return InferRequest(request_id or None, parameters, tensors, outputs, binary_outputs)


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is _ABSENT:
        return {}
    if type(value) is not dict:
        raise invalid(f"{where} must be an object", where)
    return value


def _tensor(item: Any, index: int, binary: memoryview, offset: int, max_instances: int) -> tuple[Tensor, int]:
    """One input, its data read from JSON or from the binary part at ``offset``; returns it and the next offset."""
    where = f"inputs[{index}]"
    if type(item) is not dict:
        raise invalid(f"{where} must be an object {{name, shape, datatype, data}}", where)
    name = item.get("name")
    if type(name) is not str or not name:
        raise invalid(f"{where}.name must be a non-empty string", where)
    where = f"input '{name}'"
    datatype = item.get("datatype")
    if type(datatype) is not str or (datatype not in NUMPY_TYPES and datatype != "BYTES"):
        raise invalid(f"{where}: datatype {datatype!r} is not one this server reads "
                      f"({', '.join([*NUMPY_TYPES, 'BYTES'])})", name)
    shape = item.get("shape")
    if type(shape) is not list or not shape or any(type(d) is not int or d < 0 for d in shape):
        raise invalid(f"{where}: shape must be a non-empty list of non-negative integers, got {shape!r}", name)
    if shape[0] > max_instances:
        raise PayloadTooLarge(f"{where} has {shape[0]} rows; the limit is {max_instances}", code="too_many_instances")
    count = math.prod(shape)
    parameters = _parameters(item.get("parameters", _ABSENT), f"{where} parameters")
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in item:
            raise invalid(f"{where} has neither data nor a binary_data_size parameter", name)
        data = _json_data(item["data"], datatype, count, where, name)
        return Tensor(name, datatype, shape, data), offset
    if "data" in item:
        raise invalid(f"{where} has both data and binary_data_size: send its data one way", name)
    if type(size) is not int or size < 0:
        raise invalid(f"{where}: binary_data_size must be a non-negative integer, got {size!r}", name)
    if offset + size > len(binary):
        raise invalid(f"{where}: binary_data_size is {size} bytes but only {len(binary) - offset} bytes of binary "
                      "data are left in the body", name)
    chunk = binary[offset:offset + size]
    if datatype == "BYTES":
        data: np.ndarray | list[Any] = _binary_strings(chunk, count, where, name)
    else:
        dtype = NUMPY_TYPES[datatype]
        if size != count * dtype.itemsize:
            raise invalid(f"{where}: binary_data_size is {size} bytes; shape {shape} of {datatype} takes "
                          f"{count * dtype.itemsize}", name)
        data = np.frombuffer(chunk, dtype=dtype)
    return Tensor(name, datatype, shape, data), offset + size


def _json_data(data: Any, datatype: str, count: int, where: str, name: str) -> np.ndarray | list[Any]:
    """Flat tensor data from JSON (flat or nested row-major); numbers become an array when all are plain numbers."""
    if type(data) is not list:
        raise invalid(f"{where}: data must be a list", name)
    flat = data
    while flat and type(flat[0]) is list:  # nested row-major: flatten one level at a time
        if any(type(v) is not list for v in flat):
            raise invalid(f"{where}: nested data must be lists at every level", name)
        flat = [v for sub in flat for v in sub]
    if len(flat) != count:
        raise invalid(f"{where}: data has {len(flat)} elements; its shape needs {count}", name)
    if datatype == "BYTES" or datatype == "BOOL":
        return flat
    kinds = set(map(type, flat))
    if kinds <= {int, float} and (datatype not in _INTS or kinds <= {int}):
        try:
            return np.array(flat, dtype=np.float64)
        except OverflowError:
            pass  # an integer past float range: kept as sent, the card check names it
    return flat


def _binary_strings(chunk: memoryview, count: int, where: str, name: str) -> list[str]:
    """BYTES elements in the binary extension's layout: a 4-byte little-endian length, then the bytes."""
    out, position, end = [], 0, len(chunk)
    raw = chunk.tobytes()
    while position < end:
        if position + 4 > end:
            raise invalid(f"{where}: binary BYTES data ends inside an element's 4-byte length", name)
        (length,) = _LENGTH.unpack_from(raw, position)
        position += 4
        if position + length > end:
            raise invalid(f"{where}: a BYTES element of {length} bytes runs past its binary_data_size", name)
        try:
            out.append(raw[position:position + length].decode())
        except UnicodeDecodeError:
            raise invalid(f"{where}: element {len(out)} is not UTF-8 text", name) from None
        position += length
    if len(out) != count:
        raise invalid(f"{where}: binary data holds {len(out)} BYTES elements; its shape needs {count}", name)
    return out


def _outputs(value: Any) -> list[RequestedOutput] | None:
    if value is _ABSENT:
        return None
    if type(value) is not list:
        raise invalid("outputs must be a list of {name, parameters}", "outputs")
    out = []
    for i, item in enumerate(value):
        if type(item) is not dict or type(item.get("name")) is not str:
            raise invalid(f"outputs[{i}] must be an object with a name", "outputs")
        binary = _parameters(item.get("parameters", _ABSENT), f"outputs[{i}].parameters").get("binary_data")
        if binary is not None and type(binary) is not bool:
            raise invalid(f"output '{item['name']}': binary_data must be true or false", item["name"])
        out.append(RequestedOutput(item["name"], binary))
    return out


# ----------------------------------------------------------------------------------- against the card


def tensor_name(card: ModelCard) -> str | None:
    """The name of the one-tensor input: the model's own tensor input, ``input`` for per-feature models; None
    when the card has a string feature (a float tensor cannot hold it)."""
    if any(f.type == "string" for f in card.features):
        return None
    return _tensor_input(card)


def _tensor_input(card: ModelCard) -> str:
    signature = card.signature
    return next(iter(signature.inputs)) if signature.input_mode == "tensor" else "input"


def batch_for(request: InferRequest, validator: InstanceValidator) -> Checked:
    """The validated batch of a decoded request for one version, its input quality, the instances to log (or None).

    Problems with the values name the row and the feature (422, as ``/predict``);
    tensors that do not fit the card at all (name, datatype, shape) are a 400.
    """
    card = validator.card
    if request.outputs is not None:  # before anything is predicted: an answer must never be lost to a typo
        answers = [o["name"] for o in output_metadata(card)]
        unknown = [o.name for o in request.outputs if o.name not in answers]
        if unknown:
            raise invalid(f"unknown output(s) {unknown}; model '{card.name}' answers {', '.join(answers)}", unknown[0])
    content_type = request.parameters.get("content_type")
    if content_type not in (None, "pd", "np"):
        raise invalid(f"parameters.content_type {content_type!r} is not supported: 'np' (one tensor [N, "
                      f"{len(card.features)}]) or 'pd' (one input per feature)", "parameters.content_type")
    names = validator.names
    single = request.inputs[0] if len(request.inputs) == 1 else None
    per_feature = content_type == "pd" or (content_type is None and (single is None or single.name in names))
    if not per_feature:
        return _matrix_batch(request.inputs, validator)
    return _feature_batch(request.inputs, validator)


def _matrix_batch(inputs: list[Tensor], validator: InstanceValidator) -> Checked:
    card = validator.card
    width = len(card.features)
    expected = _tensor_input(card) if validator.all_numeric else None  # tensor_name, without its pass over features
    if expected is None:
        raise invalid(f"model '{card.name}' has a string feature, so it takes one input per feature "
                      f"({', '.join(validator.names)}), not one tensor", inputs[0].name)
    if len(inputs) != 1:
        raise invalid(f"model '{card.name}' takes one tensor '{expected}' [N, {width}] or one input per feature; "
                      f"got {len(inputs)} inputs that are not all features", inputs[0].name)
    tensor = inputs[0]
    if tensor.name != expected:
        raise invalid(f"unknown input '{tensor.name}': model '{card.name}' takes one tensor '{expected}' "
                      f"[N, {width}], or one input per feature", tensor.name)
    if tensor.datatype not in MATRIX_TYPES:
        raise invalid(f"input '{expected}' has datatype {tensor.datatype}; it takes FP32 or FP64", expected)
    shape = tensor.shape
    if len(shape) != 2 or shape[1] != width or shape[0] == 0:
        raise invalid(f"input '{expected}' has shape {shape}; it takes [N, {width}] with N >= 1: a row per instance, "
                      f"the features in the order GET /v2/models/{card.name} lists them", expected)
    data = tensor.data
    if isinstance(data, np.ndarray):
        matrix = data.reshape(shape[0], width)
    else:
        nullable = [f.nullable for f in card.features]
        matrix = _numbers(data, nullable * shape[0], validator, width).reshape(shape[0], width)
    batch, quality = validator.validate_matrix(matrix)
    assert batch.matrix is not None
    return batch, quality, validator.instances_of(batch.matrix) if validator.hashes_pii else None


def _feature_batch(inputs: list[Tensor], validator: InstanceValidator) -> Checked:
    card = validator.card
    specs = {f.name: f for f in card.features}
    by_name: dict[str, Tensor] = {}
    rows: int | None = None
    for tensor in inputs:
        if tensor.name in by_name:
            raise invalid(f"input '{tensor.name}' is given twice", tensor.name)
        by_name[tensor.name] = tensor
        if len(tensor.shape) > 2 or (len(tensor.shape) == 2 and tensor.shape[1] != 1) or tensor.shape[0] == 0:
            raise invalid(f"input '{tensor.name}' has shape {tensor.shape}; one input per feature takes [N] or [N, 1] "
                          "with N >= 1", tensor.name)
        if rows is not None and tensor.shape[0] != rows:
            raise invalid(f"input '{tensor.name}' has {tensor.shape[0]} rows, the inputs before it {rows}", tensor.name)
        rows = tensor.shape[0]
    assert rows is not None
    problems = [{"field": name, "problem": "unknown feature"} for name in by_name if name not in specs]
    problems += [{"field": f.name, "problem": "missing feature"} for f in card.features
                 if f.name not in by_name and not f.nullable]
    if problems:
        raise InvalidInput(f"{len(problems)} problem(s) in the inputs for model '{card.name}'", problems)
    for name, tensor in by_name.items():
        wanted = "BYTES" if specs[name].type == "string" else "a number type (FP32, FP64, INT64, ...)"
        if (tensor.datatype == "BYTES") != (specs[name].type == "string") or tensor.datatype == "BOOL":
            raise invalid(f"input '{name}' has datatype {tensor.datatype}; feature '{name}' ({specs[name].type}) "
                          f"takes {wanted}", name)
    if validator.all_numeric:
        matrix = np.full((rows, len(card.features)), np.nan)
        for column, spec in enumerate(card.features):
            tensor = by_name.get(spec.name)
            if tensor is None:
                continue  # a nullable feature not sent: null in every row
            data = tensor.data
            matrix[:, column] = data if isinstance(data, np.ndarray) else _numbers(data, [spec.nullable] * rows,
                                                                                   validator, 1, column)
        batch, quality = validator.validate_matrix(matrix)
        assert batch.matrix is not None
        return batch, quality, validator.instances_of(batch.matrix) if validator.hashes_pii else None
    columns = {name: _column_values(tensor, specs[name].type, specs[name].nullable) for name, tensor in by_name.items()}
    present = list(columns)
    instances = [dict(zip(present, values)) for values in zip(*columns.values())]
    batch, quality = validator.validate(instances)
    return batch, quality, instances


def _numbers(values: list[Any], nullable: list[bool], validator: InstanceValidator, width: int,
             first_column: int = 0) -> np.ndarray:
    """JSON tensor values as float64 (null as NaN where the feature is nullable); 422 naming every other value."""
    out = np.empty(len(values))
    details = []
    for i, value in enumerate(values):
        kind = type(value)
        if kind is float or kind is int:
            try:
                out[i] = value
                continue
            except OverflowError:
                problem = f"expected a finite number, got {value!r}"[:80]
        elif value is None:
            if nullable[i]:
                out[i] = np.nan
                continue
            problem = "expected a number, got null"
        else:
            shown = repr(value) if kind in (str, bool) else kind.__name__
            problem = f"expected a number, got {shown[:60]}"
        details.append({"instance": i // width, "field": validator.names[first_column + i % width], "problem": problem})
    if details:
        raise InvalidInput(f"{len(details)} problem(s) in the inputs for model '{validator.card.name}'", details[:100])
    return out


def _column_values(tensor: Tensor, feature_type: str, nullable: bool) -> list[Any]:
    """One feature's values as the instance dicts of ``/predict`` would hold them (None for a null)."""
    data = tensor.data
    values = data.tolist() if isinstance(data, np.ndarray) else data
    if feature_type == "string":
        return values
    if nullable:  # NaN is how a float tensor says null
        values = [None if v != v else v for v in values]
    if feature_type == "int":  # 3.0 from a float tensor is the integer 3; 3.5 stays for the validator to refuse
        values = [int(v) if type(v) is float and v.is_integer() else v for v in values]
    return values


# ----------------------------------------------------------------------------------- metadata and responses


def input_metadata(card: ModelCard) -> list[dict[str, Any]]:
    """The inputs ``GET /v2/models/{name}`` lists: the one tensor when the card allows it, else one per feature."""
    name = tensor_name(card)
    features = card.feature_names
    if name is not None:
        datatype = "FP64" if card.signature.inputs.get(name) == "double" else "FP32"
        return [{"name": name, "datatype": datatype, "shape": [-1, len(features)],
                 "parameters": {"content_type": "np", "features": features}}]
    datatypes = {"string": "BYTES", "int": "INT64", "float": "FP64"}
    return [{"name": f.name, "datatype": datatypes[f.type], "shape": [-1],
             "parameters": {"content_type": "pd", "nullable": f.nullable}} for f in card.features]


def output_metadata(card: ModelCard) -> list[dict[str, Any]]:
    """The outputs of a version: label and per-class probabilities (class order in ``parameters.labels``), or value."""
    if card.task == "regression":
        return [{"name": "value", "datatype": "FP64", "shape": [-1]}]
    labels = card.labels or []
    return [{"name": "label", "datatype": _label_type(card), "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(labels)],
             "parameters": {"labels": [str(label) for label in labels]}}]


def model_metadata(card: ModelCard, versions: list[str]) -> dict[str, Any]:
    """``GET /v2/models/{name}[/versions/{version}]``: the version's inputs and outputs, and every served version."""
    return {"name": card.name, "versions": versions, "platform": PLATFORM, "inputs": input_metadata(card),
            "outputs": output_metadata(card),
            "parameters": {"version": card.version, "task": card.task, "features": card.feature_names}}


def _label_type(card: ModelCard) -> str:
    return "INT64" if all(type(label) is int for label in card.labels or []) else "BYTES"


def encode_outputs(card: ModelCard, predictions: Predictions, requested: list[RequestedOutput] | None,
                   binary_default: bool) -> tuple[list[dict[str, Any]], list[bytes]]:
    """The response's outputs, and the binary data that follows the JSON header (in output order)."""
    size = len(predictions.values) if predictions.values is not None else len(predictions.labels or ())
    if predictions.values is not None:
        tensors: dict[str, tuple[str, list[int], Any]] = {"value": ("FP64", [size], predictions.values)}
    else:
        assert predictions.labels is not None and predictions.probabilities is not None
        probabilities = predictions.probabilities.astype(np.float32)
        tensors = {"label": (_label_type(card), [size], predictions.labels),
                   "probabilities": ("FP32", list(probabilities.shape), probabilities)}
    if requested is None:
        chosen = [(name, binary_default) for name in tensors]
    else:  # the names were checked by batch_for
        chosen = [(o.name, binary_default if o.binary is None else o.binary) for o in requested]
    outputs, parts = [], []
    for name, binary in chosen:
        datatype, shape, data = tensors[name]
        output: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            raw = _binary(datatype, data)
            output["parameters"] = {"binary_data_size": len(raw)}
            parts.append(raw)
        else:
            output["data"] = data.ravel().tolist() if isinstance(data, np.ndarray) else list(data)
        outputs.append(output)
    return outputs, parts


def _binary(datatype: str, data: Any) -> bytes:
    if datatype == "BYTES":
        encoded = [str(v).encode() for v in data]
        return b"".join(_LENGTH.pack(len(e)) + e for e in encoded)
    return np.ascontiguousarray(data, dtype=NUMPY_TYPES[datatype]).tobytes()


def instance_parameters(version: str, variant: str, reasons: list[str | None], request_id: str) -> dict[str, Any]:
    """Each instance's version, variant (``fallback`` where the fallback answered) and fallback reason (or null),
    and ``request_id``: the id Vigil issued and logged the prediction under, the one ``/feedback`` takes.

    The response's ``id`` echoes the client's ``id`` as the protocol asks; an id the client chose
    says neither which worker served it nor when, so it cannot be a feedback key (see :mod:`service.feedback`).
    """
    return {"request_id": request_id, "versions": [version] * len(reasons),
            "variants": [variant if reason is None else "fallback" for reason in reasons],
            "reasons": reasons}


def error_text(error: VigilError) -> str:
    """An error as OIP's one string: the message, then each problem with its row and input or feature."""
    parts = []
    for detail in error.details[:20]:
        if detail.get("problem") == error.message:
            continue  # the message says it already
        where = [f"row {detail['instance']}" if detail.get("instance") is not None else None,
                 f"'{detail['field']}'" if detail.get("field") else None]
        parts.append(" ".join(w for w in where if w) + f": {detail['problem']}" if any(where) else detail["problem"])
    more = len(error.details) - 20
    text = error.message + (": " + "; ".join(parts) if parts else "")
    return text + (f"; and {more} more" if more > 0 else "")
