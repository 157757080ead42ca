"""The operator's price pages: user groups (multiplier, description), a group's prices
with where each comes from (set, reset), the record of changes, and exchange rates.

Every change goes through ``gateway/prices/service.py``, as the admin API and the CLI:
recorded in ``price_changes`` with the console user as the actor, and in force on
every gateway within ``TOLLGATE_KEY_CACHE_TTL_SECONDS``. The pages read the prices as
stored now, not this process's cached view.
"""

from typing import Any

from litestar import Request, get, post
from litestar.datastructures import State
from litestar.params import FromPath
from litestar.response import Template

from gateway.console.web import ViewerDep, form_of, render
from gateway.deps import ServicesDep
from gateway.errors import ApiError, InvalidRequest
from gateway.prices import service as prices
from gateway.prices.book import Snapshot, load_snapshot

OPERATOR = {"role": "operator"}
RULES = ("per_call", "per_image", "per_megapixel_step")


def actor(viewer: ViewerDep) -> str:
    return f"console:{viewer.user.email}"


async def fresh(services: ServicesDep) -> Snapshot:
    snapshot: Snapshot = await load_snapshot(services.pg, services.catalog)
    return snapshot


async def _groups_page(
    viewer: ViewerDep, services: ServicesDep, status_code: int = 200, **extra: Any
) -> Template:
    snapshot = await fresh(services)
    async with services.sessions() as db:
        changes = await prices.list_changes(db, 50)
    context: dict[str, Any] = {
        "groups": [prices.group_view(snapshot, name) for name in sorted(snapshot.groups)],
        "changes": changes,
        "message": None,
        "error": None,
    }
    return render(viewer, "op_prices.html", status_code, **{**context, **extra})


@get("/operator/prices", opt=OPERATOR)
async def groups_page(viewer: ViewerDep, services: ServicesDep) -> Template:
    return await _groups_page(viewer, services)


@post("/operator/prices/groups", opt=OPERATOR, status_code=200)
async def create_group(
    request: Request[Any, Any, State], viewer: ViewerDep, services: ServicesDep
) -> Template:
    form = await form_of(request)
    try:
        async with services.sessions() as db, db.begin():
            made = await prices.create_group(
                db,
                services.catalog,
                form.get("name", "").strip(),
                form.get("multiplier", "").strip() or "1",
                form.get("description", ""),
                actor(viewer),
            )
    except ApiError as exc:
        return await _groups_page(viewer, services, exc.status, error=exc.message)
    return await _groups_page(viewer, services, message=f"Group {made['name']} created.")


@post("/operator/prices/groups/{group:str}", opt=OPERATOR, status_code=200)
async def update_group(
    request: Request[Any, Any, State],
    group: FromPath[str],
    viewer: ViewerDep,
    services: ServicesDep,
) -> Template:
    """The group's multiplier and description."""
    form = await form_of(request)
    changes: dict[str, Any] = {k: form[k] for k in ("multiplier", "description") if k in form}
    try:
        async with services.sessions() as db, db.begin():
            await prices.update_group(db, services.catalog, group, changes, actor(viewer))
    except ApiError as exc:
        return await _groups_page(viewer, services, exc.status, error=exc.message)
    return await _groups_page(viewer, services, message=f"Group {group} saved.")


async def _group_page(
    viewer: ViewerDep, services: ServicesDep, group: str, status_code: int = 200, **extra: Any
) -> Template:
    snapshot = await fresh(services)
    context: dict[str, Any] = {
        "group": prices.group_view(snapshot, group) if group in snapshot.groups else None,
        "rows": prices.model_prices(snapshot, group),  # a 404 for an unknown group
        "rules": RULES,
        "message": None,
        "error": None,
    }
    return render(viewer, "op_group.html", status_code, **{**context, **extra})


@get("/operator/prices/groups/{group:str}", opt=OPERATOR)
async def group_page(group: FromPath[str], viewer: ViewerDep, services: ServicesDep) -> Template:
    return await _group_page(viewer, services, group)


def price_body(form: dict[str, str]) -> dict[str, Any]:
    """A price from the form: rule, amount, and ``quality=amount`` pairs for by_quality."""
    body: dict[str, Any] = {"rule": form.get("rule", ""), "amount": form.get("amount", "").strip()}
    pairs = form.get("by_quality", "").replace(",", " ").split()
    if pairs:
        by_quality = {}
        for pair in pairs:
            name, sep, amount = pair.partition("=")
            if not sep or not name or not amount:
                raise InvalidRequest("by_quality", "pairs such as low=0.01 high=0.04")
            by_quality[name] = amount
        body["by_quality"] = by_quality
    return body


@post("/operator/prices/groups/{group:str}/models/{model:str}", opt=OPERATOR, status_code=200)
async def set_price(
    request: Request[Any, Any, State],
    group: FromPath[str],
    model: FromPath[str],
    viewer: ViewerDep,
    services: ServicesDep,
) -> Template:
    """The group's own price for the model (replacing its multiplied catalogue price)."""
    form = await form_of(request)
    try:
        body = price_body(form)
        async with services.sessions() as db, db.begin():
            await prices.set_group_price(db, services.catalog, group, model, body, actor(viewer))
    except ApiError as exc:
        return await _group_page(viewer, services, group, exc.status, error=exc.message)
    return await _group_page(viewer, services, group, message=f"Price of {model} set.")


@post("/operator/prices/groups/{group:str}/models/{model:str}/reset", opt=OPERATOR, status_code=200)
async def reset_price(
    group: FromPath[str], model: FromPath[str], viewer: ViewerDep, services: ServicesDep
) -> Template:
    """Remove the group's own price: the catalogue's, times the multiplier, again."""
    try:
        async with services.sessions() as db, db.begin():
            await prices.delete_group_price(db, services.catalog, group, model, actor(viewer))
    except ApiError as exc:
        return await _group_page(viewer, services, group, exc.status, error=exc.message)
    return await _group_page(viewer, services, group, message=f"Price of {model} reset.")


async def _rates_page(
    viewer: ViewerDep, services: ServicesDep, status_code: int = 200, **extra: Any
) -> Template:
    async with services.sessions() as db:
        view = await prices.rates_view(db, await fresh(services))
    context: dict[str, Any] = {"view": view, "message": None, "error": None}
    return render(viewer, "op_rates.html", status_code, **{**context, **extra})


@get("/operator/rates", opt=OPERATOR)
async def rates_page(viewer: ViewerDep, services: ServicesDep) -> Template:
    return await _rates_page(viewer, services)


@post("/operator/rates", opt=OPERATOR, status_code=200)
async def set_rate(
    request: Request[Any, Any, State], viewer: ViewerDep, services: ServicesDep
) -> Template:
    """A rate in force from now (history is kept; tasks already quoted keep theirs)."""
    form = await form_of(request)
    currency = form.get("currency", "").strip().upper()
    try:
        async with services.sessions() as db, db.begin():
            await prices.set_rate(
                db,
                services.catalog,
                currency,
                form.get("rate", "").strip(),
                None,
                form.get("note", ""),
                actor(viewer),
            )
    except ApiError as exc:
        return await _rates_page(viewer, services, exc.status, error=exc.message)
    return await _rates_page(viewer, services, message=f"Rate for {currency} set.")


ROUTES = [
    groups_page,
    create_group,
    update_group,
    group_page,
    set_price,
    reset_price,
    rates_page,
    set_rate,
]
