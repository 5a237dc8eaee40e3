"""Request bodies: parsing and validating ``/predict`` input against a model card.

The instance schema of each model is a pydantic model built from its card
(strict types, finite numbers only, unknown features refused), so what the
service accepts is exactly what the card and the OpenAPI document say.
Errors are collected per instance and field, never raised as stack traces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import orjson
from pydantic import (
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    with_config,
)
from typing_extensions import NotRequired, TypedDict

from service.core.card import FeatureSpec, ModelCard
from service.core.errors import BadRequest, InvalidInput, PayloadTooLarge
from service.core.predictor import Batch

FiniteFloat = Annotated[float, Strict(), AllowInfNan(False)]
_NUMBER_TYPES = frozenset({float, int})
MAX_MODEL_NAME = 64
MAX_KEY = 256
_INT_TYPE = frozenset({int})


class PredictRequest(BaseModel):
    """Body of ``POST /predict``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME, description="Registered model name.")
    instances: list[dict[str, Any]] = Field(
        min_length=1, description="Rows to predict: feature name -> value, as the model card lists them."
    )
    key: str | None = Field(
        None, max_length=MAX_KEY, description="Optional routing key: the same key always reaches the same variant."
    )


_ENVELOPE = TypeAdapter(PredictRequest)
_LENIENT_JSON: TypeAdapter[Any] = TypeAdapter(Any)


def parse_json(body: bytes) -> Any:
    """Parse a request body; NaN/Infinity/overflowing numbers survive as floats so validation can name their field."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as strict_error:
        # orjson refuses NaN, Infinity and 1e400 outright. Re-read leniently so the
        # client learns which field holds the bad number, not just a column offset.
        try:
            return _LENIENT_JSON.validate_json(body)
        except ValidationError:
            raise BadRequest(f"malformed JSON: {strict_error}", code="malformed_json") from None


_ENVELOPE_KEYS = frozenset({"model", "instances", "key"})


def parse_envelope(payload: Any, max_instances: int) -> PredictRequest:
    """Validate the request envelope (model, instances, key), before the model's own schema."""
    if isinstance(payload, dict):
        instances = payload.get("instances")
        if isinstance(instances, list) and len(instances) > max_instances:
            raise PayloadTooLarge(
                f"{len(instances)} instances in one request; the limit is {max_instances}",
                code="too_many_instances",
            )
        # The common, well-formed envelope is taken as is: pydantic would copy every
        # instance dict (a fifth of a 64-row request's time) only to find nothing wrong.
        # The checks are PredictRequest's own; anything else gets its errors named below.
        model, key = payload.get("model"), payload.get("key")
        if (payload.keys() <= _ENVELOPE_KEYS and type(model) is str and 0 < len(model) <= MAX_MODEL_NAME
                and (key is None or (type(key) is str and len(key) <= MAX_KEY))
                and type(instances) is list and instances and all(type(row) is dict for row in instances)):
            return PredictRequest.model_construct(model=model, instances=instances, key=key)
    try:
        return _ENVELOPE.validate_python(payload)
    except ValidationError as exc:
        details = [
            {"field": ".".join(str(p) for p in err["loc"]) or "body", "problem": _problem(err)}
            for err in exc.errors(include_url=False)
        ]
        raise BadRequest("the request body does not match {model, instances, key}", details, code="invalid_request") from None


def _feature_type(spec: FeatureSpec, max_string_length: int) -> Any:
    if spec.type == "string":
        base: Any = Annotated[str, Strict(), StringConstraints(max_length=max_string_length)]
    elif spec.type == "int":
        base = Annotated[int, Strict(), Field(ge=-(2**63), lt=2**63)]
    else:
        base = FiniteFloat
    return base | None if spec.nullable else base


def _problem(err: dict[str, Any]) -> str:
    kind = err["type"]
    value = err.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    if len(shown) > 60:
        shown = shown[:57] + "..."
    if kind == "missing":
        return "missing feature"
    if kind == "extra_forbidden":
        return "unknown feature"
    if kind == "finite_number":
        return f"expected a finite number, got {shown}"
    if kind in ("float_type", "int_type", "int_from_float"):
        wanted = "an integer" if kind != "float_type" else "a number"
        return f"expected {wanted}, got {'null' if value is None else shown}"
    if kind == "string_type":
        return f"expected a string, got {'null' if value is None else shown}"
    if kind == "string_too_long":
        return f"string longer than {err.get('ctx', {}).get('max_length')} characters"
    if kind == "dict_type":
        return f"expected an object of feature values, got {shown}"
    return f"{err['msg']} (got {shown})"


