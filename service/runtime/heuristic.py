"""The heuristic fallback as a runtime: answers that cannot fail, in pure Python/NumPy.

Each registered model carries a fallback in its card (derived at registration,
:func:`service.registry.register.derive_fallback`, unless the card declares one):

- classification: the class prior (majority label, probabilities = reference
  class shares), or a declared rule set;
- regression: the reference median of the target, a declared rule set, or the
  median per bucket of one declared feature.

:class:`HeuristicPredictor` implements the same :class:`~service.core.predictor.Predictor`
interface as the ONNX runtime, so routing treats both alike.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import numpy as np

from service.core.card import BucketMedianFallback, MedianFallback, ModelCard, PriorFallback, RulesFallback
from service.core.errors import RegistryError
from service.core.predictor import Batch, Predictions, Predictor

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
}


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
