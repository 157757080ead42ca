"""``create_app(settings)``: the one place that wires routes, DI, errors and lifespan."""

import asyncio
import functools
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from arq.connections import RedisSettings, create_pool
from litestar import Litestar, Request, Response, get
from litestar.datastructures import MutableScopeHeaders, State
from litestar.di import Provide
from litestar.enums import ScopeType
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway import logs, metrics
from gateway.account.routes import AccountController
from gateway.admin import admin_router
from gateway.auth import KeyCache, bearer_token
from gateway.callbacks.routes import WebhookController
from gateway.catalog_view import ModelLists
from gateway.console.router import console_router, static_router, template_config
from gateway.db import (
    check_migrated,
    close_hot_pool,
    create_engine,
    create_hot_pool,
    known_revisions,
    migration_head,
    session_factory,
)
from gateway.deps import RATE_HEADERS, Services, ServicesDep, provide_services
from gateway.errors import Unauthorized
from gateway.heap import freeze_startup_objects
from gateway.hot_reads import HotReads
from gateway.json_body import GatewayRequest
from gateway.krea.routes import KreaController
from gateway.limits.service import RateLimiter
from gateway.openai_api.routes import OpenAIController
from gateway.openapi_docs import (
    DOCS_PATH,
    OfflineSwagger,
    StrictStructSchemaPlugin,
    docs_assets_router,
    full_options_allow,
)
from gateway.prices.book import PriceBook
from gateway.queue import enqueue_batch
from gateway.redis_client import request_path_redis
from gateway.redis_keys import task_events_channel
from gateway.responses import exception_handler
from gateway.settings import Settings, load_settings
from gateway.storage import Storage, StorageUnavailable, build_signer, build_storage
from gateway.tasks import events
from gateway.tasks.backlog import Backlog
from gateway.tasks.reads import TaskReads
from gateway.tasks.reservations import Reservations
from gateway.tasks.routes import FileController, TaskController
from gateway.tasks.schemas import REQUEST_FIELDS
from gateway.tasks.service import FinishedTasks
from pricing.catalog import COMMON_FIELDS, Catalog, CatalogError, load_catalog


def check_catalog_fits_api(catalog: Catalog) -> None:
    """Every parameter the catalogue declares must be a field of the public request."""
    for entry in catalog.models:
        for name in entry.params:
            if name not in REQUEST_FIELDS or name in COMMON_FIELDS:
                raise CatalogError(
                    f"models ({entry.id}).params.{name}: not a field of POST /v1/images/generations"
                )


def load_checked_catalog(settings: Settings) -> Catalog:
    catalog = load_catalog(settings.catalog_path)
    check_catalog_fits_api(catalog)
    if catalog.credit_currency != settings.credit_currency:
        raise CatalogError(
            f"the catalogue's prices are in {catalog.credit_currency} (`credit_currency`), "
            f"but TOLLGATE_CREDIT_CURRENCY is {settings.credit_currency}: give a catalogue "
            "priced in the credit currency"
        )
    return catalog


@get("/healthz", include_in_schema=False, sync_to_thread=False)
def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def add_rate_limit_headers(message: Message, scope: Scope) -> None:
    """Put the caller's remaining allowance (set by ``provide_principal``) on the response."""
    if message["type"] != "http.response.start":
        return
    extra = scope.get("state", {}).get(RATE_HEADERS)
    if extra:
        headers = MutableScopeHeaders.from_message(message)
        for name, value in extra.items():
            if name not in headers:
                headers[name] = value


# --- Probes, metrics, and what every request gets -----------------------------------

logger = logging.getLogger("tollgate.app")
access_logger = logging.getLogger("tollgate.access")

READY_TIMEOUT_SECONDS = 1.0
_REQUEST_ID = logs.REQUEST_ID_HEADER.lower().encode()


@functools.cache
def _head() -> str | None:
    return migration_head()


@functools.cache
def _known() -> frozenset[str]:
    return known_revisions()


