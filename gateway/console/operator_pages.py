"""The operator's tenant pages: search and create tenants; one tenant's balance, top-ups
and adjustments (with a reason), group, limits and users; suspend, resume and delete
(``gateway/tenants/service.py``, as the admin API and the CLI).
"""

from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec
from litestar import Request, get, post
from litestar.datastructures import State
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect, Template

from gateway.console import accounts, queries
from gateway.console.web import PREFIX, ViewerDep, form_of, render
from gateway.deps import ServicesDep, UnitOfWorkDep
from gateway.errors import ApiError, InvalidRequest
from gateway.ledger.models import EntryKind
from gateway.ledger.schemas import CreditChange
from gateway.ledger.service import balance, change_credits
from gateway.limits.overrides import TenantLimits, set_tenant_limits
from gateway.tenants.service import create_tenant, delete_tenant, get_tenant, update_tenant
from pricing.money import credits_from_micros

OPERATOR = {"role": "operator"}
LIMIT_FIELDS = ("rate_limit_per_minute", "rate_limit_burst", "max_in_flight")


@get("/operator/tenants", opt=OPERATOR)
async def tenants_page(
    viewer: ViewerDep, services: ServicesDep, q: FromQuery[str] = ""
) -> Template:
    async with services.sessions() as db:
        found = await queries.search_tenants(db, q)
    rows = [
        {
            "tenant": t,
            "balance": credits_from_micros(t.balance_micros),
            "held": credits_from_micros(t.held_micros),
        }
        for t in found
    ]
    return render(viewer, "op_tenants.html", rows=rows, q=q, error=None)


@post("/operator/tenants", opt=OPERATOR, status_code=303)
async def create(
    request: Request[Any, Any, State], viewer: ViewerDep, uow: UnitOfWorkDep
) -> Redirect:
    form = await form_of(request)
    tenant = await create_tenant(
        uow.session, name=form.get("name", ""), user_group=form.get("group") or "default"
    )
    return Redirect(f"{PREFIX}/operator/tenants/{tenant.id}", status_code=303)


async def _tenant_page(
    viewer: ViewerDep, services: ServicesDep, tenant_id: str, **extra: Any
) -> Template:
    async with services.sessions() as db:
        tenant = await get_tenant(db, tenant_id)
        held = await balance(db, tenant_id)
        users = await accounts.list_users(db, tenant_id)
    context: dict[str, Any] = {
        "tenant": tenant,
        "balance": credits_from_micros(held.balance_micros),
        "held": credits_from_micros(held.held_micros),
        "available": credits_from_micros(held.available_micros),
        "users": users,
        "groups": sorted((await services.prices.current()).groups),
        "models": [m.id for m in services.catalog.models],
        "message": None,
        "error": None,
        "link": None,
    }
    return render(viewer, "op_tenant.html", **{**context, **extra})


@get("/operator/tenants/{tenant_id:str}", opt=OPERATOR)
async def tenant_page(
    tenant_id: FromPath[str], viewer: ViewerDep, services: ServicesDep
) -> Template:
    return await _tenant_page(viewer, services, tenant_id)


def _amount(text: str) -> Decimal:
    try:
        return Decimal(text.strip())
    except InvalidOperation:
        raise InvalidRequest("amount", "must be a number of credits, e.g. 25 or -1.5") from None


@post("/operator/tenants/{tenant_id:str}/credits", opt=OPERATOR, status_code=200)
async def credits(
    request: Request[Any, Any, State],
    tenant_id: FromPath[str],
    viewer: ViewerDep,
    services: ServicesDep,
) -> Template:
    """A top-up (kind ``topup``) or an adjustment (signed, ``adjustment``), with its reason."""
    form = await form_of(request)
    kind = EntryKind.ADJUSTMENT if form.get("kind") == "adjustment" else EntryKind.TOPUP
    try:
        change = CreditChange(
            amount=_amount(form.get("amount", "")),
            reason=form.get("reason", "").strip(),
            idempotency_key=form.get("idempotency_key") or None,
        )
        async with services.sessions() as db, db.begin():
            await change_credits(db, tenant_id, change, kind)
    except ApiError as exc:
        return await _tenant_page(viewer, services, tenant_id, error=exc.message)
    return await _tenant_page(
        viewer, services, tenant_id, message=f"{kind.value} of {change.amount} credits applied."
    )


