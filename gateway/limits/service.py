"""Limits: request rates, tasks in flight, model access and key budgets.

Rules:
- **Rates** are per key and per tenant: a sustained rate (requests per minute)
  with a burst allowance, enforced by GCRA in one Lua script over Redis. One
  round trip checks every limit that applies; a request is counted against all
  of them or none. Time is Redis's ``TIME``, one clock for every gateway.
  Redis unreachable or silent for ``redis_timeout_seconds``: 503, never an
  unlimited pass.
- **In flight** (pending + processing) is a counter on the tenant row, raised
  by the submit's database call (``tollgate_submit``, migration 0007) and lowered
  by the settlement in the call that ends the task (``tollgate_settle``, migration
  0014), so no ending path can leak a slot.
- **Model access**: a tenant and a key may each carry a list of models; a
  request may use a model on both lists (no list: every model).
- **Key budgets** count what a key reserves, per total, UTC day and UTC month
  (``key_spend``, also written by ``tollgate_submit``); settlement
  (``tollgate_settle``) gives back what was reserved but not charged.
  A reservation that would cross a budget is refused (a budget of 0 allows
  nothing paid; no budget is ``None``).
- A rate set without a burst gets burst = min(the default burst, the rate), so
  ``--rpm 30`` alone lets 30 through at once, not the default 100.
- The ``RateLimit`` headers describe the policy they name (``q`` per ``w`` = 60 s):
  ``r`` is never above ``q`` and ``t`` never above ``w``, even for an explicit burst
  larger than the rate.
- Limits live on the tenant and key rows (``None``: the settings' default;
  0: no limit). Gateways cache them with the key (``key_cache_ttl_seconds``),
  so a change reaches every process within seconds.
"""

import asyncio
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import Table

from gateway import metrics
from gateway.auth import Principal
from gateway.errors import ApiError, ServiceUnavailable
from gateway.redis_keys import rate_key_for_key, rate_key_for_tenant
from gateway.script_batch import ScriptBatch
from gateway.settings import Settings
from gateway.tenants.models import KeySpend, Tenant
from pricing.money import credits_from_micros

tenants: Table = Tenant.__table__  # type: ignore[attr-defined]
key_spend: Table = KeySpend.__table__  # type: ignore[attr-defined]


WINDOW_SECONDS = 60  # rates are per minute


class RateLimited(ApiError):
    status = 429
    code = "rate_limit_exceeded"
    type = "rate_limit_error"
    default_message = "Too many requests, please try again later"


class TooManyInFlight(ApiError):
    status = 429
    code = "too_many_tasks_in_flight"
    type = "rate_limit_error"


class KeyBudgetExceeded(ApiError):
    status = 402
    code = "key_budget_exceeded"
    type = "insufficient_quota"


# GCRA over several limits at once, all or nothing. KEYS: one per limit.
# ARGV: per limit, the emission interval and the burst tolerance (microseconds:
# fine enough that any rate up to millions a minute is kept within 0.2 %).
# Returns {allowed, retry_us, remaining_1, reset_us_1, remaining_2, ...}.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tats = {}
local retry = 0
for i = 1, #KEYS do
  local tolerance = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  tats[i] = tat
  if now < tat - tolerance then
    retry = math.max(retry, tat - tolerance - now)
  end
