"""Errors a client can see: one ``ApiError`` base, and the envelope they leave in.

Every error leaves Tollgate as the envelope of the unified API contract
(seeds/002): ``{"error": {"code", "message", "type"}}``. Domain errors subclass
``ApiError`` beside their domain. This module is plain Python, importable by
workers: the translator that renders errors as HTTP responses, the framework's
own included, is ``gateway/responses.py``.
"""

from typing import ClassVar

import msgspec


class ApiError(Exception):
    status: ClassVar[int] = 400
    code: ClassVar[str] = "invalid_request"
    type: ClassVar[str] = "invalid_request_error"
    default_message: ClassVar[str] = "Invalid request parameters"

    def __init__(self, message: str | None = None, *, headers: dict[str, str] | None = None):
        self.message = message or self.default_message
        self.headers = headers or {}
        super().__init__(self.message)


class InvalidRequest(ApiError):
    """A request field is missing, of the wrong type or out of range."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"
    type = "authentication_error"
    default_message = "Invalid or expired token"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"
    type = "permission_error"
    default_message = "Not allowed"


class ModelAccessDenied(ApiError):
    status = 403
    code = "model_access_denied"
    type = "invalid_request_error"

    def __init__(self, model: str) -> None:
        super().__init__(f"Token does not have access to model: {model}")


class NotFound(ApiError):
    status = 404
    code = "not_found"
    type = "invalid_request_error"
    default_message = "Not found"


class Conflict(ApiError):
    status = 409
    code = "conflict"
    type = "invalid_request_error"
    default_message = "Conflict"


class LinkExpired(ApiError):
    status = 410
    code = "link_expired"
    type = "invalid_request_error"
    default_message = "This link has expired"


class ServiceUnavailable(ApiError):
    status = 503
    code = "service_unavailable"
    type = "api_error"
    default_message = "Service temporarily unavailable, please retry"


class ErrorDetail(msgspec.Struct):
    code: str
    message: str
    type: str


class ErrorResponse(msgspec.Struct):
    """The error envelope, for the OpenAPI document."""

    error: ErrorDetail
