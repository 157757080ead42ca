"""a task's end and its settlement as one database call each (ADR 0006)

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06 22:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# What an ending call returns, one row per task it ended: what the caller counts, logs and
# signals after the commit, and the callback delivery to queue. ``charged_micros`` comes in
# as the charge to capture (NULL: release the hold) and goes out as what was charged.
ENDED = """
CREATE TYPE tollgate_ended AS (
    task_id text, tenant_id text, status text, model text, request_id text,
    callback_url text, channel_id text, upstream_job_id text, api_key_id text,
    created_at timestamptz, hold_micros bigint, charged_micros bigint,
    settled boolean, delivery_id text
);
"""

# The one settlement of a task, after its ending UPDATE and in its transaction (ADR 0006):
# the ledger row (a capture of the charge, or a release of the hold, under the shared key
# settle:<task>: a second settlement of either kind is a no-op), the callback delivery of
# the task's end, then the two rows other tasks and submits contend for, last: the tenant's
# totals (held and balance, as the ledger row says; in_flight - 1) and the key's spend
# (what was reserved but not charged goes back, never below zero; the periods are those
# of limits.spend_periods for the task's submission, in UTC).
SETTLE = """
CREATE FUNCTION tollgate_settle(ended tollgate_ended) RETURNS tollgate_ended
LANGUAGE plpgsql AS $$
DECLARE
    capture boolean := ended.charged_micros IS NOT NULL;
    charge bigint := least(coalesce(ended.charged_micros, 0), ended.hold_micros);
    unused bigint;
    submitted timestamp := ended.created_at AT TIME ZONE 'UTC';
BEGIN
    INSERT INTO ledger_entries (
        tenant_id, task_id, kind, amount_micros, hold_micros, idempotency_key, reason, created_at
    ) VALUES (
        ended.tenant_id, ended.task_id, CASE WHEN capture THEN 'capture' ELSE 'release' END,
        CASE WHEN capture THEN charge ELSE ended.hold_micros END, ended.hold_micros,
        'settle:' || ended.task_id, '', now()
    ) ON CONFLICT (idempotency_key) DO NOTHING;
    ended.settled := FOUND;
    ended.charged_micros := charge;
    IF ended.callback_url IS NOT NULL THEN
        -- msg_ and 24 hex digits, as callbacks.new_delivery_id: 12 random bytes (the
        -- first 6 of a version 4 UUID are all random).
        ended.delivery_id := 'msg_' || encode(
            substr(uuid_send(gen_random_uuid()), 1, 6)
            || substr(uuid_send(gen_random_uuid()), 1, 6), 'hex');
        INSERT INTO callback_deliveries (
            id, task_id, tenant_id, url, status, schedule, attempts, next_attempt_at, created_at
        ) SELECT ended.delivery_id, ended.task_id, ended.tenant_id, ended.callback_url,
                 'pending', callback_schedule, 0, now(), now()
          FROM tenants WHERE id = ended.tenant_id;
    END IF;

    -- The hot rows, last.
    UPDATE tenants
    SET in_flight = in_flight - 1,
        held_micros = held_micros - CASE WHEN ended.settled THEN ended.hold_micros ELSE 0 END,
        balance_micros = balance_micros - CASE WHEN ended.settled THEN charge ELSE 0 END
    WHERE id = ended.tenant_id;
    unused := ended.hold_micros - charge;
    IF unused > 0 THEN
        UPDATE key_spend
        SET spent_micros = greatest(spent_micros - unused, 0)
        WHERE api_key_id = ended.api_key_id AND period IN (
            'total', 'day:' || to_char(submitted, 'YYYY-MM-DD'),
            'month:' || to_char(submitted, 'YYYY-MM'));
    END IF;
    RETURN ended;
END
$$;
"""

# The columns every ending UPDATE returns, in tollgate_ended's order; the charge
# (``charged``) is the caller's: NULL for every end but a completion.
_RETURNING = """
    RETURNING id, tenant_id, status, model, request_id, callback_url, channel_id,
        upstream_job_id, api_key_id, created_at, credits_reserved_micros, {charge},
        NULL, NULL
"""

# The worker's completion, fenced by attempt: results, the charge (worked out by the caller
# from the quote the task was reserved with) and the upstream cost in the same UPDATE.
# A cost amount of NULL leaves the amount and currency as they were.
COMPLETE = f"""
CREATE FUNCTION tollgate_complete(
    p_task_id text, p_attempt integer, p_results text, p_sizes text,
    p_ttl_seconds double precision, p_charge bigint, p_cost_micros bigint,
    p_cost_amount text, p_cost_currency text, p_channel_id text
) RETURNS SETOF tollgate_ended LANGUAGE plpgsql AS $$
DECLARE
    ended tollgate_ended;
