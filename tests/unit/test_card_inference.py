"""Card inference rules: what registration reads off the ONNX graph and the reference data, and what it refuses.

The models are the tiny linear graphs of :mod:`tests.card_graphs`, so every inferred
figure (labels, scores, deciles, ranges) can be worked out by hand.
"""

from __future__ import annotations

import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pandas as pd
import pytest

from service.core.card import PREDICTION_COLUMN, SCORE_COLUMN, FeatureSpec, ModelCard, Range
from service.core.errors import RegistryError
from service.registry.register import register_model
from service.registry.store import REFERENCE_FILE
from tests import card_graphs as graphs

REGRESSION = pd.DataFrame({"a": [0.0, 1.0, 2.0, 3.0, 4.0], "b": [1.0, 0.0, 1.0, 0.0, 1.0]})
REGRESSION["target"] = REGRESSION["a"] + 2 * REGRESSION["b"]
"""``a + 2b`` is the target, and what ``linear_regressor([1, 2])`` predicts: 2, 1, 4, 3, 6."""

CLASSES = pd.DataFrame({"a": [0.0, 2.0, 0.5, 3.0, 0.0, 1.0], "b": [1.0, 0.0, 2.0, 0.5, 3.0, 0.0],
                        "target": [1, 0, 1, 0, 1, 0]})
"""Class 1 where ``b > a``; ``tensor_classifier(SWAP)`` gives P(1) = 1 / (1 + exp(2 (a - b)))."""
SWAP = [[1.0, -1.0], [-1.0, 1.0]]


def p_one(frame: pd.DataFrame) -> np.ndarray:
    return 1 / (1 + np.exp(2 * (frame["a"] - frame["b"]).to_numpy()))


def register(tmp_path: Path, model: Path, frame: pd.DataFrame, *, name: str = "m", target: str | None = "target",
             suffix: str = ".parquet", **kwargs: Any) -> ModelCard:
    reference = tmp_path / f"reference{suffix}"
    if suffix == ".parquet":
        frame.to_parquet(reference, index=False)
    else:
        frame.to_csv(reference, index=False)
    return register_model(name, model, reference, target=target, registry=tmp_path / "registry", **kwargs)


def refusal(tmp_path: Path, model: Path, frame: pd.DataFrame, **kwargs: Any) -> str:
    with pytest.raises(RegistryError) as info:
        register(tmp_path, model, frame, **kwargs)
    assert not (tmp_path / "registry" / kwargs.get("name", "m")).exists() or not any(
        (tmp_path / "registry" / kwargs.get("name", "m")).iterdir())
    return info.value.message


def stored(tmp_path: Path, card: ModelCard) -> pd.DataFrame:
    return pd.read_parquet(tmp_path / "registry" / card.name / card.version / REFERENCE_FILE)


@pytest.fixture
def regressor(tmp_path: Path) -> Path:
    return graphs.linear_regressor(tmp_path / "regressor", [1.0, 2.0])


@pytest.fixture
def classifier(tmp_path: Path) -> Path:
    return graphs.tensor_classifier(tmp_path / "classifier", SWAP)


# ---------------------------------------------------------------------- the signature


def test_a_single_2d_input_takes_the_feature_columns_in_file_order(tmp_path: Path) -> None:
    frame = pd.DataFrame({"c": [1, 2, 3], "a": [0.5, 0.25, 0.0], "target": [1.0, 2.0, 3.0], "b": [4.0, 5.0, 6.0]})
    card = register(tmp_path, graphs.linear_regressor(tmp_path / "m", [1.0, 0.0, 0.0]), frame)
    assert card.feature_names == ["c", "a", "b"]
    assert card.signature.input_mode == "tensor" and card.signature.inputs == {"input": "float"}
    assert [f.type for f in card.features] == ["float", "float", "float"]   # the tensor is float: so is an int column
    assert [(f.min, f.max) for f in card.features] == [(1.0, 3.0), (0.0, 0.5), (4.0, 6.0)]
    assert stored(tmp_path, card)[PREDICTION_COLUMN].tolist() == [1.0, 2.0, 3.0]
    assert stored(tmp_path, card)[PREDICTION_COLUMN].dtype == np.float64   # widened from the float32 output
    assert card.target == "target"


