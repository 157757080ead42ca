"""What every worker job shares: settings, database, storage, HTTP client, channels.

Built once by the worker's start-up (``workers/main.py``) and handed to each job
in arq's context as ``ctx["deps"]``; tests build it by hand.
"""

from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.db import Statements
from gateway.settings import Settings
from gateway.storage import Storage
from pricing.catalog import Catalog
from workers.circuits import Circuits
from workers.job_clock import JobClock
from workers.liveness import Liveness
from workers.routing import Directory
from workers.upstream_slots import UpstreamSlots


@dataclass
class WorkerDeps:
    settings: Settings
    catalog: Catalog
    engine: AsyncEngine
    storage: Storage
    http: httpx.AsyncClient
    directory: Directory
    # Upstream concurrency caps and circuits; None runs without them (tests that
    # drive the job by hand).
    slots: UpstreamSlots | None = None
    circuits: Circuits | None = None
    # Hosts exempt from the address guard when fetching result images (tests only).
    image_allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    # asyncpg's pool for the task's own writes (gateway/db.create_hot_pool); None: they
    # go through the engine's connections, still one autocommit statement each.
    pg: Any = None  # asyncpg.Pool (untyped)
    # This worker's beat and which tasks it runs (workers/liveness.py); None: not told.
    liveness: Liveness | None = None
    # How long the channels' jobs take, to poll around their end.
    job_clock: JobClock = field(default_factory=JobClock)

    @property
    def statements(self) -> Statements:
        """The task's claim, lease writes and end: one round trip each."""
        return Statements(self.engine, self.pg)
