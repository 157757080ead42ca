"""Make, list and redeem redemption codes (rules: ``gateway/redemption/__init__.py``).

Services take the session first and never commit; used by the routes and the CLI.
"""

import hashlib
import math
import secrets
import time
from datetime import datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import Table, text
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.db import utcnow
from gateway.errors import ApiError, InvalidRequest, NotFound, ServiceUnavailable
from gateway.ledger import service as ledger
from gateway.ledger.models import EntryKind
from gateway.limits.service import RateLimited
from gateway.redemption.models import RedemptionBatch, RedemptionCode
from gateway.redis_keys import redeem_attempts_key
from gateway.tenants.models import new_id
from pricing.money import credits_from_micros

codes_table: Table = RedemptionCode.__table__  # type: ignore[attr-defined]

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford's base 32
MAX_COUNT = 1000
MAX_CODE_CHARS = 64


class CodeNotFound(NotFound):
    code = "redemption_code_not_found"
    default_message = "code: no such redemption code"


class CodeUsed(ApiError):
    status = 409
    code = "redemption_code_used"
    default_message = "code: this redemption code has already been redeemed"


class CodeExpired(ApiError):
    status = 410
    code = "redemption_code_expired"
    default_message = "code: this redemption code has expired"


def new_code() -> str:
    groups = ["".join(secrets.choice(_ALPHABET) for _ in range(5)) for _ in range(4)]
    return "TG-" + "-".join(groups)


def code_hash(code: str) -> str:
    normalized = code.upper().replace("-", "").replace(" ", "")
    return hashlib.sha256(normalized.encode()).hexdigest()


async def create_batch(
    session: AsyncSession,
    *,
    amount_micros: int,
    count: int,
    expires_at: datetime | None = None,
    note: str = "",
) -> tuple[RedemptionBatch, list[str]]:
    """A batch of ``count`` codes worth ``amount_micros`` each; the codes, returned once."""
    if amount_micros <= 0:
        raise InvalidRequest("amount", "must be greater than zero")
    if not 1 <= count <= MAX_COUNT:
        raise InvalidRequest("count", f"must be 1 to {MAX_COUNT}")
    if expires_at is not None and expires_at <= utcnow():
        raise InvalidRequest("expires_at", "must be in the future")
    if len(note) > 500 or "\x00" in note:
        raise InvalidRequest("note", "must be at most 500 characters, without NUL")
    batch = RedemptionBatch(
        id=new_id("rcb"), amount_micros=amount_micros, count=count, expires_at=expires_at, note=note
    )
    session.add(batch)
    await session.flush()
    codes = [new_code() for _ in range(count)]
    for code in codes:
        session.add(RedemptionCode(id=new_id("rc"), batch_id=batch.id, code_hash=code_hash(code)))
    await session.flush()
    return batch, codes


def batch_json(batch: RedemptionBatch, codes: list[RedemptionCode] | None = None) -> dict[str, Any]:
    found: dict[str, Any] = {
        "id": batch.id,
        "amount": credits_from_micros(batch.amount_micros),
        "amount_micros": batch.amount_micros,
        "count": batch.count,
        "expires_at": batch.expires_at.isoformat() if batch.expires_at else None,
        "note": batch.note,
        "created_at": batch.created_at.isoformat(),
    }
    if codes is not None:
        found["redeemed"] = sum(1 for c in codes if c.redeemed_at is not None)
        found["codes"] = [
            {
                "id": c.id,
                "redeemed_at": c.redeemed_at.isoformat() if c.redeemed_at else None,
                "tenant_id": c.redeemed_by_tenant_id,
                "key_id": c.redeemed_by_key_id,
            }
            for c in codes
        ]
    return found


async def list_batches(session: AsyncSession, limit: int = 100) -> list[dict[str, Any]]:
    """The newest batches, each with its codes: which were used, by whom, when."""
    batches = list(
        (
            await session.exec(
                select(RedemptionBatch)
                .order_by(col(RedemptionBatch.created_at).desc())
                .limit(limit)
            )
        ).all()
    )
    by_batch: dict[str, list[RedemptionCode]] = {b.id: [] for b in batches}
    if batches:
        found = await session.exec(
            select(RedemptionCode)
            .where(col(RedemptionCode.batch_id).in_(list(by_batch)))
            .order_by(col(RedemptionCode.id))
        )
        for code in found.all():
            by_batch[code.batch_id].append(code)
    return [batch_json(b, by_batch[b.id]) for b in batches]


_TAKE = text(
    """
    UPDATE redemption_codes c
    SET redeemed_at = now(), redeemed_by_tenant_id = :tenant, redeemed_by_key_id = :key
    FROM redemption_batches b
    WHERE c.code_hash = :hash AND c.redeemed_at IS NULL AND b.id = c.batch_id
      AND (b.expires_at IS NULL OR b.expires_at > now())
    RETURNING c.id, b.id, b.amount_micros
    """
)
_WHY = text(
    """
    SELECT c.redeemed_at, b.expires_at FROM redemption_codes c
    JOIN redemption_batches b ON b.id = c.batch_id WHERE c.code_hash = :hash
    """
)


async def redeem(
    session: AsyncSession, tenant_id: str, code: str, *, key_id: str | None = None
) -> dict[str, Any]:
    """Take the code for the tenant and add its credits to the ledger, or a 4xx.

    ``key_id`` is the key that asked (recorded with the code); None for a caller that
    is not a key, such as the web console's signed-in user.
    """
    if not code.strip() or len(code) > MAX_CODE_CHARS:
        raise InvalidRequest("code", f"must be 1 to {MAX_CODE_CHARS} characters")
    digest = code_hash(code)
    conn = await session.connection()
    params = {"hash": digest, "tenant": tenant_id, "key": key_id}
    taken = (await conn.execute(_TAKE, params)).first()
    if taken is None:
        why = (await conn.execute(_WHY, {"hash": digest})).first()
        if why is None:
            raise CodeNotFound()
        if why[0] is not None:
            raise CodeUsed()
        raise CodeExpired()
    code_id, batch_id, amount = taken
    await ledger.credit(
        session,
        tenant_id,
        int(amount),
        kind=EntryKind.TOPUP,
        idempotency_key=f"redeem:{code_id}",
        reason=f"redemption code {code_id} (batch {batch_id})",
    )
    balance = await ledger.balance(session, tenant_id)
    return {
        "code_id": code_id,
        "credited": credits_from_micros(int(amount)),
        "credited_micros": int(amount),
        "balance": credits_from_micros(balance.balance_micros),
        "available": credits_from_micros(balance.available_micros),
    }


async def check_attempt_rate(redis: Redis, who: str, per_minute: int) -> None:
    """Count one redemption attempt of ``who`` (``key:<id>``, or another caller's own
    name such as ``user:<id>``); 429 with Retry-After past ``per_minute``.

    A fixed one-minute window (Redis ``INCR`` with an expiry): simple, and enough to
    make guessing 100-bit codes hopeless.
    """
    now = time.time()
    window = int(now // 60)
    name = redeem_attempts_key(who, window)
    try:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.incr(name)
            pipe.expire(name, 120)
            count, _ = await pipe.execute()
    except (RedisError, OSError, TimeoutError):
        raise ServiceUnavailable(headers={"Retry-After": "1"}) from None
    if int(count) > per_minute:
        retry = max(1, math.ceil((window + 1) * 60 - now))
        raise RateLimited(
            f"Too many redemption attempts: at most {per_minute} a minute per key",
            headers={"Retry-After": str(retry)},
        )
