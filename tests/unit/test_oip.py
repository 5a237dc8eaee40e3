"""The Open Inference Protocol codec without a server: decoding, checks against the card, outputs."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest

from service import oip
from service.core.card import FeatureSpec, ModelCard
from service.core.errors import BadRequest, InvalidInput, PayloadTooLarge
from service.core.predictor import Predictions
from service.inputs import InstanceValidator
from tests.unit.test_inputs import MIXED, NUMERIC, make_card


def request(inputs: list[dict[str, Any]], binary: bytes = b"", **fields: Any) -> oip.InferRequest:
    """Decode a request the way the route does: JSON header, then binary data when there is some."""
    header = json.dumps({"inputs": inputs, **fields}).encode()
    return oip.parse_request(header + binary, str(len(header)) if binary else None, max_instances=100)


def tensor(data: Any, shape: list[int], name: str = "input", datatype: str = "FP64") -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


def decode(card: ModelCard, inputs: list[dict[str, Any]], binary: bytes = b"", **fields: Any) -> Any:
    return oip.batch_for(request(inputs, binary, **fields), InstanceValidator(card))


def refusal(kind: type[Exception], card: ModelCard, inputs: list[dict[str, Any]], binary: bytes = b"",
            **fields: Any) -> Any:
    with pytest.raises(kind) as info:
        decode(card, inputs, binary, **fields)
    return info.value


# --------------------------------------------------------------------------- the validator's matrix


def test_a_matrix_validates_like_the_same_instances() -> None:
    validator = InstanceValidator(NUMERIC)
    rows = [{"a": 1.0, "b": 0.5, "n": 2}, {"a": 11.0, "b": -0.5, "n": 3}]
    from_dicts, quality_dicts = validator.validate(rows)
    from_matrix, quality_matrix = validator.validate_matrix(np.array([[1.0, 0.5, 2], [11.0, -0.5, 3]]))
    np.testing.assert_array_equal(from_matrix.matrix, from_dicts.matrix)
    assert quality_matrix == quality_dicts and quality_matrix.out_of_range == {"a": 1}


def test_a_matrix_names_each_bad_row_and_feature() -> None:
    validator = InstanceValidator(NUMERIC)
    matrix = np.array([[np.nan, 0.0, 1], [1.0, np.inf, 2.5], [1.0, np.nan, 1]])
    with pytest.raises(InvalidInput) as info:
        validator.validate_matrix(matrix)
    assert info.value.details == [
        {"instance": 0, "field": "a", "problem": "expected a finite number, got nan"},
        {"instance": 1, "field": "b", "problem": "expected a finite number, got inf"},
        {"instance": 1, "field": "n", "problem": "expected an integer, got 2.5"},
    ]  # row 2's NaN is in a nullable feature: a null, not a problem


def test_nan_in_a_nullable_feature_is_a_counted_null() -> None:
    batch, quality = InstanceValidator(NUMERIC).validate_matrix(np.array([[1.0, np.nan, 1], [2.0, np.nan, 2]]))
    assert batch.has_nulls and quality.missing == {"b": 2}
    assert InstanceValidator(NUMERIC).instances_of(batch.matrix)[0] == {"a": 1.0, "b": None, "n": 1}


# --------------------------------------------------------------------------- request structure


def test_binary_inputs_are_read_in_order_after_the_header() -> None:
    first = np.arange(6, dtype=np.float32).reshape(2, 3)
    raw = first.tobytes()
    decoded = request([{"name": "input", "shape": [2, 3], "datatype": "FP32",
                        "parameters": {"binary_data_size": len(raw)}}], raw)
    np.testing.assert_array_equal(np.asarray(decoded.inputs[0].data).reshape(2, 3), first)


@pytest.mark.parametrize(("inputs", "binary", "says"), [
    ([{"name": "input", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": 24}}],
     b"\0" * 20, "only 20 bytes of binary data are left"),
    ([{"name": "input", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": 20}}],
     b"\0" * 20, "shape [2, 3] of FP32 takes 24"),
    ([tensor([1, 2], [1, 3])], b"", "data has 2 elements; its shape needs 3"),
    ([tensor([1, 2, 3], [1, -3])], b"", "shape must be a non-empty list of non-negative integers"),
    ([tensor([1, 2, 3], [1, 3], datatype="FP8")], b"", "datatype 'FP8' is not one this server reads"),
    ([tensor([1, 2, 3], [1, 3], datatype=["FP32"])], b"", "datatype ['FP32'] is not one this server reads"),
    ([{"name": "input", "shape": [1], "datatype": "FP32"}], b"", "neither data nor a binary_data_size"),
])
def test_structural_problems_are_400_naming_the_input(inputs: Any, binary: bytes, says: str) -> None:
    with pytest.raises(BadRequest) as info:
        request(inputs, binary)
    assert says in info.value.message and "'input'" in info.value.message


def test_binary_data_beyond_the_inputs_sizes_is_refused() -> None:
    with pytest.raises(BadRequest, match="16 bytes of binary data after the JSON header; the inputs' "
                                         "binary_data_size add up to 12"):
        request([{"name": "input", "shape": [1, 3], "datatype": "FP32", "parameters": {"binary_data_size": 12}}],
                b"\0" * 16)


@pytest.mark.parametrize("field", ["id", "parameters", "outputs", "model_name"])
def test_a_null_field_is_not_an_absent_one(field: str) -> None:
    with pytest.raises(BadRequest, match=field):
        request([tensor([1, 2, 3], [1, 3])], **{field: None})


def test_the_model_name_kserves_client_sends_is_taken_and_other_fields_are_not() -> None:
    assert request([tensor([1, 2, 3], [1, 3])], model_name="cancer").inputs[0].shape == [1, 3]
    with pytest.raises(BadRequest, match=r"unknown request field\(s\) \['model_version'\]"):
        request([tensor([1, 2, 3], [1, 3])], model_name="cancer", model_version="1")


def test_a_header_length_past_the_body_is_refused() -> None:
    with pytest.raises(BadRequest, match="says the JSON header has 999 bytes"):
        oip.parse_request(b'{"inputs": []}', "999", 10)


def test_more_rows_than_allowed_is_413() -> None:
    with pytest.raises(PayloadTooLarge):
        request([tensor([0.0] * 303, [101, 3])])


def test_nested_json_data_is_read_row_major() -> None:
    decoded = request([tensor([[1, 2, 3], [4, 5, 6]], [2, 3])])
    assert np.asarray(decoded.inputs[0].data).tolist() == [1, 2, 3, 4, 5, 6]


def test_binary_bytes_elements_are_length_prefixed() -> None:
    raw = b"".join(struct.pack("<I", len(s)) + s for s in (b"low", "h\u00e9".encode()))
    decoded = request([{"name": "city", "shape": [2], "datatype": "BYTES",
                        "parameters": {"binary_data_size": len(raw)}}], raw)
    assert decoded.inputs[0].data == ["low", "h\u00e9"]


# --------------------------------------------------------------------------- against the card


def test_one_tensor_becomes_the_matrix_in_card_order() -> None:
    batch, quality, instances = decode(NUMERIC, [tensor([1, 0.5, 2, 3, None, 4], [2, 3])])
    assert batch.matrix.tolist()[0] == [1, 0.5, 2] and np.isnan(batch.matrix[1, 1])
    assert quality.missing == {"b": 1} and instances is None  # no PII to hash: the log keeps the matrix


@pytest.mark.parametrize(("inputs", "says"), [
    ([tensor([1, 2, 3], [1, 3], name="x")], "unknown input 'x'"),
    ([tensor([1, 2, 3], [1, 3], datatype="INT64")], "datatype INT64; it takes FP32 or FP64"),
    ([tensor([1, 2, 3, 4], [1, 4])], "shape [1, 4]; it takes [N, 3]"),
    ([tensor([1, 2, 3], [3])], "shape [3]; it takes [N, 3]"),
])
def test_a_tensor_that_does_not_fit_the_card_is_400(inputs: Any, says: str) -> None:
    assert says in refusal(BadRequest, NUMERIC, inputs).message


def test_values_the_card_refuses_name_row_and_feature() -> None:
    error = refusal(InvalidInput, NUMERIC, [tensor([1, 0, 1, 2, 0, "x"], [2, 3])])
    assert error.details == [{"instance": 1, "field": "n", "problem": "expected a number, got 'x'"}]
    assert "row 1 'n': expected a number, got 'x'" in oip.error_text(error)


def test_one_input_per_feature_builds_the_same_batch() -> None:
    inputs = [tensor([0.5, 0.5], [2, 1], name="x"), tensor(["low", None], [2], name="city", datatype="BYTES")]
    batch, _, instances = decode(MIXED, inputs, parameters={"content_type": "pd"})
    assert instances == [{"x": 0.5, "city": "low"}, {"x": 0.5, "city": None}]
    assert batch.columns == {"city": ["low", None], "x": [0.5, 0.5]}


def test_per_feature_problems_match_predict() -> None:
    error = refusal(InvalidInput, MIXED, [tensor(["low"], [1], name="city", datatype="BYTES"),
                                          tensor([1], [1], name="y")])
    assert error.details == [{"field": "y", "problem": "unknown feature"}, {"field": "x", "problem": "missing feature"}]
    wrong_type = refusal(BadRequest, MIXED, [tensor([1.0], [1], name="x"), tensor([1.0], [1], name="city")])
    assert "feature 'city' (string) takes BYTES" in wrong_type.message


def test_a_string_model_takes_no_single_tensor() -> None:
    assert "takes one input per feature" in refusal(BadRequest, MIXED, [tensor([1, 2], [1, 2])]).message


def test_unknown_outputs_are_refused_before_predicting() -> None:
    error = refusal(BadRequest, NUMERIC, [tensor([1, 0, 1], [1, 3])], outputs=[{"name": "label"}])
    assert "unknown output(s) ['label']; model 'm' answers value" in error.message


def test_int_features_take_integral_floats_per_feature() -> None:
    card = make_card([FeatureSpec(name="n", type="int"), FeatureSpec(name="s", type="string")], mode="per_feature")
    _, _, instances = decode(card, [tensor([3.0], [1], name="n", datatype="FP32"),
                                    tensor(["a"], [1], name="s", datatype="BYTES")])
    assert instances == [{"n": 3, "s": "a"}] and type(instances[0]["n"]) is int


# --------------------------------------------------------------------------- outputs


def classifier(labels: list[Any]) -> ModelCard:
    return NUMERIC.model_copy(update={"task": "classification", "labels": labels, "prediction_range": None})


def test_outputs_as_json_and_as_binary() -> None:
    card = classifier(["no", "yes"])
    predictions = Predictions(labels=["yes", "no"], probabilities=np.array([[0.25, 0.75], [0.5, 0.5]]))
    outputs, parts = oip.encode_outputs(card, predictions, None, binary_default=False)
    assert parts == [] and outputs == [
        {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["yes", "no"]},
        {"name": "probabilities", "datatype": "FP32", "shape": [2, 2], "data": [0.25, 0.75, 0.5, 0.5]}]
    requested = [oip.RequestedOutput("probabilities", True), oip.RequestedOutput("label", None)]
    outputs, parts = oip.encode_outputs(card, predictions, requested, binary_default=False)
    assert [o["name"] for o in outputs] == ["probabilities", "label"] and "data" in outputs[1]
    assert outputs[0]["parameters"] == {"binary_data_size": 16}
    np.testing.assert_array_equal(np.frombuffer(parts[0], "<f4"), [0.25, 0.75, 0.5, 0.5])


def test_integer_labels_are_int64_and_metadata_gives_the_class_order() -> None:
    card = classifier([0, 1])
    outputs, parts = oip.encode_outputs(card, Predictions(labels=[1], probabilities=np.array([[0.1, 0.9]])),
                                        None, binary_default=True)
    assert outputs[0]["datatype"] == "INT64" and np.frombuffer(parts[0], "<i8").tolist() == [1]
    assert oip.output_metadata(card)[1]["parameters"] == {"labels": ["0", "1"]}


def test_each_instance_says_its_variant_and_reason() -> None:
    assert oip.instance_parameters("2", "canary", [None, "invalid_output"], "rid") == {
        "request_id": "rid", "versions": ["2", "2"], "variants": ["canary", "fallback"], "reasons": [None, "invalid_output"]}
