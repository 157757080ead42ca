"""What every console page shares: the guard that finds the viewer, CSRF, rendering.

The guard runs before every console handler: it loads the session named by the
``tollgate_console`` cookie (never a bearer key: ``/v1`` and ``/admin`` read only the
``Authorization`` header, and the console reads only its cookie), checks the CSRF
token on every state-changing request (the ``X-CSRF-Token`` header htmx sends, or the
form's ``_csrf`` field), and checks the handler's ``opt["role"]``: ``operator`` or
``tenant`` pages. Handlers marked ``opt={"public": True}`` (login, invitations) check
a pre-session CSRF cookie instead.
"""

import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from litestar import MediaType, Request, Response
from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie, State
from litestar.di import NamedDependency
from litestar.handlers.base import BaseRouteHandler
from litestar.response import Redirect, Template

from gateway.console.accounts import members_manage_keys
from gateway.console.models import ConsoleUser
from gateway.console.sessions import (
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_COOKIE,
    SESSION_TTL,
    ConsoleSession,
    SessionStore,
)
from gateway.deps import Services, services
from gateway.errors import ApiError
from gateway.tenants.models import Tenant

PREFIX = "/console"
LOGIN_COOKIE = "tollgate_console_login"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
VIEWER = "console_viewer"


class NotLoggedIn(Exception):
    """No valid session: the page answers with the login page (a redirect)."""


class Forbidden(ApiError):
    status = 403
    code = "forbidden"
    type = "permission_error"
    default_message = "You may not do this"


@dataclass(frozen=True, slots=True)
class Viewer:
    user: ConsoleUser
    session: ConsoleSession
    tenant: Tenant | None
    can_manage_keys: bool

    @property
    def tenant_id(self) -> str:
        if self.tenant is None:
            raise Forbidden("this page is for a tenant's users")
        return self.tenant.id


def session_store(svc: Services) -> SessionStore:
    # The queue name keeps test runs (each with its own queue names) apart in one Redis.
    return SessionStore(svc.quick_redis, svc.settings.queue_name)


async def submitted_csrf(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    given = connection.headers.get(CSRF_HEADER)
    if given is None and isinstance(connection, Request):
        form = await connection.form()
        value = form.get(CSRF_FIELD)
        given = value if isinstance(value, str) else None
    return given


async def console_guard(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    method = connection.scope.get("method", "GET")
    if handler.opt.get("public"):
        if method not in SAFE_METHODS:
            expected = connection.cookies.get(LOGIN_COOKIE)
            given = await submitted_csrf(connection)
            if not expected or not given or not hmac.compare_digest(given, expected):
                raise Forbidden("CSRF check failed: reload the page and try again")
        return
    svc = services(connection.app.state)
    session = await session_store(svc).load(connection.cookies.get(SESSION_COOKIE))
    if session is None:
        raise NotLoggedIn()
    if method not in SAFE_METHODS and not session.csrf_ok(await submitted_csrf(connection)):
        raise Forbidden("CSRF check failed: reload the page and try again")
    async with svc.sessions() as db:
        user = await db.get(ConsoleUser, session.user_id)
        if user is None or user.disabled_at is not None:
            raise NotLoggedIn()
        tenant = None if user.tenant_id is None else await db.get(Tenant, user.tenant_id)
        manage = user.role == "owner" or (
            user.role == "member"
            and tenant is not None
            and await members_manage_keys(db, tenant.id)
        )
    role = handler.opt.get("role")
    if role == "operator" and user.role != "operator":
        raise Forbidden("this page is for operators")
    if role == "tenant" and tenant is None:
        raise Forbidden("this page is for a tenant's users")
    if handler.opt.get("owner") and user.role != "owner":
        raise Forbidden("only the tenant's owner may do this")
    if handler.opt.get("keys") and not manage:
        raise Forbidden("your tenant's owner does not let members manage keys")
    connection.state[VIEWER] = Viewer(
        user=user, session=session, tenant=tenant, can_manage_keys=manage
    )


ViewerDep = NamedDependency[Viewer]


async def provide_viewer(request: Request[Any, Any, State]) -> Viewer:
    viewer: Viewer = request.state[VIEWER]
    return viewer


async def provide_console_services(request: Request[Any, Any, State]) -> Services:
    return services(request.app.state)


def render(
    viewer: Viewer | None, template: str, status_code: int = 200, **context: Any
) -> Template:
    return Template(
        template_name=template,
        context={"viewer": viewer, "csrf": viewer.session.csrf if viewer else "", **context},
        status_code=status_code,
        # Always HTML: a handler that may answer a redirect too (annotated ``Any``) would
        # otherwise send its refusal page as application/json, shown as text by browsers.
        media_type=MediaType.HTML,
    )


def session_cookie(request: Request[Any, Any, Any], session: ConsoleSession | None) -> Cookie:
    """The session cookie (or its removal): HttpOnly, SameSite=Lax, Secure over HTTPS."""
    return Cookie(
        key=SESSION_COOKIE,
        value=session.token if session else "",
        max_age=SESSION_TTL if session else 0,
        path=PREFIX,
        httponly=True,
        samesite="lax",
        secure=_secure(request),
    )


def _secure(request: Request[Any, Any, Any]) -> bool:
    return (
        request.url.scheme == "https" or services(request.app.state).settings.console_secure_cookies
    )


def login_cookie(request: Request[Any, Any, Any]) -> tuple[str, Cookie]:
    token = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(24)
    cookie = Cookie(
        key=LOGIN_COOKIE,
        value=token,
        path=PREFIX,
        httponly=True,
        samesite="lax",
        secure=_secure(request),
    )
    return token, cookie


def is_htmx(request: Request[Any, Any, Any]) -> bool:
    return request.headers.get("HX-Request") == "true"


def not_logged_in(request: Request[Any, Any, Any], _: Exception) -> Response[Any]:
    if is_htmx(request):
        return Response(b"", status_code=200, headers={"HX-Redirect": f"{PREFIX}/login"})
    return Redirect(f"{PREFIX}/login", status_code=303)


def api_error_page(request: Request[Any, Any, Any], exc: ApiError) -> Response[Any]:
    viewer = request.state.get(VIEWER)
    return render(viewer, "error.html", status_code=exc.status, message=exc.message)


async def form_of(request: Request[Any, Any, Any]) -> dict[str, str]:
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str)}
