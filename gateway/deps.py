"""What a request handler can ask for: the process's services, the caller, a unit of work.

``Services`` is built once at start-up (``app.py``) and kept on the app state.
``UnitOfWork`` is the request scope's transaction: it commits when the handler
returns, rolls back when it raises, and runs ``after_commit`` callbacks (such as
enqueueing a job) only once the commit has succeeded.
"""

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from arq.connections import ArqRedis
from litestar import Request
from litestar.datastructures import State
from litestar.di import NamedDependency
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.auth import KeyCache, Principal
from gateway.catalog_view import ModelLists
from gateway.limits.service import RateLimiter
from gateway.prices.book import PriceBook
from gateway.script_batch import ScriptBatch
from gateway.settings import Settings
from gateway.storage import Storage, UrlSigner
from gateway.tasks.backlog import Backlog
from gateway.tasks.events import TaskEvents
from gateway.tasks.reads import TaskReads
from gateway.tasks.reservations import Reservations
from gateway.tasks.service import FinishedTasks
from pricing.catalog import Catalog

logger = logging.getLogger("tollgate.deps")


@dataclass
class Services:
    settings: Settings
    catalog: Catalog
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    redis: ArqRedis
    keys: KeyCache
    storage: Storage
    signer: UrlSigner
    limiter: RateLimiter
    quick_redis: Redis  # the request path's (gateway/redis_client.py)
    pg: Any  # asyncpg.Pool (untyped): the hot paths' pool, gateway/db.create_hot_pool
    model_lists: ModelLists
    prices: PriceBook  # the prices in force: catalogue, groups, rates (gateway/prices)
    finished: FinishedTasks
    task_events: TaskEvents  # the process's one subscription to task signals
    task_reads: TaskReads  # reads of tasks by id that arrive together, in one query
    backlog: Backlog  # each model's backlog estimate: overload refused at submit
    enqueues: ScriptBatch  # submits' jobs queued together (gateway/queue.enqueue_batch)
    reservations: Reservations  # a tenant's submits reserved together (tasks/reservations)


@dataclass
class UnitOfWork:
    session: AsyncSession
    after_commit: list[Callable[[], Awaitable[object]]] = field(default_factory=list)


# Handler parameter types: litestar injects these by name.
ServicesDep = NamedDependency[Services]
PrincipalDep = NamedDependency[Principal]
UnitOfWorkDep = NamedDependency[UnitOfWork]


def services(state: State) -> Services:
    svc: Services = state.services
    return svc


async def provide_services(state: State) -> Services:
    return services(state)


RATE_HEADERS = "rate_limit_headers"


async def provide_principal(
    request: Request[object, object, State], services: ServicesDep
) -> Principal:
    """Authenticate the key, then count the request against its rate limits.

    It takes ``services`` although the app state has it: depending on it puts the two in
    a row, where litestar awaits them one after the other, instead of side by side in a
    task group of their own, which cost more than the key lookup (docs/performance.md).
    """
    svc = services
    principal = await svc.keys.authenticate(request.headers.get("authorization"))
    decision = await svc.limiter.check(principal)
    # Allowed responses tell the client what is left (added by app.add_rate_limit_headers).
    request.state[RATE_HEADERS] = decision.headers()
    return principal


async def provide_uow(state: State) -> AsyncIterator[UnitOfWork]:
    svc = services(state)
    async with svc.sessions() as session:
        async with session.begin():
            uow = UnitOfWork(session)
            yield uow
        for callback in uow.after_commit:
            try:
                await callback()
            except Exception:
                # The commit stands; the reconciler re-enqueues from the task rows.
                logger.exception("after-commit step failed; the reconciler will retry it")
