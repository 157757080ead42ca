"""The two reads clients poll, answered before the framework's routing.

``GET /v1/tasks/{id}`` (without ``Prefer``) and ``GET /v1/models`` are most of a
gateway's requests: async clients poll. Through litestar each paid its routing,
its dependency resolution (``KwargsModel``, signature models) and a response
object, about half of the request's CPU (docs/performance.md, "Hot reads"). This
ASGI layer sits between ``observe_requests`` (request id, metrics, access log) and
litestar, and answers those two requests itself with the very same steps the
route handlers take: the key from ``KeyCache``, one rate-limit check, the task
from ``services.finished`` or ``services.task_reads``, the model list from
``services.model_lists``.

Rules, so both ways answer alike (``tests/gateway/test_hot_reads.py``):

- Anything else goes to litestar untouched: another method or path, a query
  string, a ``Prefer`` header, an app not yet started.
- Before the rate-limit check nothing is counted, so a key that does not
  authenticate at once (missing, unknown, expired, PostgreSQL down on a cache
  miss) is handed to litestar, which answers the error as it always has.
- From the check on, an error is rendered here by ``responses.render_error``,
  the function litestar's exception handler renders with.
- The success headers are litestar's: ``content-type``, ``content-length``, the
  rate-limit fields (set on the scope's state for ``add_rate_limit_headers``, a
  ``before_send`` hook that the app's ``send`` already runs), and the route
  template on the scope for the metrics.
"""

from litestar import Litestar
from litestar.enums import ScopeType
from litestar.types import (
    ASGIApp,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Receive,
    Scope,
    Send,
)

from gateway.deps import RATE_HEADERS, Services
from gateway.responses import render_error
from gateway.tasks.routes import task_body

_TASKS = "/v1/tasks/"
_MODELS = "/v1/models"
_TASK_TEMPLATE = "/v1/tasks/{task_id}"  # as litestar names the route (its path_format)
_JSON = b"application/json"


class HotReads:
    """``handler`` (litestar's) with the two hot reads answered in front of it."""

    def __init__(self, app: Litestar, handler: ASGIApp) -> None:
        self._app = app
        self._handler = handler
        self.served = 0  # reads answered here (tests, profiling)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == ScopeType.HTTP
            and scope["method"] == "GET"
            and not scope["query_string"]
        ):
            path: str = scope["path"]
            if path == _MODELS:
                if await self._answer(scope, send, None):
                    return
            elif path.startswith(_TASKS):
                task_id = path[len(_TASKS) :]
                if task_id and "/" not in task_id and await self._answer(scope, send, task_id):
                    return
        await self._handler(scope, receive, send)

    async def _answer(self, scope: Scope, send: Send, task_id: str | None) -> bool:
        """Answer the read (the task ``task_id``, or the model list when None); False to
        leave it to litestar, having done nothing."""
        services: Services | None = getattr(self._app.state, "services", None)
        if services is None:
            return False
        authorization = None
        for name, value in scope["headers"]:
            if name == b"prefer":
                return False
            if name == b"authorization":
                authorization = value.decode("latin-1")
        try:
            principal = await services.keys.authenticate(authorization)
        except Exception:  # litestar authenticates again and answers the error
            return False
        self.served += 1
        scope["path_template"] = _MODELS if task_id is None else _TASK_TEMPLATE
        try:
            decision = await services.limiter.check(principal)
            scope["state"][RATE_HEADERS] = decision.headers()
            if task_id is None:
                prices = await services.prices.current()
                body = services.model_lists.body(
                    prices, principal.user_group, principal.allowed_models
                )
            else:
                found = services.finished.get(principal.tenant_id, task_id)
                if found is None:
                    found = task_body(
                        services, await services.task_reads.read(principal.tenant_id, task_id)
                    )
                body = found
            status, headers = 200, dict[str, str]()
        except Exception as exc:
            status, body, headers = render_error(exc, "GET", scope["path"])
        await _send(send, status, body, headers)
        return True


async def _send(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    raw = [(b"content-type", _JSON), (b"content-length", str(len(body)).encode())]
    raw += [
        (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()
    ]
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": status,
        "headers": raw,
    }
    end: HTTPResponseBodyEvent = {"type": "http.response.body", "body": body, "more_body": False}
    await send(start)
    await send(end)
