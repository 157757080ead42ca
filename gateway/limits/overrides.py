"""Setting and showing the limits of a tenant or a key (admin API and CLI).

A field left out is unchanged; ``null`` puts it back to the settings' default
(for budgets and model lists: no limit). Changes reach every gateway within
``key_cache_ttl_seconds``, when the cached key is next loaded.
"""

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

import msgspec
from sqlalchemy import select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.errors import InvalidRequest, NotFound
from gateway.limits.service import effective_burst, key_spend, spend_periods
from gateway.settings import Settings
from gateway.tenants.models import ApiKey, Tenant
from pricing.catalog import Catalog
from pricing.money import MoneyError, credits_from_micros, micros_from_text

Count = Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000)]
Burst = Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)]
Models = Annotated[list[str], msgspec.Meta(max_length=1000)]


class TenantLimits(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    rate_limit_per_minute: Count | msgspec.UnsetType | None = msgspec.UNSET
    rate_limit_burst: Burst | msgspec.UnsetType | None = msgspec.UNSET
    max_in_flight: Count | msgspec.UnsetType | None = msgspec.UNSET
    allowed_models: Models | msgspec.UnsetType | None = msgspec.UNSET


class KeyLimits(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    rate_limit_per_minute: Count | msgspec.UnsetType | None = msgspec.UNSET
    rate_limit_burst: Burst | msgspec.UnsetType | None = msgspec.UNSET
    allowed_models: Models | msgspec.UnsetType | None = msgspec.UNSET
    # Credits, exact decimals; null: no budget.
    budget_total: Decimal | msgspec.UnsetType | None = msgspec.UNSET
    budget_daily: Decimal | msgspec.UnsetType | None = msgspec.UNSET
    budget_monthly: Decimal | msgspec.UnsetType | None = msgspec.UNSET


def _models(catalog: Catalog, models: list[str] | None) -> list[str] | None:
    if models is None:
        return None
    unknown = sorted({m for m in models if catalog.model(m) is None})
    if unknown:
        raise InvalidRequest("allowed_models", f"unknown model(s): {', '.join(unknown)}")
    return sorted(set(models))


def _budget(field: str, value: Decimal | None) -> int | None:
    if value is None:
        return None
    try:
        return micros_from_text(str(value))
    except MoneyError as exc:
        raise InvalidRequest(field, str(exc)) from None


def _set(row: Any, name: str, value: Any) -> None:
    if value is not msgspec.UNSET:
        setattr(row, name, value)


async def set_tenant_limits(
    session: AsyncSession, catalog: Catalog, tenant_id: str, changes: TenantLimits
) -> Tenant:
    tenant = await session.get(Tenant, tenant_id, with_for_update=True)
    if tenant is None:
        raise NotFound(f"no tenant {tenant_id}")
    _set(tenant, "rate_limit_per_minute", changes.rate_limit_per_minute)
    _set(tenant, "rate_limit_burst", changes.rate_limit_burst)
    _set(tenant, "max_in_flight", changes.max_in_flight)
    if changes.allowed_models is not msgspec.UNSET:
        tenant.allowed_models = _models(catalog, changes.allowed_models)
    session.add(tenant)
    await session.flush()
    return tenant


async def set_key_limits(
    session: AsyncSession, catalog: Catalog, key_id: str, changes: KeyLimits
) -> ApiKey:
    key = await session.get(ApiKey, key_id, with_for_update=True)
    if key is None:
        raise NotFound(f"no key {key_id}")
    _set(key, "rate_limit_per_minute", changes.rate_limit_per_minute)
    _set(key, "rate_limit_burst", changes.rate_limit_burst)
    if changes.allowed_models is not msgspec.UNSET:
        key.allowed_models = _models(catalog, changes.allowed_models)
    for period in ("total", "daily", "monthly"):
        value = getattr(changes, f"budget_{period}")
        if value is not msgspec.UNSET:
            setattr(key, f"budget_{period}_micros", _budget(f"budget_{period}", value))
    session.add(key)
    await session.flush()
    return key


def _effective(value: int | None, default: int) -> dict[str, Any]:
    return {
        "value": default if value is None else value,
        "from": "default" if value is None else "own",
    }


def _burst(rate: int | None, default_rate: int, burst: int | None, default: int) -> dict[str, Any]:
    """The burst that applies (``gateway.limits.effective_burst``) and where it comes from."""
    value = effective_burst(default_rate if rate is None else rate, burst, default)
    return {"value": value, "from": "default" if burst is None else "own"}


def tenant_limits_json(tenant: Tenant, settings: Settings) -> dict[str, Any]:
    return {
        "tenant_id": tenant.id,
        "rate_limit_per_minute": _effective(
            tenant.rate_limit_per_minute, settings.default_tenant_rate_limit_per_minute
        ),
        "rate_limit_burst": _burst(
            tenant.rate_limit_per_minute,
            settings.default_tenant_rate_limit_per_minute,
            tenant.rate_limit_burst,
            settings.default_tenant_rate_limit_burst,
        ),
        "max_in_flight": _effective(tenant.max_in_flight, settings.default_max_in_flight),
        "in_flight": tenant.in_flight,
        "allowed_models": tenant.allowed_models,
    }


async def key_limits_json(session: AsyncSession, key: ApiKey, settings: Settings) -> dict[str, Any]:
    periods = spend_periods(datetime.now(UTC))
    rows = await (await session.connection()).execute(
        select(key_spend.c.period, key_spend.c.spent_micros).where(
            key_spend.c.api_key_id == key.id, key_spend.c.period.in_(periods)
        )
    )
    spent = {period: int(total) for period, total in rows}
    budgets = {}
    for label, period in zip(("total", "daily", "monthly"), periods, strict=True):
        budget = getattr(key, f"budget_{label}_micros")
        budgets[label] = {
            "budget": None if budget is None else credits_from_micros(budget),
            "spent": credits_from_micros(spent.get(period, 0)),
            "period": period,
        }
    return {
        "key_id": key.id,
        "tenant_id": key.tenant_id,
        "rate_limit_per_minute": _effective(
            key.rate_limit_per_minute, settings.default_key_rate_limit_per_minute
        ),
        "rate_limit_burst": _burst(
            key.rate_limit_per_minute,
            settings.default_key_rate_limit_per_minute,
            key.rate_limit_burst,
            settings.default_key_rate_limit_burst,
        ),
        "allowed_models": key.allowed_models,
        "budgets": budgets,
    }