end
local out = {retry == 0 and 1 or 0, retry}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local tolerance = tonumber(ARGV[2 * i])
  local tat = tats[i]
  if retry == 0 then
    tat = tat + interval
    redis.call('SET', KEYS[i], string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
  end
  local remaining = math.floor((now + tolerance - tat) / interval) + 1
  if remaining < 0 or (retry > 0 and now < tat - tolerance) then remaining = 0 end
  table.insert(out, remaining)
  table.insert(out, tat - now)
end
return out
"""


@dataclass(frozen=True, slots=True)
class RateLimit:
    name: str  # "key" or "tenant", as the headers name the policy
    redis_key: str
    per_minute: int
    burst: int

    @property
    def interval_us(self) -> int:
        return max(1, 60_000_000 // self.per_minute)

    @property
    def tolerance_us(self) -> int:
        return self.interval_us * (self.burst - 1)


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    retry_after_us: int
    limits: tuple[RateLimit, ...]
    remaining: tuple[int, ...]
    reset_us: tuple[int, ...]

    def headers(self) -> dict[str, str]:
        """The IETF httpapi RateLimit-Policy and RateLimit fields, one item per limit."""
        if not self.limits:
            return {}
        policy = ", ".join(
            f'"{lim.name}";q={lim.per_minute};w={WINDOW_SECONDS}' for lim in self.limits
        )
        # A burst above the rate can leave more than the quota, or longer than the
        # window to refill: the headers stay within the policy they state.
        state = ", ".join(
            f'"{lim.name}";r={min(left, lim.per_minute)};'
            f"t={min(math.ceil(reset / 1_000_000), WINDOW_SECONDS)}"
            for lim, left, reset in zip(self.limits, self.remaining, self.reset_us, strict=True)
        )
        headers = {"RateLimit-Policy": policy, "RateLimit": state}
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_us / 1_000_000)))
        return headers


def _pick(value: int | None, default: int) -> int:
    return default if value is None else value


def effective_burst(per_minute: int, burst: int | None, default_burst: int) -> int:
    """The burst that applies: its own if set, else the default capped at the rate."""
    if burst is not None:
        return max(1, burst)
    if per_minute <= 0:  # no rate limit: nothing to cap
        return max(1, default_burst)
    return max(1, min(default_burst, per_minute))


def rate_limits(settings: Settings, principal: Principal) -> tuple[RateLimit, ...]:
    found = []
    key_rate = _pick(principal.key_rate_per_minute, settings.default_key_rate_limit_per_minute)
    if key_rate > 0:
        burst = effective_burst(
            key_rate, principal.key_rate_burst, settings.default_key_rate_limit_burst
        )
        found.append(RateLimit("key", rate_key_for_key(principal.key_id), key_rate, burst))
    tenant_rate = _pick(
        principal.tenant_rate_per_minute, settings.default_tenant_rate_limit_per_minute
    )
    if tenant_rate > 0:
        burst = effective_burst(
            tenant_rate, principal.tenant_rate_burst, settings.default_tenant_rate_limit_burst
        )
        found.append(
            RateLimit("tenant", rate_key_for_tenant(principal.tenant_id), tenant_rate, burst)
        )
    return tuple(found)


class RateLimiter:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._script = redis.register_script(_GCRA)
        self._settings = settings
        # Checks that arrive together share one round trip (gateway/script_batch.py).
        self.batch = ScriptBatch(
            redis, self._script, settings.redis_timeout_seconds, name="rate-limit-batch"
        )

    async def check(self, principal: Principal) -> RateDecision:
        """Count one request against every rate limit that applies, or raise RateLimited."""
        limits = rate_limits(self._settings, principal)
        if not limits:
            return RateDecision(True, 0, (), (), ())
        args: list[int] = []
        for lim in limits:
            args += [lim.interval_us, lim.tolerance_us]
        try:
            # A Redis that accepts connections but never answers must not hang requests.
            async with asyncio.timeout(self._settings.redis_timeout_seconds):
                raw: list[Any] = await self.batch.run([lim.redis_key for lim in limits], args)
        except (RedisError, TimeoutError):
            raise ServiceUnavailable(
                "Rate limits cannot be checked right now; please retry",
                headers={"Retry-After": "1"},
            ) from None
        values = [int(v) for v in raw]
        decision = RateDecision(
            allowed=values[0] == 1,
            retry_after_us=values[1],
            limits=limits,
            remaining=tuple(values[2::2]),
            reset_us=tuple(values[3::2]),
        )
        if not decision.allowed:
            hit = [
                lim.name for lim, left in zip(limits, decision.remaining, strict=True) if left == 0
            ]
            # One refusal, one count: the key's limit when both are exhausted.
            metrics.rate_limit_refused(hit[0] if hit else "key")
            raise RateLimited(
                f"Too many requests for this {' and '.join(hit) or 'key'}: "
                f"retry after {decision.headers()['Retry-After']} s",
                headers=decision.headers(),
            )
        return decision


def check_model_access(principal: Principal, model: str) -> bool:
    allowed = principal.allowed_models
    return allowed is None or model in allowed


def max_in_flight(settings: Settings, principal: Principal) -> int:
    """The tenant's cap on tasks in flight (0: none)."""
    return _pick(principal.max_in_flight, settings.default_max_in_flight)


def too_many_in_flight(cap: int) -> TooManyInFlight:
    """The refusal of a submit the database found over ``cap`` (``tollgate_submit``)."""
    metrics.rate_limit_refused("in_flight")
    return TooManyInFlight(
        f"Too many tasks in flight: this tenant may have {cap} pending or processing "
        "at once; wait for some to finish"
    )


def spend_periods(moment: datetime) -> tuple[str, str, str]:
    """The budget periods a reservation made at ``moment`` counts in (UTC).

    ``tollgate_settle`` (migration 0014) names the same periods in SQL."""
    moment = moment.astimezone(UTC)
    return ("total", f"day:{moment:%Y-%m-%d}", f"month:{moment:%Y-%m}")


def key_budget_exceeded(period: int, budget: int, spent: int, amount: int) -> KeyBudgetExceeded:
    """The refusal of a reservation that would cross budget ``period`` (0 total, 1 daily,
    2 monthly) of the key, which had ``spent`` before it (``tollgate_submit``)."""
    metrics.rate_limit_refused("key_budget")
    label = ("total", "daily", "monthly")[period]
    return KeyBudgetExceeded(
        f"This key's {label} budget of {credits_from_micros(budget)} credits would be "
        f"exceeded: {credits_from_micros(spent)} already reserved or "
        f"spent, this request needs {credits_from_micros(amount)}"
    )
