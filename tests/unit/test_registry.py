"""The model registry: card inference, refusals, atomic version writes, version order, and ``vigil models``.

Models come from ``conftest.py`` (the two examples: one 2-D float input) and from
``tests/fixtures.py`` (a per-feature wine pipeline, a ZipMap classifier, and hand-made
graphs whose predictions are NaN/inf).
"""

from __future__ import annotations

import errno
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime
import pandas as pd
import pytest
import yaml
from click.testing import Result
from typer.testing import CliRunner

from service.registry import register as registry_module
from service.cli import app
from service.core.card import PREDICTION_COLUMN, SCORE_COLUMN, ModelCard
from service.core.errors import ModelNotFound, RegistryError
from service.registry.register import register_model
from service.registry.store import CARD_FILE, MODEL_FILE, REFERENCE_FILE, Registry, read_card
from tests import fixtures as fx

VERSION_FILES = sorted([CARD_FILE, MODEL_FILE, REFERENCE_FILE])
WINE_INPUTS = [fx.WINE_CATEGORICAL, *fx.WINE_NUMERIC]
"""Input order of the per-feature wine model: deliberately not the reference file's column order."""


# --------------------------------------------------------------------------- fixtures and helpers


@dataclass(frozen=True)
class Sources:
    """Inputs for registration: the cancer example (one 2-D input) and the wine pipeline (one input per feature)."""

    cancer: fx.Artefacts
    cancer_frame: pd.DataFrame
    wine: fx.Artefacts
    wine_frame: pd.DataFrame


@pytest.fixture(scope="module")
def wine_fitted() -> fx.Fitted:
    """The per-feature wine pipeline, fitted once for the module."""
    return fx.fit_per_feature_classifier()


@pytest.fixture(scope="module")
def wine_files(wine_fitted: fx.Fitted, tmp_path_factory: pytest.TempPathFactory) -> fx.Artefacts:
    """The wine pipeline exported with one input per column (probability tensor), and its reference data.

    The first reference row has no category, so that feature must come out nullable.
    """
    reference = wine_fitted.reference.copy()
    reference.loc[0, fx.WINE_CATEGORICAL] = None
    model = fx.export(wine_fitted.estimator, fx.per_feature_types(WINE_INPUTS, {fx.WINE_CATEGORICAL}), zipmap=False)
    return fx.write_artefacts(tmp_path_factory.mktemp("wine"), model, reference)


@pytest.fixture
def sources(trained_examples: dict[str, Path], wine_files: fx.Artefacts) -> Sources:
    """Both kinds of model with their reference frames."""
    cancer = fx.Artefacts(trained_examples["cancer"] / "model.onnx", trained_examples["cancer"] / "reference.parquet")
    return Sources(cancer, pd.read_parquet(cancer.reference), wine_files, pd.read_parquet(wine_files.reference))


def _register(files: fx.Artefacts, root: Path, name: str = "wine", **kwargs: Any) -> ModelCard:
    """Register ``files`` as ``name`` in the registry at ``root``; the target column is set unless overridden."""
    kwargs.setdefault("target", fx.TARGET)
    return register_model(name, files.model, files.reference, registry=root, **kwargs)