@post("/operator/tenants/{tenant_id:str}/settings", opt=OPERATOR, status_code=200)
async def settings(
    request: Request[Any, Any, State],
    tenant_id: FromPath[str],
    viewer: ViewerDep,
    services: ServicesDep,
) -> Template:
    """The tenant's group and limits (an empty field: the settings' default)."""
    form = await form_of(request)
    raw: dict[str, Any] = {}
    for name in LIMIT_FIELDS:
        value = form.get(name, "").strip()
        if value and not value.isdigit():
            return await _tenant_page(
                viewer, services, tenant_id, error=f"{name}: must be a whole number"
            )
        raw[name] = int(value) if value else None
    models = [m for m in form.get("allowed_models", "").replace(",", " ").split() if m]
    raw["allowed_models"] = models or None
    group = form.get("group", "").strip()
    try:
        groups = (await services.prices.current()).groups
        if group and group not in groups:
            raise InvalidRequest("group", f"must be one of {', '.join(sorted(groups))}")
        try:
            limits = msgspec.convert(raw, TenantLimits)
        except msgspec.ValidationError as exc:
            raise InvalidRequest(None, str(exc)) from None
        async with services.sessions() as db, db.begin():
            await set_tenant_limits(db, services.catalog, tenant_id, limits)
            if group:
                await update_tenant(db, tenant_id, user_group=group)
    except ApiError as exc:
        return await _tenant_page(viewer, services, tenant_id, error=exc.message)
    return await _tenant_page(viewer, services, tenant_id, message="Group and limits saved.")


@post("/operator/tenants/{tenant_id:str}/invite", opt=OPERATOR, status_code=200)
async def invite(
    request: Request[Any, Any, State],
    tenant_id: FromPath[str],
    viewer: ViewerDep,
    services: ServicesDep,
) -> Template:
    form = await form_of(request)
    try:
        async with services.sessions() as db, db.begin():
            await get_tenant(db, tenant_id)
            token = await accounts.invite(
                db,
                viewer.user,
                email=form.get("email", ""),
                role=form.get("role", "owner"),
                tenant_id=tenant_id,
            )
    except ApiError as exc:
        return await _tenant_page(viewer, services, tenant_id, error=exc.message)
    link = f"{str(request.base_url).rstrip('/')}{PREFIX}/invite/{token}"
    return await _tenant_page(viewer, services, tenant_id, link=link)


@post("/operator/tenants/{tenant_id:str}/state", opt=OPERATOR, status_code=200)
async def state(
    request: Request[Any, Any, State],
    tenant_id: FromPath[str],
    viewer: ViewerDep,
    services: ServicesDep,
) -> Template:
    """Suspend (``action=suspend``) or resume (``action=resume``) the tenant: reads go on,
    submits are refused (403 ``tenant_suspended``) within the keys' cache time."""
    form = await form_of(request)
    action = form.get("action")
    if action not in ("suspend", "resume"):
        raise InvalidRequest("action", "must be suspend or resume")
    try:
        async with services.sessions() as db, db.begin():
            await update_tenant(db, tenant_id, suspended=action == "suspend")
    except ApiError as exc:
        return await _tenant_page(viewer, services, tenant_id, error=exc.message)
    done = "suspended" if action == "suspend" else "resumed"
    return await _tenant_page(viewer, services, tenant_id, message=f"Tenant {done}.")


@post("/operator/tenants/{tenant_id:str}/delete", opt=OPERATOR, status_code=200)
async def delete(
    request: Request[Any, Any, State],
    tenant_id: FromPath[str],
    viewer: ViewerDep,
    services: ServicesDep,
) -> Template:
    """Delete the tenant for good (suspended, every key revoked; its ledger and tasks stay),
    once its name is typed in ``confirm``."""
    form = await form_of(request)
    async with services.sessions() as db:
        tenant = await get_tenant(db, tenant_id)
    if form.get("confirm", "").strip() != tenant.name:
        return await _tenant_page(
            viewer,
            services,
            tenant_id,
            error="confirm: type the tenant's name to delete it; nothing was changed",
        )
    async with services.sessions() as db, db.begin():
        await delete_tenant(db, tenant_id)
    return await _tenant_page(
        viewer, services, tenant_id, message="Tenant deleted: suspended for good, keys revoked."
    )


def _operators_page(viewer: ViewerDep, users: list[Any], **extra: Any) -> Template:
    return render(
        viewer,
        "users.html",
        **{
            "users": users,
            "link": None,
            "error": None,
            "invite_action": f"{PREFIX}/operator/users/invite",
            "invite_roles": ["operator"],
            "page": "Operators",
            **extra,
        },
    )


@get("/operator/users", opt=OPERATOR)
async def operators(viewer: ViewerDep, services: ServicesDep) -> Template:
    async with services.sessions() as db:
        found = await accounts.list_users(db, None)
    return _operators_page(viewer, found)


@post("/operator/users/invite", opt=OPERATOR, status_code=200)
async def invite_operator(
    request: Request[Any, Any, State], viewer: ViewerDep, services: ServicesDep
) -> Template:
    form = await form_of(request)
    link, error = None, None
    try:
        async with services.sessions() as db, db.begin():
            token = await accounts.invite(
                db, viewer.user, email=form.get("email", ""), role="operator", tenant_id=None
            )
        link = f"{str(request.base_url).rstrip('/')}{PREFIX}/invite/{token}"
    except ApiError as exc:
        error = exc.message
    async with services.sessions() as db:
        found = await accounts.list_users(db, None)
    return _operators_page(viewer, found, link=link, error=error)


ROUTES = [
    tenants_page,
    create,
    tenant_page,
    credits,
    settings,
    state,
    delete,
    invite,
    operators,
    invite_operator,
]
