"""Heuristic fallback models: answers that cannot fail, in pure Python/NumPy.

Each registered model carries a fallback in its card, derived at registration
from the reference data unless the card declares one:

- classification: the class prior (majority label, probabilities = reference
  class shares), or a declared rule set;
- regression: the reference median of the target, a declared rule set, or the
  median per bucket of one declared feature.

:class:`HeuristicPredictor` implements the same :class:`~service.runtime.Predictor`
interface as the ONNX runtime, so routing treats both alike.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import numpy as np
from pydantic import ValidationError

from service.errors import RegistryError
from service.registry import (
    PREDICTION_COLUMN,
    BucketMedianFallback,
    MedianFallback,
    ModelCard,
    PriorFallback,
    RulesFallback,
)
from service.runtime import Batch, Predictions, Predictor

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
}


def derive_fallback(task: str, labels: list[Any] | None, reference: Any, target: str | None,
                    declared: dict[str, Any] | None = None) -> Any:
    """The card's fallback: the declared one (completed from the reference data), else prior or median.

    The target column is the truth to summarise; without one, the model's own
    reference predictions stand in for it.
    """
    truth = reference[target] if target and target in reference else reference[PREDICTION_COLUMN]
    truth = truth.dropna()
    if declared is not None:
        kind = declared.get("kind")
        try:
            if kind == "rules":
                return RulesFallback.model_validate(declared)
            if kind == "bucket_median":
                if task != "regression":
                    raise RegistryError("fallback kind 'bucket_median' is for regression models")
                return _bucket_medians(BucketMedianFallback.model_validate(declared), reference, truth)
        except ValidationError as exc:
            problems = "; ".join(f"fallback.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise RegistryError(f"invalid declared fallback: {problems}") from None
        if kind in ("prior", "median"):
            pass  # derived below; a declared prior/median is just a request for the default
        else:
            raise RegistryError(f"fallback kind must be one of rules, bucket_median, prior, median; got {kind!r}")
    if task == "classification":
        assert labels is not None
        shares = truth.astype(str).value_counts(normalize=True)
        return PriorFallback(probabilities={str(label): float(shares.get(str(label), 0.0)) for label in labels})
    return MedianFallback(value=float(np.median(truth.to_numpy(dtype=np.float64))))


def _bucket_medians(spec: BucketMedianFallback, reference: Any, truth: Any) -> BucketMedianFallback:
    if spec.feature not in reference:
        raise RegistryError(f"fallback.feature '{spec.feature}' is not a column of the reference data")
    feature = reference.loc[truth.index, spec.feature].to_numpy(dtype=np.float64)
    target = truth.to_numpy(dtype=np.float64)
    known = ~np.isnan(feature)
    edges = spec.edges or sorted(set(np.quantile(feature[known], [0.2, 0.4, 0.6, 0.8]).tolist()))
    overall = float(np.median(target))
    bucket = np.searchsorted(np.asarray(edges), feature[known], side="left")
    values = []
    for b in range(len(edges) + 1):
        members = target[known][bucket == b]
        values.append(float(np.median(members)) if len(members) else overall)
    return spec.model_copy(update={"edges": [float(e) for e in edges], "values": values,
                                   "default": spec.default if spec.default is not None else overall})


class HeuristicPredictor(Predictor):
    """Answers from the card's fallback; never raises for a batch the validator accepted."""

    def __init__(self, card: ModelCard) -> None:
        if card.fallback is None:
            raise RegistryError(f"{card.name}:{card.version} has no fallback in its card (re-register it)")
        self.card = card
        self.spec = card.fallback
        self._labels = list(card.labels or [])
        self._label_index = {str(label): i for i, label in enumerate(self._labels)}
        self._positions = {name: i for i, name in enumerate(card.feature_names)}
        self.load_seconds = 0.0

    def predict(self, batch: Batch, budget_seconds: float | None = None) -> Predictions:
        """One answer per row from the prior, the median, the rules or the bucket medians."""
        spec = self.spec
        n = batch.size
        if isinstance(spec, PriorFallback):
            shares = np.array([spec.probabilities[str(label)] for label in self._labels], dtype=np.float64)
            majority = self._labels[int(shares.argmax())]
            return Predictions(labels=[majority] * n, probabilities=np.tile(shares, (n, 1)))
        if isinstance(spec, MedianFallback):
            return Predictions(values=np.full(n, spec.value, dtype=np.float64))
        if isinstance(spec, BucketMedianFallback):
            column = np.array([np.nan if v is None else float(v) for v in self._column(batch, spec.feature)])
            buckets = np.searchsorted(np.asarray(spec.edges), column, side="left")
            values = np.asarray(spec.values)[np.minimum(buckets, len(spec.values) - 1)]
            return Predictions(values=np.where(np.isnan(column), spec.default or 0.0, values))
        assert isinstance(spec, RulesFallback)
        columns = {rule.feature: self._column(batch, rule.feature) for rule in spec.rules}
        answers = [_first_rule(spec, columns, row) for row in range(n)]
        if self.card.task == "regression":
            return Predictions(values=np.asarray(answers, dtype=np.float64))
        probs = np.zeros((n, len(self._labels)))
        probs[np.arange(n), [self._label_index[str(a)] for a in answers]] = 1.0
        return Predictions(labels=[self._labels[self._label_index[str(a)]] for a in answers], probabilities=probs)

    def _column(self, batch: Batch, name: str) -> list[Any]:
        if batch.columns is not None:
            return batch.columns[name]
        assert batch.matrix is not None
        values = batch.matrix[:, self._positions[name]]
        return [None if np.isnan(v) else float(v) for v in values]


def _first_rule(spec: RulesFallback, columns: dict[str, list[Any]], row: int) -> Any:
    for rule in spec.rules:
        value = columns[rule.feature][row]
        if value is None:
            continue  # a null satisfies no rule
        try:
            if _OPS[rule.op](value, rule.threshold):
                return rule.then
        except TypeError:
            continue  # e.g. a string feature compared with a number: the rule does not apply
    return spec.default
