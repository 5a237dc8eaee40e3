"""Fallback rules: what the heuristic answers for each kind, and how registration derives it from the reference data."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from service.core.card import PREDICTION_COLUMN, BucketMedianFallback, FeatureSpec, MedianFallback, PriorFallback
from service.core.errors import RegistryError
from service.core.predictor import Batch
from service.registry.register import derive_fallback
from service.runtime.heuristic import HeuristicPredictor
from tests.cards import card

# ---------------------------------------------------------------------- the heuristic runtime


def matrix(*rows: list[float]) -> Batch:
    return Batch(size=len(rows), matrix=np.array(rows, dtype=np.float64))


def test_a_card_without_a_fallback_has_no_heuristic() -> None:
    with pytest.raises(RegistryError) as info:
        HeuristicPredictor(card())
    assert info.value.message == "m:1 has no fallback in its card (re-register it)"


def test_the_heuristic_loads_in_no_time() -> None:
    assert HeuristicPredictor(card(fallback={"kind": "median", "value": 1.0})).load_seconds == 0.0


def test_the_prior_answers_the_majority_class_with_the_reference_shares() -> None:
    c = card(task="classification", labels=[0, 1, 2],
             fallback={"kind": "prior", "probabilities": {"2": 0.3, "0": 0.2, "1": 0.5}})
    answer = HeuristicPredictor(c).predict(matrix([0.0, 0.0], [1.0, 1.0]))
    assert answer.labels == [1, 1]
    assert answer.probabilities is not None and answer.probabilities.dtype == np.float64
    assert answer.probabilities.tolist() == [[0.2, 0.5, 0.3], [0.2, 0.5, 0.3]]
    assert answer.values is None


def test_a_tie_in_the_prior_goes_to_the_first_label() -> None:
    c = card(task="classification", labels=["b", "a"], fallback={"kind": "prior", "probabilities": {"a": 0.5, "b": 0.5}})
    assert HeuristicPredictor(c).predict(matrix([0.0, 0.0])).labels == ["b"]


def test_the_median_answers_every_row_with_the_reference_median() -> None:
    answer = HeuristicPredictor(card(fallback={"kind": "median", "value": 4.5})).predict(matrix([0, 0], [1, 1], [2, 2]))
    assert answer.values is not None and answer.values.dtype == np.float64
    assert answer.values.tolist() == [4.5, 4.5, 4.5]
    assert answer.labels is None and answer.probabilities is None


BUCKETS = {"kind": "bucket_median", "feature": "x1", "edges": [1.0, 2.0], "values": [10.0, 20.0, 30.0]}


def test_bucket_medians_answer_by_the_bucket_of_the_feature_whose_upper_edge_is_inclusive() -> None:
    predictor = HeuristicPredictor(card(fallback=BUCKETS))
    batch = matrix(*[[99.0, x] for x in (0.5, 1.0, 1.5, 2.0, 3.0)])
    answer = predictor.predict(batch)
    assert answer.values is not None and answer.values.tolist() == [10.0, 10.0, 20.0, 20.0, 30.0]


def test_a_feature_past_the_last_declared_median_answers_the_last_one() -> None:
    short = BUCKETS | {"values": [10.0, 20.0]}   # a hand-edited card: one median fewer than buckets
    answer = HeuristicPredictor(card(fallback=short)).predict(matrix([0.0, 5.0], [0.0, 1.5]))
    assert answer.values is not None and answer.values.tolist() == [20.0, 20.0]


@pytest.mark.parametrize(("default", "expected"), [(None, 0.0), (7.0, 7.0)])
def test_a_null_bucket_feature_gets_the_declared_default_else_zero(default: float | None, expected: float) -> None:
    predictor = HeuristicPredictor(card([FeatureSpec(name="x0"), FeatureSpec(name="x1", nullable=True)],
                                        fallback=BUCKETS | {"default": default}))
    answer = predictor.predict(matrix([0.0, np.nan], [0.0, 3.0]))
    assert answer.values is not None and answer.values.tolist() == [expected, 30.0]


def test_bucket_medians_read_per_feature_columns_with_nulls() -> None:
    c = card([FeatureSpec(name="x0"), FeatureSpec(name="x1", nullable=True)], per_feature=True,
             fallback=BUCKETS | {"default": 5.0})
    batch = Batch(size=3, columns={"x0": [0.0, 0.0, 0.0], "x1": [None, 1.5, 4]}, has_nulls=True)
    answer = HeuristicPredictor(c).predict(batch)
    assert answer.values is not None and answer.values.tolist() == [5.0, 20.0, 30.0]


def rules(*rules_: tuple[str, str, Any, Any], default: Any) -> dict[str, Any]:
    return {"kind": "rules", "default": default,
            "rules": [{"feature": f, "op": op, "threshold": t, "then": then} for f, op, t, then in rules_]}


@pytest.mark.parametrize(("op", "below", "at", "above"), [
    ("<", True, False, False), ("<=", True, True, False), (">", False, False, True),
    (">=", False, True, True), ("==", False, True, False), ("!=", True, False, True),
])
def test_each_rule_operator_compares_the_feature_with_the_threshold(op: str, below: bool, at: bool, above: bool) -> None:
    predictor = HeuristicPredictor(card(fallback=rules(("x0", op, 5, 1.0), default=0.0)))
    answer = predictor.predict(matrix([4.0, 0.0], [5.0, 0.0], [6.0, 0.0]))
    assert answer.values is not None and answer.values.tolist() == [float(below), float(at), float(above)]
    assert answer.values.dtype == np.float64


def test_regression_rules_answer_floats_even_for_whole_numbers() -> None:
    predictor = HeuristicPredictor(card(fallback=rules(("x0", ">", 0, 2), default=1)))
    answer = predictor.predict(matrix([1.0, 0.0], [0.0, 0.0]))
    assert answer.values is not None and answer.values.dtype == np.float64 and answer.values.tolist() == [2.0, 1.0]


def test_the_first_rule_that_holds_answers_else_the_default() -> None:
    predictor = HeuristicPredictor(card(fallback=rules(("x0", ">", 10, 1.0), ("x1", ">", 0, 2.0), ("x0", ">", 0, 3.0),
                                                       default=-1.0)))
    answer = predictor.predict(matrix([11.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]))
    assert answer.values is not None and answer.values.tolist() == [1.0, 2.0, 3.0, -1.0]


def test_a_null_satisfies_no_rule_and_the_next_rule_is_tried() -> None:
    c = card([FeatureSpec(name="x0", nullable=True), FeatureSpec(name="x1")],
             fallback=rules(("x0", "!=", 1, 1.0), ("x1", ">", 0, 2.0), default=0.0))
    answer = HeuristicPredictor(c).predict(matrix([np.nan, 1.0], [np.nan, 0.0], [3.0, 1.0]))
    assert answer.values is not None and answer.values.tolist() == [2.0, 0.0, 1.0]


def test_a_rule_comparing_a_string_with_a_number_does_not_apply_and_the_next_is_tried() -> None:
    c = card([FeatureSpec(name="city", type="string"), FeatureSpec(name="x")], per_feature=True,
             fallback=rules(("city", "<", 5, 1.0), ("city", "==", "paris", 2.0), ("x", ">", 0, 3.0), default=0.0))
    batch = Batch(size=3, columns={"city": ["paris", "rome", "rome"], "x": [0.0, 1.0, 0.0]})
    answer = HeuristicPredictor(c).predict(batch)
    assert answer.values is not None and answer.values.tolist() == [2.0, 3.0, 0.0]


def test_classification_rules_answer_the_cards_label_with_certainty() -> None:
    c = card(task="classification", labels=[0, 1, 2], fallback=rules(("x0", ">", 5, 2), ("x0", ">", 1, "1"), default=0))
    answer = HeuristicPredictor(c).predict(matrix([6.0, 0.0], [2.0, 0.0], [0.0, 0.0]))
    assert answer.labels == [2, 1, 0] and all(type(label) is int for label in answer.labels)
    assert answer.probabilities is not None
    assert answer.probabilities.tolist() == [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    assert answer.values is None


# ---------------------------------------------------------------------- deriving the fallback at registration


def reference(**columns: list[Any]) -> pd.DataFrame:
    return pd.DataFrame(columns)


def test_a_classifier_falls_back_to_the_class_shares_of_its_target() -> None:
    frame = reference(x=[0] * 5, target=[1, 1, 1, 0, None], prediction=[0, 0, 0, 0, 0])
    prior = derive_fallback("classification", [0, 1, 2], frame, "target")
    assert prior == PriorFallback(probabilities={"0": 0.25, "1": 0.75, "2": 0.0})


def test_integer_labels_are_counted_even_when_nulls_made_the_target_a_float_column() -> None:
    frame = reference(x=[0] * 5, target=[1.0, 1.0, 1.0, 0.0, np.nan])
    assert derive_fallback("classification", [0, 1], frame, "target").probabilities == {"0": 0.25, "1": 0.75}
    fractional = reference(x=[0] * 4, target=[0.5, 1.0, 1.0, 1.0])   # not integer labels: counted as written
    assert derive_fallback("classification", ["0.5", "1.0"], fractional, "target").probabilities == {
        "0.5": 0.25, "1.0": 0.75}


def test_string_and_numeric_labels_are_counted_by_their_text() -> None:
    frame = reference(x=[0] * 4, target=["a", "b", "b", "b"])
    assert derive_fallback("classification", ["a", "b"], frame, "target").probabilities == {"a": 0.25, "b": 0.75}


@pytest.mark.parametrize("target", [None, "absent"])
def test_without_a_target_column_the_models_own_predictions_stand_in(target: str | None) -> None:
    frame = reference(x=[0] * 4, prediction=[1, 0, 0, 0])
    assert derive_fallback("classification", [0, 1], frame, target).probabilities == {"0": 0.75, "1": 0.25}
    regression = reference(x=[0] * 4, prediction=[1.0, 2.0, 4.0, None])
    assert derive_fallback("regression", None, regression, target) == MedianFallback(value=2.0)


def test_a_regressor_falls_back_to_the_median_of_its_target() -> None:
    frame = reference(x=[0] * 5, target=[1.0, 2.0, 3.0, 100.0, None], prediction=[0.0] * 5)
    assert derive_fallback("regression", None, frame, "target") == MedianFallback(value=2.5)


@pytest.mark.parametrize("kind", ["prior", "median"])
def test_a_declared_prior_or_median_is_derived_like_the_default(kind: str) -> None:
    frame = reference(x=[0] * 3, target=[1.0, 2.0, 9.0])
    task, labels = ("classification", [1.0, 2.0, 9.0]) if kind == "prior" else ("regression", None)
    assert derive_fallback(task, labels, frame, "target", {"kind": kind}) == derive_fallback(task, labels, frame, "target")


def test_declared_rules_are_taken_as_declared() -> None:
    declared = rules(("x", ">", 1, 5.0), default=0.0)
    spec = derive_fallback("regression", None, reference(x=[0.0, 2.0], target=[1.0, 2.0]), "target", declared)
    assert spec.model_dump() == declared


def test_an_unknown_fallback_kind_is_refused() -> None:
    with pytest.raises(RegistryError) as info:
        derive_fallback("regression", None, reference(target=[1.0]), "target", {"kind": "magic"})
    assert info.value.message == "fallback kind must be one of rules, bucket_median, prior, median; got 'magic'"


def test_an_invalid_declared_fallback_names_every_bad_field() -> None:
    declared = {"kind": "rules", "rules": [{"feature": "x", "op": "~", "threshold": 1, "then": 1}]}
    with pytest.raises(RegistryError) as info:
        derive_fallback("regression", None, reference(target=[1.0]), "target", declared)
    assert info.value.message == ("invalid declared fallback: fallback.rules.0.op: Input should be '<', '<=', '>', "
                                  "'>=', '==' or '!='; fallback.default: Field required")


def test_an_invalid_declared_bucket_median_is_refused() -> None:
    with pytest.raises(RegistryError, match=r"^invalid declared fallback: fallback.feature: Field required$"):
        derive_fallback("regression", None, reference(target=[1.0]), "target", {"kind": "bucket_median"})


def test_bucket_medians_are_for_regression_only() -> None:
    with pytest.raises(RegistryError) as info:
        derive_fallback("classification", [0, 1], reference(x=[1.0], target=[1]), "target",
                        {"kind": "bucket_median", "feature": "x"})
    assert info.value.message == "fallback kind 'bucket_median' is for regression models"


def test_the_bucket_feature_must_be_a_reference_column() -> None:
    with pytest.raises(RegistryError) as info:
        derive_fallback("regression", None, reference(x=[1.0], target=[1.0]), "target",
                        {"kind": "bucket_median", "feature": "y"})
    assert info.value.message == "fallback.feature 'y' is not a column of the reference data"


TEN = reference(x=[float(v) for v in range(1, 11)], target=[10.0 * v for v in range(1, 11)])


def test_bucket_medians_take_the_target_median_of_each_declared_bucket() -> None:
    spec = derive_fallback("regression", None, TEN, "target", {"kind": "bucket_median", "feature": "x",
                                                                "edges": [3, 7]})
    assert spec == BucketMedianFallback(feature="x", edges=[3.0, 7.0], values=[20.0, 55.0, 90.0], default=55.0)
    assert all(type(edge) is float for edge in spec.edges)


def test_an_empty_bucket_answers_the_overall_median() -> None:
    spec = derive_fallback("regression", None, TEN, "target", {"kind": "bucket_median", "feature": "x",
                                                                "edges": [3.0, 7.0, 7.5]})
    assert spec.values == [20.0, 55.0, 55.0, 90.0]


def test_bucket_edges_default_to_the_reference_quintiles_without_repeats() -> None:
    spec = derive_fallback("regression", None, TEN, "target", {"kind": "bucket_median", "feature": "x"})
    assert spec.edges == pytest.approx([2.8, 4.6, 6.4, 8.2])
    assert spec.values == [15.0, 35.0, 55.0, 75.0, 95.0]
    constant = reference(x=[1.0] * 4 + [2.0], target=[1.0, 2.0, 3.0, 4.0, 5.0])
    spec = derive_fallback("regression", None, constant, "target", {"kind": "bucket_median", "feature": "x"})
    assert spec.edges == pytest.approx([1.0, 1.2])   # the quintiles 1, 1, 1, 1.2: one edge per distinct value
    assert spec.values == [2.5, 3.0, 5.0]


def test_rows_without_a_target_are_left_out_and_a_null_feature_counts_only_for_the_overall_median() -> None:
    frame = pd.concat([TEN, reference(x=[None, 5.0], target=[1000.0, None])], ignore_index=True)
    spec = derive_fallback("regression", None, frame, "target", {"kind": "bucket_median", "feature": "x",
                                                                  "edges": [3.0, 7.0]})
    assert spec.values == [20.0, 55.0, 90.0]
    assert spec.default == 60.0   # the median of 10, 20, ..., 100 and 1000


@pytest.mark.parametrize("default", [0.0, 12.5])
def test_a_declared_default_for_a_null_feature_is_kept(default: float) -> None:
    spec = derive_fallback("regression", None, TEN, "target", {"kind": "bucket_median", "feature": "x",
                                                                "default": default})
    assert spec.default == default


def test_bucket_medians_summarise_the_models_predictions_without_a_target() -> None:
    frame = reference(x=[1.0, 2.0, 3.0, 4.0], **{PREDICTION_COLUMN: [1.0, 3.0, 5.0, 7.0]})
    spec = derive_fallback("regression", None, frame, None, {"kind": "bucket_median", "feature": "x", "edges": [2.0]})
    assert (spec.values, spec.default) == ([2.0, 6.0], 4.0)
