"""Model card rules: which fallbacks a card may declare, and the range a regression output must fall in."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import ValidationError

from tests.cards import card

RULE = {"feature": "x0", "op": ">", "threshold": 1, "then": 1}


def refused(message: str, **fields: Any) -> None:
    with pytest.raises(ValidationError, match=re.escape(f"Value error, {message} [type=value_error")):
        card(**fields)


def test_a_prior_must_name_exactly_the_cards_labels() -> None:
    card(task="classification", labels=[0, 1], fallback={"kind": "prior", "probabilities": {"0": 0.4, "1": 0.6}})
    for probabilities in ({"0": 1.0}, {"0": 0.4, "1": 0.5, "2": 0.1}):
        refused("fallback.probabilities must name exactly the labels ['0', '1']",
                task="classification", labels=[0, 1], fallback={"kind": "prior", "probabilities": probabilities})


def test_a_prior_is_for_classification_only() -> None:
    refused("fallback kind 'prior' is for classification models", fallback={"kind": "prior", "probabilities": {}})


@pytest.mark.parametrize("fallback", [{"kind": "median", "value": 1.0}, {"kind": "bucket_median", "feature": "x0"}])
def test_medians_are_for_regression_only(fallback: dict[str, Any]) -> None:
    card(fallback=fallback)
    refused(f"fallback kind '{fallback['kind']}' is for regression models",
            task="classification", labels=[0, 1], fallback=fallback)


def test_bucket_medians_must_bucket_a_feature_of_the_model() -> None:
    refused("fallback.feature 'age' is not a feature of the model", fallback={"kind": "bucket_median", "feature": "age"})


def test_every_rule_must_test_a_feature_of_the_model() -> None:
    rules = {"kind": "rules", "rules": [RULE, RULE | {"feature": "age"}], "default": 0}
    refused("fallback.rules[1].feature 'age' is not a feature of the model", fallback=rules)


def test_classification_rules_must_answer_a_label() -> None:
    labels = {"task": "classification", "labels": ["a", "b"]}
    card(**labels, fallback={"kind": "rules", "rules": [RULE | {"then": "b"}], "default": "a"})
    refused("fallback.rules[1].then 'c' is not one of the labels ['a', 'b']", **labels,
            fallback={"kind": "rules", "rules": [RULE | {"then": "a"}, RULE | {"then": "c"}], "default": "a"})
    refused("fallback.default 'z' is not one of the labels ['a', 'b']", **labels,
            fallback={"kind": "rules", "rules": [RULE | {"then": "a"}], "default": "z"})


def test_regression_rules_may_answer_any_number() -> None:
    fallback = card(fallback={"kind": "rules", "rules": [RULE | {"then": 12.5}], "default": -3}).fallback
    assert fallback is not None and fallback.kind == "rules"


def test_a_card_without_a_fallback_is_valid() -> None:
    assert card().fallback is None


def test_a_declared_output_range_is_the_allowed_range_whatever_the_margin() -> None:
    assert card(prediction_range=(2.0, 6.0), output_range=(0.0, 100.0)).allowed_range(0.25) == (0.0, 100.0)


def test_the_reference_range_is_widened_by_the_margin_of_its_span() -> None:
    assert card(prediction_range=(2.0, 6.0)).allowed_range(0.25) == (1.0, 7.0)
    assert card(prediction_range=(-6.0, -2.0)).allowed_range(0.5) == (-8.0, 0.0)
    assert card(prediction_range=(0.25, 0.75)).allowed_range(0.5) == (0.0, 1.0)   # a span under 1 is still the span


@pytest.mark.parametrize(("value", "margin", "allowed"), [
    (5.0, 0.1, (4.5, 5.5)),       # a constant model: the span is taken as the value itself
    (-3.0, 0.1, (-3.3, -2.7)),    # ... by its size
    (0.5, 0.1, (0.4, 0.6)),       # ... but at least 1
])
def test_a_constant_reference_prediction_is_widened_by_its_size(value: float, margin: float,
                                                                allowed: tuple[float, float]) -> None:
    assert card(prediction_range=(value, value)).allowed_range(margin) == pytest.approx(allowed)


def test_a_classifier_has_no_allowed_range() -> None:
    assert card(task="classification", labels=[0, 1]).allowed_range(0.25) is None
