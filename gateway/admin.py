"""The operator's API: every domain's admin routes, under one ``/admin`` router and one guard.

The guard checks ``TOLLGATE_ADMIN_TOKEN`` (``auth.check_admin``) before anything
else of the request runs: a wrong or missing token is 401, whatever the route or
body. Each domain keeps its admin routes beside its others; the CLI
(``gateway/cli/``) calls the same services, not these routes.

Where each domain's admin routes live:

- tenants and keys: ``gateway/tenants/routes.py``
- credits (top-up, adjust, balance, usage, refund, ledger check): ``gateway/ledger/routes.py``
- limits of a tenant or a key: ``gateway/limits/routes.py``
- callback deliveries and schedules: ``gateway/callbacks/routes.py``
- the list of tasks: ``gateway/tasks/routes.py``
- channels: ``gateway/channels/routes.py``
- redemption codes: ``gateway/redemption/routes.py``
- groups, their prices, exchange rates, price changes, usage export: ``gateway/prices/routes.py``
"""

from typing import Any

from litestar import Router
from litestar.connection import ASGIConnection
from litestar.di import Provide
from litestar.handlers import BaseRouteHandler

from gateway.auth import check_admin
from gateway.callbacks.routes import CallbackAdminController
from gateway.channels.routes import ChannelAdminController
from gateway.deps import provide_uow, services
from gateway.ledger.routes import LedgerAdminController
from gateway.limits.routes import LimitsAdminController
from gateway.prices.routes import PricesAdminController
from gateway.redemption.routes import RedemptionAdminController
from gateway.tasks.routes import TaskAdminController
from gateway.tenants.routes import TenantAdminController


def admin_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Let only the holder of the admin token through (401 otherwise)."""
    admin_token = services(connection.app.state).settings.admin_token
    check_admin(connection.headers.get("authorization"), admin_token)


def admin_router() -> Router:
    """A new ``/admin`` router (one per app: litestar binds a router to the app it joins)."""
    return Router(
        path="/admin",
        guards=[admin_guard],
        dependencies={"uow": Provide(provide_uow)},
        tags=["admin"],
        security=[{"adminAuth": []}],
        route_handlers=[
            TenantAdminController,
            LedgerAdminController,
            LimitsAdminController,
            CallbackAdminController,
            TaskAdminController,
            ChannelAdminController,
            RedemptionAdminController,
            PricesAdminController,
        ],
    )