async def _database_ready(engine: AsyncEngine) -> dict[str, str]:
    head = _head()
    try:
        async with asyncio.timeout(READY_TIMEOUT_SECONDS), engine.connect() as conn:
            try:
                query = text("SELECT version_num FROM alembic_version")
                current = (await conn.execute(query)).scalar()
            except ProgrammingError:  # no alembic_version table: never migrated
                current = None
    except TimeoutError:
        return {"postgresql": "timeout"}
    except Exception as exc:
        logger.warning("readyz: PostgreSQL unreachable: %s", exc)
        return {"postgresql": "unreachable"}
    if current == head or (current is not None and current not in _known()):
        # A revision this code does not know is newer: a rolling upgrade (gateway/db.py).
        return {"postgresql": "ok", "migrations": "ok"}
    return {"postgresql": "ok", "migrations": f"at {current or 'no revision'}, needs {head}"}


async def _redis_ready(redis: Redis) -> dict[str, str]:
    try:
        async with asyncio.timeout(READY_TIMEOUT_SECONDS):
            await redis.ping()
    except TimeoutError:
        return {"redis": "timeout"}
    except Exception as exc:
        logger.warning("readyz: Redis unreachable: %s", exc)
        return {"redis": "unreachable"}
    return {"redis": "ok"}


async def _storage_ready(storage: Storage) -> dict[str, str]:
    try:
        async with asyncio.timeout(READY_TIMEOUT_SECONDS):
            await storage.check()
    except TimeoutError:
        return {"storage": "timeout"}
    except StorageUnavailable as exc:
        logger.warning("readyz: result store unavailable: %s", exc)
        return {"storage": "unreachable"}
    return {"storage": "ok"}


@get("/readyz", include_in_schema=False)
async def readyz(services: ServicesDep) -> Response[dict[str, Any]]:
    """Ready for traffic: PostgreSQL, Redis and the result store answer, and the schema is at
    the code's head."""
    database, redis, storage = await asyncio.gather(
        _database_ready(services.engine),
        _redis_ready(services.redis),
        _storage_ready(services.storage),
    )
    checks = {**database, **redis, **storage}
    if all(state == "ok" for state in checks.values()):
        return Response({"status": "ready"})
    return Response({"status": "not ready", "checks": checks}, status_code=503)


@get("/metrics", include_in_schema=False)
async def metrics_endpoint(
    request: Request[Any, Any, State], services: ServicesDep
) -> Response[bytes]:
    """Prometheus exposition. Unauthenticated unless TOLLGATE_METRICS_TOKEN is set: keep it
    off the public listener (docs/observability.md)."""
    token = services.settings.metrics_token
    if token is not None:
        given = bearer_token(request.headers.get("authorization"))
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise Unauthorized("Invalid metrics token")
    state = await metrics.read_state(
        redis=services.redis,
        engine=services.engine,
        settings=services.settings,
        models=[entry.id for entry in services.catalog.models],
    )
    body, content_type = metrics.exposition(state)
    return Response(content=body, media_type=content_type)