def test_a_double_input_is_fed_doubles(tmp_path: Path) -> None:
    frame = REGRESSION.assign(a=REGRESSION["a"] + 1e-9)   # lost in float32, kept in float64
    card = register(tmp_path, graphs.linear_regressor(tmp_path / "m", [1.0, 2.0], "double"), frame)
    assert card.signature.inputs == {"input": "double"}
    assert stored(tmp_path, card)[PREDICTION_COLUMN].tolist() == (frame["a"] + 2 * frame["b"]).tolist()


def test_a_symbolic_width_takes_any_number_of_columns(tmp_path: Path) -> None:
    card = register(tmp_path, graphs.linear_regressor(tmp_path / "m", [1.0, 2.0], width="N"), REGRESSION)
    assert card.feature_names == ["a", "b"]


def test_a_width_that_does_not_match_the_feature_columns_is_refused(tmp_path: Path) -> None:
    model = graphs.linear_regressor(tmp_path / "m", [1.0, 2.0, 3.0])
    assert refusal(tmp_path, model, REGRESSION) == (
        "model input 'input' takes 3 features but the reference data has 2 feature columns (a, b) "
        "besides the target 'target'")
    assert refusal(tmp_path, model, REGRESSION.drop(columns=["target"]), target=None).endswith(
        "has 2 feature columns (a, b) (is --target missing?)")
    five = pd.DataFrame({name: [1.0] for name in "abcde"})
    assert "has 5 feature columns (a, b, c, d, e) (is --target missing?)" in refusal(tmp_path, model, five, target=None)
    six = pd.DataFrame({name: [1.0] for name in "abcdef"})
    assert "has 6 feature columns (a, b, c, d, e…) (is --target missing?)" in refusal(tmp_path, model, six, target=None)


def test_a_single_2d_input_must_be_float_or_double(tmp_path: Path) -> None:
    model = graphs.save(tmp_path / "m", [graphs.helper.make_node("Cast", ["input"], ["value"], to=1)],
                        [graphs.tensor_input(2, "int64")],
                        [graphs.helper.make_tensor_value_info("value", 1, [None, 2])])
    assert refusal(tmp_path, model, REGRESSION) == (
        "model input 'input' is tensor(int64); a single 2-D input must be float or double")


def test_an_input_of_an_unsupported_type_is_refused(tmp_path: Path) -> None:
    model = graphs.per_feature_sum(tmp_path / "m", {"a": "float", "flag": "bool"})
    assert refusal(tmp_path, model, REGRESSION.assign(flag=True)) == "model input 'flag' has unsupported type tensor(bool)"


PER_FEATURE = pd.DataFrame({"d": [1.0, 2.0, 3.0], "city": ["rome", None, "paris"], "i": [1, 2, 3],
                            "f": [0.5, 1.5, 2.5], "j": [30, 20, 10], "target": [0.0, 1.0, 2.0]})
PER_FEATURE_INPUTS = {"city": "string", "i": "int64", "j": "int32", "d": "double", "f": "float"}
CITY_CODES = {"paris": 100.0, "rome": 200.0, "": 1000.0}
"""What ``per_feature_sum`` adds for a city: a null city is fed as "", as the runtime feeds it when serving."""


def per_feature_model(tmp_path: Path) -> Path:
    return graphs.per_feature_sum(tmp_path / "m", PER_FEATURE_INPUTS, codes=CITY_CODES)


def test_one_input_per_feature_takes_the_graphs_input_order_and_element_types(tmp_path: Path) -> None:
    card = register(tmp_path, per_feature_model(tmp_path), PER_FEATURE)
    assert card.signature.input_mode == "per_feature" and card.signature.inputs == PER_FEATURE_INPUTS
    assert card.features == [
        FeatureSpec(name="city", type="string", nullable=True, categories=["paris", "rome"]),
        FeatureSpec(name="i", type="int", min=1.0, max=3.0),
        FeatureSpec(name="j", type="int", min=10.0, max=30.0),
        FeatureSpec(name="d", type="float", min=1.0, max=3.0),
        FeatureSpec(name="f", type="float", min=0.5, max=2.5),
    ]
    # Every input was fed its own element type, the null city as "": the sums come out exact.
    assert stored(tmp_path, card)[PREDICTION_COLUMN].tolist() == [232.5, 1025.5, 118.5]
    assert card.handles_missing is True   # the row without a city was answered


def test_one_input_named_like_a_column_is_a_per_feature_model(tmp_path: Path) -> None:
    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0], "target": [1.0, 2.0, 3.0]})
    card = register(tmp_path, graphs.per_feature_sum(tmp_path / "m", {"a": "float"}), frame)
    assert card.signature.input_mode == "per_feature" and card.feature_names == ["a"]


