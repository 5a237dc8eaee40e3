"""``POST /feedback``: ground truth for logged predictions, validated, deduplicated, stored, counted.

Two body shapes:

- ``{"model", "request_id", "actuals": [a0, a1, ...]}`` — one actual per instance of that request, in order;
- ``{"model", "items": [{"request_id", "index", "actual"}, ...]}`` — partial feedback.

Decisions (documented in the README): a request id that is not in the
prediction log (older than its retention, or never served) is refused with 404
and counted in ``vigil_feedback_unmatched_total``; nothing of a refused body is
stored. Feedback for an instance that already has feedback is acknowledged as
a duplicate and not counted again (the first actual stands).
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from monitoring.canary import CanaryComparison
from monitoring.feedback import FeedbackRow, PredictionIndex, write_feedback
from monitoring.metrics import FeedbackMetrics, VigilMetrics
from service.core.card import ModelCard
from service.core.errors import BadRequest, InvalidInput, ModelNotFound, VigilError, validation_problems


class UnknownRequest(VigilError):
    """Feedback names a request id the prediction log does not hold."""

    status_code = 404
    code = "unknown_request_id"


class FeedbackItem(BaseModel):
    """Ground truth for one instance of a served request."""

    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(min_length=1, max_length=64)
    index: int = Field(ge=0, le=99_999)
    actual: Any


class FeedbackWhole(BaseModel):
    """Feedback for every instance of one request, in order."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=64)
    request_id: str = Field(min_length=1, max_length=64)
    actuals: list[Any] = Field(min_length=1, max_length=10_000)

    def flat(self) -> list[FeedbackItem]:
        """Every (request id, index, actual) of the body."""
        return [FeedbackItem(request_id=self.request_id, index=i, actual=a) for i, a in enumerate(self.actuals)]


class FeedbackItems(BaseModel):
    """Feedback for chosen instances, possibly of several requests."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=64)
    items: list[FeedbackItem] = Field(min_length=1, max_length=10_000)

    def flat(self) -> list[FeedbackItem]:
        """Every (request id, index, actual) of the body."""
        return self.items


FeedbackRequest = FeedbackWhole | FeedbackItems
FEEDBACK_BODY: TypeAdapter[FeedbackRequest] = TypeAdapter(FeedbackRequest)


def _check_actual(card: ModelCard, value: Any) -> str | None:
    """Why ``value`` cannot be an actual for this model, or None."""
    if card.task == "regression":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {value!r}"
        if not math.isfinite(float(value)):
            return f"expected a finite number, got {value!r}"
        return None
    labels = card.labels or []
    if isinstance(value, bool) or not any(type(value) is type(label) and value == label for label in labels):
        return f"expected one of the labels {labels}, got {value!r}"
    return None


class FeedbackService:
    """Accepts feedback for the models of one worker."""

    def __init__(self, data_dir: Any, metrics: VigilMetrics | None) -> None:
        self.data_dir = data_dir
        self.metrics = metrics
        self.index = PredictionIndex(data_dir)
        self._recorders: dict[tuple[str, str], FeedbackMetrics] = {}

    def parse(self, payload: Any) -> FeedbackRequest:
        """Validate the body's shape."""
        try:
            return FEEDBACK_BODY.validate_python(payload)
        except ValidationError as exc:
            details = [{"field": key, "problem": problem} for key, problem in validation_problems(exc, top="body")]
            raise BadRequest("the body is not {model, request_id, actuals} or {model, items}", details,
                             code="invalid_request") from None

    def accept(self, request: FeedbackRequest, cards: dict[str, ModelCard],
               comparisons: dict[str, tuple[CanaryComparison, float]] | None = None) -> dict[str, Any]:
        """Validate, join, deduplicate, store and count; returns what was accepted.

        ``comparisons``: model -> (live canary comparison, its regression tolerance), fed with the
        ground truth of both variants' answers.
        """
        card = cards.get(request.model)
        if card is None:
            raise ModelNotFound(f"no model named '{request.model}'")
        items = request.flat()
        problems = [{"instance": i, "field": "actual", "problem": why}
                    for i, item in enumerate(items) if (why := _check_actual(card, item.actual)) is not None]
        if problems:
            raise InvalidInput(f"{len(problems)} actual(s) do not fit model '{card.name}' ({card.task})", problems[:100])
        self.index.refresh(card.name)
        rows: list[FeedbackRow] = []
        unknown: list[dict[str, Any]] = []
        duplicates = 0
        seen: set[tuple[str, int]] = set()
        for i, item in enumerate(items):
            logged = self.index.lookup(card.name, item.request_id)
            if logged is None or item.index not in logged:
                unknown.append({"instance": i, "field": "request_id",
                                "problem": f"no logged prediction {item.request_id}[{item.index}]"})
                continue
            key = (item.request_id, item.index)
            if key in seen or self.index.already_answered(card.name, *key):
                duplicates += 1
                continue
            seen.add(key)
            rows.append(FeedbackRow(item.request_id, item.index, item.actual, logged[item.index]))
        if unknown:
            if self.metrics is not None:
                self.metrics.feedback_unmatched.labels(card.name).inc(len(unknown))
            raise UnknownRequest(
                f"{len(unknown)} item(s) name predictions that are not in the prediction log (never served, past "
                "its retention, or not yet flushed: retry in a few seconds); nothing was stored", unknown[:100])
        if rows:
            write_feedback(self.data_dir, card.name, card.task, rows)
            self.index.mark_answered(card.name, rows)
            self._count(card, rows)
            if comparisons and card.name in comparisons:
                self._compare(card, rows, *comparisons[card.name])
        return {"model": card.name, "accepted": len(rows), "duplicates": duplicates}

    def _compare(self, card: ModelCard, rows: list[FeedbackRow], comparison: CanaryComparison,
                 regression_tolerance: float) -> None:
        """Feed ground truth of a live canary's and its stable's answers to their comparison."""
        versions = {"stable": comparison.stable_version, "canary": comparison.canary_version}
        span = 1.0
        if card.prediction_range is not None:
            span = max(card.prediction_range.max - card.prediction_range.min, 1e-9)
        for row in rows:
            variant = row.prediction.variant
            if row.prediction.reason is not None or versions.get(variant) != row.prediction.version:
                continue  # fallback answers and other versions say nothing about this pair
            if card.task == "regression":
                missed = abs(float(row.actual) - float(row.prediction.prediction)) > regression_tolerance * span
            else:
                missed = str(row.actual) != str(row.prediction.prediction)
            comparison.variant(variant).record_feedback(missed)

    def _count(self, card: ModelCard, rows: list[FeedbackRow]) -> None:
        if self.metrics is None:
            return
        regression = card.task == "regression"
        for row in rows:
            key = (card.name, row.prediction.version)
            recorder = self._recorders.get(key)
            if recorder is None:
                version_card = card if card.version == row.prediction.version else card.model_copy(
                    update={"version": row.prediction.version})
                recorder = self._recorders[key] = self.metrics.feedback_recorder(version_card)
            recorder.record(row.prediction.variant, row.prediction.prediction, row.actual, regression)
