"""Redeeming a code from the console: the API's ``POST /v1/account/redeem`` for the
signed-in user (``gateway/redemption/service.py``), with its attempt limit counted per
console user instead of per key."""

from typing import Any

from litestar import Request, get, post
from litestar.datastructures import State
from litestar.response import Template

from gateway.account import service as account
from gateway.console.web import ViewerDep, form_of, render
from gateway.deps import ServicesDep
from gateway.errors import ApiError
from gateway.redemption import service as redemption

TENANT = {"role": "tenant"}


async def _page(
    viewer: ViewerDep, services: ServicesDep, status_code: int = 200, **extra: Any
) -> Template:
    async with services.sessions() as db:
        found = await account.tenant_account(db, services.settings, viewer.tenant_id)
    context: dict[str, Any] = {
        "balance": found["balance"],
        "available": found["available"],
        "per_minute": services.settings.redeem_rate_limit_per_minute,
        "error": None,
        "redeemed": None,
    }
    return render(viewer, "redeem.html", status_code, **{**context, **extra})


@get("/redeem", opt=TENANT)
async def redeem_page(viewer: ViewerDep, services: ServicesDep) -> Template:
    return await _page(viewer, services)


@post("/redeem", opt=TENANT, status_code=200)
async def redeem(
    request: Request[Any, Any, State], viewer: ViewerDep, services: ServicesDep
) -> Template:
    """Unknown (404), used (409), expired (410) or too many attempts (429): the page
    again with the reason and that status; nothing is credited."""
    form = await form_of(request)
    try:
        await redemption.check_attempt_rate(
            services.quick_redis,
            f"user:{viewer.user.id}",
            services.settings.redeem_rate_limit_per_minute,
        )
        async with services.sessions() as db, db.begin():
            redeemed = await redemption.redeem(db, viewer.tenant_id, form.get("code", ""))
    except ApiError as exc:
        return await _page(viewer, services, exc.status, error=f"{exc.message} ({exc.code})")
    return await _page(viewer, services, redeemed=redeemed)


ROUTES = [redeem_page, redeem]
