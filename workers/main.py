"""The worker process: ``tollgate-worker`` (or ``python -m workers``).

Builds its settings from the environment at start-up, never at import time,
then runs an arq worker with the generation job and the reconciler cron.
"""

import asyncio
import contextlib
import functools
import logging
import sys
from collections.abc import Coroutine
from typing import Any

import httpx
import uvloop
from arq import cron
from arq.connections import ArqRedis, RedisSettings
from redis.exceptions import RedisError

from gateway import metrics
from gateway.db import (
    DatabaseNotReady,
    check_migrated,
    close_hot_pool,
    create_engine,
    create_hot_pool,
    session_factory,
)
from gateway.heap import freeze_startup_objects
from gateway.logs import configure_logging
from gateway.outbound import OutboundClient, StreamsTransport
from gateway.redis_keys import (
    CALLBACK_JOB,
    CANCEL_JOB,
    CHANNEL_TEST_JOB,
    GENERATE_JOB,
    queue_wake_channel,
    task_events_channel,
)
from gateway.settings import Settings, SettingsError, load_settings
from gateway.storage import build_signer, build_storage
from gateway.tasks import events
from pricing.catalog import CatalogError, load_catalog
from workers.callbacks import CallbackDeps, deliver_callback, reconcile_callbacks
from workers.channel_test import test_channel
from workers.circuits import Circuits
from workers.deps import WorkerDeps
from workers.generate import cancel_upstream, generate_task
from workers.ledger_audit import ledger_check_cron
from workers.liveness import Liveness
from workers.outage import (
    Health,
    is_database_outage,
    is_redis_outage,
    retry_on_outage,
    wait_for_database,
    watch_database,
)
from workers.providers import ADAPTERS
from workers.reconciler import reap_dead_runs, reconcile, recover_lost_queue, restore_slots
from workers.resilient import ResilientWorker
from workers.retention import retention_cron
from workers.routing import Directory
from workers.upstream_slots import UpstreamSlots

logger = logging.getLogger("tollgate.worker")

# The poll loop's fallback sleep: a new job wakes it at once (the queue's wake channel);
# this bounds only deferred jobs, crons and a missed wake-up.
POLL_DELAY = 0.05

# How often each worker beats, checks that Redis still holds its queue
# (``recover_lost_queue``) and looks for dead workers' runs (``reap_dead_runs``).
QUEUE_CHECK_SECONDS = 1.0

# How long a worker starting behind a queue no worker has marked lets its recovery run before
# taking jobs (``_recover_before_the_first_job``).
RECOVERY_HEAD_START_SECONDS = 5.0

# How often each worker hands on the slots that expired leases and lapsed back-offs freed.
SWEEP_SECONDS = 0.2


def check_upstreams(settings: Settings) -> None:
    """Refuse at start-up a TOLLGATE_UPSTREAMS entry naming no known adapter."""
    for name in settings.upstreams:
        if name not in ADAPTERS:
            raise SettingsError(
                f"TOLLGATE_UPSTREAMS: unknown adapter {name!r} (known: {', '.join(ADAPTERS)})"
            )


