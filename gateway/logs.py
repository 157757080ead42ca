"""Structured logs: one JSON object per line, naming the request and the task it is about.

Rules:
- ``configure_logging(settings)`` is the one set-up, called by every process's
  entry point (``tollgate serve`` and the app factory, ``tollgate-worker``): one
  handler on the root logger writing JSON lines to stderr. Libraries' loggers
  (uvicorn, arq, httpx) propagate into it.
- A line carries ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
  ``request_id`` and ``task_id`` when known, and whatever the call passed as
  ``extra=`` under its own name; a traceback goes in ``exc_info``.
- Each HTTP request has an id: the client's ``X-Request-ID`` when it is sane
  (``sane_request_id``), else a new one; the response echoes it. A task keeps
  the id of the request that submitted it (``tasks.request_id``), and the
  worker's and the callback's lines name it: each job runs in ``scope()`` and
  calls ``bind(task_id=..., request_id=...)`` once it has read the task.
- Never in a log: API keys, webhook secrets, the admin token, the signing
  secret, upstream keys, Authorization headers, SQL parameters, and prompts
  (unless ``TOLLGATE_LOG_PROMPTS=true``). Code does not pass them; ``Redactor``
  removes them anyway, as defence in depth: known secret values, anything
  shaped like a key or a bearer token, ``[parameters: …]`` of database errors,
  and ``extra`` fields with a sensitive name.
"""

import itertools
import logging
import re
import secrets
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import IO, Any

import msgspec

from gateway.settings import Settings

REQUEST_ID_HEADER = "X-Request-ID"
MAX_REQUEST_ID = 100  # the width of tasks.request_id

# The request or task a line is about; one dict per request or job, so a bind() inside
# the handler is seen by the lines the request scope writes after it.
_context: ContextVar[dict[str, str] | None] = ContextVar("tollgate_log_context", default=None)

_SANE_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:+=/-]{{0,{MAX_REQUEST_ID - 1}}}")


def sane_request_id(value: str | None) -> str | None:
    """``value`` if it is fit to store and log as a request id (1–100 safe characters)."""
    if value and _SANE_ID.fullmatch(value):
        return value
    return None


# A random prefix per process and a counter: unique across processes (48 random bits),
# and cheaper than fresh randomness on every request.
_ID_PREFIX = secrets.token_hex(8)
_ids = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ids):016x}"


def start_request(request_id: str) -> Token[dict[str, str] | None]:
    """Name ``request_id`` on every line of this request; undo with ``end_request``."""
    return _context.set({"request_id": request_id})


def end_request(token: Token[dict[str, str] | None]) -> None:
    _context.reset(token)


def current_request_id() -> str | None:
    found = _context.get()
    return found.get("request_id") if found else None


def bind(**fields: str | None) -> None:
    """Name ``fields`` (e.g. ``task_id``; None: unknown) on the rest of the current
    request's or job's lines (see ``scope``)."""
    known = {name: value for name, value in fields.items() if value}
    found = _context.get()
    if found is None:
        _context.set(known)
    else:
        found.update(known)


@contextmanager
def scope() -> Iterator[None]:
    """A fresh logging context for one job: what ``bind`` adds inside ends with the block."""
    token = _context.set({})
    try:
        yield
    finally:
        _context.reset(token)


# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's coloured copy of the message
    "taskName",
}

