"""the submit's reservation as one database function (ADR 0005)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 15:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Called as one statement, outside any explicit transaction, so the call is the whole
# transaction: one round trip. Order matters (ADR 0005): the rows only this request
# touches first, then the two rows every submit of the tenant and key contends for (the
# tenant's balance and in-flight count, the key's spend), last, so their locks are held
# only while the function returns and the transaction commits. A refusal raises, and the
# raise rolls back everything the call wrote. Returns 'created', 'duplicate:<task id>'
# (an Idempotency-Key retry of the same body) or 'conflict' (same key, another body).
SUBMIT = """
CREATE FUNCTION tollgate_submit(
    p_task_id text, p_tenant_id text, p_api_key_id text, p_model text, p_provider text,
    p_request jsonb, p_quote jsonb, p_billing_rule text, p_user_group text,
    p_amount bigint, p_estimated_seconds integer, p_can_cancel boolean,
    p_callback_url text, p_api text, p_request_id text, p_created_at timestamptz,
    p_max_in_flight integer, p_periods text[], p_budgets bigint[],
    p_idempotency_key text, p_request_hash text
) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    earlier record;
    spent record;
    current_in_flight integer;
BEGIN
    IF p_idempotency_key IS NOT NULL THEN
        INSERT INTO idempotency_keys (tenant_id, key, request_hash, task_id, created_at)
        VALUES (p_tenant_id, p_idempotency_key, p_request_hash, p_task_id, p_created_at)
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            SELECT request_hash, task_id INTO earlier FROM idempotency_keys
            WHERE tenant_id = p_tenant_id AND key = p_idempotency_key;
            IF earlier.request_hash <> p_request_hash THEN
                RETURN 'conflict';
            END IF;
            RETURN 'duplicate:' || earlier.task_id;
        END IF;
    END IF;

    INSERT INTO tasks (
        id, tenant_id, api_key_id, model, provider, status, progress, request, quote,
        billing_rule, user_group, credits_reserved_micros, estimated_seconds, can_cancel,
        callback_url, api, attempt, request_id, created_at
    ) VALUES (
        p_task_id, p_tenant_id, p_api_key_id, p_model, p_provider, 'pending', 0, p_request,
        p_quote, p_billing_rule, p_user_group, p_amount, p_estimated_seconds, p_can_cancel,
        p_callback_url, p_api, 0, p_request_id, p_created_at
    );
    INSERT INTO ledger_entries (
        tenant_id, task_id, kind, amount_micros, idempotency_key, reason, created_at
    ) VALUES (p_tenant_id, p_task_id, 'hold', p_amount, 'hold:' || p_task_id, '', p_created_at);

    -- The hot rows, last.
    UPDATE tenants
    SET held_micros = held_micros + p_amount, in_flight = in_flight + 1
    WHERE id = p_tenant_id
      AND balance_micros - held_micros >= p_amount
      AND (p_max_in_flight = 0 OR in_flight < p_max_in_flight);
    IF NOT FOUND THEN
        SELECT in_flight INTO current_in_flight FROM tenants WHERE id = p_tenant_id;
        IF p_max_in_flight > 0 AND current_in_flight >= p_max_in_flight THEN
            RAISE EXCEPTION 'too many tasks in flight' USING ERRCODE = 'TG429';
        END IF;
        RAISE EXCEPTION 'insufficient quota' USING ERRCODE = 'TG402';
    END IF;
    FOR spent IN
        INSERT INTO key_spend AS s (api_key_id, period, spent_micros)
        SELECT p_api_key_id, period, p_amount FROM unnest(p_periods) AS period
        ON CONFLICT (api_key_id, period)
        DO UPDATE SET spent_micros = s.spent_micros + EXCLUDED.spent_micros
        RETURNING s.period, s.spent_micros
    LOOP
        FOR i IN 1 .. array_length(p_periods, 1) LOOP
            IF p_periods[i] = spent.period AND p_budgets[i] IS NOT NULL
               AND spent.spent_micros > p_budgets[i] THEN
                RAISE EXCEPTION 'key budget exceeded' USING ERRCODE = 'TGBUD',
                    DETAIL = i || ',' || p_budgets[i] || ',' || (spent.spent_micros - p_amount);
            END IF;
        END LOOP;
    END LOOP;
    RETURN 'created';
END
$$;
"""


def upgrade() -> None:
    op.execute(SUBMIT)


def downgrade() -> None:
    op.execute("DROP FUNCTION tollgate_submit")
