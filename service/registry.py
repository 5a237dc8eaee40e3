"""The model registry on disk: cards, reading, verifying and registering versions.

Layout: ``<registry>/<name>/<version>/`` holding ``model.onnx``, ``card.yaml``
and ``reference.parquet``. A version directory is immutable once written:
registration builds it under a temporary name and renames it into place, so a
crash never leaves half a version behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.errors import ModelNotFound, RegistryError

MODEL_FILE = "model.onnx"
CARD_FILE = "card.yaml"
REFERENCE_FILE = "reference.parquet"
PREDICTION_COLUMN = "prediction"
"""Column of the stored reference data holding the model's own output (label or value)."""
SCORE_COLUMN = "prediction_score"
"""Column of the stored reference data holding the positive-class score (binary classifiers)."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

Task = Literal["classification", "regression"]
FeatureType = Literal["float", "int", "string"]
Label = int | str


class FeatureSpec(BaseModel):
    """One input feature as the model expects it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    type: FeatureType = "float"
    min: float | None = None
    """Smallest value seen in the reference data (numbers only)."""
    max: float | None = None
    """Largest value seen in the reference data (numbers only)."""
    nullable: bool = False
    """Whether a request may send null (or omit the feature)."""
    pii: Literal[False, "drop", "hash"] = False
    """Personal data: never logged in clear; dropped or hashed."""
    categories: list[str] | None = None
    """Values seen in the reference data (string features, when few)."""


class OnnxSignature(BaseModel):
    """How the card's features map onto the ONNX graph's inputs and outputs."""

    model_config = ConfigDict(extra="forbid")

    input_mode: Literal["tensor", "per_feature"]
    """``tensor``: one 2-D input, features in column order; ``per_feature``: one input per feature."""
    inputs: dict[str, str]
    """ONNX input name -> element type (``float``, ``double``, ``int64``, ``string``)."""
    label_output: str | None = None
    probability_output: str | None = None
    probability_format: Literal["tensor", "zipmap"] | None = None
    value_output: str | None = None


class Training(BaseModel):
    """Where the model came from."""

    model_config = ConfigDict(extra="allow")

    dataset_fingerprint: str
    rows: int
    parameters: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    code_revision: str | None = None
    created_at: datetime
    dataset: str | None = None


class Range(BaseModel):
    """A closed numeric interval."""

    min: float
    max: float


class PriorFallback(BaseModel):
    """Classification fallback: always the majority class, with the reference class shares."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["prior"] = "prior"
    probabilities: dict[str, float]
    """Label (as text) -> share of the reference data."""


class MedianFallback(BaseModel):
    """Regression fallback: the reference median of the target."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["median"] = "median"
    value: float


class Rule(BaseModel):
    """``if <feature> <op> <threshold> then <then>``."""

    model_config = ConfigDict(extra="forbid")
    feature: str
    op: Literal["<", "<=", ">", ">=", "==", "!="]
    threshold: float | str
    then: Label | float


class RulesFallback(BaseModel):
    """A declared rule set evaluated in order; the first rule that holds answers, else ``default``."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["rules"] = "rules"
    rules: list[Rule] = Field(min_length=1)
    default: Label | float


class BucketMedianFallback(BaseModel):
    """Regression fallback: the reference median of the target per bucket of one declared feature."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["bucket_median"] = "bucket_median"
    feature: str
    edges: list[float] = Field(default_factory=list)
    """Upper bounds of the buckets but the last (computed from the reference quintiles when omitted)."""
    values: list[float] = Field(default_factory=list)
    """Median per bucket, ``len(edges) + 1`` of them (computed at registration)."""
    default: float | None = None
    """Answer when the feature is null (the overall median when omitted)."""


FallbackSpec = Annotated[
    PriorFallback | MedianFallback | RulesFallback | BucketMedianFallback, Field(discriminator="kind")
]


