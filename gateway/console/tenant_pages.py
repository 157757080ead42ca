"""A tenant's pages: overview, keys, webhooks, usage, and its users.

Every query names the viewer's own tenant (``viewer.tenant_id``): an id from another
tenant in a URL is "not found", never that tenant's data.
"""

import json
from datetime import date
from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.params import FromPath, FromQuery
from litestar.response import Template

from gateway.console import accounts, queries
from gateway.console.web import PREFIX, ViewerDep, form_of, render
from gateway.db import utcnow
from gateway.deps import ServicesDep
from gateway.errors import ApiError, InvalidRequest
from gateway.ledger import reports
from gateway.ledger.service import balance
from gateway.limits.overrides import KeyLimits, set_key_limits
from gateway.tenants.models import Tenant, new_webhook_secret
from gateway.tenants.service import issue_key, list_keys
from pricing.money import credits_from_micros

TENANT = {"role": "tenant"}
KEYS = {"role": "tenant", "keys": True}
OWNER = {"role": "tenant", "owner": True}


@get("/overview", opt=TENANT)
async def overview(viewer: ViewerDep, services: ServicesDep) -> Template:
    async with services.sessions() as db:
        held = await balance(db, viewer.tenant_id)
        spend = await queries.spend_per_day(db, viewer.tenant_id)
        flying = await queries.in_flight(db, viewer.tenant_id)
    chart = {
        "days": [d.isoformat() for d, _ in spend],
        "credits": [float(credits_from_micros(m)) for _, m in spend],  # for drawing only
    }
    return render(
        viewer,
        "overview.html",
        balance=credits_from_micros(held.balance_micros),
        held=credits_from_micros(held.held_micros),
        available=credits_from_micros(held.available_micros),
        spend_total=credits_from_micros(sum(m for _, m in spend)),
        spend=spend,
        chart=json.dumps(chart),
        in_flight=flying,
    )


async def _keys_page(viewer: ViewerDep, services: ServicesDep, **extra: Any) -> Template:
    async with services.sessions() as db:
        keys = await list_keys(db, viewer.tenant_id)
        members = await accounts.members_manage_keys(db, viewer.tenant_id)
    tenant = viewer.tenant
    assert tenant is not None
    usable = [
        m.id
        for m in services.catalog.models
        if tenant.allowed_models is None or m.id in tenant.allowed_models
    ]
    context: dict[str, Any] = {
        "keys": [k for k in keys if k.name != queries.CONSOLE_KEY_NAME],
        "usable_models": usable,
        "credits": credits_from_micros,
        "members_manage_keys": members,
        "issued": None,
        "error": None,
    }
    return render(viewer, "keys.html", **{**context, **extra})


async def key_limits_from_form(request: Request[Any, Any, State], tenant: Tenant) -> KeyLimits:
    """A new key's models and budgets: never a model the tenant itself may not use."""
    form = await request.form()
    models = sorted({m for m in form.getall("models", []) if isinstance(m, str) and m})
    if tenant.allowed_models is not None:
        wider = sorted(set(models) - set(tenant.allowed_models))
        if wider:
            raise InvalidRequest("models", f"your tenant may not use {', '.join(wider)}")
    budgets: dict[str, Decimal | msgspec.UnsetType] = {}
    for period in ("total", "daily", "monthly"):
        text = form.get(f"budget_{period}")
        budgets[period] = msgspec.UNSET
        if isinstance(text, str) and text.strip():
            try:
                budgets[period] = Decimal(text.strip())
            except InvalidOperation:
                raise InvalidRequest(f"budget_{period}", "must be a number of credits") from None
    return KeyLimits(
        allowed_models=models or msgspec.UNSET,
        budget_total=budgets["total"],
        budget_daily=budgets["daily"],
        budget_monthly=budgets["monthly"],
    )


@get("/keys", opt=TENANT)
async def keys_page(viewer: ViewerDep, services: ServicesDep) -> Template:
    return await _keys_page(viewer, services)


@post("/keys", opt=KEYS, status_code=200)
async def create_key(
    request: Request[Any, Any, State], viewer: ViewerDep, services: ServicesDep
) -> Template:
    form = await form_of(request)
    try:
        async with services.sessions() as db, db.begin():
            tenant = await db.get(Tenant, viewer.tenant_id)
            assert tenant is not None
            limits = await key_limits_from_form(request, tenant)
            issued = await issue_key(db, tenant, name=form.get("name", "").strip())
            await set_key_limits(db, services.catalog, issued.key.id, limits)
    except ApiError as exc:
        return await _keys_page(viewer, services, error=exc.message)
    return await _keys_page(viewer, services, issued=issued.secret)


