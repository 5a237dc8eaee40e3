"""The model card: everything Vigil knows about one model version, as pydantic models.

A card sits beside each artefact (``models/<name>/<version>/card.yaml``). Every
other part of Vigil reads it: validation takes the feature specs, the runtime
the ONNX signature, routing the fallback, metrics the prediction quantiles, the
prediction log the reserved column names.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PREDICTION_COLUMN = "prediction"
"""Column of the stored reference data (and the prediction log) holding the model's own output (label or value)."""
SCORE_COLUMN = "prediction_score"
"""Column of the stored reference data (and the prediction log) holding the positive-class score (binary classifiers)."""
RESERVED_COLUMNS = frozenset({"time", "request_id", "index", "model", "date", "version", "variant", "reason",
                              PREDICTION_COLUMN, SCORE_COLUMN})
"""Columns the prediction log writes itself: no feature may take one of these names."""

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
