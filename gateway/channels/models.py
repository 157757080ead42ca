"""The ``channels`` table: one upstream account that serves some catalogue models.

A channel names its adapter (the wire protocol), where to call it and with
which key, the upstream's own id for each model it serves, and how routing
treats it: higher ``priority`` first, ``weight`` among equals, at most
``max_concurrency`` upstream jobs at once. The key is stored encrypted, to be
used and never shown: no API answer, CLI output or log line carries it.
"""

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from gateway.crypto import CHANNEL_API_KEY, Sealed
from gateway.db import utcnow

# The wire protocols a channel can speak: the keys of workers.providers.ADAPTERS
# (the gateway may not import workers; a test keeps the two lists equal).
ADAPTER_NAMES = ("krea", "siliconflow", "unified", "openai", "bfl")

MAX_WEIGHT = 1000


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


class Channel(SQLModel, table=True):
    __tablename__ = "channels"
    __table_args__ = (
        sa.CheckConstraint(f"weight BETWEEN 1 AND {MAX_WEIGHT}", name="ck_channels_weight"),
        sa.CheckConstraint("max_concurrency >= 1", name="ck_channels_max_concurrency"),
    )

    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(max_length=100, sa_column_kwargs={"unique": True})
    adapter: str = Field(max_length=30)
    base_url: str = Field(max_length=2048)
    # Stored encrypted (gateway/crypto.py); at most 4096 characters (channels/service.py).
    api_key: str = Field(sa_type=Sealed(CHANNEL_API_KEY, 8192), repr=False)
    # Catalogue model id -> the upstream's id for it (None: the catalogue's upstream_model).
    models: dict[str, str | None] = Field(default_factory=dict, sa_type=JSONB)
    # Catalogue model id -> this account's own upstream cost (a pricing.catalog.Cost as
    # JSON); models not named cost the catalogue's upstream_cost.
    upstream_costs: dict[str, dict[str, Any]] = Field(default_factory=dict, sa_type=JSONB)
    priority: int = 0
    weight: int = 1
    max_concurrency: int = 16
    enabled: bool = True
    created_at: datetime = Field(default_factory=utcnow, sa_type=_ts())
    updated_at: datetime = Field(default_factory=utcnow, sa_type=_ts())
