"""A tenant's tasks: the list (thumbnails, filters), one task's detail with its request,
price, charge and callback deliveries, its live status (an htmx fragment polled until
the task ends), and redelivering its callback."""

from datetime import date
from functools import partial
from typing import Any
from urllib.parse import urlencode

from litestar import Request, get, post
from litestar.datastructures import State
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect, Stream, Template

from gateway.account import service as account
from gateway.callbacks import service as callbacks
from gateway.callbacks.routes import redeliver_and_queue
from gateway.console.queries import OPEN
from gateway.console.web import PREFIX, ViewerDep, is_htmx, render
from gateway.deps import ServicesDep, UnitOfWorkDep
from gateway.errors import InvalidRequest
from gateway.storage import UrlSigner
from gateway.tasks import waiting
from gateway.tasks.models import Task, TaskStatus
from gateway.tasks.service import get_tenant_task, render_task
from pricing.money import credits_from_micros

TENANT = {"role": "tenant"}
PAGE = 50
STATUSES = tuple(s.value for s in TaskStatus)


def _day(value: str | None, field: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(field, "must be a date, YYYY-MM-DD") from None


def same_origin(url: str, public_base_url: str) -> str:
    """A result link on the gateway itself, made relative: the page loads it from the host
    the console was reached on, whatever ``TOLLGATE_PUBLIC_BASE_URL`` says. Links to an
    object store (presigned) stay as they are."""
    base = public_base_url.rstrip("/")
    return url[len(base) :] if url.startswith(base + "/") else url


def _older_link(
    filters: account.TaskFilter, since: str | None, until: str | None, more: str | None
) -> str | None:
    """The next page's address: the same filters and the API's cursor (``next_cursor``)."""
    if more is None:
        return None
    shown = {"status": filters.status, "model": filters.model, "since": since, "until": until}
    query = {k: v for k, v in shown.items() if v}
    return f"{PREFIX}/tasks?" + urlencode({**query, "cursor": more})


def task_view(task: Task, signer: UrlSigner, public_base_url: str = "") -> dict[str, Any]:
    """What the pages show of a task: the API's own rendering plus the money in credits."""
    shown = render_task(task, signer)
    return {
        "task": task,
        "api": shown,
        "images": [same_origin(u, public_base_url) for u in shown.results or []],
        "reserved": credits_from_micros(task.credits_reserved_micros),
        "charged": (
            credits_from_micros(task.credits_charged_micros)
            if task.credits_charged_micros is not None
            else None
        ),
        "final": task.status not in OPEN,
    }


@get("/tasks", opt=TENANT)
async def tasks_page(
    request: Request[Any, Any, State],
    viewer: ViewerDep,
    services: ServicesDep,
    status: FromQuery[str | None] = None,
    model: FromQuery[str | None] = None,
    since: FromQuery[str | None] = None,
    until: FromQuery[str | None] = None,
    cursor: FromQuery[str | None] = None,
) -> Template:
    """The API's task list (``GET /v1/tasks``: its filters, its cursor) for the viewer's tenant."""
    filters = account.TaskFilter(
        status=status or None,
        model=model or None,
        since=_day(since, "since"),
        until=_day(until, "until"),
    )
    async with services.sessions() as db:
        found, more = await account.list_tasks(
            db, viewer.tenant_id, filters, limit=PAGE, cursor=cursor or None
        )
    rows = [task_view(t, services.signer, services.settings.public_base_url) for t in found]
    template = "tasks_rows.html" if is_htmx(request) else "tasks.html"
    return render(
        viewer,
        template,
        rows=rows,
        statuses=STATUSES,
        models=[m.id for m in services.catalog.models],
        filters=filters,
        since=since or "",
        until=until or "",
        operator=False,
        older=_older_link(filters, since, until, more),
    )


async def _detail(viewer: ViewerDep, services: ServicesDep, task_id: str, **extra: Any) -> Template:
    async with services.sessions() as db:
        task = await get_tenant_task(db, viewer.tenant_id, task_id)
        deliveries = await callbacks.list_deliveries(db, task.id)
    return render(
        viewer,
        "task.html",
        **task_view(task, services.signer, services.settings.public_base_url),
        deliveries=deliveries,
        **extra,
    )


@get("/tasks/{task_id:str}", opt=TENANT)
async def task_page(task_id: FromPath[str], viewer: ViewerDep, services: ServicesDep) -> Template:
    return await _detail(viewer, services, task_id)


@get("/tasks/{task_id:str}/status", opt=TENANT)
async def task_status(task_id: FromPath[str], viewer: ViewerDep, services: ServicesDep) -> Template:
    """The live part of a task's page: polled every second while the task is open."""
    async with services.sessions() as db:
        task = await get_tenant_task(db, viewer.tenant_id, task_id)
    return render(
        viewer,
        "task_status.html",
        **task_view(task, services.signer, services.settings.public_base_url),
    )


@get("/tasks/{task_id:str}/events", opt=TENANT)
async def task_events(task_id: FromPath[str], viewer: ViewerDep, services: ServicesDep) -> Stream:
    """The task's changes as server-sent events: the API's own stream (``/v1/tasks/{id}/events``)
    for the viewer's tenant, with the console's cookie instead of a key. The page refreshes
    its status part on each event."""
    # Read once before answering, so another tenant's task is a 404, not an empty stream.
    await waiting.read_task(services, viewer.tenant_id, task_id)
    events = waiting.task_events(
        services,
        viewer.tenant_id,
        task_id,
        None,
        partial(render_task, signer=services.signer),
    )
    return Stream(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@post("/tasks/{task_id:str}/redeliver", opt=TENANT, status_code=303)
async def redeliver(
    task_id: FromPath[str], viewer: ViewerDep, services: ServicesDep, uow: UnitOfWorkDep
) -> Redirect:
    """Queue the callback again (after the commit), then show the task with the new delivery."""
    await get_tenant_task(uow.session, viewer.tenant_id, task_id)
    await redeliver_and_queue(uow, services, viewer.tenant_id, task_id)
    return Redirect(f"{PREFIX}/tasks/{task_id}", status_code=303)


ROUTES = [tasks_page, task_page, task_status, task_events, redeliver]