@post("/keys/{key_id:str}/revoke", opt=KEYS, status_code=200)
async def revoke_key(key_id: FromPath[str], viewer: ViewerDep, services: ServicesDep) -> Template:
    async with services.sessions() as db, db.begin():
        key = await queries.tenant_key(db, viewer.tenant_id, key_id)
        if key.revoked_at is None:
            key.revoked_at = utcnow()
            db.add(key)
    return await _keys_page(viewer, services)


@post("/keys/members", opt=OWNER, status_code=200)
async def members_keys(
    request: Request[Any, Any, State], viewer: ViewerDep, services: ServicesDep
) -> Template:
    form = await form_of(request)
    async with services.sessions() as db, db.begin():
        await accounts.set_members_manage_keys(db, viewer.tenant_id, form.get("allowed") == "on")
    return await _keys_page(viewer, services)


@get("/webhooks", opt=TENANT)
async def webhooks(viewer: ViewerDep, services: ServicesDep) -> Template:
    async with services.sessions() as db:
        deliveries = await queries.tenant_deliveries(db, viewer.tenant_id)
    return render(viewer, "webhooks.html", deliveries=deliveries, secret=None)


@post("/webhooks/secret", opt=OWNER, status_code=200)
async def webhook_secret(
    request: Request[Any, Any, State], viewer: ViewerDep, services: ServicesDep
) -> Template:
    """Reveal the signing secret, or replace it (``rotate=1``): an htmx fragment."""
    form = await form_of(request)
    async with services.sessions() as db, db.begin():
        tenant = await db.get(Tenant, viewer.tenant_id)
        assert tenant is not None
        if form.get("rotate") == "1":
            tenant.webhook_secret = new_webhook_secret()
            db.add(tenant)
        secret = tenant.webhook_secret
    return render(viewer, "secret.html", secret=secret)


def _day(value: str | None, field: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(field, "must be a date, YYYY-MM-DD") from None


@get("/usage", opt=TENANT)
async def usage(
    viewer: ViewerDep,
    services: ServicesDep,
    since: FromQuery[str | None] = None,
    until: FromQuery[str | None] = None,
) -> Template:
    async with services.sessions() as db:
        report = await reports.usage(
            db, viewer.tenant_id, _day(since, "since"), _day(until, "until")
        )
    return render(viewer, "usage.html", report=report, since=since or "", until=until or "")


@get("/usage.csv", opt=TENANT)
async def usage_csv(
    viewer: ViewerDep,
    services: ServicesDep,
    since: FromQuery[str | None] = None,
    until: FromQuery[str | None] = None,
) -> Response[str]:
    async with services.sessions() as db:
        report = await reports.usage(
            db, viewer.tenant_id, _day(since, "since"), _day(until, "until")
        )
    return Response(
        reports.usage_csv(report),
        media_type="text/csv",
        headers={"Content-Disposition": 'attachment; filename="usage.csv"'},
    )


@get("/users", opt=TENANT)
async def users(viewer: ViewerDep, services: ServicesDep) -> Template:
    async with services.sessions() as db:
        found = await accounts.list_users(db, viewer.tenant_id)
    return render(viewer, "users.html", users=found, link=None, error=None)


@post("/users/invite", opt=OWNER, status_code=200)
async def invite(
    request: Request[Any, Any, State], viewer: ViewerDep, services: ServicesDep
) -> Template:
    form = await form_of(request)
    link, error = None, None
    try:
        async with services.sessions() as db, db.begin():
            token = await accounts.invite(
                db,
                viewer.user,
                email=form.get("email", ""),
                role=form.get("role", "member"),
                tenant_id=viewer.tenant_id,
            )
        link = f"{str(request.base_url).rstrip('/')}{PREFIX}/invite/{token}"
    except ApiError as exc:
        error = exc.message
    async with services.sessions() as db:
        found = await accounts.list_users(db, viewer.tenant_id)
    return render(viewer, "users.html", users=found, link=link, error=error)


ROUTES = [
    overview,
    keys_page,
    create_key,
    revoke_key,
    members_keys,
    webhooks,
    webhook_secret,
    usage,
    usage_csv,
    users,
    invite,
]
