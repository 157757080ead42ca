"""Console sessions in Redis, the login throttle, and each session's CSRF token.

A session is a random token in an ``HttpOnly`` cookie; Redis keeps, under the
token's hash, the user it belongs to and its CSRF token, for ``SESSION_TTL``
from the last request. Each user's sessions are also listed, so that changing a
password (or disabling the user) ends them all but the current one.

Logins are throttled per account and per client address: failures are counted in
a window; past the limit, that account (or address) is locked until the window
ends, whatever the password.
"""

import hashlib
import hmac
import json
import secrets
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from redis.asyncio import Redis

T = TypeVar("T")
SESSION_COOKIE = "tollgate_console"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "_csrf"
SESSION_TTL = 12 * 3600
LOGIN_WINDOW = 15 * 60
MAX_FAILURES_PER_ACCOUNT = 5
MAX_FAILURES_PER_ADDRESS = 20


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _session_key(namespace: str, digest: str) -> str:
    return f"tollgate:console:{namespace}:session:{digest}"


def _user_sessions_key(namespace: str, user_id: str) -> str:
    return f"tollgate:console:{namespace}:user:{user_id}"


def _failures_key(namespace: str, kind: str, who: str) -> str:
    return f"tollgate:console:{namespace}:login:{kind}:{hashlib.sha256(who.encode()).hexdigest()}"


async def _awaited(value: Awaitable[T] | T) -> T:
    """redis-py types some commands as "awaitable or not"; on the asyncio client they are."""
    if isinstance(value, Awaitable):
        return await value
    return value


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    token: str
    user_id: str
    csrf: str

    def csrf_ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.csrf.encode())


class SessionStore:
    def __init__(self, redis: Redis, namespace: str) -> None:
        self._redis = redis
        self._ns = namespace

    async def create(self, user_id: str) -> ConsoleSession:
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
        digest = _hash(token)
        value = json.dumps({"user_id": user_id, "csrf": csrf})
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(_session_key(self._ns, digest), value, ex=SESSION_TTL)
            pipe.sadd(_user_sessions_key(self._ns, user_id), digest)
            pipe.expire(_user_sessions_key(self._ns, user_id), SESSION_TTL)
            await pipe.execute()
        return ConsoleSession(token=token, user_id=user_id, csrf=csrf)

    async def load(self, token: str | None) -> ConsoleSession | None:
        if not token or len(token) > 100:
            return None
        key = _session_key(self._ns, _hash(token))
        raw = await self._redis.get(key)
        if raw is None:
            return None
        await self._redis.expire(key, SESSION_TTL)
        data = json.loads(raw)
        return ConsoleSession(token=token, user_id=data["user_id"], csrf=data["csrf"])

    async def end(self, session: ConsoleSession) -> None:
        digest = _hash(session.token)
        await self._redis.delete(_session_key(self._ns, digest))
        await _awaited(self._redis.srem(_user_sessions_key(self._ns, session.user_id), digest))

    async def end_all(self, user_id: str, *, keep: ConsoleSession | None = None) -> int:
        """End the user's sessions (all but ``keep``); how many ended."""
        listing = _user_sessions_key(self._ns, user_id)
        digests = {
            d.decode() if isinstance(d, bytes) else d
            for d in await _awaited(self._redis.smembers(listing))
        }
        if keep is not None:
            digests.discard(_hash(keep.token))
        if not digests:
            return 0
        ended: int = await self._redis.delete(*(_session_key(self._ns, d) for d in digests))
        await _awaited(self._redis.srem(listing, *digests))
        return ended

    # --- the login throttle ----------------------------------------------------------------

    async def locked(self, email: str, address: str) -> bool:
        account, client = await self._redis.mget(
            _failures_key(self._ns, "account", email), _failures_key(self._ns, "address", address)
        )
        return int(account or 0) >= MAX_FAILURES_PER_ACCOUNT or (
            int(client or 0) >= MAX_FAILURES_PER_ADDRESS
        )

    async def failed(self, email: str, address: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            for kind, who in (("account", email), ("address", address)):
                key = _failures_key(self._ns, kind, who)
                pipe.incr(key)
                pipe.expire(key, LOGIN_WINDOW, nx=True)
            await pipe.execute()

    async def succeeded(self, email: str) -> None:
        await self._redis.delete(_failures_key(self._ns, "account", email))