def create_worker(settings: Settings, **overrides: Any) -> ResilientWorker:
    catalog = load_catalog(settings.catalog_path)
    if catalog.credit_currency != settings.credit_currency:
        raise CatalogError(
            f"the catalogue's prices are in {catalog.credit_currency}, but "
            f"TOLLGATE_CREDIT_CURRENCY is {settings.credit_currency}"
        )
    check_upstreams(settings)
    storage = build_storage(settings)

    health = Health("worker")

    async def startup(ctx: dict[str, Any]) -> None:
        async with contextlib.AsyncExitStack() as opened:
            opened.push_async_callback(storage.close)
            await _start(ctx, opened)
            # Started: what it opened is closed by the shutdown (a start cut short, by a
            # stop or a failure, closes it here).
            ctx["opened"] = opened.pop_all()
        freeze_startup_objects()

    async def _start(ctx: dict[str, Any], opened: contextlib.AsyncExitStack) -> None:
        engine = create_engine(settings)
        opened.push_async_callback(engine.dispose)
        await wait_for_database(engine, health)
        await check_migrated(engine)
        # Task changes this worker commits signal the gateways' waiting requests.
        publisher = events.Publisher(ctx["redis"], task_events_channel(settings.queue_name))
        publisher.start()
        opened.push_async_callback(publisher.close)
        events.attach(engine, publisher)
        opened.callback(events.detach, engine)
        # httpx's client on our HTTP/1.1 exchange, its plain requests past httpx's client
        # layers (gateway/outbound/client.py).
        http = OutboundClient(
            StreamsTransport(
                max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0
            ),
            timeout=httpx.Timeout(
                settings.upstream_timeout_seconds, connect=settings.upstream_connect_timeout_seconds
            ),
        )
        opened.push_async_callback(http.aclose)
        # The task's claim, lease writes and end: one autocommit statement each.
        pg = await create_hot_pool(settings)
        opened.push_async_callback(close_hot_pool, pg)
        ctx["deps"] = WorkerDeps(
            settings=settings,
            catalog=catalog,
            engine=engine,
            storage=storage,
            http=http,
            directory=Directory(settings, catalog, engine, http),
            slots=UpstreamSlots(
                ctx["redis"],
                lease_seconds=settings.lease_seconds,
                poll_seconds=settings.poll_interval_seconds,
                queue_name=settings.queue_name,
                restore=functools.partial(restore_slots, ctx["redis"], engine, settings),
            ),
            circuits=Circuits(
                ctx["redis"],
                namespace=settings.queue_name,
                threshold=settings.circuit_failure_threshold,
                window_seconds=settings.circuit_window_seconds,
                cooldown_seconds=settings.circuit_cooldown_seconds,
            ),
            image_allowed_hosts=frozenset(settings.outbound_allowed_hosts),
            pg=pg,
            liveness=Liveness(
                ctx["redis"], settings.queue_name, settings.worker_dead_after_seconds
            ),
        )
        await _recover_before_the_first_job(ctx["deps"], ctx["redis"], opened)
        _start_background(
            opened,
            watch_database(engine, health),
            _sweep_slots(ctx["deps"].slots),
            _every_second(ctx["deps"], ctx["redis"], ctx["deps"].liveness),
        )

    interval = settings.reconcile_interval_seconds
    options: dict[str, Any] = {
        "functions": [
            # A job waiting for an upstream slot parks and is queued again when handed one;
            # arq retries it only for open circuits and outages, which the deadline ends.
            _named(retry_on_outage(health, generate_task), GENERATE_JOB, max_tries=100_000),
            _named(retry_on_outage(health, cancel_upstream), CANCEL_JOB, max_tries=3),
            _named(test_channel, CHANNEL_TEST_JOB, max_tries=1),
        ],
        "cron_jobs": [
            cron(
                reconcile,
                name="reconcile",
                second=set(range(0, 60, interval)),
                run_at_startup=True,
                unique=True,
                timeout=60,
            ),
            ledger_check_cron(settings),
            *retention_cron(settings),
        ],
        "on_startup": startup,
        "on_shutdown": _shutdown,
        "redis_settings": RedisSettings.from_dsn(settings.redis_url),
        "queue_name": settings.queue_name,
        "max_jobs": settings.worker_max_jobs,
        # A job may wait out the whole task deadline; a lost job is re-queued by
        # the reconciler long before arq's own in-progress timeout would.
        "job_timeout": settings.task_deadline_seconds + 60,
        "keep_result": 0,
        "max_tries": 1000,
        "poll_delay": POLL_DELAY,
        "handle_signals": True,
        # SIGTERM: stop taking jobs, let running ones finish, then cancel (hand back) the rest.
        "job_completion_wait": settings.worker_shutdown_grace_seconds,
    }
    options.update(overrides)
    return ResilientWorker(
        health=health, wake_channel=queue_wake_channel(settings.queue_name), **options
    )


def create_callback_worker(settings: Settings, **overrides: Any) -> ResilientWorker:
    """A worker for the callback queue: deliveries and their reconciler."""
    signer = build_signer(settings)  # callbacks carry the task's result links

    health = Health("callback worker")

    async def startup(ctx: dict[str, Any]) -> None:
        async with contextlib.AsyncExitStack() as opened:
            engine = create_engine(settings)
            opened.push_async_callback(engine.dispose)
            await wait_for_database(engine, health)
            await check_migrated(engine)
            deps = CallbackDeps(
                settings=settings,
                engine=engine,
                sessions=session_factory(engine),
                signer=signer,
            )
            opened.pop_all()  # the deps close the engine with the rest
            opened.push_async_callback(deps.aclose)
            ctx["callback_deps"] = deps
            _start_background(opened, watch_database(engine, health))
            ctx["opened"] = opened.pop_all()
        freeze_startup_objects()

    options: dict[str, Any] = {
        "functions": [_named(retry_on_outage(health, deliver_callback), CALLBACK_JOB)],
        "cron_jobs": [
            cron(
                reconcile_callbacks,
                name="reconcile_callbacks",
                second=set(range(0, 60, settings.reconcile_interval_seconds)),
                run_at_startup=True,
                unique=True,
                timeout=60,
            )
        ],
        "on_startup": startup,
        "on_shutdown": _shutdown,
        "redis_settings": RedisSettings.from_dsn(settings.redis_url),
        "queue_name": settings.callback_queue_name,
        "max_jobs": settings.callback_max_jobs,
        # An attempt takes at most the callback timeout; one job is one attempt.
        "job_timeout": settings.callback_timeout_seconds + 30,
        "keep_result": 0,
        "max_tries": 3,
        "poll_delay": POLL_DELAY,
        "handle_signals": True,
        # SIGTERM: stop taking jobs, let running ones finish, then cancel (hand back) the rest.
        "job_completion_wait": settings.worker_shutdown_grace_seconds,
    }
    options.update(overrides)
    return ResilientWorker(
        health=health, wake_channel=queue_wake_channel(settings.callback_queue_name), **options
    )


