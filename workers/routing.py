"""Channel routing: which upstream accounts may serve a model, in which order.

Channels come from two places, read together:

- the ``channels`` table (admin API and CLI), re-read every
  ``channel_cache_ttl_seconds``, so a change reaches every worker within that;
- ``TOLLGATE_UPSTREAMS``: each account there is channel ``env:<adapter>`` and
  serves every catalogue model whose ``provider`` is that adapter, under the
  catalogue's ``upstream_model``.

Order (``Directory.candidates``): enabled channels serving the model, highest
``priority`` first; among equal priorities a weighted random order (each
channel's chance of coming first is its share of the weights), drawn anew for
every task so load spreads by weight. Circuits and slots are the caller's
business (``workers/admission.py``), and so is moving a task to the next
channel when one fails (``workers/failover.py``): this module only says who
could serve.
"""

import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.channels.models import Channel
from gateway.settings import Settings
from pricing.catalog import Catalog, Cost, ModelEntry
from workers.providers import ADAPTERS
from workers.providers.base import Endpoint, Provider

logger = logging.getLogger("tollgate.routing")

ENV_PREFIX = "env:"


@dataclass(frozen=True, slots=True)
class Route:
    """One channel as a worker uses it, with its adapter built."""

    id: str
    name: str
    adapter: str
    endpoint: Endpoint
    # Catalogue model id -> the upstream's id (None: the catalogue's upstream_model).
    models: Mapping[str, str | None]
    priority: int
    weight: int
    max_concurrency: int
    provider: Provider
    # Catalogue model id -> this account's own upstream cost (models not named: the
    # catalogue's upstream_cost). Env channels have none.
    costs: Mapping[str, Cost] = field(default_factory=dict)

    def upstream_model(self, entry: ModelEntry) -> str:
        return self.models.get(entry.id) or entry.upstream_model


def channel_costs(name: str, stored: Mapping[str, Any]) -> dict[str, Cost]:
    """A channel's own upstream costs; one that no longer validates is skipped (logged)."""
    costs: dict[str, Cost] = {}
    for model, cost in stored.items():
        try:
            costs[model] = Cost.model_validate(cost)
        except ValueError:
            logger.error("channel %s: its upstream cost of %s is invalid, ignored", name, model)
    return costs


def weighted_order(routes: list[Route], rng: random.Random) -> list[Route]:
    """Priority first; among equals, a random order where weight w comes first w/total of the time.

    Each route draws ``u ** (1 / weight)`` and the largest draw goes first
    (Efraimidis and Spirakis): a weighted sample without replacement.
    """
    keyed = [(-r.priority, -(rng.random() ** (1.0 / r.weight)), r.id, r) for r in routes]
    keyed.sort(key=lambda k: (k[0], k[1], k[2]))
    return [k[3] for k in keyed]


def channel_endpoint(settings: Settings, base_url: str, api_key: str) -> Endpoint:
    """Where and how a channel's adapter calls its upstream, with the settings' limits."""
    return Endpoint(
        base_url=base_url.rstrip("/"),
        api_key=api_key,
        submit_timeout=settings.upstream_timeout_seconds,
        poll_timeout=settings.upstream_poll_timeout_seconds,
        max_body_bytes=settings.upstream_max_body_bytes,
        max_image_bytes=settings.max_image_bytes,
    )


class Directory:
    """The channels this worker can route to, cached for ``channel_cache_ttl_seconds``."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        engine: AsyncEngine,
        http: httpx.AsyncClient,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._catalog = catalog
        self._engine = engine
        self._http = http
        self._rng = rng or random.Random()
        self._clock = clock
        self._loaded_at: float | None = None
        self._routes: dict[str, Route] = {}
        # Adapters are kept while their channel is unchanged: (id, updated) -> route.
        self._built: dict[tuple[str, str], Route] = {}
        self._env = self._env_routes()

    def _endpoint(self, base_url: str, api_key: str) -> Endpoint:
        return channel_endpoint(self._settings, base_url, api_key)

    def _env_routes(self) -> dict[str, Route]:
        routes = {}
        for adapter, account in self._settings.upstreams.items():
            build = ADAPTERS.get(adapter)
            if build is None:
                # workers/main.py refuses this at start-up; tests that build a
                # Directory by hand get the same message.
                known = ", ".join(ADAPTERS)
                raise ValueError(f"TOLLGATE_UPSTREAMS: unknown adapter {adapter!r} ({known})")
            endpoint = self._endpoint(str(account.base_url), account.api_key)
            route_id = ENV_PREFIX + adapter
            routes[route_id] = Route(
                id=route_id,
                name=route_id,
                adapter=adapter,
                endpoint=endpoint,
                models={e.id: None for e in self._catalog.models if e.provider == adapter},
                priority=account.priority,
                weight=account.weight,
                max_concurrency=account.max_concurrency,
                provider=build(self._http, endpoint),
            )
        return routes

    async def _load(self) -> None:
        now = self._clock()
        if self._loaded_at is not None and now - self._loaded_at < (
            self._settings.channel_cache_ttl_seconds
        ):
            return
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(Channel.__table__))).all()  # type: ignore[attr-defined]
        routes = dict(self._env)
        built: dict[tuple[str, str], Route] = {}
        for row in rows:
            if not row.enabled:
                continue
            build = ADAPTERS.get(row.adapter)
            if build is None:
                logger.error("channel %s: unknown adapter %r, skipped", row.name, row.adapter)
                continue
            version = (row.id, row.updated_at.isoformat())
            route = self._built.get(version)
            if route is None:
                endpoint = self._endpoint(row.base_url, row.api_key)
                route = Route(
                    id=row.id,
                    name=row.name,
                    adapter=row.adapter,
                    endpoint=endpoint,
                    models=dict(row.models),
                    priority=row.priority,
                    weight=row.weight,
                    max_concurrency=row.max_concurrency,
                    provider=build(self._http, endpoint),
                    costs=channel_costs(row.name, row.upstream_costs or {}),
                )
            built[version] = route
            routes[route.id] = route
        self._routes, self._built, self._loaded_at = routes, built, now

    async def candidates(self, model_id: str) -> list[Route]:
        """The enabled channels serving ``model_id``, in the order to try them."""
        await self._load()
        serving = [r for r in self._routes.values() if model_id in r.models]
        return weighted_order(serving, self._rng)

    async def get(self, channel_id: str) -> Route | None:
        """An enabled channel by id (the one a resumed task's upstream job runs on)."""
        await self._load()
        return self._routes.get(channel_id)
