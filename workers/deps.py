"""What every worker job shares: settings, database, storage, HTTP client, channels.

Built once by the worker's start-up (``workers/main.py``) and handed to each job
in arq's context as ``ctx["deps"]``; tests build it by hand.
"""

from dataclasses import dataclass, field

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.settings import Settings
from gateway.storage import Storage
from pricing.catalog import Catalog
from workers.circuits import Circuits
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
