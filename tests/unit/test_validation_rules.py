"""Validation rules: the /predict envelope, each feature type's bounds, the problems named, and the batch built.

The numeric and envelope fast paths must give exactly what the schema path gives, and
must be taken for the plain requests they exist for; both halves are tested here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.core.card import FeatureSpec
from service.core.errors import BadRequest, InvalidInput, PayloadTooLarge
from service.inputs import MAX_KEY, MAX_MODEL_NAME, InstanceValidator, parse_envelope, parse_json
from tests.cards import card

INTS = card([FeatureSpec(name="n", type="int")])
BOUNDED = card([FeatureSpec(name="a", min=0.0, max=10.0), FeatureSpec(name="b", min=-1.0, max=1.0)])
MIXED = card([FeatureSpec(name="city", type="string"), FeatureSpec(name="x", min=0.0, max=1.0)], per_feature=True)
MIXED_NULLABLE = card([FeatureSpec(name="city", type="string", nullable=True),
                       FeatureSpec(name="x", min=0.0, max=1.0, nullable=True)], per_feature=True)


def problems_of(validator: InstanceValidator, instances: list[Any]) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        validator.validate(instances)
    return info.value


class SchemaNotConsulted:
    """Stands in for the per-value schema where a test expects the fast path to answer alone."""

    def validate_python(self, value: Any) -> Any:
        raise AssertionError("the per-value schema was consulted")


# ---------------------------------------------------------------------- the body and its envelope


def test_a_body_that_is_not_json_is_a_bad_request_naming_the_parse_error() -> None:
    with pytest.raises(BadRequest) as info:
        parse_json(b'{"model": ')
    assert info.value.code == "malformed_json"
    assert info.value.message.startswith("malformed JSON: ") and len(info.value.message) > len("malformed JSON: ")


def test_a_body_with_nan_or_infinity_is_read_for_validation_to_name() -> None:
    body = parse_json(b'{"a": NaN, "b": [1, 2]}')
    assert np.isnan(body["a"]) and body["b"] == [1, 2]
    assert parse_json(b'{"model": "m"}') == {"model": "m"}


@pytest.mark.parametrize("count", [1, 5])
def test_up_to_max_instances_are_accepted(count: int) -> None:
    assert len(parse_envelope({"model": "m", "instances": [{}] * count}, max_instances=5).instances) == count


def test_more_than_max_instances_is_payload_too_large_with_both_numbers() -> None:
    with pytest.raises(PayloadTooLarge) as info:
        parse_envelope({"model": "m", "instances": [{}] * 6}, max_instances=5)
    assert info.value.message == "6 instances in one request; the limit is 5"
    assert info.value.code == "too_many_instances"


@pytest.mark.parametrize("payload", [
    {"model": "m", "instances": [{"a": 1}]},
    {"model": "m" * MAX_MODEL_NAME, "instances": [{"a": 1}, {"a": 2}], "key": None},
    {"model": "cancer", "instances": [{"a": 1}], "key": "k" * MAX_KEY},
    {"model": "cancer", "instances": [{"a": 1}], "key": "k"},
])
def test_a_well_formed_envelope_is_taken_as_is_without_copying_the_instances(payload: dict[str, Any]) -> None:
    request = parse_envelope(payload, max_instances=10)
    assert (request.model, request.key) == (payload["model"], payload.get("key"))
    assert request.instances is payload["instances"]
    assert all(got is sent for got, sent in zip(request.instances, payload["instances"]))


@pytest.mark.parametrize(("payload", "details"), [
    ({"model": "m", "instances": [{"a": 1}, 3]},
     [{"field": "instances.1", "problem": "expected an object of feature values, got 3"}]),
    ({"model": "", "instances": [{}]},
     [{"field": "model", "problem": "String should have at least 1 character (got '')"}]),
    ({"model": "m", "instances": [], "colour": "red"},
     [{"field": "instances", "problem": "List should have at least 1 item after validation, not 0 (got list)"},
      {"field": "colour", "problem": "unknown feature"}]),
    ({"model": "m", "instances": [{}], "key": 5},
     [{"field": "key", "problem": "expected a string, got 5"}]),
    ([1, 2], [{"field": "body", "problem": "Input should be a valid dictionary or instance of PredictRequest "
                                           "(got list)"}]),
])
def test_a_malformed_envelope_names_every_field_and_its_problem(payload: Any, details: list[dict[str, str]]) -> None:
    with pytest.raises(BadRequest) as info:
        parse_envelope(payload, max_instances=10)
    assert info.value.message == "the request body does not match {model, instances, key}"
    assert info.value.code == "invalid_request"
    assert info.value.details == details


# ---------------------------------------------------------------------- feature types and their bounds


@pytest.mark.parametrize(("value", "accepted"), [
    (2**63 - 1, True), (-(2**63), True), (2**63, False), (-(2**63) - 1, False), (2**64, False), (200, True),
])
def test_an_int_feature_takes_any_64_bit_integer(value: int, accepted: bool) -> None:
    validator = InstanceValidator(INTS)
    if accepted:
        batch, _ = validator.validate([{"n": value}])
        assert batch.matrix is not None and batch.matrix.dtype == np.float64
        assert batch.matrix.tolist() == [[float(value)]] and batch.size == 1 and batch.has_nulls is False
    else:
        error = problems_of(validator, [{"n": value}])
        assert [d["field"] for d in error.details] == ["n"]


def test_int_columns_within_64_bits_take_the_fast_path() -> None:
    validator = InstanceValidator(INTS)
    assert validator.numeric_matrix([{"n": 200}, {"n": -(2**62)}]) is not None
    assert validator.numeric_matrix([{"n": 2**63}]) is None


def test_plain_numeric_rows_never_reach_the_per_value_schema() -> None:
    validator = InstanceValidator(BOUNDED)
    validator.adapter = SchemaNotConsulted()  # type: ignore[assignment]
    batch, quality = validator.validate([{"a": 1, "b": 0.5}, {"a": 2.5, "b": -1}])
    assert batch.matrix is not None and batch.matrix.tolist() == [[1.0, 0.5], [2.5, -1.0]]
    assert (quality.missing, quality.out_of_range) == ({}, {})


@pytest.mark.parametrize(("length", "accepted"), [(1024, True), (1025, False)])
def test_strings_are_limited_to_1024_characters_by_default(length: int, accepted: bool) -> None:
    validator = InstanceValidator(MIXED)
    rows = [{"city": "p" * length, "x": 0.5}]
    if accepted:
        assert validator.validate(rows)[0].columns == {"city": ["p" * length], "x": [0.5]}
    else:
        assert problems_of(validator, rows).details == [
            {"instance": 0, "field": "city", "problem": "string longer than 1024 characters"}]


def test_the_instance_schema_lists_the_cards_features_and_refuses_others() -> None:
    schema = InstanceValidator(MIXED_NULLABLE).instance_schema
    assert schema["additionalProperties"] is False
    assert list(schema["properties"]) == ["city", "x"]
    assert schema.get("required", []) == []
    strict = InstanceValidator(MIXED).instance_schema
    assert strict["required"] == ["city", "x"]
    assert strict["properties"]["city"]["type"] == "string" and strict["properties"]["x"]["type"] == "number"


# ---------------------------------------------------------------------- the problems named


def test_a_problem_shows_the_value_up_to_60_characters() -> None:
    validator = InstanceValidator(BOUNDED)
    exactly = "v" * 58                      # repr adds two quotes: 60 characters
    longer = "v" * 59
    details = problems_of(validator, [{"a": exactly, "b": 0}, {"a": longer, "b": 0}]).details
    assert details[0]["problem"] == f"expected a number, got '{exactly}'"
    assert details[1]["problem"] == f"expected a number, got '{'v' * 56}..."
    assert len(details[1]["problem"]) == len("expected a number, got ") + 60


def test_a_list_or_object_value_is_shown_by_its_type() -> None:
    details = problems_of(InstanceValidator(BOUNDED), [{"a": [1, 2], "b": {"x": 1}}]).details
    assert [d["problem"] for d in details] == ["expected a number, got list", "expected a number, got dict"]


def test_an_instance_that_is_not_an_object_is_named_by_its_type() -> None:
    details = problems_of(InstanceValidator(MIXED), [["paris", 0.5]]).details
    assert details == [{"instance": 0, "problem": "expected an object of feature values, got list"}]


@pytest.mark.parametrize(("row", "problem"), [
    ({"a": 1.0}, "missing feature"),
    ({"a": float("nan"), "b": 0.0}, "expected a finite number, got nan"),
    ({"a": None, "b": 0.0}, "expected a number, got null"),
    ({"a": True, "b": 0.0}, "expected a number, got True"),
])
def test_each_numeric_problem_is_named(row: dict[str, Any], problem: str) -> None:
    details = problems_of(InstanceValidator(BOUNDED), [row]).details
    assert details == [{"instance": 0, "field": "a" if "b" in row else "b", "problem": problem}]


@pytest.mark.parametrize(("value", "problem"), [(1.5, "expected an integer, got 1.5"),
                                                (None, "expected an integer, got null")])
def test_an_int_feature_names_what_it_got_instead(value: Any, problem: str) -> None:
    assert problems_of(InstanceValidator(INTS), [{"n": value}]).details == [
        {"instance": 0, "field": "n", "problem": problem}]


def test_a_number_sent_for_a_string_feature_is_refused() -> None:
    details = problems_of(InstanceValidator(MIXED), [{"city": 5, "x": 0.5}]).details
    assert details == [{"instance": 0, "field": "city", "problem": "expected a string, got 5"}]


def test_a_null_string_is_named_as_null() -> None:
    details = problems_of(InstanceValidator(MIXED), [{"city": None, "x": 0.5}]).details
    assert details == [{"instance": 0, "field": "city", "problem": "expected a string, got null"}]


def test_at_most_100_problems_are_listed_but_all_are_counted() -> None:
    error = problems_of(InstanceValidator(MIXED), [{"city": 1, "x": "no"}] * 75)
    assert len(error.details) == 100
    assert error.message == "150 problem(s) in the instances for model 'm'"


# ---------------------------------------------------------------------- the batch and the input quality


def test_complete_rows_of_a_card_with_strings_have_no_nulls() -> None:
    batch, quality = InstanceValidator(MIXED).validate([{"city": "paris", "x": 0.5}, {"city": "rome", "x": 0.1}])
    assert (batch.size, batch.has_nulls, batch.matrix) == (2, False, None)
    assert batch.columns == {"city": ["paris", "rome"], "x": [0.5, 0.1]}
    assert quality.missing == {}
    complete = InstanceValidator(MIXED_NULLABLE).validate([{"city": "paris", "x": 0.5}])[0]
    assert complete.has_nulls is False


def test_nulls_and_omitted_features_are_nulls_in_the_columns_and_counted_missing() -> None:
    batch, quality = InstanceValidator(MIXED_NULLABLE).validate([{"city": None, "x": 0.5}, {"x": 2.0}, {"city": "rome"}])
    assert (batch.size, batch.has_nulls) == (3, True)
    assert batch.columns == {"city": [None, None, "rome"], "x": [0.5, 2.0, None]}
    assert quality.missing == {"city": 2, "x": 1}
    assert quality.out_of_range == {"x": 1}


def test_numeric_nulls_are_nan_in_the_matrix_and_counted_missing() -> None:
    validator = InstanceValidator(card([FeatureSpec(name="a", min=0.0, max=10.0),
                                        FeatureSpec(name="b", min=-1.0, max=1.0, nullable=True)]))
    batch, quality = validator.validate([{"a": 1, "b": None}, {"a": 2.5}, {"a": 3, "b": 0.5}])
    assert (batch.size, batch.has_nulls, batch.columns) == (3, True, None)
    assert batch.matrix is not None and batch.matrix.dtype == np.float64
    assert np.array_equal(batch.matrix, [[1.0, np.nan], [2.5, np.nan], [3.0, 0.5]], equal_nan=True)
    assert (quality.missing, quality.out_of_range) == ({"b": 2}, {})


@pytest.mark.parametrize("row", [{"a": 0.0, "b": -1.0}, {"a": 10.0, "b": 1.0}])
def test_a_value_on_the_reference_bounds_is_in_range(row: dict[str, float]) -> None:
    validator = InstanceValidator(BOUNDED)
    assert validator.validate([row])[1].out_of_range == {}
    assert validator.validate([row, row])[1].out_of_range == {}


def test_values_outside_the_reference_range_are_counted_per_feature() -> None:
    validator = InstanceValidator(BOUNDED)
    assert validator.validate([{"a": 10.5, "b": 0.0}])[1].out_of_range == {"a": 1}
    assert validator.validate([{"a": -0.5, "b": 1.5}])[1].out_of_range == {"a": 1, "b": 1}
    rows = [{"a": 10.5, "b": 0.0}, {"a": -1.0, "b": 2.0}, {"a": 5.0, "b": 0.0}]
    assert validator.validate(rows)[1].out_of_range == {"a": 2, "b": 1}
    assert validator.validate(rows[2:0:-1])[1].out_of_range == {"a": 1, "b": 1}   # two rows: the second is out


def test_a_feature_without_reference_bounds_is_never_out_of_range() -> None:
    validator = InstanceValidator(card([FeatureSpec(name="free"), FeatureSpec(name="low", min=0.0)]))
    assert validator.validate([{"free": -1e300, "low": 1e300}])[1].out_of_range == {}
    assert validator.validate([{"free": 1e300, "low": -1.0}, {"free": -1e300, "low": 5.0}])[1].out_of_range == {"low": 1}
