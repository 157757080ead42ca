"""The route layer's HTTP shapes: JSON responses, and the one translator of errors.

``json_response`` encodes with ``encode_json`` (exact decimals). ``exception_handler``
renders every error as the envelope of ``gateway/errors.py``: an ``ApiError`` by its
own status, code and message; the framework's own exceptions (validation, unknown
route, method, body too large) by their status. A dependency that cannot be reached
(PostgreSQL or Redis down, restarting, refusing connections, a pool timing out) is
503 ``service_unavailable`` with ``Retry-After``, never a 500. An unexpected exception
is logged with its trace and answered 500 ``internal_error`` with a fixed message: no
trace reaches a client. Only route modules and ``app.py`` import this (it loads litestar).
"""

import logging
import re
from types import TracebackType
from typing import Any

import asyncpg
import msgspec
import redis.exceptions
from litestar import Request, Response
from litestar.exceptions import HTTPException, SerializationException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from gateway.errors import ApiError, ErrorResponse, ServiceUnavailable
from gateway.tasks.schemas import encode_json

logger = logging.getLogger("tollgate.errors")

_encoder = msgspec.json.Encoder()

JSON = "application/json"


def json_response(value: object, status: int = 200) -> Response[Any]:
    """``value`` as a JSON response, encoded by ``encode_json`` (exact decimals)."""
    return Response(content=encode_json(value), media_type=JSON, status_code=status)


def encoded_response(body: bytes) -> Response[Any]:
    """A 200 JSON response of a body ``encode_json`` made earlier (a cached one)."""
    return Response(content=body, media_type=JSON)


# Framework statuses that have no ApiError of their own.
_FRAMEWORK_CODES: dict[int, tuple[str, str]] = {
    400: ("invalid_request", "invalid_request_error"),
    401: ("unauthorized", "authentication_error"),
    403: ("forbidden", "permission_error"),
    404: ("not_found", "invalid_request_error"),
    405: ("method_not_allowed", "invalid_request_error"),
    413: ("request_too_large", "invalid_request_error"),
    415: ("unsupported_media_type", "invalid_request_error"),
    429: ("rate_limit_exceeded", "rate_limit_error"),
    503: ("service_unavailable", "api_error"),
}


def error_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI entries for the error statuses a route can answer.

    Every route that uses this reads PostgreSQL or Redis, so 503 (a dependency down) is
    always among them.
    """
    described = {
        400: "Invalid request: the message names the field",
        401: "Missing, unknown or revoked key",
        402: "Insufficient quota: top up the account",
        403: "The key may not use this model, lacks the scope, or its tenant is suspended",
        404: "Not found",
        409: "Conflict (an Idempotency-Key reused with another body)",
        410: "The link has expired",
        413: "Request body too large",
        429: "A rate limit or the cap on tasks in flight was hit; see Retry-After",
        503: "A dependency (PostgreSQL, Redis) is unreachable, or the model is "
        "overloaded; retry after Retry-After seconds",
    }
    return {
        status: ResponseSpec(
            data_container=ErrorResponse, description=described[status], generate_examples=False
        )
        for status in sorted({*statuses, 503})
    }


def admin_error_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """``error_responses`` for an admin route: its 401 is about the admin token."""
    found = error_responses(*statuses)
    if 401 in found:
        found[401] = ResponseSpec(
            data_container=ErrorResponse,
            description="Missing or wrong admin token (TOLLGATE_ADMIN_TOKEN)",
            generate_examples=False,
        )
    if 409 in found:
        found[409] = ResponseSpec(
            data_container=ErrorResponse,
            description="Conflict: a name in use, an idempotency key reused for another "
            "change, or nothing left to refund or deliver; the message says which",
            generate_examples=False,
        )
    return found


def envelope(code: str, message: str, type_: str) -> bytes:
    return _encoder.encode({"error": {"code": code, "message": message, "type": type_}})


_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]+)`")
_MISSING_FIELD = re.compile(r"missing required field `([^`]+)`")


def _validation_message(exc: ValidationException) -> str:
    """Name the field from litestar's validation detail ("seed: Expected `int`...")."""
    extra: Any = exc.extra
    if isinstance(extra, list) and extra and isinstance(extra[0], dict):
        key = str(extra[0].get("key") or "")
        message = str(extra[0].get("message") or "is invalid")
        if found := _UNKNOWN_FIELD.search(message):
            return f"{found[1]}: unknown field"
        if found := _MISSING_FIELD.search(message):
            return f"{found[1]}: is required"
        if key and key != "data":
            # A parameter named after a Python keyword (``from_``, aliased ``from``)
            # is reported by its name on the wire.
            return f"{key.removesuffix('_')}: {message}"
        return f"body: {message}"
    return exc.detail or "Invalid request"


