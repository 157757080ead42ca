"""Logging in and out, changing one's password, and accepting an invitation."""

from typing import Any

from litestar import Request, get, post
from litestar.datastructures import State
from litestar.params import FromPath
from litestar.response import Redirect, Template

from gateway.console import accounts
from gateway.console.web import (
    PREFIX,
    ViewerDep,
    form_of,
    login_cookie,
    render,
    session_cookie,
    session_store,
)
from gateway.deps import ServicesDep
from gateway.errors import ApiError

PUBLIC = {"public": True}


def _home(role: str) -> str:
    return f"{PREFIX}/operator/tenants" if role == "operator" else f"{PREFIX}/overview"


@get("/login", opt=PUBLIC)
async def login_page(request: Request[Any, Any, State]) -> Template:
    token, cookie = login_cookie(request)
    page = render(None, "login.html", login_csrf=token, error=None, email="")
    page.cookies.append(cookie)
    return page


@post("/login", opt=PUBLIC, status_code=200)
async def login(request: Request[Any, Any, State], services: ServicesDep) -> Any:
    form = await form_of(request)
    email, password = form.get("email", "").strip().lower(), form.get("password", "")
    address = request.client.host if request.client else "unknown"
    store = session_store(services)
    token, _ = login_cookie(request)

    def refused(message: str, status: int) -> Template:
        return render(None, "login.html", status, login_csrf=token, error=message, email=email)

    if await store.locked(email, address):
        return refused("Too many failed logins: try again in 15 minutes.", 429)
    async with services.sessions() as db, db.begin():
        user = await accounts.authenticate(db, email, password)
    if user is None:
        await store.failed(email, address)
        return refused("Wrong email or password.", 401)
    await store.succeeded(email)
    session = await store.create(user.id)
    response = Redirect(_home(user.role), status_code=303)
    response.cookies.append(session_cookie(request, session))
    return response


@post("/logout", status_code=303)
async def logout(
    request: Request[Any, Any, State], viewer: ViewerDep, services: ServicesDep
) -> Redirect:
    await session_store(services).end(viewer.session)
    response = Redirect(f"{PREFIX}/login", status_code=303)
    response.cookies.append(session_cookie(request, None))
    return response


@get("/")
async def home(viewer: ViewerDep) -> Redirect:
    return Redirect(_home(viewer.user.role), status_code=303)


@get("/account")
async def account_page(viewer: ViewerDep) -> Template:
    return render(viewer, "account.html", message=None, error=None)


@post("/account/password", status_code=200)
async def change_password(
    request: Request[Any, Any, State], viewer: ViewerDep, services: ServicesDep
) -> Template:
    form = await form_of(request)
    async with services.sessions() as db, db.begin():
        user = await db.get(type(viewer.user), viewer.user.id)
        assert user is not None
        if not accounts.password_matches(user.password_hash, form.get("current", "")):
            return render(
                viewer, "account.html", 400, message=None, error="current: wrong password"
            )
        try:
            await accounts.set_password(db, user, form.get("new", ""))
        except ApiError as exc:
            return render(viewer, "account.html", 400, message=None, error=exc.message)
    ended = await session_store(services).end_all(user.id, keep=viewer.session)
    message = f"Password changed; {ended} other session(s) ended."
    return render(viewer, "account.html", message=message, error=None)


@get("/invite/{token:str}", opt=PUBLIC)
async def invitation_page(
    request: Request[Any, Any, State], token: FromPath[str], services: ServicesDep
) -> Template:
    async with services.sessions() as db:
        invitation = await accounts.open_invitation(db, token)
    login_token, cookie = login_cookie(request)
    page = render(
        None, "invite.html", invitation=invitation, token=token, login_csrf=login_token, error=None
    )
    page.cookies.append(cookie)
    return page


@post("/invite/{token:str}", opt=PUBLIC, status_code=200)
async def accept_invitation(
    request: Request[Any, Any, State], token: FromPath[str], services: ServicesDep
) -> Any:
    form = await form_of(request)
    try:
        async with services.sessions() as db, db.begin():
            user = await accounts.accept_invitation(db, token, form.get("password", ""))
    except ApiError as exc:
        async with services.sessions() as db:
            invitation = await accounts.open_invitation(db, token)
        login_token, _ = login_cookie(request)
        return render(
            None,
            "invite.html",
            exc.status,
            invitation=invitation,
            token=token,
            login_csrf=login_token,
            error=exc.message,
        )
    session = await session_store(services).create(user.id)
    response = Redirect(_home(user.role), status_code=303)
    response.cookies.append(session_cookie(request, session))
    return response


ROUTES = [
    login_page,
    login,
    logout,
    home,
    account_page,
    change_password,
    invitation_page,
    accept_invitation,
]
