"""The playground: a model's settings rendered from the catalogue, its price before
submitting, and the submit itself through ``submit_and_queue``, the API's own path."""

from dataclasses import dataclass
from typing import Any

from litestar import Request, get, post
from litestar.datastructures import State
from litestar.params import FromQuery
from litestar.response import Redirect, Template

from gateway.console import queries
from gateway.console.web import PREFIX, ViewerDep, form_of, is_htmx, render
from gateway.db import utcnow
from gateway.deps import ServicesDep
from gateway.errors import ApiError, InvalidRequest
from gateway.prices.book import Snapshot
from gateway.tasks.routes import submit_and_queue
from pricing.catalog import COMMON_FIELDS, Catalog, ModelEntry
from pricing.money import credits_from_micros
from pricing.quote import quote
from pricing.request import InvalidField, resolve_request

TENANT = {"role": "tenant"}
# Labels for parameters whose name says little on its own (the field name follows).
LABELS = {"n": "Images (n)", "nsfw_check": "NSFW check"}


@dataclass(frozen=True, slots=True)
class Control:
    """One form control: its field name, how it is shown, its range and default."""

    name: str
    label: str
    kind: str  # "number", "checkbox", "select", "text"
    default: Any = None
    min: int | None = None
    max: int | None = None
    options: tuple[str, ...] = ()
    help: str = ""


def controls(entry: ModelEntry) -> list[Control]:
    found: list[Control] = []
    if entry.sizes is not None:
        found.append(
            Control("size", "Size", "select", entry.default_size, options=tuple(entry.sizes))
        )
        found.append(
            Control("quality", "Quality", "select", entry.default_quality, options=entry.qualities)
        )
    elif entry.dimensions is not None:
        bounds = entry.dimensions
        found.append(
            Control(
                "size",
                "Size (WIDTHxHEIGHT)",
                "text",
                bounds.default,
                help=f"each side {bounds.min_side}–{bounds.max_side}, "
                f"a multiple of {bounds.multiple_of}",
            )
        )
    for name, spec in entry.params.items():
        if spec.fixed is not None or spec.type == "list":
            continue  # fixed by the model, or a list of uploads the playground does not offer
        label = LABELS.get(name) or name.replace("_", " ").capitalize()
        if spec.type == "int":
            found.append(
                Control(
                    name, label, "number", spec.default, spec.min, spec.max, help=spec.description
                )
            )
        elif spec.type == "bool":
            found.append(Control(name, label, "checkbox", spec.default, help=spec.description))
        elif spec.type == "enum":
            found.append(
                Control(
                    name,
                    label,
                    "select",
                    spec.default,
                    options=spec.values or (),
                    help=spec.description,
                )
            )
        else:
            found.append(Control(name, label, "text", spec.default, help=spec.description))
    return found


def fields_from_form(entry: ModelEntry, form: dict[str, str]) -> dict[str, Any]:
    """The request's fields as the API would receive them; a value left empty is not sent."""
    fields: dict[str, Any] = {"model": entry.id, "prompt": form.get("prompt", "")}
    for control in controls(entry):
        raw = form.get(control.name)
        if control.kind == "checkbox":
            fields[control.name] = raw == "on"
        elif raw is None or raw.strip() == "":
            continue
        elif control.kind == "number":
            try:
                fields[control.name] = int(raw)
            except ValueError:
                raise InvalidRequest(control.name, "must be a whole number") from None
        else:
            fields[control.name] = raw.strip()
    return fields


def _entry(catalog: Catalog, model: str | None, allowed: frozenset[str] | None) -> ModelEntry:
    usable = [m for m in catalog.models if allowed is None or m.id in allowed]
    if not usable:
        raise InvalidRequest("model", "your tenant may use no model")
    return next((m for m in usable if m.id == model), usable[0])


def price_text(entry: ModelEntry, group: str, prices: Snapshot, fields: dict[str, Any]) -> str:
    """The price the submit will hold (the group's, in force now), or what is wrong."""
    try:
        request = resolve_request(entry, {k: v for k, v in fields.items() if k != "model"})
    except InvalidField as exc:
        return f"{exc.field}: {exc.message}"
    name, priced_group = prices.group(group)
    priced = quote(entry, name, priced_group, request, rates=prices.rates_at(utcnow()))
    return f"{credits_from_micros(priced.amount_micros)} credits"


@get("/playground", opt=TENANT)
async def playground(
    request: Request[Any, Any, State],
    viewer: ViewerDep,
    services: ServicesDep,
    model: FromQuery[str | None] = None,
) -> Template:
    tenant = viewer.tenant
    assert tenant is not None
    allowed = frozenset(tenant.allowed_models) if tenant.allowed_models is not None else None
    catalog = services.catalog
    entry = _entry(catalog, model, allowed)
    models = [m for m in catalog.models if allowed is None or m.id in allowed]
    defaults = {c.name: c.default for c in controls(entry) if c.default is not None}
    prices = await services.prices.current()
    price = price_text(entry, tenant.user_group, prices, {"prompt": "x", **defaults})
    template = "playground_fields.html" if is_htmx(request) else "playground.html"
    return render(
        viewer,
        template,
        models=models,
        entry=entry,
        controls=controls(entry),
        price=price,
        error=None,
        common=COMMON_FIELDS,
    )


@post("/playground/price", opt=TENANT, status_code=200)
async def playground_price(
    request: Request[Any, Any, State], viewer: ViewerDep, services: ServicesDep
) -> Template:
    tenant = viewer.tenant
    assert tenant is not None
    form = await form_of(request)
    allowed = frozenset(tenant.allowed_models) if tenant.allowed_models is not None else None
    entry = _entry(services.catalog, form.get("model"), allowed)
    try:
        fields = fields_from_form(entry, {**form, "prompt": form.get("prompt") or "x"})
        prices = await services.prices.current()
        text = price_text(entry, tenant.user_group, prices, fields)
    except ApiError as exc:
        text = exc.message
    return render(viewer, "price.html", price=text)


@post("/playground", opt=TENANT, status_code=200)
async def playground_submit(
    request: Request[Any, Any, State], viewer: ViewerDep, services: ServicesDep
) -> Any:
    tenant = viewer.tenant
    assert tenant is not None
    form = await form_of(request)
    allowed = frozenset(tenant.allowed_models) if tenant.allowed_models is not None else None
    catalog = services.catalog
    entry = _entry(catalog, form.get("model"), allowed)
    try:
        fields = fields_from_form(entry, form)
        async with services.sessions() as db, db.begin():
            principal = await queries.console_principal(db, tenant)
        # Counted like an API request: the key's and the tenant's rate limits apply.
        await services.limiter.check(principal)
        task = await submit_and_queue(
            services, principal, fields=fields, webhook_url=None, idempotency_key=None
        )
    except ApiError as exc:
        models = [m for m in catalog.models if allowed is None or m.id in allowed]
        return render(
            viewer,
            "playground.html",
            exc.status,
            models=models,
            entry=entry,
            controls=controls(entry),
            price="",
            error=f"{exc.message} ({exc.code})",
            common=COMMON_FIELDS,
        )
    return Redirect(f"{PREFIX}/tasks/{task.id}", status_code=303)


ROUTES = [playground, playground_price, playground_submit]