async def _sweep_slots(slots: UpstreamSlots | None) -> None:
    """Hand on slots freed by expired leases and lapsed back-offs (a release hands its own)."""
    if slots is None:
        return
    while True:
        await asyncio.sleep(SWEEP_SECONDS)
        try:
            await slots.sweep()
        except RedisError:
            pass  # the poll loop logs the outage
        except Exception as exc:
            if not (is_redis_outage(exc) or is_database_outage(exc)):
                logger.exception("slot sweep failed")


async def _recover_before_the_first_job(
    deps: WorkerDeps, redis: ArqRedis, opened: contextlib.AsyncExitStack
) -> None:
    """A queue no worker has marked (Redis lost it, or workers start after the gateways took
    tasks) is queued again before this worker takes a job, for ``RECOVERY_HEAD_START_SECONDS``
    at most. Recovering beside its own runs, it would queue again the tasks those runs end
    meanwhile: each a job that only finds its task over, queued ahead of newer tasks (a
    fifth of a 2,000-task backlog in the benchmark). A backlog too large to go again within
    the head start (tens of thousands) goes on beside the jobs rather than idle the worker."""
    recovery = asyncio.create_task(_recover_queue(deps, redis))
    opened.push_async_callback(_stop, recovery)
    await asyncio.wait({recovery}, timeout=RECOVERY_HEAD_START_SECONDS)


async def _recover_queue(deps: WorkerDeps, redis: ArqRedis) -> None:
    """``recover_lost_queue``; an outage leaves it to the every-second check."""
    try:
        await recover_lost_queue(deps, redis)
    except Exception as exc:
        if not (is_redis_outage(exc) or is_database_outage(exc)):
            logger.exception("recovering the queue at start-up failed")


async def _every_second(deps: WorkerDeps, redis: ArqRedis, liveness: Liveness) -> None:
    """The worker's beat; the queue queued again as soon as Redis is found to have lost its
    state; the tasks of workers found dead handed on."""
    while True:
        try:
            await liveness.beat()
            await recover_lost_queue(deps, redis)
            await reap_dead_runs(deps, redis, liveness)
        except RedisError:
            pass  # the poll loop logs the outage
        except Exception as exc:
            if not (is_redis_outage(exc) or is_database_outage(exc)):
                logger.exception("the worker's every-second duties failed")
        await asyncio.sleep(QUEUE_CHECK_SECONDS)


def _start_background(opened: contextlib.AsyncExitStack, *loops: Coroutine[Any, Any, None]) -> None:
    """Run ``loops`` beside the jobs; they are stopped first at the shutdown."""
    for loop in loops:
        task = asyncio.create_task(loop)
        opened.push_async_callback(_stop, task)


async def _stop(task: "asyncio.Task[None]") -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _shutdown(ctx: dict[str, Any]) -> None:
    """Close what the start-up opened, last opened first (arq calls this only once started)."""
    opened: contextlib.AsyncExitStack | None = ctx.pop("opened", None)
    if opened is not None:
        await opened.aclose()


def _named(fn: Any, name: str, **options: Any) -> Any:
    from arq.worker import func

    return func(fn, name=name, **options)


def main() -> None:
    """``tollgate-worker`` runs generation; ``tollgate-worker --callbacks`` runs deliveries."""
    callbacks = "--callbacks" in sys.argv[1:]
    # uvloop, as the gateway's server: its sockets cost the upstream calls, the deliveries
    # and the Redis and PostgreSQL round trips far less than asyncio's own loop.
    asyncio.set_event_loop(uvloop.new_event_loop())
    try:
        settings = load_settings()
        worker = create_callback_worker(settings) if callbacks else create_worker(settings)
    except (SettingsError, CatalogError) as exc:
        sys.exit(f"tollgate-worker: {exc}")
    configure_logging(settings)
    metrics.configure(settings)
    stop_metrics = metrics.serve_worker_metrics(settings.metrics_port)
    try:
        worker.run()
    except DatabaseNotReady as exc:
        sys.exit(f"tollgate-worker: {exc}")
    finally:
        if stop_metrics is not None:
            stop_metrics()


if __name__ == "__main__":
    main()
