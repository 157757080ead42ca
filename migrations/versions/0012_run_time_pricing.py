"""prices at run time: groups, group prices, exchange rates, price changes, a version
stamp; channels' own upstream costs; each task's upstream cost in its own currency

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 18:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "price_groups",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("multiplier", sa.String(40), nullable=False),
        sa.Column("description", sa.String(1000), nullable=False, server_default=""),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
    )
    op.create_table(
        "group_prices",
        sa.Column("group_name", sa.String(100), primary_key=True),
        sa.Column("model", sa.String(100), primary_key=True),
        sa.Column("price", JSONB(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
    )
    op.create_table(
        "exchange_rates",
        sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=True),
        sa.Column("currency", sa.String(8), nullable=False),
        sa.Column("rate", sa.String(40), nullable=False),
        sa.Column("effective_at", _ts(), nullable=False),
        sa.Column("set_by", sa.String(200), nullable=False, server_default=""),
        sa.Column("note", sa.String(1000), nullable=False, server_default=""),
        sa.Column("created_at", _ts(), nullable=False),
    )
    op.create_index("ix_exchange_rates_currency", "exchange_rates", ["currency", "effective_at"])
    op.create_table(
        "price_changes",
        sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=True),
        sa.Column("changed_at", _ts(), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(30), nullable=False),
        sa.Column("subject", sa.String(300), nullable=False),
        sa.Column("old", JSONB(), nullable=True),
        sa.Column("new", JSONB(), nullable=True),
    )
    op.create_index("ix_price_changes_changed_at", "price_changes", ["changed_at"])
    op.create_table(
        "pricing_version",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("version", sa.BigInteger(), nullable=False),
    )
    op.execute("INSERT INTO pricing_version (id, version) VALUES (1, 0)")
    # A channel's own upstream cost per model (a pricing.catalog.Cost as JSON).
    op.add_column(
        "channels",
        sa.Column("upstream_costs", JSONB(), nullable=False, server_default=sa.text("'{}'")),
    )
    # The task's upstream cost in the upstream's own currency (exact decimal text); its
    # value in credits stays in upstream_cost_micros. Nullable: older tasks have none.
    op.add_column("tasks", sa.Column("upstream_cost_amount", sa.String(200), nullable=True))
    op.add_column("tasks", sa.Column("upstream_cost_currency", sa.String(8), nullable=True))


def downgrade() -> None:
    op.drop_column("tasks", "upstream_cost_currency")
    op.drop_column("tasks", "upstream_cost_amount")
    op.drop_column("channels", "upstream_costs")
    op.drop_table("pricing_version")
    op.drop_index("ix_price_changes_changed_at", "price_changes")
    op.drop_table("price_changes")
    op.drop_index("ix_exchange_rates_currency", "exchange_rates")
    op.drop_table("exchange_rates")
    op.drop_table("group_prices")
    op.drop_table("price_groups")