def _sha256(path: Path) -> str:
    """Hex sha256 of a file, computed independently of the registry's own helper."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stored_reference(root: Path, card: ModelCard) -> pd.DataFrame:
    """The reference data the registry stored beside a card."""
    return pd.read_parquet(root / card.name / card.version / REFERENCE_FILE)


def _version_snapshot(root: Path, name: str, version: str) -> dict[str, bytes]:
    """File name -> bytes of one stored version, to show it was left untouched."""
    return {p.name: p.read_bytes() for p in sorted((root / name / version).iterdir())}


def _assert_no_version_written(root: Path, name: str, existing: tuple[str, ...] = ()) -> None:
    """Only the ``existing`` versions of ``name`` are present: no new version, no staging dir, no stray file."""
    assert Registry(root).versions(name) == list(existing)
    model_dir = root / name
    leftovers = sorted(p.name for p in model_dir.iterdir() if p.name not in existing) if model_dir.is_dir() else []
    assert leftovers == [], f"left behind in {model_dir}: {leftovers}"
    if not existing:
        stray = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()] if root.exists() else []
        assert stray == [], f"files written under the registry: {stray}"


# --------------------------------------------------------------------------- card inference


def test_tensor_classifier_card(example_registry: Path, trained_examples: dict[str, Path]) -> None:
    """(a) One 2-D float input: features in column order, labels in probability order, metadata on the card."""
    trained = trained_examples["cancer"]
    reference = pd.read_parquet(trained / "reference.parquet")
    metadata = json.loads((trained / "metadata.json").read_text())
    features = reference.drop(columns=[fx.TARGET])

    card = Registry(example_registry).card("cancer", "1")

    assert card.task == "classification"
    assert card.target == fx.TARGET
    assert card.signature.input_mode == "tensor"
    assert card.signature.inputs == {"input": "float"}
    assert card.signature.probability_format == "tensor"
    assert card.signature.label_output and card.signature.probability_output
    assert card.feature_names == list(features.columns)
    assert {f.type for f in card.features} == {"float"}
    assert not any(f.nullable for f in card.features)
    assert [(f.min, f.max) for f in card.features] == [(features[c].min(), features[c].max()) for c in features.columns]
    assert card.labels == [0, 1]
    assert card.prediction_range is None
    assert card.sha256 == _sha256(trained / "model.onnx") == _sha256(example_registry / "cancer" / "1" / MODEL_FILE)
    assert card.training.rows == metadata["train_rows"] != len(reference)
    assert card.training.metrics == pytest.approx(metadata["metrics"])
    assert card.training.dataset == metadata["dataset"]
    assert card.training.parameters == metadata["parameters"]


def test_tensor_classifier_reference_holds_predictions(
    example_registry: Path, trained_examples: dict[str, Path]
) -> None:
    """The stored reference data is the features, the target, and the model's predicted label and score."""
    trained = trained_examples["cancer"]
    reference = pd.read_parquet(trained / "reference.parquet")
    accuracy = json.loads((trained / "metadata.json").read_text())["metrics"]["accuracy"]
    card = Registry(example_registry).card("cancer", "1")

    stored = _stored_reference(example_registry, card)

    assert list(stored.columns) == [*card.feature_names, fx.TARGET, PREDICTION_COLUMN, SCORE_COLUMN]
    pd.testing.assert_frame_equal(stored[list(reference.columns)], reference)
    # scikit-learn's held-out accuracy on these very rows: a label mix-up would not reproduce it.
    assert (stored[PREDICTION_COLUMN] == stored[fx.TARGET]).mean() == pytest.approx(accuracy, abs=1.5 / len(stored))
    # The score is the probability of labels[1], so it decides the predicted label.
    expected = np.where(stored[SCORE_COLUMN] > 0.5, card.labels[1], card.labels[0])
    assert (stored[PREDICTION_COLUMN].to_numpy() == expected).all()
    assert stored[SCORE_COLUMN].between(0, 1).all()