class ModelCard(BaseModel):
    """Everything Vigil knows about one model version; stored as ``card.yaml``."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: str
    task: Task
    features: list[FeatureSpec]
    signature: OnnxSignature
    labels: list[Label] | None = None
    """Class labels in the order of the probability columns (classification)."""
    prediction_range: Range | None = None
    """Smallest and largest prediction on the reference data (regression)."""
    prediction_quantiles: list[float] = Field(default_factory=list)
    """Deciles of the reference predictions (value, or positive-class score); metric buckets come from these."""
    output_range: Range | None = None
    """Declared allowed range of regression outputs; when omitted, the prediction range widened by a margin."""
    handles_missing: bool = False
    """Whether the model gave finite outputs on reference rows with nulls (else such rows go to the fallback)."""
    fallback: FallbackSpec | None = None
    """The heuristic that answers when the model cannot (derived from the reference data at registration)."""
    target: str | None = None
    training: Training
    sha256: str

    @model_validator(mode="after")
    def _task_fields(self) -> ModelCard:
        from monitoring.predlog import RESERVED_COLUMNS

        clashes = [f.name for f in self.features if f.name in RESERVED_COLUMNS]
        if clashes:
            raise ValueError(f"feature name(s) {clashes} are reserved for the prediction log's own columns")
        if self.task == "classification" and not self.labels:
            raise ValueError("a classification card needs 'labels'")
        if self.task == "regression" and self.prediction_range is None:
            raise ValueError("a regression card needs 'prediction_range'")
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError("feature names must be unique")
        self._check_fallback(set(names))
        return self

    def _check_fallback(self, names: set[str]) -> None:
        spec = self.fallback
        if spec is None:
            return
        labels = {str(label) for label in self.labels or []}
        if isinstance(spec, (PriorFallback,)) and self.task == "classification" and set(spec.probabilities) != labels:
            raise ValueError(f"fallback.probabilities must name exactly the labels {sorted(labels)}")
        if isinstance(spec, (MedianFallback, BucketMedianFallback)) and self.task != "regression":
            raise ValueError(f"fallback kind '{spec.kind}' is for regression models")
        if isinstance(spec, PriorFallback) and self.task != "classification":
            raise ValueError("fallback kind 'prior' is for classification models")
        if isinstance(spec, BucketMedianFallback) and spec.feature not in names:
            raise ValueError(f"fallback.feature '{spec.feature}' is not a feature of the model")
        if isinstance(spec, RulesFallback):
            for i, rule in enumerate(spec.rules):
                if rule.feature not in names:
                    raise ValueError(f"fallback.rules[{i}].feature '{rule.feature}' is not a feature of the model")
                if self.task == "classification" and str(rule.then) not in labels:
                    raise ValueError(f"fallback.rules[{i}].then '{rule.then}' is not one of the labels {sorted(labels)}")
            if self.task == "classification" and str(spec.default) not in labels:
                raise ValueError(f"fallback.default '{spec.default}' is not one of the labels {sorted(labels)}")

    def allowed_range(self, margin: float) -> tuple[float, float] | None:
        """Regression outputs outside this range are invalid: the declared range, else the observed one widened by ``margin`` of its span."""
        if self.output_range is not None:
            return self.output_range.min, self.output_range.max
        if self.prediction_range is None:
            return None
        span = self.prediction_range.max - self.prediction_range.min
        pad = margin * (span if span > 0 else max(abs(self.prediction_range.max), 1.0))
        return self.prediction_range.min - pad, self.prediction_range.max + pad

    @property
    def feature_names(self) -> list[str]:
        """Feature names in the order the model takes them."""
        return [f.name for f in self.features]

    @property
    def hashes_pii(self) -> bool:
        """Whether any feature is logged as a salted hash of its value (``pii: hash``)."""
        return any(f.pii == "hash" for f in self.features)


def registry_root(path: str | os.PathLike[str] | None = None) -> Path:
    """The registry directory: the argument, else ``VIGIL_REGISTRY``, else ``./models``."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get("VIGIL_REGISTRY", "models"))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _version_key(version: str) -> tuple[int, int | str]:
    # Integers sort numerically and after nothing else; other names sort after them, lexically.
    return (0, int(version)) if version.isdigit() else (1, version)


