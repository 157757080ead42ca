"""Changing prices at run time: groups, group prices and exchange rates; the change log.

Services take the session first and never commit (the caller's unit of work does).
Every change writes its ``price_changes`` row (who, when, old, new) and bumps the
version stamp in the same transaction, so a change and its record and its
announcement to every process are one. The API and the CLI both call these.
"""

import re
from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import ValidationError
from sqlalchemy import text
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.db import utcnow
from gateway.errors import InvalidRequest, NotFound
from gateway.prices.book import SessionRows, Snapshot, load_snapshot
from gateway.prices.models import ExchangeRate, GroupPrice, PriceChange, PriceGroup
from pricing.catalog import CURRENCY_PATTERN, Catalog, Cost, Price
from pricing.money import MoneyError, parse_credits, plain

_GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MAX_DESCRIPTION = 1000


def decimal_text(field: str, value: object, *, positive: bool = False) -> str:
    """A decimal figure given as a string or a JSON number, exactly, as canonical text."""
    if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
        raise InvalidRequest(field, 'must be a decimal number such as "1.5"')
    try:
        number = parse_credits(str(value))
    except MoneyError as exc:
        raise InvalidRequest(field, str(exc)) from None
    if positive and number <= 0:
        raise InvalidRequest(field, "must be greater than 0")
    exponent = number.as_tuple().exponent
    if not isinstance(exponent, int) or exponent < -12:
        raise InvalidRequest(field, "at most 12 decimal places")
    if number >= Decimal(10) ** 12:
        raise InvalidRequest(field, "must be less than 10^12")
    # As given ("0.30" stays), but never in exponent form: "1E+2" and 1e2 are "100".
    return format(number, "f")


def check_group_name(value: object) -> str:
    if not isinstance(value, str) or not _GROUP_NAME.fullmatch(value):
        raise InvalidRequest("name", "1 to 100 letters, digits, '.', '_' or '-'")
    return value


def check_description(value: object) -> str:
    if not isinstance(value, str) or len(value) > MAX_DESCRIPTION:
        raise InvalidRequest("description", f"a string of at most {MAX_DESCRIPTION} characters")
    return value


async def locked_snapshot(session: AsyncSession, catalog: Catalog) -> Snapshot:
    """Bump the version stamp first (its row lock makes price changes one at a time), then
    read the prices as they are now, in this transaction: a change checks and records
    what it replaces without racing another."""
    await session.exec(  # type: ignore[call-overload]
        text("UPDATE pricing_version SET version = version + 1 WHERE id = 1")
    )
    return await load_snapshot(SessionRows(session), catalog)


async def _record(
    session: AsyncSession,
    actor: str,
    kind: str,
    subject: str,
    old: dict[str, Any] | None,
    new: dict[str, Any] | None,
) -> None:
    session.add(PriceChange(actor=actor[:200], kind=kind, subject=subject, old=old, new=new))
    await session.flush()


def group_view(snapshot: Snapshot, name: str) -> dict[str, Any]:
    group = snapshot.groups[name]
    return {
        "name": name,
        "multiplier": str(group.multiplier),
        "description": snapshot.descriptions.get(name, ""),
        "own_prices": sorted(group.prices),
        "in_catalogue": name in snapshot.catalog.groups,
    }


def _known(snapshot: Snapshot, name: str) -> None:
    if name not in snapshot.groups:
        raise NotFound(f"no group {name}")


async def create_group(
    session: AsyncSession,
    catalog: Catalog,
    name: object,
    multiplier: object,
    description: object,
    actor: str,
) -> dict[str, Any]:
    group = check_group_name(name)
    snapshot = await locked_snapshot(session, catalog)
    if group in snapshot.groups:
        raise InvalidRequest("name", f"a group {group!r} exists")
    figure = decimal_text("multiplier", multiplier, positive=True)
    about = check_description(description)
    session.add(PriceGroup(name=group, multiplier=figure, description=about))
    new = {"multiplier": figure, "description": about}
    await _record(session, actor, "group", group, None, new)
    return {"name": group, **new}