def test_regressor_card(example_registry: Path, trained_examples: dict[str, Path]) -> None:
    """(d) A regressor: a value output, the prediction range and deciles of the stored predictions."""
    trained = trained_examples["diabetes"]
    reference = pd.read_parquet(trained / "reference.parquet")
    metrics = json.loads((trained / "metadata.json").read_text())["metrics"]

    card = Registry(example_registry).card("diabetes", "1")
    stored = _stored_reference(example_registry, card)
    predictions = stored[PREDICTION_COLUMN].to_numpy()

    assert card.task == "regression"
    assert card.labels is None
    assert card.signature.value_output and card.signature.probability_output is None
    assert card.feature_names == [c for c in reference.columns if c != fx.TARGET]
    assert card.sha256 == _sha256(trained / "model.onnx")
    assert list(stored.columns) == [*card.feature_names, fx.TARGET, PREDICTION_COLUMN]
    assert card.prediction_range is not None
    assert (card.prediction_range.min, card.prediction_range.max) == (predictions.min(), predictions.max())
    assert card.prediction_range.min > 0 and card.prediction_range.max < reference[fx.TARGET].max()
    assert card.prediction_quantiles == pytest.approx(np.quantile(predictions, np.linspace(0.1, 0.9, 9)))
    # The stored predictions are the ONNX model's own (float32: close to, not equal to, scikit-learn's).
    session = onnxruntime.InferenceSession(str(trained / "model.onnx"), providers=["CPUExecutionProvider"])
    (onnx_values,) = session.run(None, {"input": reference[card.feature_names].to_numpy(np.float32)})
    assert predictions == pytest.approx(onnx_values.ravel(), rel=1e-6)
    assert np.abs(predictions - stored[fx.TARGET].to_numpy()).mean() == pytest.approx(metrics["mae"], rel=0.05)


def test_per_feature_classifier_card(wine_files: fx.Artefacts, wine_fitted: fx.Fitted, tmp_path: Path) -> None:
    """(b) One input per feature, float and string: order, types, ranges, categories and nullability."""
    reference = pd.read_parquet(wine_files.reference)
    metadata = {"train_rows": len(wine_fitted.train), "metrics": {"accuracy": np.float64(0.9), "n": 3},
                "parameters": {"C": 1.0}, "dataset": "sklearn.datasets.load_wine"}

    card = _register(wine_files, tmp_path, metadata=metadata)

    assert card.task == "classification"
    assert card.signature.input_mode == "per_feature"
    assert card.signature.inputs == {fx.WINE_CATEGORICAL: "string", **{c: "float" for c in fx.WINE_NUMERIC}}
    assert card.feature_names == WINE_INPUTS
    category, *numeric = card.features
    assert (category.type, category.nullable, category.min, category.max) == ("string", True, None, None)
    assert category.categories == ["high", "low", "mid"]
    for spec in numeric:
        assert (spec.type, spec.nullable, spec.categories) == ("float", False, None)
        assert (spec.min, spec.max) == (reference[spec.name].min(), reference[spec.name].max())
    assert card.labels == list(wine_fitted.estimator.classes_) == [0, 1, 2]
    assert card.handles_missing  # the row without a category got a finite answer
    assert card.sha256 == _sha256(wine_files.model) == _sha256(tmp_path / "wine" / "1" / MODEL_FILE)
    assert card.training.rows == len(wine_fitted.train)
    assert card.training.metrics == {"accuracy": 0.9, "n": 3.0}
    assert card.training.parameters == {"C": 1.0}
    assert card.training.dataset == "sklearn.datasets.load_wine"
    assert Registry(tmp_path).card("wine", "1") == card


def test_per_feature_reference_predictions_match_sklearn(
    wine_files: fx.Artefacts, wine_fitted: fx.Fitted, tmp_path: Path
) -> None:
    """The stored predictions are the pipeline's own, read in the labels' probability order."""
    card = _register(wine_files, tmp_path)
    stored = _stored_reference(tmp_path, card)
    # The registry feeds a missing category as "", which the one-hot encoder ignores like any unknown value.
    inputs = stored[WINE_INPUTS].fillna({fx.WINE_CATEGORICAL: ""})

    assert list(stored.columns) == [*WINE_INPUTS, fx.TARGET, PREDICTION_COLUMN, SCORE_COLUMN]
    assert stored[PREDICTION_COLUMN].tolist() == wine_fitted.estimator.predict(inputs).tolist()
    expected_scores = wine_fitted.estimator.predict_proba(inputs).max(axis=1)
    assert stored[SCORE_COLUMN].to_numpy() == pytest.approx(expected_scores, abs=1e-5)


def test_training_rows_default_to_reference_rows(wine_files: fx.Artefacts, tmp_path: Path) -> None:
    """Without metadata the card counts the reference rows and records no metrics."""
    card = _register(wine_files, tmp_path)

    assert card.training.rows == len(pd.read_parquet(wine_files.reference))
    assert card.training.metrics == {} and card.training.parameters == {}
    assert card.training.dataset_fingerprint.startswith("sha256:")