_REDACTED = "[REDACTED]"
_SENSITIVE_NAME = re.compile(r"authorization|secret|password|passwd|token|api_?key|cookie", re.I)
_PROMPT_NAMES = frozenset({"prompt", "negative_prompt"})
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]+", re.I), rf"\1\2{_REDACTED}"),
    (
        re.compile(r"""(authorization["']?\s*[:=]\s*["']?)[^"'\s,}]+""", re.I),
        rf"\1{_REDACTED}",
    ),
    (re.compile(r"\btg_[A-Za-z0-9_-]{6,}"), f"tg_{_REDACTED}"),
    (re.compile(r"\bwhsec_[A-Za-z0-9+/=]{6,}"), f"whsec_{_REDACTED}"),
    # SQLAlchemy prints a failed statement's values; they may hold a prompt or a key.
    (
        re.compile(r"\[parameters: .*?\](?=\s*\(Background on this error|\s*$)", re.S),
        "[parameters: redacted]",
    ),
    # asyncpg names the value it could not encode.
    (re.compile(r"(query argument \$\d+: ).*?(?=\s\(|\n|$)"), rf"\1{_REDACTED}"),
)


class Redactor(logging.Filter):
    """Removes secrets from a record before any formatter sees it (see the module rules)."""

    def __init__(self, known_secrets: Iterable[str] = (), *, log_prompts: bool = False) -> None:
        super().__init__()
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = sorted({s for s in known_secrets if len(s) >= 8}, key=len, reverse=True)
        self._log_prompts = log_prompts

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, _REDACTED)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the line
            message = f"{record.msg} {record.args!r}"
        record.msg, record.args = self.redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        for name, value in list(record.__dict__.items()):
            if name in _STANDARD or name in ("request_id", "task_id"):
                continue
            if name in _PROMPT_NAMES:
                if not self._log_prompts:
                    setattr(record, name, "[withheld]")
            elif _SENSITIVE_NAME.search(name):
                setattr(record, name, _REDACTED)
            elif isinstance(value, str):
                setattr(record, name, self.redact(value))
        return True


class ContextFilter(logging.Filter):
    """Puts the current request id and task id on the record (an explicit ``extra`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        found = _context.get()
        if found:
            for name, value in found.items():
                if getattr(record, name, None) is None:
                    setattr(record, name, value)
        return True


_encoder = msgspec.json.Encoder(enc_hook=str)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ("request_id", "task_id"):
            value = getattr(record, name, None)
            if value:
                line[name] = value
        for name, value in record.__dict__.items():
            if name not in _STANDARD and name not in line and value is not None:
                line[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc_info"] = record.exc_text
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        try:
            return _encoder.encode(line).decode()
        except (TypeError, ValueError, OverflowError):
            return _encoder.encode({k: str(v) for k, v in line.items()}).decode()


class JsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler ``configure_logging`` installs (found again by its class)."""


def known_secrets(settings: Settings) -> list[str]:
    found = [settings.admin_token, settings.signing_secret]
    if settings.metrics_token:
        found.append(settings.metrics_token)
    found += [account.api_key for account in settings.upstreams.values()]
    found += [item.partition(":")[2].strip() for item in settings.encryption_keys.split(",")]
    return [secret for secret in found if secret]


def configure_logging(settings: Settings, stream: IO[str] | None = None) -> logging.Handler:
    """Send every log line of this process to ``stream`` (stderr) as JSON; idempotent."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, JsonHandler):
            root.removeHandler(handler)
    handler = JsonHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    handler.addFilter(Redactor(known_secrets(settings), log_prompts=settings.log_prompts))
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    # One line per upstream poll and download is noise (and URLs may carry upstream tokens).
    logging.getLogger("httpx").setLevel(
        logging.DEBUG if settings.log_level == "DEBUG" else logging.WARNING
    )
    return handler


class OutageLog:
    """A warning for the first of a run of failed calls, then debug lines for the rest of
    that minute: a Redis outage is one warning per component, not one per call."""

    def __init__(self, log: logging.Logger, quiet_seconds: float = 60.0) -> None:
        self._log = log
        self._quiet_seconds = quiet_seconds
        self._warned_at: float | None = None

    def failed(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if self._warned_at is not None and now - self._warned_at < self._quiet_seconds:
            self._log.debug(message, *args)
            return
        self._warned_at = now
        self._log.warning(
            message + " (more such failures in the next %.0f s at debug)",
            *args,
            self._quiet_seconds,
        )
