"""Request parsing and validation against model cards, without a server."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np
import pytest

from service.core.card import FeatureSpec, ModelCard, OnnxSignature, Training
from service.core.errors import BadRequest, InvalidInput, PayloadTooLarge
from service.inputs import InstanceValidator, parse_envelope, parse_json


def make_card(features: list[FeatureSpec], mode: str = "tensor") -> ModelCard:
    inputs = {"input": "float"} if mode == "tensor" else {
        f.name: {"string": "string", "int": "int64"}.get(f.type, "float") for f in features}
    return ModelCard(
        name="m", version="1", task="regression", features=features,
        signature=OnnxSignature(input_mode=mode, inputs=inputs, value_output="variable"),  # type: ignore[arg-type]
        prediction_range={"min": 0, "max": 1},  # type: ignore[arg-type]
        training=Training(dataset_fingerprint="x", rows=1, created_at=datetime.now(timezone.utc)),
        sha256="0" * 64,
    )


NUMERIC = make_card([
    FeatureSpec(name="a", min=0, max=10),
    FeatureSpec(name="b", min=-1, max=1, nullable=True),
    FeatureSpec(name="n", type="int", min=0, max=5),
])
MIXED = make_card([
    FeatureSpec(name="city", type="string", nullable=True),
    FeatureSpec(name="x", min=0, max=1),
], mode="per_feature")


def problems(card: ModelCard, instances: list[Any]) -> list[dict[str, Any]]:
    with pytest.raises(InvalidInput) as info:
        InstanceValidator(card, max_string_length=16).validate(instances)
    assert info.value.status_code == 422
    return info.value.details


def test_valid_rows_become_a_float_matrix_in_card_order() -> None:
    batch, quality = InstanceValidator(NUMERIC).validate([{"n": 2, "b": 0.5, "a": 3}, {"a": 1.5, "b": -0.5, "n": 0}])
    assert batch.size == 2 and not batch.has_nulls
    assert batch.matrix is not None and batch.matrix.tolist() == [[3.0, 0.5, 2.0], [1.5, -0.5, 0.0]]
    assert quality.missing == {} and quality.out_of_range == {}


def test_nullable_feature_may_be_null_or_absent_and_is_counted() -> None:
    batch, quality = InstanceValidator(NUMERIC).validate([{"a": 1, "b": None, "n": 1}, {"a": 2, "n": 1}, {"a": 3, "b": 0, "n": 1}])
    assert batch.has_nulls
    assert batch.matrix is not None and np.isnan(batch.matrix[:2, 1]).all() and batch.matrix[2, 1] == 0
    assert quality.missing == {"b": 2}


def test_values_outside_the_reference_range_are_accepted_and_counted() -> None:
    _, quality = InstanceValidator(NUMERIC).validate([{"a": 11, "b": 2, "n": 1}, {"a": -1, "b": 0, "n": 9}])
    assert quality.out_of_range == {"a": 2, "b": 1, "n": 1}


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        ({"b": 0, "n": 1}, "a", "missing feature"),
        ({"a": 1, "b": 0, "n": 1, "z": 1}, "z", "unknown feature"),
        ({"a": "1", "b": 0, "n": 1}, "a", "expected a number, got '1'"),
        ({"a": None, "b": 0, "n": 1}, "a", "expected a number, got null"),
        ({"a": False, "b": 0, "n": 1}, "a", "expected a number, got False"),
        ({"a": float("nan"), "b": 0, "n": 1}, "a", "expected a finite number, got nan"),
        ({"a": float("inf"), "b": 0, "n": 1}, "a", "expected a finite number, got inf"),
        ({"a": 1, "b": 0, "n": 1.5}, "n", "expected an integer, got 1.5"),
        ({"a": 1, "b": 0, "n": 2**70}, "n", None),
    ],
)
def test_each_bad_value_is_named(row: dict[str, Any], field: str, problem: str | None) -> None:
    details = problems(NUMERIC, [{"a": 1, "b": 0, "n": 1}, row])
    assert len(details) == 1
    assert details[0]["instance"] == 1 and details[0]["field"] == field
    if problem is not None:
        assert details[0]["problem"] == problem


def test_every_problem_of_every_instance_is_listed() -> None:
    details = problems(NUMERIC, [{"a": "x", "b": 0}, 5])
    assert {(d["instance"], d.get("field")) for d in details} == {(0, "a"), (0, "n"), (1, None)}
    assert any("expected an object" in d["problem"] for d in details)


def test_string_features_are_columns_with_a_length_limit() -> None:
    batch, quality = InstanceValidator(MIXED).validate([{"city": "Oslo", "x": 0.5}, {"x": 2.0}])
    assert batch.matrix is None and batch.columns == {"city": ["Oslo", None], "x": [0.5, 2.0]}
    assert quality.missing == {"city": 1} and quality.out_of_range == {"x": 1}
    assert problems(MIXED, [{"city": "x" * 17, "x": 0}])[0]["problem"] == "string longer than 16 characters"
    assert problems(MIXED, [{"city": 3, "x": 0}])[0]["problem"] == "expected a string, got 3"


def test_parse_json_keeps_non_finite_numbers_for_validation() -> None:
    payload = parse_json(b'{"model": "m", "instances": [{"a": NaN, "b": 1e400, "n": -Infinity}]}')
    row = payload["instances"][0]
    assert np.isnan(row["a"]) and row["b"] == float("inf") and row["n"] == float("-inf")
    with pytest.raises(BadRequest) as info:
        parse_json(b'{"model": ')
    assert info.value.code == "malformed_json" and info.value.status_code == 400


def test_deeply_nested_json_is_a_clean_400() -> None:
    body = b'{"model": "m", "instances": [' + b"[" * 5000 + b"]" * 5000 + b"]}"
    try:
        payload = parse_json(body)
    except BadRequest as exc:
        assert exc.code == "malformed_json"
        return
    with pytest.raises(BadRequest):
        parse_envelope(payload, 1000)


def test_envelope_rules() -> None:
    assert parse_envelope({"model": "m", "instances": [{}], "key": "k"}, 10).key == "k"
    with pytest.raises(PayloadTooLarge) as too_many:
        parse_envelope({"model": "m", "instances": [{}] * 11}, 10)
    assert too_many.value.status_code == 413 and too_many.value.code == "too_many_instances"
    for bad, field in [({"model": "m", "instances": []}, "instances"),
                       ({"instances": [{}]}, "model"),
                       ({"model": "m", "instances": [{}], "other": 1}, "other"),
                       ({"model": 3, "instances": [{}]}, "model")]:
        with pytest.raises(BadRequest) as info:
            parse_envelope(bad, 10)
        assert info.value.details[0]["field"] == field


SLOW_ONLY = [True, False, None, "1", [1], {"x": 1}, float("nan"), float("inf"), -float("inf"), 10**400, 2**63, 1.5]
"""Values the plain-number fast path must leave to the schema (1.5 only for the int feature)."""


@pytest.mark.parametrize("seed", range(40))
def test_fast_numeric_path_agrees_with_the_schema(seed: int) -> None:
    """Whatever the fast path accepts, the schema accepts with the same matrix; whatever it declines, the schema decides."""
    rng = np.random.default_rng(seed)
    validator = InstanceValidator(NUMERIC)
    rows: list[Any] = []
    for _ in range(int(rng.integers(1, 6))):
        row: dict[str, Any] = {"a": float(rng.normal()), "b": int(rng.integers(-1, 2)), "n": int(rng.integers(0, 6))}
        if rng.random() < 0.3:
            row[str(rng.choice(["a", "b", "n"]))] = SLOW_ONLY[int(rng.integers(len(SLOW_ONLY)))]
        if rng.random() < 0.1:
            row.pop(str(rng.choice(["a", "b", "n"])))
        if rng.random() < 0.1:
            row["extra"] = 1
        rows.append(row if rng.random() > 0.05 else [row])
    fast = validator.numeric_matrix(rows)
    try:
        validator.adapter.validate_python(rows)
        schema_accepts = True
    except Exception:  # noqa: BLE001 - any refusal
        schema_accepts = False
    if fast is not None:
        assert schema_accepts
        batch, _ = validator.validate(rows)
        expected = [[float(r["a"]), float(r["b"]), float(r["n"])] for r in rows]
        assert batch.matrix is not None and batch.matrix.tolist() == expected
    elif schema_accepts:
        validator.validate(rows)  # declined by the fast path, still accepted by the schema path
    else:
        with pytest.raises(InvalidInput):
            validator.validate(rows)


def test_fast_path_takes_plain_rows_and_leaves_the_rest() -> None:
    validator = InstanceValidator(NUMERIC)
    assert validator.numeric_matrix([{"a": 1, "b": 0.5, "n": 3}]) is not None
    for row in ({"a": 1, "b": None, "n": 3}, {"a": 1, "n": 3}, {"a": 1, "b": 0.5, "n": 3.0},
                {"a": True, "b": 0.5, "n": 3}, {"a": float("nan"), "b": 0.5, "n": 3}, {"a": 10**400, "b": 0, "n": 3}):
        assert validator.numeric_matrix([row]) is None, row


@pytest.mark.parametrize("payload", [
    {"model": "m", "instances": [{"a": 1}]},
    {"model": "m", "instances": [{"a": 1}], "key": None},
    {"model": "m", "instances": [{"a": 1}], "key": "user-1"},
    {"model": "m", "instances": [{"a": 1}, 3]},
    {"model": "m" * 65, "instances": [{"a": 1}]},
    {"model": "m", "instances": [{"a": 1}], "key": "k" * 257},
    {"model": "m", "instances": [{"a": 1}], "key": 5},
    {"model": "", "instances": [{"a": 1}]},
])
def test_envelope_fast_path_agrees_with_the_schema(payload: dict[str, Any]) -> None:
    from service.inputs import PredictRequest

    try:
        expected: PredictRequest | None = PredictRequest.model_validate(payload)
    except Exception:  # noqa: BLE001
        expected = None
    if expected is None:
        with pytest.raises(BadRequest):
            parse_envelope(payload, 10)
    else:
        got = parse_envelope(payload, 10)
        assert (got.model, got.instances, got.key) == (expected.model, expected.instances, expected.key)