def test_graph_inputs_missing_from_the_reference_data_are_named(tmp_path: Path) -> None:
    model = per_feature_model(tmp_path)
    assert refusal(tmp_path, model, PER_FEATURE.drop(columns=["d", "f"])) == (
        "the model takes one input per feature, and the reference data is missing column(s): d, f")


def test_reference_columns_the_graph_does_not_take_are_named(tmp_path: Path) -> None:
    model = per_feature_model(tmp_path)
    assert refusal(tmp_path, model, PER_FEATURE.assign(extra=1.0, more=2.0)) == (
        "reference column(s) not used by the model: extra, more (is --target missing?)")


@pytest.mark.parametrize(("count", "categories"), [(100, True), (101, False)])
def test_string_categories_are_kept_up_to_a_hundred(count: int, categories: bool, tmp_path: Path) -> None:
    names = [f"c{i:03d}" for i in range(count)]
    frame = pd.DataFrame({"city": names[::-1], "x": np.arange(count, dtype=float), "target": 0.0})
    card = register(tmp_path, graphs.per_feature_sum(tmp_path / "m", {"city": "string", "x": "float"}), frame)
    assert card.features[0].categories == (names if categories else None)
    assert card.features[0].nullable is False


@pytest.mark.parametrize(("column", "dtype"), [(["x", "y", "z"], "object"), ([True, False, True], "bool")])
def test_a_numeric_input_needs_a_numeric_column(column: list[Any], dtype: str, tmp_path: Path) -> None:
    frame = pd.DataFrame({"a": column, "b": [1.0, 2.0, 3.0], "target": [0.0, 1.0, 2.0]})
    assert refusal(tmp_path, graphs.linear_regressor(tmp_path / "m", [1.0, 2.0]), frame) == (
        f"feature 'a' must be numeric for the model, reference data has {dtype}")


def test_a_null_int_is_fed_as_zero_as_the_runtime_feeds_it_when_serving(tmp_path: Path) -> None:
    frame = PER_FEATURE.assign(i=[1.0, None, 3.0])
    card = register(tmp_path, per_feature_model(tmp_path), frame)
    assert card.features[1] == FeatureSpec(name="i", type="int", min=1.0, max=3.0, nullable=True)
    assert stored(tmp_path, card)[PREDICTION_COLUMN].tolist() == [232.5, 1023.5, 118.5]
    assert card.handles_missing is True


# ---------------------------------------------------------------------- outputs and the task


def test_an_integer_label_and_a_float_tensor_make_a_classifier(tmp_path: Path, classifier: Path) -> None:
    card = register(tmp_path, classifier, CLASSES)
    assert card.task == "classification"
    assert (card.signature.label_output, card.signature.probability_output, card.signature.probability_format) == (
        "label", "probabilities", "tensor")
    assert card.signature.value_output is None and card.prediction_range is None


@pytest.mark.parametrize("label_output", [True, False])
def test_a_zipmap_makes_a_classifier_with_or_without_a_label_output(label_output: bool, tmp_path: Path) -> None:
    model = graphs.tensor_classifier(tmp_path / "m", SWAP, zipmap=True, label_output=label_output)
    card = register(tmp_path, model, CLASSES)
    assert card.task == "classification" and card.labels == [0, 1]
    assert (card.signature.label_output, card.signature.probability_output, card.signature.probability_format) == (
        "label" if label_output else None, "probability_maps", "zipmap")
    assert stored(tmp_path, card)[SCORE_COLUMN].to_numpy() == pytest.approx(p_one(CLASSES), rel=1e-5)


def test_float_outputs_alone_make_a_regressor_answering_from_the_first(tmp_path: Path) -> None:
    card = register(tmp_path, graphs.two_outputs(tmp_path / "m", "float", "double"),
                    pd.DataFrame({"x": [1.0, 2.0], "target": [1.0, 2.0]}))
    assert card.task == "regression" and card.signature.value_output == "a"
    assert card.signature.label_output is None and card.labels is None


def test_the_declared_task_wins_over_the_outputs(tmp_path: Path, classifier: Path) -> None:
    as_regressor = register(tmp_path, classifier, CLASSES, task="regression")
    assert as_regressor.task == "regression" and as_regressor.signature.value_output == "probabilities"
    scores = graphs.tensor_classifier(tmp_path / "scores", SWAP, label_output=False)
    as_classifier = register(tmp_path, scores, CLASSES, name="n", task="classification")
    assert as_classifier.task == "classification" and as_classifier.labels == [0, 1]
    assert as_classifier.signature.label_output is None


