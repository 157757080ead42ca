"""The periodic ledger check: ``ledger.check`` on a cron, its result as two gauges.

Every ``TOLLGATE_LEDGER_CHECK_INTERVAL_SECONDS`` one generation worker (whichever
takes the tick first) runs the check that ``tollgate ledger check`` runs, sets
``tollgate_ledger_check_problems`` and
``tollgate_ledger_check_last_run_timestamp_seconds``, and logs each problem. The
cron ticks every minute; a Redis key that lives one interval decides whether a
tick runs the check, so the fleet runs it once per interval however many workers
there are, and a restart does not run it again early. The key keeps the result:
a tick that does not run the check sets the gauges from it. A worker that has not
yet seen a check reports 0 for both gauges: aggregate them with ``max``.

The check only reads (a full pass over the ledger); it never changes money.
"""

import json
import logging
import time
from typing import Any

from arq import cron
from arq.connections import ArqRedis

from gateway import metrics
from gateway.ledger import service as ledger
from gateway.redis_keys import ledger_check_key
from gateway.settings import Settings
from workers.deps import WorkerDeps

logger = logging.getLogger("tollgate.ledger_check")


async def check_ledger(ctx: dict[str, Any]) -> int | None:
    """Run the ledger check unless one ran within the interval; the problems it found,
    or None when it did not run (the gauges then take the last run's result)."""
    deps: WorkerDeps = ctx["deps"]
    redis: ArqRedis = ctx["redis"]
    key = ledger_check_key(deps.settings.queue_name)
    claimed = await redis.set(
        key, json.dumps({}), nx=True, ex=deps.settings.ledger_check_interval_seconds
    )
    if not claimed:
        # Checked lately, maybe by another worker: report that result here too, so a
        # restarted worker does not show a stale check for a whole interval.
        raw = await redis.get(key)
        last = json.loads(raw) if raw else {}
        if "at" in last:
            metrics.ledger_checked(last["problems"], at=last["at"])
        return None
    try:
        async with deps.engine.connect() as conn:
            problems = await ledger.check(conn)
    except Exception:
        # Let the next tick try again; the stale timestamp gauge tells the alert.
        await redis.delete(key)
        raise
    at = time.time()
    await redis.set(key, json.dumps({"at": at, "problems": len(problems)}), keepttl=True)
    metrics.ledger_checked(len(problems), at=at)
    for problem in problems:
        logger.error("ledger check: %s", problem, extra={"problem": problem})
    if problems:
        logger.error("ledger check: %d problem(s); see `tollgate ledger check`", len(problems))
    else:
        logger.info("ledger check: every balance and hold matches its entries")
    return len(problems)


def ledger_check_cron(settings: Settings) -> Any:
    """The arq cron job of the ledger check: ticks each minute (the first within a minute
    of start-up) and runs the check once per interval."""
    return cron(
        check_ledger,
        name="ledger_check",
        second={30},
        run_at_startup=False,
        unique=True,
        timeout=max(60, settings.ledger_check_interval_seconds),
    )
