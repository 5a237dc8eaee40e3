"""The response models and the OpenAPI document's pieces: what ``/docs.json`` says each route takes and answers.

The error model is derived from the shape :func:`service.core.errors.error_body`
writes (its ``ErrorBody`` type), so the document and the bodies cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, TypeAdapter

from service.core.errors import ErrorBody
from service.feedback import FEEDBACK_BODY
from service.inputs import PredictRequest


class Prediction(BaseModel):
    """One instance's answer: ``label`` and ``probabilities`` (classification) or ``value`` (regression)."""

    version: str
    variant: str
    label: int | str | None = None
    probabilities: dict[str, float] | None = None
    value: float | None = None


class PredictResponse(BaseModel):
    request_id: str
    model: str
    predictions: list[Prediction]


class AdminModelRequest(BaseModel):
    """Body of ``/admin/rollback`` and ``/admin/promote``."""

    model_config = {"extra": "forbid"}
    model: str = Field(min_length=1, max_length=64)
    to: str | None = Field(None, min_length=1, max_length=64)
    """Rollback only: serve this version as stable (and drop the canary) instead of just turning the canary off."""


def _openapi_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema as OpenAPI 3.0 (what BentoML publishes) accepts it.

    ``$defs`` are inlined (FastAPI does not hoist them from ``openapi_extra``),
    ``anyOf [X, null]`` becomes ``X`` with ``nullable``, and numeric
    ``exclusiveMinimum``/``exclusiveMaximum`` become the 3.0 boolean form.
    """
    defs = schema.get("$defs", {})

    def convert(node: Any) -> Any:
        if isinstance(node, list):
            return [convert(v) for v in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return convert(defs[ref.removeprefix("#/$defs/")])
        out = {k: convert(v) for k, v in node.items() if k != "$defs"}
        options = out.get("anyOf")
        if isinstance(options, list) and {"type": "null"} in options:
            rest = [o for o in options if o != {"type": "null"}]
            out.pop("anyOf")
            out.update(rest[0] if len(rest) == 1 else {"anyOf": rest})
            out["nullable"] = True
        for key, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if isinstance(out.get(key), (int, float)) and not isinstance(out.get(key), bool):
                out[bound] = out.pop(key)
                out[key] = True
        return out

    return convert(schema)


ERROR_SCHEMA = _openapi_schema(TypeAdapter(ErrorBody).json_schema())
"""Every error body, as OpenAPI 3.0."""

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": text, "content": {"application/json": {"schema": ERROR_SCHEMA}}}
    for code, text in {
        400: "Malformed JSON or a body that is not {model, instances, key}.",
        404: "No model of that name.",
        413: "Body over the size limit, or more instances than allowed.",
        415: "The body is not JSON.",
        422: "Instances that do not match the model's input schema; details name the instance and field.",
        401: "Admin endpoints: missing or wrong bearer token.",
        403: "Admin endpoints: disabled because VIGIL_ADMIN_TOKEN is not set.",
        409: "Admin endpoints: the action does not apply (e.g. no canary to promote or roll back).",
        429: "The worker is at its concurrency limit; retry after the Retry-After seconds.",
        503: "The model is registered but nothing can answer for it.",
        504: "The request ran past the request timeout.",
    }.items()
}


def request_body(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` declaring a required JSON body of the given pydantic JSON schema."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _openapi_schema(schema)}}}}


PREDICT_BODY = request_body(PredictRequest.model_json_schema())
FEEDBACK_REQUEST_BODY = request_body(FEEDBACK_BODY.json_schema())
ADMIN_BODY = request_body(AdminModelRequest.model_json_schema())
METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}}
