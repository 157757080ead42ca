"""A tenant's pages: overview, keys, webhooks, usage, and its users (redeeming a code:
``tenant_redeem.py``). They read and change through the API's own services.

Every query names the viewer's own tenant (``viewer.tenant_id``): an id from another
tenant in a URL is "not found", never that tenant's data.
"""

import json
from datetime import UTC, date, datetime
from typing import Any

from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.params import FromPath, FromQuery
from litestar.response import Template

from gateway.account import service as account
from gateway.console import accounts, queries
from gateway.console.web import PREFIX, ViewerDep, form_of, render
from gateway.db import utcnow
from gateway.deps import ServicesDep
from gateway.errors import ApiError, InvalidRequest
from gateway.tenants import keys
from gateway.tenants.models import Tenant, new_webhook_secret
from gateway.tenants.service import list_keys
from pricing.money import MoneyError, credits_from_micros, micros_from_text

TENANT = {"role": "tenant"}
KEYS = {"role": "tenant", "keys": True}
OWNER = {"role": "tenant", "owner": True}


@get("/overview", opt=TENANT)
async def overview(viewer: ViewerDep, services: ServicesDep) -> Template:
    """The API's account (``GET /v1/account``), the spend chart and the tasks in flight."""
    async with services.sessions() as db:
        found = await account.tenant_account(db, services.settings, viewer.tenant_id)
        spend = await queries.spend_per_day(db, viewer.tenant_id)
        flying: list[Any] = []
        for status in queries.OPEN:
            page, _ = await account.list_tasks(
                db, viewer.tenant_id, account.TaskFilter(status=status), limit=20
            )
            flying += page
    chart = {
        "days": [d.isoformat() for d, _ in spend],
        "credits": [float(credits_from_micros(m)) for _, m in spend],  # for drawing only
    }
    return render(
        viewer,
        "overview.html",
        balance=found["balance"],
        held=found["held"],
        available=found["available"],
        suspended=found["suspended"],
        spend_total=credits_from_micros(sum(m for _, m in spend)),
        spend=spend,
        chart=json.dumps(chart),
        in_flight=sorted(flying, key=lambda t: (t.created_at, t.id), reverse=True)[:20],
    )


async def _keys_page(viewer: ViewerDep, services: ServicesDep, **extra: Any) -> Template:
    async with services.sessions() as db:
        found = await list_keys(db, viewer.tenant_id)
        members = await accounts.members_manage_keys(db, viewer.tenant_id)
    tenant = viewer.tenant
    assert tenant is not None
    usable = [
        m.id
        for m in services.catalog.models
        if tenant.allowed_models is None or m.id in tenant.allowed_models
    ]
    context: dict[str, Any] = {
        "keys": [k for k in found if k.name != queries.CONSOLE_KEY_NAME],
        "usable_models": usable,
        "credits": credits_from_micros,
        "now": utcnow(),
        "members_manage_keys": members,
        "issued": None,
        "error": None,
    }
    return render(viewer, "keys.html", **{**context, **extra})


def _budget(form: dict[str, str], period: str) -> int | None:
    text = form.get(f"budget_{period}", "").strip()
    if not text:
        return None
    try:
        return micros_from_text(text)
    except MoneyError:
        raise InvalidRequest(f"budget_{period}", "must be a number of credits") from None


def _expiry(text: str) -> datetime | None:
    """The form's ``expires_at`` (a date and time in UTC, as ``datetime-local`` sends it)."""
    if not text.strip():
        return None
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidRequest("expires_at", "must be a date and time, YYYY-MM-DDTHH:MM") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


async def key_request_from_form(request: Request[Any, Any, State]) -> keys.OwnKeyRequest:
    """A new key as the API's ``POST /v1/keys`` takes it: name, models (none ticked: the
    tenant's), budgets in credits, expiry, and the key-management scope."""
    form = await request.form()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    models = sorted({m for m in form.getall("models", []) if isinstance(m, str) and m})
    return keys.OwnKeyRequest(
        name=fields.get("name", "").strip(),
        allowed_models=models or None,
        budgets={period: _budget(fields, period) for period in keys.PERIODS},
        expires_at=_expiry(fields.get("expires_at", "")),
        can_manage_keys=fields.get("can_manage_keys") == "on",
    )


@get("/keys", opt=TENANT)
async def keys_page(viewer: ViewerDep, services: ServicesDep) -> Template:
    return await _keys_page(viewer, services)


@post("/keys", opt=KEYS, status_code=200)
async def create_key(
    request: Request[Any, Any, State], viewer: ViewerDep, services: ServicesDep
) -> Template:
    try:
        wanted = await key_request_from_form(request)
        async with services.sessions() as db, db.begin():
            issued = await keys.create_tenant_key(db, services.catalog, viewer.tenant_id, wanted)
    except ApiError as exc:
        return await _keys_page(viewer, services, error=exc.message)
    return await _keys_page(viewer, services, issued=issued.secret)


@post("/keys/{key_id:str}/revoke", opt=KEYS, status_code=200)
async def revoke_key(key_id: FromPath[str], viewer: ViewerDep, services: ServicesDep) -> Template:
    async with services.sessions() as db, db.begin():
        await keys.revoke_tenant_key(db, viewer.tenant_id, key_id)
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
        report = await account.usage(
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
        report = await account.usage(
            db, viewer.tenant_id, _day(since, "since"), _day(until, "until")
        )
    return Response(
        account.usage_csv(report),
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