class Registry:
    """Read access to ``<root>/<name>/<version>/``."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = registry_root(root)

    def names(self) -> list[str]:
        """Registered model names, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and _NAME_RE.match(p.name) and self.versions(p.name))

    def versions(self, name: str) -> list[str]:
        """Versions of a model, oldest first (numeric versions in numeric order)."""
        model_dir = self.root / name
        if not model_dir.is_dir():
            return []
        found = [p.name for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return sorted(found, key=_version_key)

    def latest(self, name: str) -> str:
        """Newest version of a model; :class:`ModelNotFound` when there is none."""
        versions = self.versions(name)
        if not versions:
            raise ModelNotFound(f"model '{name}' is not registered in {self.root}")
        return versions[-1]

    def path(self, name: str, version: str) -> Path:
        """Directory of one version."""
        return self.root / name / version

    def card(self, name: str, version: str | None = None) -> ModelCard:
        """Read and validate a version's card (the newest version when none is given)."""
        version = version or self.latest(name)
        card_path = self.path(name, version) / CARD_FILE
        if not card_path.is_file():
            raise ModelNotFound(f"model '{name}' has no version '{version}' in {self.root}")
        return read_card(card_path)

    def verify(self, card: ModelCard) -> Path:
        """Check that the model file matches the card's sha256; returns its path."""
        model_path = self.path(card.name, card.version) / MODEL_FILE
        if not model_path.is_file():
            raise RegistryError(f"{card.name}:{card.version}: {MODEL_FILE} is missing")
        actual = sha256_file(model_path)
        if actual != card.sha256:
            raise RegistryError(
                f"{card.name}:{card.version}: sha256 of {MODEL_FILE} is {actual[:12]}…, "
                f"the card says {card.sha256[:12]}… (file changed after registration)"
            )
        return model_path


def read_card(path: Path) -> ModelCard:
    """Parse a ``card.yaml``, with an error naming the file and the key on failure."""
    try:
        raw = yaml.safe_load(path.read_text())
        return ModelCard.model_validate(raw)
    except (OSError, yaml.YAMLError) as exc:
        raise RegistryError(f"cannot read {path}: {exc}") from exc
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise RegistryError(f"invalid card {path}: {problems}") from exc


# --------------------------------------------------------------------------- registration

_ONNX_ELEM = {
    "tensor(float)": "float",
    "tensor(double)": "double",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(string)": "string",
}


def _load_reference(path: Path) -> Any:
    import pandas as pd

    if not path.is_file():
        raise RegistryError(f"reference data {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif suffix == ".csv":
            frame = pd.read_csv(path)
        else:
            raise RegistryError(f"reference data must be .csv or .parquet, got '{path.name}'")
    except RegistryError:
        raise
    except Exception as exc:
        raise RegistryError(f"cannot read reference data {path}: {exc}") from exc
    if frame.empty:
        raise RegistryError(f"reference data {path} has no rows")
    frame.columns = [str(c) for c in frame.columns]
    return frame


def _open_session(model_path: Path) -> Any:
    import onnxruntime as ort

    if not model_path.is_file():
        raise RegistryError(f"model file {model_path} does not exist")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RegistryError(f"{model_path} is not a loadable ONNX model: {first_line}") from exc


def _infer_signature(session: Any, frame: Any, target: str | None) -> tuple[OnnxSignature, list[str]]:
    """Map the reference columns onto the graph inputs; returns the signature and feature order."""
    inputs = session.get_inputs()
    columns = [c for c in frame.columns if c != target]
    for inp in inputs:
        if inp.type not in _ONNX_ELEM:
            raise RegistryError(f"model input '{inp.name}' has unsupported type {inp.type}")
    if len(inputs) == 1 and len(inputs[0].shape) == 2 and inputs[0].name not in columns:
        inp = inputs[0]
        width = inp.shape[1]
        if _ONNX_ELEM[inp.type] not in ("float", "double"):
            raise RegistryError(f"model input '{inp.name}' is {inp.type}; a single 2-D input must be float or double")
        if isinstance(width, int) and width != len(columns):
            raise RegistryError(
                f"model input '{inp.name}' takes {width} features but the reference data has "
                f"{len(columns)} feature columns ({', '.join(columns[:5])}{'…' if len(columns) > 5 else ''})"
                + (f" besides the target '{target}'" if target else " (is --target missing?)")
            )
        return OnnxSignature(input_mode="tensor", inputs={inp.name: _ONNX_ELEM[inp.type]}), columns
    missing = [inp.name for inp in inputs if inp.name not in frame.columns]
    if missing:
        raise RegistryError(
            f"the model takes one input per feature, and the reference data is missing column(s): {', '.join(missing)}"
        )
    extra = [c for c in columns if c not in {inp.name for inp in inputs}]
    if extra:
        raise RegistryError(f"reference column(s) not used by the model: {', '.join(extra)} (is --target missing?)")
    return (
        OnnxSignature(input_mode="per_feature", inputs={inp.name: _ONNX_ELEM[inp.type] for inp in inputs}),
        [inp.name for inp in inputs],
    )


def _feature_specs(frame: Any, order: list[str], signature: OnnxSignature) -> list[FeatureSpec]:
    import pandas as pd

    specs = []
    for name in order:
        column = frame[name]
        nullable = bool(column.isna().any())
        elem = signature.inputs.get(name, "float") if signature.input_mode == "per_feature" else "float"
        if elem == "string":
            values = column.dropna().astype(str)
            uniques = sorted(values.unique().tolist())
            specs.append(FeatureSpec(name=name, type="string", nullable=nullable,
                                     categories=uniques if len(uniques) <= 100 else None))
            continue
        if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
            raise RegistryError(f"feature '{name}' must be numeric for the model, reference data has {column.dtype}")
        ftype: FeatureType = "int" if elem in ("int64", "int32") else "float"
        finite = column.dropna()
        specs.append(FeatureSpec(
            name=name, type=ftype, nullable=nullable,
            min=float(finite.min()) if len(finite) else None,
            max=float(finite.max()) if len(finite) else None,
        ))
    return specs


def _reference_feeds(frame: Any, features: list[FeatureSpec], signature: OnnxSignature) -> dict[str, np.ndarray]:
    names = [f.name for f in features]
    if signature.input_mode == "tensor":
        (input_name, elem), = signature.inputs.items()
        dtype = np.float64 if elem == "double" else np.float32
        return {input_name: frame[names].to_numpy(dtype=dtype)}
    feeds = {}
    for spec in features:
        elem = signature.inputs[spec.name]
        column = frame[spec.name]
        if elem == "string":
            feeds[spec.name] = column.astype(object).where(column.notna(), "").astype(str).to_numpy(dtype=object).reshape(-1, 1)
        else:
            dtype = {"float": np.float32, "double": np.float64, "int64": np.int64, "int32": np.int32}[elem]
            feeds[spec.name] = column.to_numpy(dtype=dtype).reshape(-1, 1)
    return feeds


def _classify_outputs(session: Any, task: Task | None) -> tuple[Task, dict[str, Any]]:
    outputs = session.get_outputs()
    label = next((o for o in outputs if o.type in ("tensor(int64)", "tensor(string)")), None)
    zipmap = next((o for o in outputs if o.type.startswith("seq(map(")), None)
    floats = [o for o in outputs if o.type in ("tensor(float)", "tensor(double)")]
    looks_like_classifier = zipmap is not None or (label is not None and bool(floats))
    task = task or ("classification" if looks_like_classifier else "regression")
    if task == "classification":
        if zipmap is not None:
            return task, {"label_output": label.name if label else None, "probability_output": zipmap.name,
                          "probability_format": "zipmap"}
        if not floats:
            raise RegistryError("a classifier must output class probabilities (a float tensor or a ZipMap)")
        return task, {"label_output": label.name if label else None, "probability_output": floats[0].name,
                      "probability_format": "tensor"}
    if not floats:
        raise RegistryError("a regressor must output a float tensor; the model outputs "
                            + ", ".join(f"{o.name} ({o.type})" for o in outputs))
    return task, {"value_output": floats[0].name}


def _check_finite(values: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])[:5].tolist()
        raise RegistryError(f"{what} on the reference data are NaN/inf (rows {rows}{'…' if bad.sum() > 5 else ''})")


def _decile_edges(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.unique(np.quantile(values, np.linspace(0.1, 0.9, 9)))]


def _git_revision(cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def register_model(
    name: str,
    model_file: str | os.PathLike[str],
    reference_file: str | os.PathLike[str],
    *,
    target: str | None = None,
    task: Task | None = None,
    version: str | None = None,
    registry: str | os.PathLike[str] | None = None,
    metadata: dict[str, Any] | None = None,
    pii: dict[str, str] | None = None,
    fallback: dict[str, Any] | None = None,
    output_range: tuple[float, float] | None = None,
) -> ModelCard:
    """Validate a model against its reference data and write a new immutable version.

    Infers the card from the ONNX signature and the reference data; ``pii`` marks
    features as personal data (``{"email": "hash"}``: hashed, or ``"drop"``: never
    logged). ``fallback`` declares the heuristic (rules or per-bucket medians)
    instead of the derived prior/median; ``output_range`` declares the allowed
    range of regression outputs. Nothing is
    written unless every check passes, and the version appears atomically.
    Raises :class:`RegistryError` naming the problem otherwise.
    """
    import pandas as pd

    if not _NAME_RE.match(name):
        raise RegistryError(f"model name '{name}' must be 1-64 letters, digits, '_', '.' or '-'")
    if version is not None and (not _NAME_RE.match(version) or version.startswith(".")):
        raise RegistryError(f"version '{version}' must be 1-64 letters, digits, '_', '.' or '-'")
    reg = Registry(registry)
    model_path = Path(model_file)
    frame = _load_reference(Path(reference_file))
    if target is not None and target not in frame.columns:
        raise RegistryError(f"target column '{target}' is not in the reference data (columns: {', '.join(frame.columns[:8])}…)")

    session = _open_session(model_path)
    signature, order = _infer_signature(session, frame, target)
    features = _feature_specs(frame, order, signature)
    for feature_name, treatment in (pii or {}).items():
        spec = next((f for f in features if f.name == feature_name), None)
        if spec is None:
            raise RegistryError(f"--pii names '{feature_name}', which is not a feature of the model")
        if treatment not in ("drop", "hash"):
            raise RegistryError(f"--pii {feature_name}={treatment}: use 'drop' or 'hash'")
        spec.pii = treatment  # type: ignore[assignment]
    task, outputs = _classify_outputs(session, task)
    signature = signature.model_copy(update=outputs)

    try:
        feeds = _reference_feeds(frame, features, signature)
        results = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    except Exception as exc:
        raise RegistryError(f"the model fails on the reference data: {str(exc).strip().splitlines()[0]}") from exc

    reference = frame[order + ([target] if target else [])].copy()
    # Rows with a null are judged apart: a model may not take NaN (then those rows go to
    # the fallback when served), but it must answer every complete row with finite values.
    complete = ~frame[order].isna().any(axis=1).to_numpy()
    if not complete.any():
        raise RegistryError("every reference row has a null; the model must be checked on complete rows")
    labels: list[Label] | None = None
    prediction_range: Range | None = None
    if task == "classification":
        probs_raw = results[signature.probability_output]
        if signature.probability_format == "zipmap":
            labels = list(probs_raw[0].keys())
            probs = np.array([[row[k] for k in labels] for row in probs_raw], dtype=np.float64)
        else:
            probs = np.asarray(probs_raw, dtype=np.float64).reshape(len(frame), -1)
            if signature.label_output is not None:
                predicted = np.asarray(results[signature.label_output]).reshape(-1)[complete]
                # Class order: the label of the most probable column, column by column.
                labels = []
                for col in range(probs.shape[1]):
                    hits = predicted[probs[complete].argmax(axis=1) == col]
                    labels.append(hits[0] if len(hits) else None)
                if any(lbl is None for lbl in labels):
                    if target is None:
                        raise RegistryError("cannot tell the class labels: pass --target so they can be read from the reference data")
                    labels = sorted(pd.unique(frame[target]).tolist())
            elif target is not None:
                labels = sorted(pd.unique(frame[target]).tolist())
            else:
                raise RegistryError("the model outputs no labels: pass --target so they can be read from the reference data")
        labels = [lbl.item() if hasattr(lbl, "item") else lbl for lbl in labels]
        if len(labels) != probs.shape[1]:
            raise RegistryError(f"the model gives {probs.shape[1]} probabilities per row but {len(labels)} labels were found")
        _check_finite(probs[complete], "predicted probabilities")
        answered = np.isfinite(probs).all(axis=1)
        handles_missing = bool((~complete).any() and answered.all())
        predicted_labels = [labels[i] if ok else None for i, ok in zip(probs.argmax(axis=1), answered)]
        reference[PREDICTION_COLUMN] = predicted_labels
        score = np.where(answered, probs[:, 1] if probs.shape[1] == 2 else probs.max(axis=1), np.nan)
        reference[SCORE_COLUMN] = score
        quantiles = _decile_edges(score[answered])
    else:
        values = np.asarray(results[signature.value_output], dtype=np.float64).reshape(len(frame), -1)[:, 0]
        _check_finite(values[complete], "predictions")
        answered = np.isfinite(values)
        handles_missing = bool((~complete).any() and answered.all())
        values = np.where(answered, values, np.nan)
        prediction_range = Range(min=float(values[answered].min()), max=float(values[answered].max()))
        reference[PREDICTION_COLUMN] = values
        quantiles = _decile_edges(values[answered])

    from service.fallback import derive_fallback

    fallback_spec = derive_fallback(task, labels, reference, target, declared=fallback)

    meta = dict(metadata or {})
    version = version or _next_version(reg, name)
    try:
        card = ModelCard(
            name=name,
            version=version,
            task=task,
            features=features,
            signature=signature,
            labels=labels,
            prediction_range=prediction_range,
            prediction_quantiles=quantiles,
            output_range=Range(min=output_range[0], max=output_range[1]) if output_range else None,
            handles_missing=handles_missing,
            fallback=fallback_spec,
            target=target,
            training=_training(frame, meta, Path(model_file)),
            sha256=sha256_file(model_path),
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'card'}: {e['msg']}" for e in exc.errors())
        raise RegistryError(f"the inferred card is invalid: {problems}") from exc
    _write_version(reg, card, model_path, reference)
    return card


def _training(frame: Any, meta: dict[str, Any], model_file: Path) -> Training:
    """The card's training section from ``--metadata``; a RegistryError when the metadata cannot go on a card."""
    reserved = sorted({"dataset_fingerprint", "rows", "created_at"} & set(meta))
    if reserved:
        raise RegistryError(f"metadata key(s) {reserved} are set by the registry (use 'train_rows' for the row count)")
    try:
        return Training(
            dataset_fingerprint=_fingerprint(frame),
            rows=int(meta.pop("train_rows", len(frame))),
            parameters=meta.pop("parameters", {}),
            metrics={k: float(v) for k, v in meta.pop("metrics", {}).items()},
            code_revision=meta.pop("code_revision", None) or _git_revision(model_file.resolve().parent),
            created_at=datetime.now(timezone.utc),
            **meta,
        )
    except (TypeError, ValueError, AttributeError) as exc:  # pydantic's ValidationError is a ValueError
        raise RegistryError(f"invalid metadata: {exc}") from exc


def _fingerprint(frame: Any) -> str:
    import pandas as pd

    hashed = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    digest = hashlib.sha256(hashed.tobytes())
    digest.update(json.dumps(list(map(str, frame.columns))).encode())
    return "sha256:" + digest.hexdigest()


def _next_version(reg: Registry, name: str) -> str:
    numeric = [int(v) for v in reg.versions(name) if v.isdigit()]
    return str(max(numeric, default=0) + 1)


def _write_version(reg: Registry, card: ModelCard, model_path: Path, reference: Any) -> None:
    model_dir = reg.root / card.name
    final = model_dir / card.version
    if final.exists():
        raise RegistryError(f"{card.name}:{card.version} already exists; versions are immutable (omit --version for the next one)")
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f".staging-{card.version}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        shutil.copyfile(model_path, staging / MODEL_FILE)
        if sha256_file(staging / MODEL_FILE) != card.sha256:
            raise RegistryError(f"{model_path} changed while it was being registered")
        reference.to_parquet(staging / REFERENCE_FILE, index=False)
        card_text = yaml.safe_dump(card.model_dump(mode="json", exclude_none=True), sort_keys=False, allow_unicode=True)
        (staging / CARD_FILE).write_text(card_text)
        for item in staging.iterdir():
            with open(item, "rb") as fh:
                os.fsync(fh.fileno())
        # rename() onto an existing non-empty directory fails, so a concurrent writer of the
        # same version loses cleanly instead of mixing files.
        try:
            os.rename(staging, final)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise RegistryError(f"{card.name}:{card.version} already exists; versions are immutable") from exc
            raise RegistryError(f"cannot write {final}: {exc.strerror or exc}") from exc
        dir_fd = os.open(model_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