def test_a_classifier_needs_probabilities(tmp_path: Path) -> None:
    model = graphs.two_outputs(tmp_path / "m", "int64", "int64")
    frame = pd.DataFrame({"x": [1.0, 2.0], "target": [0, 1]})
    assert refusal(tmp_path, model, frame, task="classification") == (
        "a classifier must output class probabilities (a float tensor or a ZipMap)")


def test_a_regressor_needs_a_float_output_and_the_refusal_lists_the_outputs(tmp_path: Path) -> None:
    model = graphs.two_outputs(tmp_path / "m", "int64", "int32")
    assert refusal(tmp_path, model, pd.DataFrame({"x": [1.0, 2.0], "target": [0, 1]})) == (
        "a regressor must output a float tensor; the model outputs a (tensor(int64)), b (tensor(int32))")


# ---------------------------------------------------------------------- labels, scores and deciles


@pytest.mark.parametrize("labels", [[7, 3], ["yes", "no"]])
def test_labels_follow_the_probability_columns_as_the_label_output_names_them(labels: list[Any], tmp_path: Path) -> None:
    frame = CLASSES.assign(target=[labels[int(t)] for t in CLASSES["target"]])
    card = register(tmp_path, graphs.tensor_classifier(tmp_path / "m", SWAP, labels), frame)
    assert card.labels == labels and all(type(label) is type(labels[0]) for label in card.labels)
    reference = stored(tmp_path, card)
    assert reference[PREDICTION_COLUMN].tolist() == frame["target"].tolist()


def test_a_class_predicted_on_a_single_row_is_named(tmp_path: Path) -> None:
    frame = pd.DataFrame({"a": [0.0, 2.0, 3.0, 4.0], "b": [1.0, 0.0, 0.0, 0.0], "target": ["y", "n", "n", "n"]})
    card = register(tmp_path, graphs.tensor_classifier(tmp_path / "m", SWAP, ["n", "y"]), frame)
    assert card.labels == ["n", "y"]


def test_labels_come_from_the_zipmap_keys(tmp_path: Path) -> None:
    frame = CLASSES.assign(target=["no", "yes", "no", "yes", "no", "yes"])
    card = register(tmp_path, graphs.tensor_classifier(tmp_path / "m", SWAP, ["yes", "no"], zipmap=True), frame)
    assert card.labels == ["no", "yes"]   # onnxruntime hands the maps over in key order
    # The score is the probability of the second label by key ("yes"), the graph's first column.
    assert stored(tmp_path, card)[SCORE_COLUMN].to_numpy() == pytest.approx(1 - p_one(CLASSES), rel=1e-5)


NEVER_ONE = [[1.0, 0.0], [1.0, 0.0]]
"""Both logits equal: the argmax is always column 0, so column 1's label is never seen."""


def test_a_class_never_predicted_takes_the_labels_from_the_target_sorted(tmp_path: Path) -> None:
    frame = CLASSES.assign(target=[9, 4, 9, 4, 9, 4])
    card = register(tmp_path, graphs.tensor_classifier(tmp_path / "m", NEVER_ONE, [9, 4]), frame)
    assert card.labels == [4, 9]


def test_a_class_never_predicted_without_a_target_is_refused(tmp_path: Path) -> None:
    model = graphs.tensor_classifier(tmp_path / "m", NEVER_ONE)
    assert refusal(tmp_path, model, CLASSES.drop(columns=["target"]), target=None) == (
        "cannot tell the class labels: pass --target so they can be read from the reference data")


def test_without_a_label_output_the_labels_are_the_sorted_target_values(tmp_path: Path) -> None:
    model = graphs.tensor_classifier(tmp_path / "m", SWAP, label_output=False)
    card = register(tmp_path, model, CLASSES.assign(target=["b", "a", "b", "a", "b", "a"]), task="classification")
    assert card.labels == ["a", "b"]
    assert refusal(tmp_path, model, CLASSES.drop(columns=["target"]), name="n", target=None,
                   task="classification") == (
        "the model outputs no labels: pass --target so they can be read from the reference data")


def test_as_many_labels_as_probability_columns_are_needed(tmp_path: Path) -> None:
    model = graphs.tensor_classifier(tmp_path / "m", SWAP, label_output=False)
    assert refusal(tmp_path, model, CLASSES.assign(target=[0, 1, 2, 0, 1, 2]), task="classification") == (
        "the model gives 2 probabilities per row but 3 labels were found")