@dataclass(slots=True)
class InputQuality:
    """Per-feature counts of what was accepted but is worth watching."""

    missing: dict[str, int]
    out_of_range: dict[str, int]


class InstanceValidator:
    """Validates a request's instances against one model card and builds the model's batch."""

    def __init__(self, card: ModelCard, max_string_length: int = 1024) -> None:
        self.card = card
        self.names = card.feature_names
        fields = {}
        for spec in card.features:
            ftype = _feature_type(spec, max_string_length)
            fields[spec.name] = NotRequired[ftype] if spec.nullable else ftype
        instance = with_config(ConfigDict(extra="forbid"))(TypedDict(f"{card.name}_instance", fields))  # type: ignore[operator]
        self.adapter = TypeAdapter(list[instance])
        self.instance_schema = TypeAdapter(instance).json_schema()
        self.all_numeric = all(f.type != "string" for f in card.features)
        self.hashes_pii = card.hashes_pii
        """The card's ``hashes_pii``, read on every request: the log then keeps the instance dicts."""
        self.nullable = [f.name for f in card.features if f.nullable]
        numeric = [i for i, f in enumerate(card.features) if f.type != "string"]
        self._numeric_idx = np.array(numeric, dtype=np.intp)
        self._mins = np.array([card.features[i].min if card.features[i].min is not None else -np.inf for i in numeric])
        self._maxs = np.array([card.features[i].max if card.features[i].max is not None else np.inf for i in numeric])
        self._numeric_names = [card.features[i].name for i in numeric]
        self._bounds_lo = self._mins.tolist()
        self._bounds_hi = self._maxs.tolist()
        self._name_set = frozenset(self.names)
        self._int_columns = [i for i, f in enumerate(card.features) if f.type == "int"]
        self._nullable_columns = np.array([f.nullable for f in card.features], dtype=bool)

    def validate(self, instances: list[dict[str, Any]]) -> tuple[Batch, InputQuality]:
        """Check every instance; raise :class:`InvalidInput` listing every problem found."""
        matrix = self.numeric_matrix(instances) if self.all_numeric else None
        if matrix is not None:
            return (Batch(size=len(instances), matrix=matrix),
                    InputQuality(missing={}, out_of_range=self._out_of_range(matrix)))
        try:
            rows = self.adapter.validate_python(instances)
        except ValidationError as exc:
            details = []
            for err in exc.errors(include_url=False)[:100]:
                loc = err["loc"]
                entry: dict[str, Any] = {"instance": loc[0] if loc else None}
                if len(loc) > 1:
                    entry["field"] = str(loc[1])
                entry["problem"] = _problem(err)
                details.append(entry)
            raise InvalidInput(f"{len(exc.errors())} problem(s) in the instances for model '{self.card.name}'", details) from None
        size = len(rows)
        names = self.names
        has_nulls = False
        if self.nullable:
            for row in rows:
                if len(row) != len(names) or None in row.values():
                    has_nulls = True
                    break
        if self.all_numeric:
            if has_nulls:
                matrix = np.array([[np.nan if (v := row.get(n)) is None else v for n in names] for row in rows], dtype=np.float64)
            else:
                matrix = np.array([[row[n] for n in names] for row in rows], dtype=np.float64)
            batch = Batch(size=size, matrix=matrix, has_nulls=has_nulls)
            numeric = matrix
        else:
            columns = {n: [row.get(n) for row in rows] for n in names}
            batch = Batch(size=size, columns=columns, has_nulls=has_nulls)
            numeric = np.array(
                [[np.nan if (v := row.get(n)) is None else v for n in self._numeric_names] for row in rows],
                dtype=np.float64,
            ).reshape(size, len(self._numeric_names))
        missing: dict[str, int] = {}
        if has_nulls:
            for name in self.nullable:
                count = sum(1 for row in rows if row.get(name) is None)
                if count:
                    missing[name] = count
        return batch, InputQuality(missing=missing, out_of_range=self._out_of_range(numeric))

    def validate_matrix(self, matrix: np.ndarray) -> tuple[Batch, InputQuality]:
        """Check a numeric matrix (rows x the card's features, in card order) as :meth:`validate` checks instances.

        For inputs that arrive as numbers already (a decoded tensor), so no
        instance dicts are built. NaN is a null: accepted (and counted missing)
        where the feature is nullable, refused elsewhere like every ±inf;
        ``int`` features take integral values only. Raises
        :class:`InvalidInput` naming each row and feature, like :meth:`validate`.
        """
        assert self.all_numeric, "a matrix carries numeric features only"
        matrix = np.asarray(matrix, dtype=np.float64)
        size = len(matrix)
        finite = np.isfinite(matrix)
        has_nulls = False
        missing: dict[str, int] = {}
        details: list[dict[str, Any]] = []
        if not finite.all():
            nulls = np.isnan(matrix) & self._nullable_columns
            has_nulls = bool(nulls.any())
            for row, column in zip(*np.nonzero(~finite & ~nulls)):
                value = float(matrix[row, column])
                details.append({"instance": int(row), "field": self.names[column],
                                "problem": f"expected a finite number, got {value!r}"})
            if has_nulls:
                counts = nulls.sum(axis=0)
                missing = {self.names[i]: int(c) for i, c in enumerate(counts) if c}
        if self._int_columns:
            ints = matrix[:, self._int_columns]
            with np.errstate(invalid="ignore"):
                bad = np.isfinite(ints) & ((ints != np.floor(ints)) | (np.abs(ints) >= 2.0**63))
            for row, position in zip(*np.nonzero(bad)):
                column = self._int_columns[position]
                details.append({"instance": int(row), "field": self.names[column],
                                "problem": f"expected an integer, got {float(matrix[row, column])!r}"})
        if details:
            details.sort(key=lambda d: (d["instance"], self.names.index(d["field"])))
            raise InvalidInput(f"{len(details)} problem(s) in the instances for model '{self.card.name}'",
                               details[:100])
        return (Batch(size=size, matrix=matrix, has_nulls=has_nulls),
                InputQuality(missing=missing, out_of_range=self._out_of_range(matrix)))

    def instances_of(self, matrix: np.ndarray) -> list[dict[str, Any]]:
        """The instance dicts a matrix stands for (None for NaN, ``int`` features as integers), as a client would send them."""
        ints = set(self._int_columns)
        return [{name: None if v != v else (int(v) if i in ints else v) for i, (name, v) in enumerate(zip(self.names, row))}
                for row in matrix.tolist()]

    def numeric_matrix(self, instances: list[Any]) -> np.ndarray | None:
        """The float64 matrix of instances that are plainly valid, else None.

        Plainly valid: every instance has exactly the card's features, each a
        finite JSON number (an integer for ``int`` features). That is what
        nearly every request sends, and checking it with a few C-level passes is
        several times cheaper than the per-value schema validation, which still
        runs for anything else (nulls included) and names every problem.
        """
        names, expected = self.names, self._name_set
        for row in instances:
            if type(row) is not dict or row.keys() != expected:
                return None
        values = [row[name] for row in instances for name in names]
        if not set(map(type, values)) <= _NUMBER_TYPES:  # bool, str, None, lists: the schema says why
            return None
        width = len(names)
        for column in self._int_columns:
            if not set(map(type, values[column::width])) <= _INT_TYPE:
                return None
        try:
            matrix = np.array(values, dtype=np.float64).reshape(len(instances), width)
        except OverflowError:  # an integer beyond float range
            return None
        if not np.isfinite(matrix).all():
            return None
        if self._int_columns and (np.abs(matrix[:, self._int_columns]) >= 2.0**63).any():
            return None
        return matrix

    def _out_of_range(self, numeric: np.ndarray) -> dict[str, int]:
        out_of_range: dict[str, int] = {}
        if len(numeric) == 1:
            # One row (the common request): a Python pass is cheaper than five numpy calls.
            for name, value, low, high in zip(self._numeric_names, numeric[0].tolist(), self._bounds_lo, self._bounds_hi):
                if value < low or value > high:
                    out_of_range[name] = 1
            return out_of_range
        if numeric.size:
            with np.errstate(invalid="ignore"):
                outside = ((numeric < self._mins) | (numeric > self._maxs)).sum(axis=0)
            if outside.any():
                out_of_range = {self._numeric_names[i]: int(c) for i, c in enumerate(outside) if c}
        return out_of_range
