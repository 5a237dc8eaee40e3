"""Errors that carry their HTTP status, and the one place that turns them into bodies.

Every refusal a client can see is a :class:`VigilError`; the HTTP layer calls
:func:`error_body` and never formats errors itself, so the body shape is the
same everywhere: ``{"error": {"code", "message", "details"}}``.
"""

from __future__ import annotations

from typing import Any


class VigilError(Exception):
    """Base class: a message for humans, a stable ``code`` for programs, and a status."""

    status_code = 500
    code = "internal_error"

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


class RequestTimeout(VigilError):
    """The request ran past the request timeout."""

    status_code = 504
    code = "timeout"


class RegistryError(VigilError):
    """A model cannot be registered or read from the registry; the message says why."""

    status_code = 400
    code = "registry_error"


def error_body(error: VigilError) -> dict[str, Any]:
    """The JSON body for an error, in the one shape clients can rely on."""
    return {"error": {"code": error.code, "message": error.message, "details": error.details}}