def test_a_binary_classifiers_score_is_the_second_class_probability(tmp_path: Path, classifier: Path) -> None:
    card = register(tmp_path, classifier, CLASSES)
    reference = stored(tmp_path, card)
    scores = p_one(CLASSES)
    assert reference[SCORE_COLUMN].to_numpy() == pytest.approx(scores, rel=1e-5)
    assert reference[SCORE_COLUMN].dtype == np.float64   # the float32 tensor is widened, as drift jobs read it
    assert reference[PREDICTION_COLUMN].tolist() == [1, 0, 1, 0, 1, 0]
    assert card.prediction_quantiles == pytest.approx(np.quantile(scores, np.linspace(0.1, 0.9, 9)), rel=1e-5)


def test_a_multiclass_score_is_the_top_probability(tmp_path: Path) -> None:
    three = [[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]
    card = register(tmp_path, graphs.tensor_classifier(tmp_path / "m", three), CLASSES.assign(target=[0, 1, 2] * 2),
                    task="classification")
    logits = CLASSES[["a", "b"]].to_numpy() @ np.array(three)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert stored(tmp_path, card)[SCORE_COLUMN].to_numpy() == pytest.approx(probs.max(axis=1), rel=1e-5)
    assert stored(tmp_path, card)[PREDICTION_COLUMN].tolist() == probs.argmax(axis=1).tolist()


def test_regression_deciles_and_range_come_from_the_predictions(tmp_path: Path) -> None:
    frame = pd.DataFrame({"a": np.arange(11, dtype=float), "b": 0.0, "target": 0.0})
    card = register(tmp_path, graphs.linear_regressor(tmp_path / "m", [1.0, 0.0]), frame)
    assert card.prediction_quantiles == pytest.approx([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert card.prediction_range == Range(min=0.0, max=10.0)


def test_repeated_deciles_are_kept_once(tmp_path: Path) -> None:
    frame = pd.DataFrame({"a": [1.0] * 9 + [2.0], "b": 0.0, "target": 0.0})
    card = register(tmp_path, graphs.linear_regressor(tmp_path / "m", [1.0, 0.0]), frame)
    assert card.prediction_quantiles == pytest.approx([1.0, 1.1])   # the 10th to 80th percentiles are all 1


# ---------------------------------------------------------------------- nulls and non-finite outputs


def test_rows_with_nulls_the_model_cannot_answer_go_unanswered(tmp_path: Path, regressor: Path) -> None:
    frame = REGRESSION.assign(b=[1.0, None, 1.0, 0.0, 1.0])
    card = register(tmp_path, regressor, frame)
    assert card.handles_missing is False
    assert card.features[1].nullable is True and (card.features[1].min, card.features[1].max) == (0.0, 1.0)
    assert np.isnan(stored(tmp_path, card)[PREDICTION_COLUMN][1])
    assert card.prediction_range == Range(min=2.0, max=6.0)
    assert card.prediction_quantiles == pytest.approx(np.quantile([2.0, 4.0, 3.0, 6.0], np.linspace(0.1, 0.9, 9)))


def test_a_model_answering_rows_with_nulls_handles_missing(tmp_path: Path) -> None:
    frame = REGRESSION.assign(b=[1.0, None, 1.0, 0.0, 1.0])
    card = register(tmp_path, graphs.linear_regressor(tmp_path / "m", [1.0, 2.0], ignore_nulls=True), frame)
    assert card.handles_missing is True
    assert stored(tmp_path, card)[PREDICTION_COLUMN][1] == 1.0
    assert card.prediction_range == Range(min=1.0, max=6.0)


def test_complete_reference_data_says_nothing_about_nulls(tmp_path: Path) -> None:
    card = register(tmp_path, graphs.linear_regressor(tmp_path / "m", [1.0, 2.0], ignore_nulls=True), REGRESSION)
    assert card.handles_missing is False


def test_class_rows_with_nulls_get_no_label_and_no_score(tmp_path: Path, classifier: Path) -> None:
    frame = CLASSES.assign(a=[0.0, None, 0.5, 3.0, 0.0, 1.0])
    card = register(tmp_path, classifier, frame)
    reference = stored(tmp_path, card)
    assert card.handles_missing is False
    assert reference[PREDICTION_COLUMN].isna().tolist() == [False, True, False, False, False, False]
    assert reference[PREDICTION_COLUMN].drop(index=1).tolist() == [1, 1, 0, 1, 0]
    assert np.isnan(reference[SCORE_COLUMN][1]) and not np.isnan(reference[SCORE_COLUMN].drop(index=1)).any()
    answered = p_one(frame.drop(index=1))
    assert card.prediction_quantiles == pytest.approx(np.quantile(answered, np.linspace(0.1, 0.9, 9)), rel=1e-5)


def test_a_classifier_answering_rows_with_nulls_handles_missing(tmp_path: Path) -> None:
    frame = CLASSES.assign(a=[0.0, None, 0.5, 3.0, 0.0, 1.0])
    model = graphs.tensor_classifier(tmp_path / "m", SWAP, ignore_nulls=True)
    card = register(tmp_path, model, frame)
    assert card.handles_missing is True
    assert stored(tmp_path, card)[PREDICTION_COLUMN].tolist() == [1, 0, 1, 0, 1, 0]   # a = 0 on row 1
    assert register(tmp_path, model, CLASSES).handles_missing is False   # complete data says nothing about nulls


def test_reference_data_whose_every_row_has_a_null_is_refused(tmp_path: Path, regressor: Path) -> None:
    frame = REGRESSION.assign(a=[None, 1.0, None, 3.0, None], b=[1.0, None, 1.0, None, 1.0])
    assert refusal(tmp_path, regressor, frame) == (
        "every reference row has a null; the model must be checked on complete rows")


def test_non_finite_predictions_on_complete_rows_are_refused_naming_the_rows(tmp_path: Path) -> None:
    model = graphs.linear_regressor(tmp_path / "m", [1e30, 0.0])
    frame = REGRESSION.assign(a=[0.0, 1e10, 0.0, 1e10, 0.0])   # 1e40 overflows float32
    assert refusal(tmp_path, model, frame) == "predictions on the reference data are NaN/inf (rows [1, 3])"
    five = pd.DataFrame({"a": [1e10] * 5 + [0.0], "b": 0.0, "target": 0.0})
    assert refusal(tmp_path, model, five) == "predictions on the reference data are NaN/inf (rows [0, 1, 2, 3, 4])"
    six = pd.DataFrame({"a": [1e10] * 6 + [0.0], "b": 0.0, "target": 0.0})
    assert refusal(tmp_path, model, six) == "predictions on the reference data are NaN/inf (rows [0, 1, 2, 3, 4]…)"


def test_non_finite_probabilities_on_complete_rows_are_refused(tmp_path: Path) -> None:
    model = graphs.tensor_classifier(tmp_path / "m", [[1e30, -1e30], [0.0, 0.0]])
    frame = CLASSES.assign(a=[1e10, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert refusal(tmp_path, model, frame, task="classification").startswith(
        "predicted probabilities on the reference data are NaN/inf (rows [0])")


# ---------------------------------------------------------------------- names, versions, options


@pytest.mark.parametrize("name", ["", "-m", "a/b", "x" * 65])
def test_a_model_name_must_be_a_safe_directory_name(name: str, tmp_path: Path, regressor: Path) -> None:
    assert refusal(tmp_path, regressor, REGRESSION, name=name) == (
        f"model name '{name}' must be 1-64 letters, digits, '_', '.' or '-'")


@pytest.mark.parametrize("version", [".1", "a/b", "-x"])
def test_a_version_must_be_a_safe_directory_name(version: str, tmp_path: Path, regressor: Path) -> None:
    assert refusal(tmp_path, regressor, REGRESSION, version=version) == (
        f"version '{version}' must be 1-64 letters, digits, '_', '.' or '-'")


def test_versions_count_up_from_the_highest_number_ignoring_named_ones(tmp_path: Path, regressor: Path) -> None:
    assert register(tmp_path, regressor, REGRESSION).version == "1"
    assert register(tmp_path, regressor, REGRESSION, version="9").version == "9"
    assert register(tmp_path, regressor, REGRESSION, version="v10").version == "v10"
    assert register(tmp_path, regressor, REGRESSION).version == "10"


def test_a_target_missing_from_the_reference_data_is_refused_listing_columns(tmp_path: Path, regressor: Path) -> None:
    frame = pd.DataFrame({name: [1.0] for name in "abcdefghij"})
    assert refusal(tmp_path, regressor, frame, target="y") == (
        "target column 'y' is not in the reference data (columns: a, b, c, d, e, f, g, h…)")


def test_pii_marks_a_feature_dropped_or_hashed(tmp_path: Path, regressor: Path) -> None:
    card = register(tmp_path, regressor, REGRESSION, pii={"a": "hash", "b": "drop"})
    assert [f.pii for f in card.features] == ["hash", "drop"]


def test_pii_must_name_a_feature_and_a_treatment(tmp_path: Path, regressor: Path) -> None:
    assert refusal(tmp_path, regressor, REGRESSION, pii={"email": "hash"}) == (
        "--pii names 'email', which is not a feature of the model")
    assert refusal(tmp_path, regressor, REGRESSION, pii={"a": "mask"}) == "--pii a=mask: use 'drop' or 'hash'"


def test_a_declared_output_range_and_fallback_go_on_the_card(tmp_path: Path, regressor: Path) -> None:
    card = register(tmp_path, regressor, REGRESSION, output_range=(-1.0, 9.0),
                    fallback={"kind": "rules", "rules": [{"feature": "a", "op": ">", "threshold": 2, "then": 5.0}],
                              "default": 1.0})
    assert card.output_range == Range(min=-1.0, max=9.0)
    assert card.fallback is not None and card.fallback.kind == "rules"
    assert register(tmp_path, regressor, REGRESSION).output_range is None


def test_fractional_class_labels_are_refused_naming_each_one(tmp_path: Path) -> None:
    model = graphs.tensor_classifier(tmp_path / "m", SWAP, label_output=False)
    message = refusal(tmp_path, model, CLASSES.assign(target=[0.5, 1.5] * 3), task="classification")
    assert message == ("the inferred card is invalid: "
                       "labels.0.int: Input should be a valid integer, got a number with a fractional part; "
                       "labels.0.str: Input should be a valid string; "
                       "labels.1.int: Input should be a valid integer, got a number with a fractional part; "
                       "labels.1.str: Input should be a valid string")


def test_a_card_that_does_not_validate_is_refused_naming_the_rule(tmp_path: Path) -> None:
    frame = pd.DataFrame({"version": [1.0, 2.0], "target": [1.0, 2.0]})
    message = refusal(tmp_path, graphs.linear_regressor(tmp_path / "m", [1.0]), frame)
    assert message == ("the inferred card is invalid: card: Value error, feature name(s) ['version'] are reserved "
                       "for the prediction log's own columns")


def test_the_fallback_is_derived_from_the_target(tmp_path: Path, regressor: Path) -> None:
    assert register(tmp_path, regressor, REGRESSION).fallback.model_dump() == {"kind": "median", "value": 3.0}
    assert register(tmp_path, regressor, REGRESSION.assign(target=[0.0, 0.0, 0.0, 5.0, 5.0]),
                    name="n").fallback.model_dump() == {"kind": "median", "value": 0.0}


# ---------------------------------------------------------------------- reference files and training metadata


@pytest.mark.parametrize("suffix", [".csv", ".CSV"])
def test_a_csv_reference_gives_the_same_features_as_parquet(suffix: str, tmp_path: Path, regressor: Path) -> None:
    from_csv = register(tmp_path, regressor, REGRESSION, suffix=suffix)
    from_parquet = register(tmp_path, regressor, REGRESSION)
    assert from_csv.features == from_parquet.features
    assert from_csv.training.dataset_fingerprint == from_parquet.training.dataset_fingerprint


def test_reference_data_that_is_missing_of_another_kind_or_empty_is_refused(tmp_path: Path, regressor: Path) -> None:
    registry = tmp_path / "registry"
    with pytest.raises(RegistryError) as info:
        register_model("m", regressor, tmp_path / "absent.parquet", registry=registry)
    assert info.value.message == f"reference data {tmp_path / 'absent.parquet'} does not exist"
    as_json = tmp_path / "reference.json"
    as_json.write_text(REGRESSION.to_json())
    with pytest.raises(RegistryError) as info:
        register_model("m", regressor, as_json, registry=registry)
    assert info.value.message == "reference data must be .csv or .parquet, got 'reference.json'"
    empty = tmp_path / "empty.parquet"
    REGRESSION.iloc[:0].to_parquet(empty)
    with pytest.raises(RegistryError) as info:
        register_model("m", regressor, empty, registry=registry)
    assert info.value.message == f"reference data {empty} has no rows"


def test_a_missing_model_file_is_refused_naming_it(tmp_path: Path) -> None:
    assert refusal(tmp_path, tmp_path / "absent.onnx", REGRESSION) == f"model file {tmp_path / 'absent.onnx'} does not exist"


def test_a_model_failing_on_the_reference_data_is_refused_with_the_first_line_of_why(tmp_path: Path) -> None:
    from tests.onnx_graphs import index_lookup_regressor

    model = index_lookup_regressor(tmp_path / "lookup.onnx", table_size=3)
    frame = pd.DataFrame({"idx": [0.0, 7.0], "x": [0.0, 0.0], "target": [0.0, 70.0]})   # 7 is past the table
    message = refusal(tmp_path, model, frame)
    assert message.startswith("the model fails on the reference data: ") and "Gather" in message
    assert "\n" not in message


def test_an_unreadable_reference_file_is_refused_naming_it(tmp_path: Path, regressor: Path) -> None:
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 but not really")
    with pytest.raises(RegistryError) as info:
        register_model("m", regressor, broken, registry=tmp_path / "registry")
    assert info.value.message.startswith(f"cannot read reference data {broken}: ")


def test_a_model_file_onnxruntime_cannot_load_is_refused_with_the_first_line_of_why(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"\x08\x07not a model")
    with pytest.raises(Exception) as loading:
        onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    first_line = str(loading.value).strip().splitlines()[0]
    assert refusal(tmp_path, model, REGRESSION) == f"{model} is not a loadable ONNX model: {first_line}"


def test_the_dataset_fingerprint_changes_with_the_values_and_the_column_names(tmp_path: Path, regressor: Path) -> None:
    first = register(tmp_path, regressor, REGRESSION).training.dataset_fingerprint
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 64
    assert register(tmp_path, regressor, REGRESSION).training.dataset_fingerprint == first
    changed = REGRESSION.assign(a=REGRESSION["a"] + 1)
    assert register(tmp_path, regressor, changed).training.dataset_fingerprint != first
    renamed = REGRESSION.rename(columns={"target": "y"})
    assert register(tmp_path, regressor, renamed, target="y").training.dataset_fingerprint != first


def test_a_fingerprint_does_not_change_between_releases(tmp_path: Path) -> None:
    # sha256 over pandas' per-row hashes (without the index), then the JSON list of column names.
    frame = pd.DataFrame({"a": [0.0, 1.0], "target": [1.0, 2.0]})
    card = register(tmp_path, graphs.linear_regressor(tmp_path / "m", [1.0]), frame)
    assert card.training.dataset_fingerprint == (
        "sha256:74b6ecc34c31e66b43dff3ab4fc5faf2500c82288a1b56f58961788504787b4d")


def test_the_code_revision_defaults_to_the_commit_holding_the_model_file(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "model"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    model = graphs.linear_regressor(repo / "model", [1.0, 2.0])
    assert register(tmp_path, model, REGRESSION).training.code_revision == head
    assert register(tmp_path, model, REGRESSION, metadata={"code_revision": "v1"}).training.code_revision == "v1"


def test_training_metadata_goes_on_the_card(tmp_path: Path, regressor: Path) -> None:
    before = datetime.now(timezone.utc)
    card = register(tmp_path, regressor, REGRESSION, metadata={
        "train_rows": 1000, "parameters": {"alpha": 0.1}, "metrics": {"r2": "0.75"}, "code_revision": "abc123",
        "dataset": "houses-2024"})
    training = card.training
    assert (training.rows, training.parameters, training.metrics) == (1000, {"alpha": 0.1}, {"r2": 0.75})
    assert (training.code_revision, training.dataset) == ("abc123", "houses-2024")
    assert before <= training.created_at <= datetime.now(timezone.utc)


def test_without_metadata_the_training_rows_are_the_reference_rows(tmp_path: Path, regressor: Path) -> None:
    training = register(tmp_path, regressor, REGRESSION).training
    assert (training.rows, training.parameters, training.metrics, training.code_revision) == (5, {}, {}, None)


@pytest.mark.parametrize(("metadata", "message"), [
    ({"rows": 3, "created_at": "now", "dataset_fingerprint": "mine"},
     "metadata key(s) ['created_at', 'dataset_fingerprint', 'rows'] are set by the registry "
     "(use 'train_rows' for the row count)"),
    ({"metrics": {"r2": "high"}}, "invalid metadata: could not convert string to float: 'high'"),
    ({"train_rows": "many"}, "invalid metadata: invalid literal for int() with base 10: 'many'"),
])
def test_metadata_the_card_cannot_hold_is_refused(metadata: dict[str, Any], message: str, tmp_path: Path,
                                                  regressor: Path) -> None:
    assert refusal(tmp_path, regressor, REGRESSION, metadata=metadata) == message
