"""Usage reports: per tenant by model and day, and the per-task export across tenants.

Money is charged minus what was given back: a task's refunds, and adjustments that
name the task (a positive adjustment credits the tenant, so it lowers the revenue).
The margin is that net revenue minus the upstream cost in credits.
"""

import csv
import io
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import text

from gateway.errors import InvalidRequest
from gateway.ledger.service import Db, connection
from pricing.money import credits_from_micros

# Refunds and task adjustments, per task: ledger_entries is indexed on task_id.
_RETURNED = """
    LEFT JOIN LATERAL (
        SELECT COALESCE(SUM(amount_micros) FILTER (WHERE kind = 'refund'), 0) AS refunded,
               COALESCE(SUM(amount_micros) FILTER (WHERE kind = 'adjustment'), 0) AS adjusted
        FROM ledger_entries e
        WHERE e.task_id = t.id AND e.kind IN ('refund', 'adjustment')
    ) r ON true
"""

_USAGE = text(
    f"""
    SELECT (t.created_at AT TIME ZONE 'UTC')::date AS day, t.model,
           COUNT(*) AS tasks,
           COUNT(*) FILTER (WHERE t.status = 'completed') AS completed,
           COUNT(*) FILTER (WHERE t.status = 'failed') AS failed,
           COALESCE(SUM(t.images_delivered), 0) AS images,
           COALESCE(SUM(t.credits_charged_micros), 0) AS charged,
           COALESCE(SUM(r.refunded), 0) AS refunded,
           COALESCE(SUM(r.adjusted), 0) AS adjusted,
           COALESCE(SUM(t.upstream_cost_micros), 0) AS cost
    FROM tasks t {_RETURNED}
    WHERE t.tenant_id = :tenant AND t.created_at >= :since AND t.created_at < :until
    GROUP BY day, t.model ORDER BY day, t.model
    """
)

_TASKS = text(
    f"""
    SELECT t.id, t.tenant_id, t.model, t.status, t.user_group, t.billing_rule, t.channel_id,
           t.created_at, t.finished_at, t.images_delivered, t.credits_reserved_micros,
           COALESCE(t.credits_charged_micros, 0), r.refunded, r.adjusted,
           COALESCE(t.upstream_cost_micros, 0), t.upstream_cost_amount,
           t.upstream_cost_currency, t.quote ->> 'cost_currency'
    FROM tasks t {_RETURNED}
    WHERE t.created_at >= :since AND t.created_at < :until
    ORDER BY t.created_at, t.id
    LIMIT :limit
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
    "refunded",
    "adjusted",
    "net",
    "upstream_cost",
    "margin",
)

TASK_COLUMNS = (
    "task_id",
    "tenant_id",
    "model",
    "status",
    "user_group",
    "billing_rule",
    "channel_id",
    "created_at",
    "finished_at",
    "images",
    "quoted",
    "charged",
    "refunded",
    "adjusted",
    "net",
    "upstream_cost",
    "upstream_cost_amount",
    "upstream_cost_currency",
    "margin",
)

MAX_EXPORT_ROWS = 100_000


def _bounds(since: date | None, until: date | None) -> tuple[datetime, datetime]:
    end = until or datetime.now(UTC).date()
    start = since or end - timedelta(days=30)
    return (
        datetime.combine(start, time.min, tzinfo=UTC),
        datetime.combine(end + timedelta(days=1), time.min, tzinfo=UTC),
    )


def _money(row: dict[str, Any], name: str, micros: int) -> None:
    row[name] = credits_from_micros(micros)
    row[f"{name}_micros"] = micros


async def usage(
    db: Db, tenant_id: str, since: date | None, until: date | None
) -> list[dict[str, Any]]:
    """Rows of the report; money in credits (exact decimals) and in micro-credits."""
    start, end = _bounds(since, until)
    conn = await connection(db)
    rows = await conn.execute(_USAGE, {"tenant": tenant_id, "since": start, "until": end})
    report = []
    for day, model, tasks, completed, failed, images, charged, refunded, adjusted, cost in rows:
        net = int(charged) - int(refunded) - int(adjusted)
        row: dict[str, Any] = {
            "day": day.isoformat(),
            "model": model,
            "tasks": tasks,
            "completed": completed,
            "failed": failed,
            "images": int(images),
        }
        _money(row, "charged", int(charged))
        _money(row, "refunded", int(refunded))
        _money(row, "adjusted", int(adjusted))
        _money(row, "net", net)
        _money(row, "upstream_cost", int(cost))
        _money(row, "margin", net - int(cost))
        report.append(row)
    return report


async def task_export(
    db: Db, since: date | None, until: date | None, limit: int | None = None
) -> list[dict[str, Any]]:
    """One row per task of every tenant created in [since, until] (UTC days).

    A range with more than ``limit`` tasks (``MAX_EXPORT_ROWS``) is refused rather than
    cut short: a margin export that silently lost rows would be wrong.
    """
    if since is not None and until is not None and since > until:
        raise InvalidRequest("from", "must not be after `to`")
    most = MAX_EXPORT_ROWS if limit is None else limit
    start, end = _bounds(since, until)
    conn = await connection(db)
    rows = (await conn.execute(_TASKS, {"since": start, "until": end, "limit": most + 1})).all()
    if len(rows) > most:
        raise InvalidRequest(
            "from", f"the range holds more than {most:,} tasks: export shorter ranges"
        )
    export = []
    for r in rows:
        charged, refunded, adjusted, cost = int(r[11]), int(r[12]), int(r[13]), int(r[14])
        net = charged - refunded - adjusted
        row: dict[str, Any] = {
            "task_id": r[0],
            "tenant_id": r[1],
            "model": r[2],
            "status": r[3],
            "user_group": r[4],
            "billing_rule": r[5],
            "channel_id": r[6],
            "created_at": r[7].isoformat(),
            "finished_at": r[8].isoformat() if r[8] else None,
            "images": r[9],
        }
        _money(row, "quoted", int(r[10]))
        _money(row, "charged", charged)
        _money(row, "refunded", refunded)
        _money(row, "adjusted", adjusted)
        _money(row, "net", net)
        _money(row, "upstream_cost", cost)
        row["upstream_cost_amount"] = r[15]
        row["upstream_cost_currency"] = r[16] or (r[17] if r[15] else None)
        _money(row, "margin", net - cost)
        export.append(row)
    return export


def _csv(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row[c] is None else row[c] for c in columns])
    return out.getvalue()


def usage_csv(report: list[dict[str, Any]]) -> str:
    return _csv(report, COLUMNS)


def task_export_csv(export: list[dict[str, Any]]) -> str:
    return _csv(export, TASK_COLUMNS)