def observe_requests(handler: ASGIApp, *, access_log: bool) -> ASGIApp:
    """Wrap the app's ASGI handler (routing included, so 404s are seen): a request id for
    the logs and the ``X-Request-ID`` header, and the request counted and timed."""

    async def observed(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await handler(scope, receive, send)
            return
        method: str = scope["method"]
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        request_id = (
            logs.sane_request_id(given.decode("latin-1") if given else None)
            or logs.new_request_id()
        )
        echoed = request_id.encode("latin-1")
        status = 500  # unless a response starts

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (_REQUEST_ID, echoed)]
            await send(message)

        started = time.perf_counter()
        token = logs.start_request(request_id)
        try:
            await handler(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            route: str | None = scope.get("path_template")
            metrics.observe_http(route, method, status, seconds)
            if access_log:
                access_logger.info(
                    "%s %s %d",
                    method,
                    route or metrics.UNMATCHED,
                    status,
                    extra={"status": status, "duration_ms": round(seconds * 1000, 3)},
                )
            logs.end_request(token)

    return observed


def create_app(settings: Settings, *, check_schema: bool = True) -> Litestar:
    catalog = load_checked_catalog(settings)
    signer = build_signer(settings)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        engine = create_engine(settings)
        redis = pg = None
        # The request path's own Redis client (rate limits, queueing submits).
        quick = request_path_redis(settings.redis_url)
        storage = build_storage(settings)
        publisher = None
        task_events = None
        backlog: Backlog | None = None
        reservations: Reservations | None = None
        try:
            if check_schema:
                await check_migrated(engine)
            redis = await create_pool(RedisSettings.from_dsn(settings.redis_url))
            pg = await create_hot_pool(settings)
            metrics.configure(settings)
            channel = task_events_channel(settings.queue_name)
            # Changes this process commits (a cancel) signal waiters in every process.
            publisher = events.Publisher(redis, channel)
            publisher.start()
            events.attach(engine, publisher)
            sessions = session_factory(engine)
            task_events = events.TaskEvents(settings.redis_url, channel, pg)
            task_events.start()
            backlog = Backlog(engine, redis, settings, catalog)
            reservations = Reservations(pg)
            app.state.services = Services(
                settings=settings,
                catalog=catalog,
                engine=engine,
                sessions=sessions,
                redis=redis,
                keys=KeyCache(engine, settings.key_cache_ttl_seconds),
                storage=storage,
                signer=signer,
                limiter=RateLimiter(quick, settings),
                quick_redis=quick,
                pg=pg,
                model_lists=ModelLists(catalog),
                prices=PriceBook(catalog, pg, settings.key_cache_ttl_seconds),
                finished=FinishedTasks(),
                task_events=task_events,
                task_reads=TaskReads(pg),
                backlog=backlog,
                enqueues=enqueue_batch(quick, settings.redis_timeout_seconds),
                reservations=reservations,
            )
            freeze_startup_objects()
            yield
        finally:
            if reservations is not None:
                await reservations.close()
            if backlog is not None:
                await backlog.close()
            if task_events is not None:
                await task_events.close()
            if publisher is not None:
                await publisher.close()
                events.detach(engine)
            if pg is not None:
                await close_hot_pool(pg)
            if redis is not None:
                await redis.aclose()
            await quick.aclose()
            await quick.connection_pool.disconnect()
            await storage.close()
            await engine.dispose()

    app = Litestar(
        route_handlers=[
            TaskController,
            WebhookController,
            FileController,
            KreaController,
            OpenAIController,
            AccountController,
            admin_router(),
            healthz,
            readyz,
            metrics_endpoint,
            docs_assets_router(),
            console_router(),
            static_router(),
        ],
        before_send=[add_rate_limit_headers, full_options_allow],
        plugins=[StrictStructSchemaPlugin()],
        dependencies={"services": Provide(provide_services)},
        exception_handlers={Exception: exception_handler},
        lifespan=[lifespan],
        state=State(),
        request_max_body_size=settings.max_body_bytes,
        request_class=GatewayRequest,
        # The console's pages (gateway/console/); the API answers JSON only.
        template_config=template_config(),
        # Logging is configured once per process (gateway/logs.py), never by the framework.
        logging_config=None,
        openapi_config=OpenAPIConfig(
            title="Tollgate",
            version="0.1.0",
            description="One metered endpoint in front of many image-generation upstreams.",
            path=DOCS_PATH,
            # Every asset from the gateway itself: /docs works offline (gateway/openapi_docs.py).
            render_plugins=[OfflineSwagger()],
            components=Components(
                security_schemes={
                    "bearerAuth": SecurityScheme(type="http", scheme="bearer"),
                    "adminAuth": SecurityScheme(
                        type="http", scheme="bearer", description="TOLLGATE_ADMIN_TOKEN"
                    ),
                }
            ),
        ),
    )
    # The polled reads are answered in front of litestar's routing (gateway/hot_reads.py).
    app.state.hot_reads = HotReads(app, app.asgi_handler)
    app.asgi_handler = observe_requests(app.state.hot_reads, access_log=settings.access_log)
    return app


def app_from_env() -> Litestar:
    """Factory for ``uvicorn --factory gateway.app:app_from_env`` (one per gateway process)."""
    settings = load_settings()
    logs.configure_logging(settings)
    return create_app(settings)
