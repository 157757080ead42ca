"""The worker process: ``tollgate-worker`` (or ``python -m workers``).

Builds its settings from the environment at start-up, never at import time,
then runs an arq worker with the generation job and the reconciler cron.
"""

import logging
import math
import sys
from typing import Any

import httpx
from arq import cron
from arq.connections import RedisSettings
from arq.worker import Worker

from gateway.db import DatabaseNotReady, check_migrated, create_engine, session_factory
from gateway.redis_keys import CALLBACK_JOB, GENERATE_JOB
from gateway.settings import Settings, SettingsError, load_settings
from gateway.storage import LocalStorage, UrlSigner
from pricing.catalog import CatalogError, load_catalog
from workers.callbacks import CallbackDeps, deliver_callback, reconcile_callbacks
from workers.generate import WorkerDeps, generate_task
from workers.providers import ADAPTERS
from workers.providers.base import Endpoint, Provider
from workers.reconciler import reconcile
from workers.upstream_slots import MIN_WAIT_SECONDS, UpstreamSlots

logger = logging.getLogger("tollgate.worker")


def build_providers(settings: Settings, client: httpx.AsyncClient) -> dict[str, Provider]:
    providers: dict[str, Provider] = {}
    for name, account in settings.upstreams.items():
        adapter = ADAPTERS.get(name)
        if adapter is None:
            raise SettingsError(
                f"TOLLGATE_UPSTREAMS: unknown provider {name!r} (known: {', '.join(ADAPTERS)})"
            )
        providers[name] = adapter(
            client,
            Endpoint(
                base_url=str(account.base_url),
                api_key=account.api_key,
                submit_timeout=settings.upstream_timeout_seconds,
                poll_timeout=settings.upstream_poll_timeout_seconds,
            ),
        )
    return providers


def create_worker(settings: Settings, **overrides: Any) -> Worker:
    catalog = load_catalog(settings.catalog_path)

    async def startup(ctx: dict[str, Any]) -> None:
        engine = create_engine(settings)
        await check_migrated(engine)
        http = httpx.AsyncClient(
            timeout=httpx.Timeout(
                settings.upstream_timeout_seconds, connect=settings.upstream_connect_timeout_seconds
            ),
            trust_env=False,
        )
        ctx["deps"] = WorkerDeps(
            settings=settings,
            catalog=catalog,
            engine=engine,
            storage=LocalStorage(settings.storage_dir),
            http=http,
            providers=build_providers(settings, http),
            slots=UpstreamSlots(
                ctx["redis"],
                lease_seconds=settings.lease_seconds,
                poll_seconds=settings.poll_interval_seconds,
            ),
        )

    async def shutdown(ctx: dict[str, Any]) -> None:
        deps: WorkerDeps | None = ctx.get("deps")
        if deps is not None:
            await deps.http.aclose()
            await deps.engine.dispose()

    interval = settings.reconcile_interval_seconds
    # A job refused an upstream slot is run again later (arq's Retry, which counts as a
    # try); the task's deadline ends such waits, so the count must never end them first.
    slot_waits = math.ceil(settings.task_deadline_seconds / MIN_WAIT_SECONDS)
    options: dict[str, Any] = {
        "functions": [_named(generate_task, GENERATE_JOB, max_tries=slot_waits + 1000)],
        "cron_jobs": [
            cron(
                reconcile,
                name="reconcile",
                second=set(range(0, 60, interval)),
                run_at_startup=True,
                unique=True,
                timeout=60,
            )
        ],
        "on_startup": startup,
        "on_shutdown": shutdown,
        "redis_settings": RedisSettings.from_dsn(settings.redis_url),
        "queue_name": settings.queue_name,
        "max_jobs": settings.worker_max_jobs,
        # A job may wait out the whole task deadline; a lost job is re-queued by
        # the reconciler long before arq's own in-progress timeout would.
        "job_timeout": settings.task_deadline_seconds + 60,
        "keep_result": 0,
        "max_tries": 1000,
        "poll_delay": 0.05,
        "handle_signals": True,
    }
    options.update(overrides)
    return Worker(**options)


def create_callback_worker(settings: Settings, **overrides: Any) -> Worker:
    """A worker for the callback queue: deliveries and their reconciler."""

    async def startup(ctx: dict[str, Any]) -> None:
        engine = create_engine(settings)
        await check_migrated(engine)
        ctx["callback_deps"] = CallbackDeps(
            settings=settings,
            engine=engine,
            sessions=session_factory(engine),
            signer=UrlSigner(settings.signing_secret, settings.public_base_url),
        )

    async def shutdown(ctx: dict[str, Any]) -> None:
        deps: CallbackDeps | None = ctx.get("callback_deps")
        if deps is not None:
            await deps.engine.dispose()

    options: dict[str, Any] = {
        "functions": [_named(deliver_callback, CALLBACK_JOB)],
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
        "on_shutdown": shutdown,
        "redis_settings": RedisSettings.from_dsn(settings.redis_url),
        "queue_name": settings.callback_queue_name,
        "max_jobs": settings.callback_max_jobs,
        # An attempt takes at most the callback timeout; one job is one attempt.
        "job_timeout": settings.callback_timeout_seconds + 30,
        "keep_result": 0,
        "max_tries": 3,
        "poll_delay": 0.05,
        "handle_signals": True,
    }
    options.update(overrides)
    return Worker(**options)


def _named(fn: Any, name: str, **options: Any) -> Any:
    from arq.worker import func

    return func(fn, name=name, **options)


def main() -> None:
    """``tollgate-worker`` runs generation; ``tollgate-worker --callbacks`` runs deliveries."""
    callbacks = "--callbacks" in sys.argv[1:]
    try:
        settings = load_settings()
        worker = create_callback_worker(settings) if callbacks else create_worker(settings)
    except (SettingsError, CatalogError) as exc:
        sys.exit(f"tollgate-worker: {exc}")
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        worker.run()
    except DatabaseNotReady as exc:
        sys.exit(f"tollgate-worker: {exc}")


if __name__ == "__main__":
    main()
