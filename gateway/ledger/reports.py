"""The usage report: per tenant, per model and day — tasks, images, charged, cost, margin."""

import csv
import io
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import text

from gateway.ledger.service import Db, connection
from pricing.money import credits_from_micros

_USAGE = text(
    """
    SELECT (created_at AT TIME ZONE 'UTC')::date AS day, model,
           COUNT(*) AS tasks,
           COUNT(*) FILTER (WHERE status = 'completed') AS completed,
           COUNT(*) FILTER (WHERE status = 'failed') AS failed,
           COALESCE(SUM(images_delivered), 0) AS images,
           COALESCE(SUM(credits_charged_micros), 0) AS charged,
           COALESCE(SUM(upstream_cost_micros), 0) AS cost
    FROM tasks
    WHERE tenant_id = :tenant AND created_at >= :since AND created_at < :until
    GROUP BY day, model ORDER BY day, model
    """
)

COLUMNS = (
    "day",
    "model",
    "tasks",
    "completed",
    "failed",
    "images",
    "charged",
    "upstream_cost",
    "margin",
)


def _bounds(since: date | None, until: date | None) -> tuple[datetime, datetime]:
    end = until or datetime.now(UTC).date()
    start = since or end - timedelta(days=30)
    return (
        datetime.combine(start, time.min, tzinfo=UTC),
        datetime.combine(end + timedelta(days=1), time.min, tzinfo=UTC),
    )


async def usage(
    db: Db, tenant_id: str, since: date | None, until: date | None
) -> list[dict[str, Any]]:
    """Rows of the report; money in credits (exact decimals) and in micro-credits."""
    start, end = _bounds(since, until)
    conn = await connection(db)
    rows = await conn.execute(_USAGE, {"tenant": tenant_id, "since": start, "until": end})
    report = []
    for day, model, tasks, completed, failed, images, charged, cost in rows:
        report.append(
            {
                "day": day.isoformat(),
                "model": model,
                "tasks": tasks,
                "completed": completed,
                "failed": failed,
                "images": int(images),
                "charged": credits_from_micros(int(charged)),
                "upstream_cost": credits_from_micros(int(cost)),
                "margin": credits_from_micros(int(charged) - int(cost)),
                "charged_micros": int(charged),
                "upstream_cost_micros": int(cost),
                "margin_micros": int(charged) - int(cost),
            }
        )
    return report


def usage_csv(report: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in report:
        writer.writerow([row[column] for column in COLUMNS])
    return out.getvalue()