async def update_group(
    session: AsyncSession, catalog: Catalog, name: str, changes: dict[str, Any], actor: str
) -> dict[str, Any]:
    snapshot = await locked_snapshot(session, catalog)
    _known(snapshot, name)
    current = snapshot.groups[name]
    old = {"multiplier": str(current.multiplier), "description": snapshot.descriptions[name]}
    new = dict(old)
    if "multiplier" in changes:
        new["multiplier"] = decimal_text("multiplier", changes["multiplier"], positive=True)
    if "description" in changes:
        new["description"] = check_description(changes["description"])
    if (
        Decimal(new["multiplier"]) == current.multiplier
        and new["description"] == old["description"]
    ):
        return {"name": name, **old}  # nothing changes: nothing to store or record
    row = await session.get(PriceGroup, name)
    if row is None:  # a catalogue group, set at run time from now on
        row = PriceGroup(name=name, multiplier=new["multiplier"])
    row.multiplier, row.description, row.updated_at = (
        new["multiplier"],
        new["description"],
        utcnow(),
    )
    session.add(row)
    await _record(session, actor, "group", name, old, new)
    return {"name": name, **new}


def price_json(price: Price, *, canonical: bool = False) -> dict[str, Any]:
    """A price as the API shows and stores it: decimal strings, no empty modifiers.

    Stored as given ("0.30"); ``canonical`` drops the trailing zeros a product leaves
    (0.006 × 0.75 is 0.00450, shown "0.0045"), as ``GET /v1/models`` shows it.
    """

    def text(value: Decimal) -> str:
        return str(plain(value) if canonical else value)

    shown: dict[str, Any] = {"rule": price.rule, "amount": text(price.amount)}
    if price.by_quality:
        shown["by_quality"] = {k: text(v) for k, v in price.by_quality.items()}
    for name in ("with_style_references", "with_moodboard"):
        value = getattr(price, name)
        if value is not None:
            shown[name] = text(value)
    return shown


def check_price(catalog: Catalog, model: str, body: dict[str, Any], *, cost: bool = False) -> Price:
    """A price (or a channel's cost, with its ``currency``) given in a request, checked
    against the model like the catalogue's own; a 400 names the field."""
    entry = catalog.model(model)
    if entry is None:
        raise NotFound(f"no model {model} in the catalogue")
    figures = dict(body)
    for name in ("amount", "with_style_references", "with_moodboard"):
        if figures.get(name) is not None:
            figures[name] = decimal_text(name, figures[name])
    if isinstance(figures.get("by_quality"), dict):
        figures["by_quality"] = {
            k: decimal_text(f"by_quality.{k}", v) for k, v in figures["by_quality"].items()
        }
    if cost:
        currency = figures.get("currency")
        if not isinstance(currency, str) or not re.fullmatch(CURRENCY_PATTERN, currency):
            raise InvalidRequest("currency", "three capital letters, such as USD, CNY or KCU")
    try:
        price: Price = (Cost if cost else Price).model_validate(figures)
        entry.check_price(price)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "price"
        raise InvalidRequest(where, first["msg"]) from None
    except ValueError as exc:
        where = "by_quality" if "quality" in str(exc) else "rule"
        raise InvalidRequest(where, str(exc)) from None
    return price


def model_prices(snapshot: Snapshot, group: str) -> list[dict[str, Any]]:
    """Every model's effective price for the group, and where it comes from."""
    _known(snapshot, group)
    currency = snapshot.catalog.credit_currency
    rows = []
    for entry in snapshot.catalog.models:
        price, source = snapshot.effective_price(group, entry)
        rows.append(
            {
                "model": entry.id,
                "source": source,
                "set_at_run_time": entry.id in snapshot.run_time_prices.get(group, ()),
                "currency": currency,
                **price_json(price, canonical=True),
                "catalogue_price": price_json(entry.price, canonical=True),
                "multiplier": str(snapshot.groups[group].multiplier),
            }
        )
    return rows


