"""The operator's other pages: channels (live health, add, edit, enable/disable, test),
tasks across tenants, callback deliveries, and the ledger check."""

from typing import Any

from litestar import Request, get, post
from litestar.datastructures import State
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect, Template
from sqlmodel import col, select

from gateway.account.service import TaskFilter
from gateway.callbacks.models import CallbackDelivery
from gateway.channels import service as channels
from gateway.channels.models import ADAPTER_NAMES
from gateway.console import channel_health
from gateway.console.tenant_tasks import STATUSES, task_view
from gateway.console.web import PREFIX, ViewerDep, form_of, is_htmx, render
from gateway.deps import ServicesDep
from gateway.errors import ApiError, InvalidRequest
from gateway.ledger.service import check
from gateway.tasks.service import list_tasks

OPERATOR = {"role": "operator"}
NUMBERS = ("priority", "weight", "max_concurrency")


async def _channels_page(viewer: ViewerDep, services: ServicesDep, **extra: Any) -> Template:
    async with services.sessions() as db:
        found = await channels.list_channels(db)
        health = await channel_health.health(db, services.quick_redis, services.settings, found)
    context: dict[str, Any] = {
        "channels": found,
        "health": health,
        "adapters": ADAPTER_NAMES,
        "models": [m.id for m in services.catalog.models],
        "error": None,
        "test": None,
        "form": {},
    }
    return render(viewer, "op_channels.html", **{**context, **extra})


@get("/operator/channels", opt=OPERATOR)
async def channels_page(
    request: Request[Any, Any, State], viewer: ViewerDep, services: ServicesDep
) -> Template:
    page = await _channels_page(viewer, services)
    if is_htmx(request):  # the health table, refreshed every few seconds
        page.template_name = "op_channel_rows.html"
    return page


def _fields(form: dict[str, str], *, adding: bool) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name in ("name", "adapter", "base_url"):
        if form.get(name, "").strip():
            fields[name] = form[name].strip()
    if form.get("api_key", "").strip():  # left empty when editing: keep the stored key
        fields["api_key"] = form["api_key"].strip()
    if adding or form.get("models", "").strip():
        fields["models"] = channel_health.models_from_text(form.get("models", ""))
    for name in NUMBERS:
        value = form.get(name, "").strip()
        if value:
            try:
                fields[name] = int(value)
            except ValueError:
                raise InvalidRequest(name, "must be a whole number") from None
    return fields


@post("/operator/channels", opt=OPERATOR, status_code=200)
async def add_channel(
    request: Request[Any, Any, State], viewer: ViewerDep, services: ServicesDep
) -> Any:
    form = await form_of(request)
    try:
        async with services.sessions() as db, db.begin():
            await channels.create_channel(db, _fields(form, adding=True), services.catalog)
    except ApiError as exc:
        shown = {k: v for k, v in form.items() if k not in ("api_key", "_csrf")}
        return await _channels_page(viewer, services, error=exc.message, form=shown)
    return Redirect(f"{PREFIX}/operator/channels", status_code=303)


@get("/operator/channels/{ref:str}", opt=OPERATOR)
async def channel_page(ref: FromPath[str], viewer: ViewerDep, services: ServicesDep) -> Template:
    async with services.sessions() as db:
        channel = await channels.get_channel(db, ref)
    return render(
        viewer,
        "op_channel.html",
        channel=channel,
        models_text=channel_health.models_to_text(channel.models),
        adapters=ADAPTER_NAMES,
        error=None,
    )


@post("/operator/channels/{ref:str}", opt=OPERATOR, status_code=200)
async def edit_channel(
    request: Request[Any, Any, State], ref: FromPath[str], viewer: ViewerDep, services: ServicesDep
) -> Any:
    form = await form_of(request)
    try:
        async with services.sessions() as db, db.begin():
            await channels.update_channel(db, ref, _fields(form, adding=False), services.catalog)
    except ApiError as exc:
        async with services.sessions() as db:
            channel = await channels.get_channel(db, ref)
        return render(
            viewer,
            "op_channel.html",
            400,
            channel=channel,
            adapters=ADAPTER_NAMES,
            models_text=form.get("models", ""),
            error=exc.message,
        )
    return Redirect(f"{PREFIX}/operator/channels", status_code=303)