def test_csv_reference_gives_the_same_card(wine_files: fx.Artefacts, tmp_path: Path) -> None:
    """A .csv reference file is read like a .parquet one (an empty category cell is a null)."""
    csv_files = fx.write_artefacts(tmp_path / "csv", wine_files.model, pd.read_parquet(wine_files.reference), ".csv")

    from_csv = _register(csv_files, tmp_path / "a")
    from_parquet = _register(wine_files, tmp_path / "b")

    assert from_csv.features == from_parquet.features
    assert from_csv.labels == from_parquet.labels


def test_zipmap_classifier_card(tmp_path: Path) -> None:
    """(c) skl2onnx's default ZipMap output: string labels in probability order, predictions as sklearn's."""
    fitted = fx.fit_tensor_classifier(string_labels=True)
    files = fx.write_artefacts(tmp_path, fx.export(fitted.estimator, fx.tensor_types(len(fx.WINE_NUMERIC))),
                               fitted.reference)

    card = _register(files, tmp_path / "models")
    stored = _stored_reference(tmp_path / "models", card)

    assert card.task == "classification"
    assert card.signature.probability_format == "zipmap"
    assert card.signature.label_output == "output_label"
    assert card.signature.probability_output == "output_probability"
    assert card.labels == list(fitted.estimator.classes_) == ["class_0", "class_1", "class_2"]
    assert card.feature_names == fx.WINE_NUMERIC
    assert stored[PREDICTION_COLUMN].tolist() == fitted.estimator.predict(fitted.features).tolist()
    expected_scores = fitted.estimator.predict_proba(fitted.features).max(axis=1)
    assert stored[SCORE_COLUMN].to_numpy() == pytest.approx(expected_scores, abs=1e-5)


def test_tensor_classifier_with_string_labels(tmp_path: Path) -> None:
    """A classifier with string classes exported with a probability tensor (zipmap off) registers."""
    fitted = fx.fit_tensor_classifier(string_labels=True)
    model = fx.export(fitted.estimator, fx.tensor_types(len(fx.WINE_NUMERIC)), zipmap=False)
    files = fx.write_artefacts(tmp_path, model, fitted.reference)

    card = _register(files, tmp_path / "models")

    assert card.labels == ["class_0", "class_1", "class_2"]


# --------------------------------------------------------------------------- refusals