def _is_data_exception(exc: Exception) -> bool:
    """PostgreSQL's class 22 (data exception) errors, through SQLAlchemy and asyncpg."""
    if not isinstance(exc, DBAPIError):
        return False
    sqlstate = getattr(exc.orig, "sqlstate", None) or getattr(
        getattr(exc.orig, "__cause__", None), "sqlstate", None
    )
    return isinstance(sqlstate, str) and sqlstate.startswith("22")


# Seconds a client is told to wait when PostgreSQL or Redis cannot be reached.
UNAVAILABLE_RETRY_AFTER = "2"

# SQLSTATE classes that mean "the server is not there for you right now": 08 connection
# exception, 53 insufficient resources (too many connections), 57P operator intervention
# (shutting down, starting up, crash recovery).
_UNAVAILABLE_SQLSTATES = ("08", "53", "57P")
# Modules whose OSError (refused, reset, no such socket file, timed out) is a dependency's.
_CLIENT_MODULES = ("asyncpg", "sqlalchemy", "redis", "gateway.db")


def _raised_in_a_client(tb: TracebackType | None) -> bool:
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", ""))
        if module.startswith(_CLIENT_MODULES):
            return True
        tb = tb.tb_next
    return False


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc``, the DBAPI error SQLAlchemy wraps, and their causes and contexts."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo and len(seen) < 16:
        found = todo.pop()
        if found is None or any(found is s for s in seen):
            continue
        seen.append(found)
        todo += [getattr(found, "orig", None), found.__cause__, found.__context__]
    return seen


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says PostgreSQL or Redis cannot be reached (not a bug, not bad input)."""
    for found in _chain(exc):
        if isinstance(found, PoolTimeout):
            return True
        if isinstance(found, DBAPIError) and found.connection_invalidated:
            return True
        if isinstance(found, asyncpg.PostgresConnectionError):
            return True  # 08xxx
        closed = "clos" in str(found)  # "connection is closed", "pool is closing"
        if isinstance(found, asyncpg.InterfaceError) and closed:
            return True
        if isinstance(found, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
            return True
        sqlstate = getattr(found, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_UNAVAILABLE_SQLSTATES):
            return True
        if isinstance(found, OSError) and _raised_in_a_client(found.__traceback__):
            return True  # refused, reset, the unix socket gone, a connect timing out
    return False


def _unavailable(method: str, path: str, exc: Exception) -> tuple[int, bytes, dict[str, str]]:
    logger.warning("dependency unavailable on %s %s: %s: %s", method, path, type(exc).__name__, exc)
    return (
        503,
        envelope("service_unavailable", ServiceUnavailable.default_message, "api_error"),
        {"Retry-After": UNAVAILABLE_RETRY_AFTER},
    )


def exception_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    status, body, headers = render_error(exc, request.method, request.url.path)
    return Response(content=body, status_code=status, media_type=JSON, headers=headers or None)


def render_error(exc: Exception, method: str, path: str) -> tuple[int, bytes, dict[str, str]]:
    """The status, envelope and headers of the answer to ``exc`` (raised serving
    ``method path``): litestar's exception handler, and the hot reads (gateway/hot_reads.py)."""
    if isinstance(exc, ApiError):
        headers = exc.headers
        if exc.status == 503 and "Retry-After" not in headers:
            headers = {**headers, "Retry-After": UNAVAILABLE_RETRY_AFTER}
        return exc.status, envelope(exc.code, exc.message, exc.type), headers
    if isinstance(exc, ValidationException):
        message = _validation_message(exc)
        return 400, envelope("invalid_request", message, "invalid_request_error"), {}
    if isinstance(exc, HTTPException) and isinstance(exc.__cause__, SerializationException):
        message = f"body: malformed JSON ({exc.detail})"
        return 400, envelope("invalid_request", message, "invalid_request_error"), {}
    if isinstance(exc, HTTPException) and exc.status_code < 500:
        code, type_ = _FRAMEWORK_CODES.get(
            exc.status_code, ("invalid_request", "invalid_request_error")
        )
        message = exc.detail or code.replace("_", " ")
        if exc.status_code == 413:
            message = "Request body is too large"
        return exc.status_code, envelope(code, message, type_), dict(exc.headers or {})
    if isinstance(exc, HTTPException) and exc.status_code == 503:
        return _unavailable(method, path, exc)
    if is_unavailable(exc):
        return _unavailable(method, path, exc)
    if _is_data_exception(exc):
        # A value PostgreSQL cannot store (too long, invalid characters) that a
        # check upstream missed: the client's input, so a 400, never a 500.
        logger.warning("data exception on %s %s: %s", method, path, exc)
        message = "A value in the request cannot be stored (too long or invalid characters)"
        return 400, envelope("invalid_request", message, "invalid_request_error"), {}
    logger.exception("unhandled error on %s %s", method, path)
    return 500, envelope("internal_error", "Internal server error", "api_error"), {}