@post("/operator/channels/{ref:str}/enabled", opt=OPERATOR, status_code=200)
async def set_enabled(
    request: Request[Any, Any, State], ref: FromPath[str], viewer: ViewerDep, services: ServicesDep
) -> Template:
    form = await form_of(request)
    async with services.sessions() as db, db.begin():
        await channels.update_channel(
            db, ref, {"enabled": form.get("enabled") == "true"}, services.catalog
        )
    return await _channels_page(viewer, services)


@post("/operator/channels/{ref:str}/test", opt=OPERATOR, status_code=200)
async def test_channel(ref: FromPath[str], viewer: ViewerDep, services: ServicesDep) -> Template:
    """Queue a test generation on a worker; the fragment polls for its outcome."""
    async with services.sessions() as db:
        channel = await channels.get_channel(db, ref)
    test_id = await channel_health.start_test(
        services.redis, services.settings.queue_name, channel.id
    )
    return render(viewer, "op_channel_test.html", channel=channel, test_id=test_id, result=None)


@get("/operator/channels/{ref:str}/test/{test_id:str}", opt=OPERATOR)
async def test_result(
    ref: FromPath[str], test_id: FromPath[str], viewer: ViewerDep, services: ServicesDep
) -> Template:
    async with services.sessions() as db:
        channel = await channels.get_channel(db, ref)
    result = await channel_health.test_outcome(
        services.redis, services.settings.queue_name, test_id
    )
    return render(viewer, "op_channel_test.html", channel=channel, test_id=test_id, result=result)


@get("/operator/tasks", opt=OPERATOR)
async def all_tasks(
    request: Request[Any, Any, State],
    viewer: ViewerDep,
    services: ServicesDep,
    tenant: FromQuery[str | None] = None,
    status: FromQuery[str | None] = None,
    model: FromQuery[str | None] = None,
) -> Template:
    if status and status not in STATUSES:
        raise InvalidRequest("status", f"must be one of {', '.join(STATUSES)}")
    async with services.sessions() as db:
        found = await list_tasks(db, tenant_id=tenant or None, status=status or None, limit=100)
    rows = [
        task_view(t, services.signer, services.settings.public_base_url)
        for t in found
        if not model or t.model == model
    ]
    return render(
        viewer,
        "tasks_rows.html" if is_htmx(request) else "tasks.html",
        rows=rows,
        statuses=STATUSES,
        models=[m.id for m in services.catalog.models],
        filters=TaskFilter(status=status or None, model=model or None),
        since="",
        until="",
        operator=True,
        tenant=tenant,
    )


@get("/operator/deliveries", opt=OPERATOR)
async def deliveries(
    viewer: ViewerDep, services: ServicesDep, status: FromQuery[str | None] = None
) -> Template:
    query = select(CallbackDelivery).order_by(col(CallbackDelivery.created_at).desc()).limit(100)
    if status:
        query = query.where(CallbackDelivery.status == status)
    async with services.sessions() as db:
        found = list((await db.exec(query)).all())
    return render(viewer, "op_deliveries.html", deliveries=found, status=status or "")


@get("/operator/ledger", opt=OPERATOR)
async def ledger_page(viewer: ViewerDep) -> Template:
    return render(viewer, "op_ledger.html", problems=None)


@post("/operator/ledger/check", opt=OPERATOR, status_code=200)
async def ledger_check(viewer: ViewerDep, services: ServicesDep) -> Template:
    async with services.sessions() as db:
        problems = await check(db)
    return render(viewer, "op_ledger.html", problems=problems)


ROUTES = [
    channels_page,
    add_channel,
    channel_page,
    edit_channel,
    set_enabled,
    test_channel,
    test_result,
    all_tasks,
    deliveries,
    ledger_page,
    ledger_check,
]