def _bytes_file(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` and return it."""
    path.write_bytes(data)
    return path


Case = Callable[[Sources, Path], dict[str, Any]]
"""Builds the ``register_model`` arguments of one refusal (over the cancer defaults) in a scratch directory."""


def _model_bytes(make: Callable[[Sources], bytes]) -> Case:
    """A case registering the given model bytes against the cancer reference data."""
    return lambda s, tmp: {"model_file": _bytes_file(tmp / "model.onnx", make(s))}


def _cancer_reference(change: Callable[[pd.DataFrame], pd.DataFrame], suffix: str = ".parquet") -> Case:
    """A case registering the cancer model (one 2-D input) against a changed copy of its reference data."""
    return lambda s, tmp: {"reference_file": fx.write_reference(tmp, change(s.cancer_frame), suffix)}


def _wine_reference(change: Callable[[pd.DataFrame], pd.DataFrame]) -> Case:
    """A case registering the per-feature wine model against a changed copy of its reference data."""
    return lambda s, tmp: {"model_file": s.wine.model, "reference_file": fx.write_reference(tmp, change(s.wine_frame))}


def _nonfinite(kind: fx.NonFinite) -> Case:
    """A case registering a NaN/inf-producing graph against the numeric wine columns."""
    def build(s: Sources, tmp: Path) -> dict[str, Any]:
        model = _bytes_file(tmp / "nonfinite.onnx", fx.nonfinite_model(len(fx.WINE_NUMERIC), kind))
        reference = fx.write_reference(tmp, s.wine_frame[[*fx.WINE_NUMERIC, fx.TARGET]])
        return {"model_file": model, "reference_file": reference}
    return build


def _truncated(s: Sources) -> bytes:
    """The first half of the cancer model file."""
    data = s.cancer.model.read_bytes()
    return data[: len(data) // 2]


NONFINITE = "predictions on the reference data are NaN/inf"
REFUSALS: dict[str, tuple[Case, str]] = {
    "random-bytes": (_model_bytes(lambda s: np.random.default_rng(0).bytes(4096)), "is not a loadable ONNX model"),
    "truncated-model": (_model_bytes(_truncated), "is not a loadable ONNX model"),
    "missing-model": (lambda s, tmp: {"model_file": tmp / "absent.onnx"}, "absent.onnx does not exist"),
    "tensor-column-dropped": (_cancer_reference(lambda f: f.drop(columns=["mean radius"])),
                              "takes 30 features but the reference data has 29 feature columns"),
    "tensor-column-added": (_cancer_reference(lambda f: f.assign(extra=1.0)),
                            "takes 30 features but the reference data has 31 feature columns"),
    "target-not-passed": (lambda s, tmp: {"target": None}, "(is --target missing?)"),
    "non-numeric-feature": (_cancer_reference(lambda f: f.assign(**{"mean radius": "wide"})),
                            "feature 'mean radius' must be numeric"),
    "per-feature-column-missing": (_wine_reference(lambda f: f.drop(columns=["alcohol"])),
                                   "reference data is missing column(s): alcohol"),
    "per-feature-column-extra": (_wine_reference(lambda f: f.assign(extra=1.0)),
                                 "reference column(s) not used by the model: extra"),
    "nan-from-division-by-zero": (_nonfinite("divide_by_zero"), NONFINITE),
    "nan-from-log-of-negative": (_nonfinite("log_of_negative"), NONFINITE),
    "reference-missing": (lambda s, tmp: {"reference_file": tmp / "absent.parquet"}, "absent.parquet does not exist"),
    "reference-suffix": (_cancer_reference(lambda f: f, ".json"), "must be .csv or .parquet, got 'reference.json'"),
    "reference-empty": (_cancer_reference(lambda f: f.iloc[:0]), "has no rows"),
    "target-not-in-data": (lambda s, tmp: {"target": "diagnosis"},
                           "target column 'diagnosis' is not in the reference data"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusal_names_the_problem_and_writes_nothing(case: str, sources: Sources, tmp_path: Path) -> None:
    """Each unusable input raises RegistryError saying why, and the registry is left empty."""
    build, message = REFUSALS[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    kwargs: dict[str, Any] = {"model_file": sources.cancer.model, "reference_file": sources.cancer.reference,
                              "target": fx.TARGET, **build(sources, inputs)}
    root = tmp_path / "models"

    with pytest.raises(RegistryError) as raised:
        register_model("m", registry=root, **kwargs)

    assert message in raised.value.message
    _assert_no_version_written(root, "m")


@pytest.mark.parametrize("name", ["", "../escape", "a/b", "a b", ".hidden", "-dash", "x" * 65, "ünï"])
def test_bad_model_name_refused(name: str, wine_files: fx.Artefacts, tmp_path: Path) -> None:
    """Names that are not 1-64 safe characters are refused before anything is written."""
    root = tmp_path / "models"

    with pytest.raises(RegistryError, match="model name"):
        _register(wine_files, root, name=name)

    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("version", ["", "../1", ".1", "a b", "1/2"])
def test_bad_version_refused(version: str, wine_files: fx.Artefacts, tmp_path: Path) -> None:
    """Version names follow the same rule as model names (no hidden or nested directories)."""
    with pytest.raises(RegistryError, match="version"):
        _register(wine_files, tmp_path, version=version)

    _assert_no_version_written(tmp_path, "wine")


def test_existing_version_refused_and_left_intact(registry_copy: Path, sources: Sources) -> None:
    """Versions are immutable: registering cancer:1 again fails and the stored version is unchanged."""
    before = _version_snapshot(registry_copy, "cancer", "1")

    with pytest.raises(RegistryError, match="cancer:1 already exists"):
        _register(sources.cancer, registry_copy, name="cancer", version="1")

    assert _version_snapshot(registry_copy, "cancer", "1") == before
    _assert_no_version_written(registry_copy, "cancer", existing=("1",))


@pytest.mark.parametrize("metadata", [{"rows": 10}, {"metrics": {"accuracy": "n/a"}}],
                         ids=["reserved-key", "text-metric"])
def test_bad_metadata_refused(metadata: dict[str, Any], wine_files: fx.Artefacts, tmp_path: Path) -> None:
    """Metadata that cannot go on the card is a RegistryError (the CLI then prints it without a traceback)."""
    with pytest.raises(RegistryError, match="metadata"):
        _register(wine_files, tmp_path, metadata=metadata)


# --------------------------------------------------------------------------- atomic writes


class SimulatedCrash(RuntimeError):
    """Raised by a patched file operation to simulate the process dying mid-write."""


def _crash(*args: Any, **kwargs: Any) -> None:
    """Stand-in for a file operation: always crashes."""
    raise SimulatedCrash("simulated crash")


CRASH_POINTS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "copying-the-model": lambda mp: mp.setattr(registry_module.shutil, "copyfile", _crash),
    "writing-the-reference": lambda mp: mp.setattr(pd.DataFrame, "to_parquet", _crash),
    "writing-the-card": lambda mp: mp.setattr(registry_module.yaml, "safe_dump", _crash),
    "syncing-the-files": lambda mp: mp.setattr(registry_module.os, "fsync", _crash),
    "renaming-into-place": lambda mp: mp.setattr(registry_module.os, "rename", _crash),
}


@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_crash_during_first_registration_leaves_no_version(
    point: str, wine_files: fx.Artefacts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash anywhere in the write leaves neither a version nor a staging directory."""
    CRASH_POINTS[point](monkeypatch)

    with pytest.raises(SimulatedCrash):
        _register(wine_files, tmp_path)

    _assert_no_version_written(tmp_path, "wine")


@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_crash_during_second_registration_keeps_the_first(
    point: str, registry_copy: Path, sources: Sources, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash while writing cancer:2 leaves cancer:1 as it was, still verifying, and no cancer:2."""
    before = _version_snapshot(registry_copy, "cancer", "1")
    CRASH_POINTS[point](monkeypatch)

    with pytest.raises(SimulatedCrash):
        _register(sources.cancer, registry_copy, name="cancer")

    monkeypatch.undo()
    _assert_no_version_written(registry_copy, "cancer", existing=("1",))
    assert _version_snapshot(registry_copy, "cancer", "1") == before
    registry = Registry(registry_copy)
    assert registry.verify(registry.card("cancer")) == registry_copy / "cancer" / "1" / MODEL_FILE


def test_version_appears_complete_in_one_rename(
    wine_files: fx.Artefacts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The version is built in a hidden directory that readers ignore, then renamed into place whole."""
    real_rename = registry_module.os.rename
    seen: list[dict[str, Any]] = []

    def spying_rename(src: str | Path, dst: str | Path) -> None:
        """Record what a reader could see just before the version is renamed into place."""
        src, dst = Path(src), Path(dst)
        seen.append({
            "hidden_sibling": src.parent == dst.parent and src.name.startswith("."),
            "target_exists": dst.exists(),
            "files": sorted(p.name for p in src.iterdir()),
            "card_matches_model": read_card(src / CARD_FILE).sha256 == _sha256(src / MODEL_FILE),
            "visible_versions": Registry(tmp_path).versions("wine"),
        })
        real_rename(src, dst)

    monkeypatch.setattr(registry_module.os, "rename", spying_rename)
    card = _register(wine_files, tmp_path)

    assert seen == [{"hidden_sibling": True, "target_exists": False, "files": VERSION_FILES,
                     "card_matches_model": True, "visible_versions": []}]
    assert sorted(p.name for p in (tmp_path / "wine").iterdir()) == [card.version]
    assert sorted(p.name for p in (tmp_path / "wine" / card.version).iterdir()) == VERSION_FILES


def test_failed_first_registration_leaves_no_model_name(
    wine_files: fx.Artefacts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a crashed first registration the model is not listed as registered."""
    CRASH_POINTS["renaming-into-place"](monkeypatch)

    with pytest.raises(SimulatedCrash):
        _register(wine_files, tmp_path)

    assert Registry(tmp_path).names() == []


def test_rename_failure_reports_the_os_error(
    wine_files: fx.Artefacts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rename failing for a reason other than a concurrent writer says what went wrong."""
    def full_disk(src: Any, dst: Any) -> None:
        """os.rename on a full disk."""
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(registry_module.os, "rename", full_disk)

    with pytest.raises(RegistryError, match="No space left on device"):
        _register(wine_files, tmp_path)


# --------------------------------------------------------------------------- versions and reading


def test_versions_default_to_the_next_integer(wine_files: fx.Artefacts, tmp_path: Path) -> None:
    """Two registrations without a version give 1 then 2; latest is 2 and both cards read back."""
    first = _register(wine_files, tmp_path)
    second = _register(wine_files, tmp_path)
    registry = Registry(tmp_path)

    assert (first.version, second.version) == ("1", "2")
    assert registry.versions("wine") == ["1", "2"]
    assert registry.latest("wine") == "2"
    assert registry.card("wine") == second
    assert registry.card("wine", "1") == first
    assert first.training.dataset_fingerprint == second.training.dataset_fingerprint


def test_explicit_version_name(wine_files: fx.Artefacts, tmp_path: Path) -> None:
    """An explicit version is used as given, and the next default still counts integers only."""
    named = _register(wine_files, tmp_path, version="v-a")
    numbered = _register(wine_files, tmp_path)

    assert named.version == "v-a"
    assert sorted(p.name for p in (tmp_path / "wine" / "v-a").iterdir()) == VERSION_FILES
    assert Registry(tmp_path).card("wine", "v-a") == named
    assert numbered.version == "1"


def test_versions_sort_numerically(wine_files: fx.Artefacts, tmp_path: Path) -> None:
    """'2' sorts before '10', whatever the registration order, and the next default follows the largest."""
    for version in ("10", "2", "9"):
        _register(wine_files, tmp_path, version=version)
    following = _register(wine_files, tmp_path)
    registry = Registry(tmp_path)

    assert following.version == "11"
    assert registry.versions("wine") == ["2", "9", "10", "11"]
    assert registry.latest("wine") == "11"
    assert registry.names() == ["wine"]


def test_unknown_model_or_version_is_model_not_found(example_registry: Path, tmp_path: Path) -> None:
    """Reading a model or version that is not there raises ModelNotFound naming it."""
    registry = Registry(example_registry)

    with pytest.raises(ModelNotFound, match="'nope' is not registered"):
        registry.card("nope")
    with pytest.raises(ModelNotFound, match="'nope' is not registered"):
        registry.latest("nope")
    with pytest.raises(ModelNotFound, match="no version '7'"):
        registry.card("cancer", "7")
    assert registry.versions("nope") == []
    assert Registry(tmp_path / "absent").names() == []


def test_verify_accepts_the_registered_file(example_registry: Path) -> None:
    """An untouched version verifies and returns its model path."""
    registry = Registry(example_registry)

    assert registry.verify(registry.card("diabetes", "1")) == example_registry / "diabetes" / "1" / MODEL_FILE


def test_verify_refuses_a_modified_model(registry_copy: Path) -> None:
    """A model file changed after registration fails verification with a sha256 mismatch."""
    registry = Registry(registry_copy)
    card = registry.card("cancer", "1")
    with open(registry_copy / "cancer" / "1" / MODEL_FILE, "ab") as fh:
        fh.write(b"\0")

    with pytest.raises(RegistryError, match="sha256 of model.onnx .* changed after registration"):
        registry.verify(card)


def test_verify_refuses_a_missing_model(registry_copy: Path) -> None:
    """A version whose model file is gone fails verification."""
    registry = Registry(registry_copy)
    card = registry.card("cancer", "1")
    (registry_copy / "cancer" / "1" / MODEL_FILE).unlink()

    with pytest.raises(RegistryError, match="cancer:1: model.onnx is missing"):
        registry.verify(card)


# --------------------------------------------------------------------------- the CLI


def _invoke(*args: str | Path) -> Result:
    """Run ``vigil`` with the given arguments in-process."""
    return CliRunner().invoke(app, [str(a) for a in args])


def _flat(text: str) -> str:
    """Text with line wrapping undone (rich wraps long messages)."""
    return " ".join(text.split())


def test_cli_register_prints_the_version(wine_files: fx.Artefacts, tmp_path: Path) -> None:
    """`vigil models register` writes the version, reads --metadata, and prints name:version."""
    metadata = tmp_path / "metadata.json"
    metadata.write_text(json.dumps({"train_rows": 124, "metrics": {"accuracy": 0.97}}))
    root = tmp_path / "models"
    command = ["models", "register", "wine", "--model", wine_files.model, "--reference", wine_files.reference,
               "--target", fx.TARGET, "--registry", root]

    first = _invoke(*command, "--metadata", metadata)
    second = _invoke(*command)

    assert first.exit_code == 0, first.output
    assert "registered wine:1 (classification, 6 features" in _flat(first.stdout)
    assert second.exit_code == 0, second.output
    assert "registered wine:2" in _flat(second.stdout)
    card = Registry(root).card("wine", "1")
    assert (card.training.rows, card.training.metrics) == (124, {"accuracy": 0.97})


def test_cli_register_refusal_is_a_message_not_a_traceback(tmp_path: Path, sources: Sources) -> None:
    """A refused registration exits 1 with the reason on stderr, and writes nothing."""
    model = _bytes_file(tmp_path / "random.onnx", np.random.default_rng(1).bytes(2048))
    root = tmp_path / "models"

    result = _invoke("models", "register", "m", "--model", model, "--reference", sources.cancer.reference,
                     "--target", fx.TARGET, "--registry", root)

    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert "is not a loadable ONNX model" in _flat(result.stderr)
    assert "Traceback" not in result.output
    _assert_no_version_written(root, "m")


def test_cli_list_shows_every_model(example_registry: Path) -> None:
    """`vigil models list` prints each model with its versions and task."""
    result = _invoke("models", "list", "--registry", example_registry)

    assert result.exit_code == 0, result.output
    # Table cells, whatever characters rich draws the borders with: model, versions, latest, task, features.
    cells = [[w for w in line.split() if any(ch.isalnum() for ch in w)] for line in result.stdout.splitlines()]
    rows = {row[0]: row for row in cells if row}
    assert rows["cancer"] == ["cancer", "1", "1", "classification", "30"]
    assert rows["diabetes"] == ["diabetes", "1", "1", "regression", "10"]


@pytest.mark.parametrize("as_json", [False, True], ids=["yaml", "json"])
def test_cli_show_prints_the_card(as_json: bool, example_registry: Path) -> None:
    """`vigil models show NAME:1` prints the stored card (YAML, or JSON with --json)."""
    result = _invoke("models", "show", "cancer:1", "--registry", example_registry, *(["--json"] if as_json else []))

    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout) if as_json else yaml.safe_load(result.stdout)
    card = Registry(example_registry).card("cancer", "1")
    assert printed == card.model_dump(mode="json", exclude_none=True)


def test_cli_show_unknown_model_fails_cleanly(example_registry: Path) -> None:
    """`vigil models show` of an unknown model exits 1 with the reason."""
    result = _invoke("models", "show", "nope", "--registry", example_registry)

    assert result.exit_code == 1
    assert "model 'nope' is not registered" in _flat(result.stderr)
    assert "Traceback" not in result.output
