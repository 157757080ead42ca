"""The console's router, its templates and its static files (all served by the gateway)."""

from pathlib import Path

from litestar import Router
from litestar.di import Provide
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig

from gateway.console import (
    auth_pages,
    operator_channels,
    operator_pages,
    operator_prices,
    playground,
    tenant_pages,
    tenant_redeem,
    tenant_tasks,
)
from gateway.console.web import (
    PREFIX,
    NotLoggedIn,
    api_error_page,
    console_guard,
    not_logged_in,
    provide_viewer,
)
from gateway.deps import provide_uow
from gateway.errors import ApiError

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"


def template_config() -> TemplateConfig[JinjaTemplateEngine]:
    return TemplateConfig(directory=TEMPLATES, engine=JinjaTemplateEngine)


def console_router() -> Router:
    pages = Router(
        path=PREFIX,
        route_handlers=[
            *auth_pages.ROUTES,
            *tenant_pages.ROUTES,
            *tenant_redeem.ROUTES,
            *tenant_tasks.ROUTES,
            *playground.ROUTES,
            *operator_pages.ROUTES,
            *operator_channels.ROUTES,
            *operator_prices.ROUTES,
        ],
        guards=[console_guard],
        dependencies={"viewer": Provide(provide_viewer), "uow": Provide(provide_uow)},
        exception_handlers={NotLoggedIn: not_logged_in, ApiError: api_error_page},
        include_in_schema=False,
        # Pages are per user: never stored by a shared cache.
        response_headers={"Cache-Control": "no-store"},
    )
    return pages


def static_router() -> Router:
    return create_static_files_router(
        path=f"{PREFIX}/static", directories=[STATIC], include_in_schema=False
    )