BEGIN
    UPDATE tasks
    SET status = 'completed', progress = 100, results = p_results::jsonb,
        result_sizes = p_sizes::jsonb, images_delivered = jsonb_array_length(p_results::jsonb),
        finished_at = now(), results_expire_at = now() + make_interval(secs => p_ttl_seconds),
        lease_expires_at = NULL,
        credits_charged_micros = least(p_charge, credits_reserved_micros),
        upstream_cost_micros = p_cost_micros,
        upstream_cost_amount = CASE WHEN p_cost_amount IS NULL THEN upstream_cost_amount
                                    ELSE p_cost_amount END,
        upstream_cost_currency = CASE WHEN p_cost_amount IS NULL THEN upstream_cost_currency
                                      ELSE p_cost_currency END,
        channel_id = coalesce(p_channel_id, channel_id)
    WHERE id = p_task_id AND attempt = p_attempt AND status = 'processing'
    {_RETURNING.format(charge="p_charge")}
    INTO ended;
    IF FOUND THEN
        RETURN NEXT tollgate_settle(ended);
    END IF;
END
$$;
"""

# A failure, fenced by attempt; the whole hold is released.
FAIL = f"""
CREATE FUNCTION tollgate_fail(
    p_task_id text, p_attempt integer, p_code text, p_message text
) RETURNS SETOF tollgate_ended LANGUAGE plpgsql AS $$
DECLARE
    ended tollgate_ended;
BEGIN
    UPDATE tasks
    SET status = 'failed', error_code = p_code, error_message = left(p_message, 1000),
        finished_at = now(), lease_expires_at = NULL, credits_charged_micros = 0,
        upstream_cost_micros = 0
    WHERE id = p_task_id AND attempt = p_attempt AND status IN ('pending', 'processing')
    {_RETURNING.format(charge="NULL")}
    INTO ended;
    IF FOUND THEN
        RETURN NEXT tollgate_settle(ended);
    END IF;
END
$$;
"""

# The tenant's cancel: pending, or processing where the upstream can stop it. Bumping the
# attempt fences out the worker on it.
CANCEL = f"""
CREATE FUNCTION tollgate_cancel(
    p_task_id text, p_tenant_id text, p_code text, p_message text
) RETURNS SETOF tollgate_ended LANGUAGE plpgsql AS $$
DECLARE
    ended tollgate_ended;
BEGIN
    UPDATE tasks
    SET status = 'cancelled', attempt = attempt + 1, error_code = p_code,
        error_message = p_message, finished_at = now(), lease_expires_at = NULL,
        credits_charged_micros = 0, upstream_cost_micros = 0, can_cancel = false
    WHERE id = p_task_id AND tenant_id = p_tenant_id
      AND (status = 'pending' OR (status = 'processing' AND can_cancel))
    {_RETURNING.format(charge="NULL")}
    INTO ended;
    IF FOUND THEN
        RETURN NEXT tollgate_settle(ended);
    END IF;
END
$$;
"""

# The sweeper: open tasks past their deadline, oldest first, at most p_limit, skipping
# rows another transaction holds. Bumping the attempt fences out any worker still on one.
FAIL_OVERDUE = f"""
CREATE FUNCTION tollgate_fail_overdue(
    p_deadline_seconds double precision, p_limit integer, p_code text, p_message text
) RETURNS SETOF tollgate_ended LANGUAGE plpgsql AS $$
DECLARE
    ended tollgate_ended;
BEGIN
    FOR ended IN
        UPDATE tasks
        SET status = 'failed', attempt = attempt + 1, error_code = p_code,
            error_message = p_message, finished_at = now(), lease_expires_at = NULL,
            credits_charged_micros = 0, upstream_cost_micros = 0
        WHERE id IN (
            SELECT id FROM tasks
            WHERE status IN ('pending', 'processing')
              AND created_at < now() - make_interval(secs => p_deadline_seconds)
            ORDER BY created_at LIMIT p_limit FOR UPDATE SKIP LOCKED
        )
        {_RETURNING.format(charge="NULL")}
    LOOP
        RETURN NEXT tollgate_settle(ended);
    END LOOP;
END
$$;
"""


def upgrade() -> None:
    for sql in (ENDED, SETTLE, COMPLETE, FAIL, CANCEL, FAIL_OVERDUE):
        op.execute(sql)


def downgrade() -> None:
    for function in (
        "tollgate_fail_overdue",
        "tollgate_cancel",
        "tollgate_fail",
        "tollgate_complete",
        "tollgate_settle",
    ):
        op.execute(f"DROP FUNCTION {function}")
    op.execute("DROP TYPE tollgate_ended")
