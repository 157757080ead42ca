"""The prices in force: the catalogue, with the operator's groups, prices and rates over it.

``PriceBook.current()`` answers from memory. At most once per ``ttl`` it reads the
version stamp (one indexed row) and, only when the stamp moved, reloads the
layers; concurrent callers share that one read. The submit path therefore makes
no pricing query of its own, and a change reaches every process within ``ttl``.
"""

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import text

from pricing.catalog import Catalog, Group, ModelEntry, Price
from pricing.money import EXACT, parse_credits

VERSION_SQL = "SELECT version FROM pricing_version WHERE id = 1"
GROUPS_SQL = "SELECT name, multiplier, description FROM price_groups"
PRICES_SQL = "SELECT group_name, model, price FROM group_prices"
RATES_SQL = "SELECT currency, rate, effective_at FROM exchange_rates ORDER BY effective_at, id"

# Where a group's price of a model comes from.
CATALOGUE = "catalogue"
MULTIPLIER = "group_multiplier"
OVERRIDE = "group_override"


@dataclass(frozen=True)
class Snapshot:
    """One consistent view of the prices, as of ``version``."""

    catalog: Catalog
    version: int
    groups: Mapping[str, Group]
    descriptions: Mapping[str, str]
    # Group -> models whose own price was set at run time (not by the catalogue file).
    run_time_prices: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # Currency -> [(effective from, credits per unit)], oldest first.
    rate_history: Mapping[str, tuple[tuple[datetime, Decimal], ...]] = field(default_factory=dict)

    def group(self, name: str) -> tuple[str, Group]:
        """The group a tenant of ``name`` pays as: its own, or ``default`` if it has none."""
        if name in self.groups:
            return name, self.groups[name]
        return "default", self.groups["default"]

    def rates_at(self, when: datetime) -> dict[str, Decimal]:
        """Credits per unit of each currency at ``when``: the operator's latest dated rate
        in force, else the catalogue's default; the credit currency is always 1."""
        rates = dict(self.catalog.exchange_rates)
        for currency, history in self.rate_history.items():
            in_force = [rate for since, rate in history if since <= when]
            if in_force:
                rates[currency] = in_force[-1]
        rates[self.catalog.credit_currency] = Decimal(1)
        return rates

    def effective_price(self, group_name: str, entry: ModelEntry) -> tuple[Price, str]:
        """The price of ``entry`` for the group, with its figures after the multiplier, and
        where it comes from."""
        _, group = self.group(group_name)
        own = group.prices.get(entry.id)
        if own is not None:
            return own, OVERRIDE
        if group.multiplier == 1:
            return entry.price, CATALOGUE
        return multiplied(entry.price, group.multiplier), MULTIPLIER


def multiplied(price: Price, factor: Decimal) -> Price:
    """The price with every figure × ``factor``, exact (the quote rounds, once, at the end)."""

    def times(value: Decimal | None) -> Decimal | None:
        return None if value is None else EXACT.multiply(value, factor)

    return price.model_copy(
        update={
            "amount": times(price.amount),
            "by_quality": {k: EXACT.multiply(v, factor) for k, v in price.by_quality.items()},
            "with_style_references": times(price.with_style_references),
            "with_moodboard": times(price.with_moodboard),
        }
    )


def build_snapshot(
    catalog: Catalog,
    version: int,
    groups: list[tuple[str, str, str]],
    prices: list[tuple[str, str, Mapping[str, Any]]],
    rates: list[tuple[str, str, datetime]],
) -> Snapshot:
    """Layer the stored groups, prices and rates over the catalogue's."""
    merged: dict[str, Group] = dict(catalog.groups)
    descriptions = {name: "" for name in merged}
    for name, multiplier, description in groups:
        base = merged.get(name, Group())
        merged[name] = base.model_copy(update={"multiplier": parse_credits(multiplier)})
        descriptions[name] = description
    run_time: dict[str, set[str]] = {}
    for group_name, model, price in prices:
        if catalog.model(model) is None:
            continue  # a model since removed from the catalogue
        base = merged.get(group_name, Group())
        own = {**base.prices, model: Price.model_validate(price)}
        merged[group_name] = base.model_copy(update={"prices": own})
        descriptions.setdefault(group_name, "")
        run_time.setdefault(group_name, set()).add(model)
    # Oldest first. Of the rates already in force only the latest matters (and later
    # ones may come into force): the submit path scans a few entries, not the history.
    now = datetime.now(UTC)
    history: dict[str, list[tuple[datetime, Decimal]]] = {}
    for currency, rate, since in rates:
        kept = history.setdefault(currency, [])
        if since <= now and kept and kept[-1][0] <= now:
            kept.pop()
        kept.append((since, parse_credits(rate)))
    return Snapshot(
        catalog=catalog,
        version=version,
        groups=merged,
        descriptions=descriptions,
        run_time_prices={g: frozenset(m) for g, m in run_time.items()},
        rate_history={c: tuple(h) for c, h in history.items()},
    )


async def load_snapshot(conn: Any, catalog: Catalog) -> Snapshot:
    """Read every layer through an asyncpg connection or pool (four small queries)."""
    version = await conn.fetchval(VERSION_SQL) or 0
    groups = [tuple(r) for r in await conn.fetch(GROUPS_SQL)]
    prices = [(r[0], r[1], _json(r[2])) for r in await conn.fetch(PRICES_SQL)]
    rates = [tuple(r) for r in await conn.fetch(RATES_SQL)]
    return build_snapshot(catalog, int(version), groups, prices, rates)


class SessionRows:
    """``fetchval`` and ``fetch`` over a SQLAlchemy session, as ``load_snapshot`` reads an
    asyncpg pool: a snapshot read inside the caller's transaction."""

    def __init__(self, session: Any) -> None:
        self._session = session

    async def fetchval(self, sql: str) -> Any:
        return (await self._session.exec(text(sql))).scalar()

    async def fetch(self, sql: str) -> list[Any]:
        return list((await self._session.exec(text(sql))).all())


def _json(value: Any) -> Mapping[str, Any]:
    if isinstance(value, str):
        loaded: Mapping[str, Any] = json.loads(value)
        return loaded
    return dict(value)


class PriceBook:
    """The prices in force for one process, refreshed at most once per ``ttl`` seconds."""

    def __init__(self, catalog: Catalog, pool: Any, ttl_seconds: float) -> None:
        self.catalog = catalog
        self._pool = pool
        self._ttl = ttl_seconds
        self._snapshot: Snapshot | None = None
        self._checked_until = 0.0
        self._refreshing: asyncio.Future[Snapshot] | None = None

    async def current(self) -> Snapshot:
        snapshot = self._snapshot
        if snapshot is not None and time.monotonic() < self._checked_until:
            return snapshot
        refreshing = self._refreshing
        if refreshing is None:
            refreshing = self._refreshing = asyncio.ensure_future(self._refresh())
            refreshing.add_done_callback(lambda _: setattr(self, "_refreshing", None))
        return await asyncio.shield(refreshing)

    async def _refresh(self) -> Snapshot:
        version = int(await self._pool.fetchval(VERSION_SQL) or 0)
        snapshot = self._snapshot
        if snapshot is None or snapshot.version != version:
            snapshot = await load_snapshot(self._pool, self.catalog)
            self._snapshot = snapshot
        self._checked_until = time.monotonic() + self._ttl
        return snapshot
