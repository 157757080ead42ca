"""``create_app(settings)``: the one place that wires routes, DI, errors and lifespan."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from arq.connections import RedisSettings, create_pool
from litestar import Litestar, get
from litestar.datastructures import MutableScopeHeaders, State
from litestar.di import Provide
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.types import Message, Scope

from gateway.admin import AdminController
from gateway.auth import KeyCache
from gateway.callbacks.routes import WebhookController
from gateway.db import check_migrated, create_engine, session_factory
from gateway.deps import RATE_HEADERS, Services, provide_services
from gateway.errors import exception_handler
from gateway.limits import RateLimiter
from gateway.settings import Settings, load_settings
from gateway.storage import LocalStorage, UrlSigner
from gateway.tasks.routes import FileController, TaskController
from gateway.tasks.schemas import REQUEST_FIELDS
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


def create_app(settings: Settings, *, check_schema: bool = True) -> Litestar:
    catalog = load_checked_catalog(settings)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        engine = create_engine(settings)
        redis = None
        try:
            if check_schema:
                await check_migrated(engine)
            redis = await create_pool(RedisSettings.from_dsn(settings.redis_url))
            app.state.services = Services(
                settings=settings,
                catalog=catalog,
                engine=engine,
                sessions=session_factory(engine),
                redis=redis,
                keys=KeyCache(engine, settings.key_cache_ttl_seconds),
                storage=LocalStorage(settings.storage_dir),
                signer=UrlSigner(settings.signing_secret, settings.public_base_url),
                limiter=RateLimiter(redis, settings),
            )
            yield
        finally:
            if redis is not None:
                await redis.aclose()
            await engine.dispose()

    return Litestar(
        route_handlers=[
            TaskController,
            WebhookController,
            FileController,
            AdminController,
            healthz,
        ],
        before_send=[add_rate_limit_headers],
        dependencies={"services": Provide(provide_services)},
        exception_handlers={Exception: exception_handler},
        lifespan=[lifespan],
        state=State(),
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="Tollgate",
            version="0.1.0",
            description="One metered endpoint in front of many image-generation upstreams.",
            path="/docs",
            render_plugins=[SwaggerRenderPlugin()],
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


def app_from_env() -> Litestar:
    """Factory for ``uvicorn --factory gateway.app:app_from_env``."""
    return create_app(load_settings())