async def set_group_price(
    session: AsyncSession,
    catalog: Catalog,
    group: str,
    model: str,
    body: dict[str, Any],
    actor: str,
) -> dict[str, Any]:
    snapshot = await locked_snapshot(session, catalog)
    _known(snapshot, group)
    price = check_price(snapshot.catalog, model, body)
    stored = price_json(price)
    row = await session.get(GroupPrice, (group, model))
    old = row.price if row is not None else None
    if row is None:
        row = GroupPrice(group_name=group, model=model, price=stored)
    row.price, row.updated_at = stored, utcnow()
    session.add(row)
    await _record(session, actor, "group_price", f"{group}/{model}", old, stored)
    return {"group": group, "model": model, **stored}


async def delete_group_price(
    session: AsyncSession, catalog: Catalog, group: str, model: str, actor: str
) -> None:
    snapshot = await locked_snapshot(session, catalog)
    _known(snapshot, group)
    row = await session.get(GroupPrice, (group, model))
    if row is None:
        raise NotFound(f"group {group} has no run-time price for {model}")
    old = row.price
    await session.delete(row)
    await _record(session, actor, "group_price", f"{group}/{model}", old, None)


async def list_changes(session: AsyncSession, limit: int) -> list[dict[str, Any]]:
    query = select(PriceChange).order_by(col(PriceChange.id).desc()).limit(limit)
    return [
        {
            "id": c.id,
            "changed_at": c.changed_at.isoformat(),
            "actor": c.actor,
            "kind": c.kind,
            "subject": c.subject,
            "old": c.old,
            "new": c.new,
        }
        for c in (await session.exec(query)).all()
    ]


def check_currency(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(CURRENCY_PATTERN, value):
        raise InvalidRequest("currency", "three capital letters, such as USD, CNY or KCU")
    return value


async def set_rate(
    session: AsyncSession,
    catalog: Catalog,
    currency: object,
    rate: object,
    effective_at: datetime | None,
    note: str,
    actor: str,
) -> dict[str, Any]:
    """Record a dated rate (credits per unit of ``currency``); history is never rewritten."""
    code = check_currency(currency)
    snapshot = await locked_snapshot(session, catalog)
    if code == snapshot.catalog.credit_currency:
        raise InvalidRequest("currency", f"{code} is the credit currency: its rate is always 1")
    figure = decimal_text("rate", rate, positive=True)
    since = effective_at or utcnow()
    if since.tzinfo is None:
        raise InvalidRequest("effective_at", "needs a time zone (such as Z)")
    old_rate = snapshot.rates_at(since).get(code)
    session.add(
        ExchangeRate(
            currency=code, rate=figure, effective_at=since, set_by=actor[:200], note=note[:1000]
        )
    )
    new = {"rate": figure, "effective_at": since.isoformat()}
    old = None if old_rate is None else {"rate": str(old_rate)}
    await _record(session, actor, "exchange_rate", code, old, new)
    return {"currency": code, **new, "note": note}


async def rates_view(session: AsyncSession, snapshot: Snapshot) -> dict[str, Any]:
    """The rates in force now, and every dated rate the operator set, newest first."""
    now = utcnow()
    rows = (
        await session.exec(
            select(ExchangeRate).order_by(col(ExchangeRate.effective_at).desc()).limit(1000)
        )
    ).all()
    set_by_operator = {r.currency for r in rows if r.effective_at <= now}
    return {
        "credit_currency": snapshot.catalog.credit_currency,
        "rates": [
            {
                "currency": code,
                "rate": str(rate),
                "source": "operator" if code in set_by_operator else "catalogue",
            }
            for code, rate in sorted(snapshot.rates_at(now).items())
        ],
        "history": [
            {
                "currency": r.currency,
                "rate": r.rate,
                "effective_at": r.effective_at.isoformat(),
                "set_by": r.set_by,
                "note": r.note,
                "created_at": r.created_at.isoformat(),
            }
            for r in rows
        ],
    }
