"""Errors that carry their HTTP status, and the one place that turns them into bodies.

Every refusal a client can see is a :class:`VigilError`; the HTTP layer calls
:func:`error_body` and never formats errors itself, so the body shape is the
same everywhere: ``{"error": {"code", "message", "details"}}``.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from typing_extensions import NotRequired, TypedDict


class ErrorDetail(TypedDict):
    """One problem in a request: which instance (row) and field (feature or input), and what is wrong."""

    instance: NotRequired[int | None]
    field: NotRequired[str | None]
    problem: str


class ErrorInfo(TypedDict):
    code: str
    message: str
    details: list[ErrorDetail]


class ErrorBody(TypedDict):
    """Every 4xx/5xx body has this shape; the OpenAPI error model is derived from it."""

    error: ErrorInfo


class VigilError(Exception):
    """Base class: a message for humans, a stable ``code`` for programs, and a status.

    ``headers`` go out with the error response (``Retry-After`` for 429, the
    request id once a request has one).
    """

    status_code = 500
    code = "internal_error"
    headers: dict[str, str] = {}

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class BadRequest(VigilError):
    """The request is not something Vigil can read (malformed JSON, wrong envelope)."""

    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None, code: str | None = None) -> None:
        super().__init__(message, details)
        if code:
            self.code = code


class InvalidInput(VigilError):
    """The instances do not match the model's input schema."""

    status_code = 422
    code = "invalid_input"


class ModelNotFound(VigilError):
    """No model of that name is registered."""

    status_code = 404
    code = "model_not_found"


class ModelNotReady(VigilError):
    """The model is registered but could not be loaded."""

    status_code = 503
    code = "model_not_ready"


class PayloadTooLarge(VigilError):
    """The body or the number of instances is over the configured limit."""

    status_code = 413
    code = "payload_too_large"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code:
            self.code = code


class UnsupportedMediaType(VigilError):
    """The request body is not JSON."""

    status_code = 415
    code = "unsupported_media_type"


class Unauthorized(VigilError):
    """An admin call without the right bearer token."""

    status_code = 401
    code = "unauthorized"


class Forbidden(VigilError):
    """Admin endpoints are disabled (no ``VIGIL_ADMIN_TOKEN`` set)."""

    status_code = 403
    code = "admin_disabled"


class Conflict(VigilError):
    """The action does not apply to the current state (e.g. no canary to promote)."""

    status_code = 409
    code = "conflict"


class Overloaded(VigilError):
    """The worker is at its concurrency limit."""

    status_code = 429
    code = "overloaded"
    headers = {"Retry-After": "1"}


class RequestTimeout(VigilError):
    """The request ran past the request timeout."""

    status_code = 504
    code = "timeout"


class RegistryError(VigilError):
    """A model cannot be registered or read from the registry; the message says why."""

    status_code = 400
    code = "registry_error"


def error_body(error: VigilError) -> ErrorBody:
    """The JSON body for an error, in the one shape clients can rely on."""
    return {"error": {"code": error.code, "message": error.message, "details": error.details}}  # type: ignore[typeddict-item]


def validation_problems(exc: ValidationError, prefix: str = "", top: str = "") -> list[tuple[str, str]]:
    """Each problem pydantic found, as (the dotted key it is at, what is wrong).

    ``prefix`` goes before every key (the section the model was read from);
    ``top`` names a problem with the whole value, which has no key of its own.
    Pydantic's validator wrappers (``function-after``) are not part of a key.
    """
    out = []
    for err in exc.errors(include_url=False):
        key = ".".join(str(part) for part in err["loc"] if part != "function-after")
        out.append((f"{prefix}{key}" if key else top, err["msg"]))
    return out


def describe_validation(exc: ValidationError, prefix: str = "", top: str = "") -> str:
    """:func:`validation_problems` as one line: ``key: problem; key: problem``."""
    return "; ".join(f"{key}: {problem}" for key, problem in validation_problems(exc, prefix, top))
