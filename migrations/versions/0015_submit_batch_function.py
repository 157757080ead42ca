"""one tenant's submits reserved together in one database call (ADR 0007)

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-08 01:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The submits of one tenant that a gateway process has waiting, as one call and one
# transaction (ADR 0007). Each item is decided on its own, in order, exactly as
# tollgate_submit (migration 0007) would decide it alone after the items before it: its
# Idempotency-Key claim, then the tenant's cap on tasks in flight and its free balance,
# then its key's budgets. What changes is the hot rows' writes: the tenant's row and each
# of its keys' spend rows are locked once, read once and written once for the whole
# batch, where one call per submit wrote them once per submit (a row version each, and a
# lock every other submit of the tenant queued on).
#
# Arrays, one element per item (p_periods and p_budgets: one row of three per item, as
# limits.spend_periods and the key's budgets). Returns one text per item: 'created',
# 'duplicate:<task id>', 'conflict', 'TG402' (not enough credits), 'TG429' (the cap on
# tasks in flight), or 'TGBUD:<period index>,<budget>,<spent before>' (a key budget),
# the codes tollgate_submit raises. The caller never sends one Idempotency-Key twice in
# a call. A key spend row that another transaction created after this call read it (a
# key's first submit of a day, from two processes at once) raises TGRTY: everything
# rolls back, and the caller submits the items one by one through tollgate_submit.
SUBMIT_BATCH = """
CREATE FUNCTION tollgate_submit_batch(
    p_tenant_id text, p_task_ids text[], p_api_key_ids text[], p_models text[],
    p_providers text[], p_requests jsonb[], p_quotes jsonb[], p_billing_rules text[],
    p_user_groups text[], p_amounts bigint[], p_estimated_seconds integer[],
    p_can_cancel boolean[], p_callback_urls text[], p_apis text[], p_request_ids text[],
    p_created_at timestamptz[], p_max_in_flight integer[], p_periods text[],
    p_budgets bigint[], p_idempotency_keys text[], p_request_hashes text[]
) RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    n integer := cardinality(p_task_ids);
    periods integer := array_length(p_periods, 2);
    outcome text[] := array_fill(NULL::text, ARRAY[n]);
    earlier record;
    row record;
    keys text[];
    free bigint;
    flying integer;
    held_added bigint := 0;
    accepted integer := 0;
    -- The key spends the batch counts in: '<key> <period>', spent before, added.
    spend_names text[] := '{}';
    spend_before bigint[] := '{}';
    spend_added bigint[] := '{}';
    s integer;
    refusal text;
    total bigint;
BEGIN
    -- Idempotency claims first, in order, as tollgate_submit makes its claim first.
    FOR i IN 1 .. n LOOP
        CONTINUE WHEN p_idempotency_keys[i] IS NULL;
        INSERT INTO idempotency_keys (tenant_id, key, request_hash, task_id, created_at)
        VALUES (p_tenant_id, p_idempotency_keys[i], p_request_hashes[i], p_task_ids[i],
                p_created_at[i])
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            SELECT request_hash, task_id INTO earlier FROM idempotency_keys
            WHERE tenant_id = p_tenant_id AND key = p_idempotency_keys[i];
            outcome[i] := CASE WHEN earlier.request_hash <> p_request_hashes[i]
                               THEN 'conflict' ELSE 'duplicate:' || earlier.task_id END;
        END IF;
    END LOOP;

    -- The hot rows, locked once: the tenant's, then its keys' spends in one order.
    SELECT balance_micros - held_micros AS free, in_flight INTO row
    FROM tenants WHERE id = p_tenant_id FOR UPDATE;
    free := coalesce(row.free, 0);
    flying := coalesce(row.in_flight, 0);
    -- By the primary key's two columns as arrays: an index scan whatever the table's size.
    keys := ARRAY(SELECT DISTINCT p_api_key_ids[i] FROM generate_subscripts(p_task_ids, 1) AS i
                  WHERE outcome[i] IS NULL);
    FOR row IN
        SELECT api_key_id, period, spent_micros FROM key_spend
        WHERE api_key_id = ANY(keys) AND period = ANY(p_periods)
        ORDER BY api_key_id, period
        FOR UPDATE
    LOOP
        spend_names := spend_names || (row.api_key_id || ' ' || row.period);
        spend_before := spend_before || row.spent_micros;
        spend_added := spend_added || 0::bigint;
    END LOOP;

    -- Each item in order, against what the items before it took.
    FOR i IN 1 .. n LOOP
        CONTINUE WHEN outcome[i] IS NOT NULL;
        IF p_max_in_flight[i] > 0 AND flying >= p_max_in_flight[i] THEN
            outcome[i] := 'TG429';
            CONTINUE;
        END IF;
        IF free < p_amounts[i] THEN
            outcome[i] := 'TG402';
            CONTINUE;
        END IF;
        refusal := NULL;
        FOR j IN 1 .. periods LOOP
            s := array_position(spend_names, p_api_key_ids[i] || ' ' || p_periods[i][j]);
            IF s IS NULL THEN  -- no row yet: nothing spent in that period
                spend_names := spend_names || (p_api_key_ids[i] || ' ' || p_periods[i][j]);
                spend_before := spend_before || 0::bigint;
                spend_added := spend_added || 0::bigint;
                s := cardinality(spend_names);
            END IF;
            IF p_budgets[i][j] IS NOT NULL
               AND spend_before[s] + spend_added[s] + p_amounts[i] > p_budgets[i][j] THEN
                refusal := 'TGBUD:' || j || ',' || p_budgets[i][j] || ','
                           || (spend_before[s] + spend_added[s]);
                EXIT;
            END IF;
        END LOOP;
        IF refusal IS NOT NULL THEN
            outcome[i] := refusal;
            CONTINUE;
        END IF;
        FOR j IN 1 .. periods LOOP
            s := array_position(spend_names, p_api_key_ids[i] || ' ' || p_periods[i][j]);
            spend_added[s] := spend_added[s] + p_amounts[i];
        END LOOP;
        free := free - p_amounts[i];
        flying := flying + 1;
        held_added := held_added + p_amounts[i];
        accepted := accepted + 1;
        outcome[i] := 'created';
    END LOOP;

    -- A refused item's claim goes, as its rollback would have taken it.
    DELETE FROM idempotency_keys
    WHERE tenant_id = p_tenant_id AND key IN (
        SELECT p_idempotency_keys[i] FROM generate_subscripts(p_task_ids, 1) AS i
        WHERE p_idempotency_keys[i] IS NOT NULL
          AND (outcome[i] LIKE 'TG%'));
    IF accepted = 0 THEN
        RETURN outcome;
    END IF;

    INSERT INTO tasks (
        id, tenant_id, api_key_id, model, provider, status, progress, request, quote,
        billing_rule, user_group, credits_reserved_micros, estimated_seconds, can_cancel,
        callback_url, api, attempt, request_id, created_at
    ) SELECT p_task_ids[i], p_tenant_id, p_api_key_ids[i], p_models[i], p_providers[i],
             'pending', 0, p_requests[i], p_quotes[i], p_billing_rules[i], p_user_groups[i],
             p_amounts[i], p_estimated_seconds[i], p_can_cancel[i], p_callback_urls[i],
             p_apis[i], 0, p_request_ids[i], p_created_at[i]
      FROM generate_subscripts(p_task_ids, 1) AS i WHERE outcome[i] = 'created';
    INSERT INTO ledger_entries (
        tenant_id, task_id, kind, amount_micros, idempotency_key, reason, created_at
    ) SELECT p_tenant_id, p_task_ids[i], 'hold', p_amounts[i], 'hold:' || p_task_ids[i], '',
             p_created_at[i]
      FROM generate_subscripts(p_task_ids, 1) AS i WHERE outcome[i] = 'created';

    UPDATE tenants
    SET held_micros = held_micros + held_added, in_flight = in_flight + accepted
    WHERE id = p_tenant_id;
    FOR s IN 1 .. cardinality(spend_names) LOOP
        CONTINUE WHEN spend_added[s] = 0;
        INSERT INTO key_spend AS k (api_key_id, period, spent_micros)
        VALUES (split_part(spend_names[s], ' ', 1), split_part(spend_names[s], ' ', 2),
                spend_added[s])
        ON CONFLICT (api_key_id, period)
        DO UPDATE SET spent_micros = k.spent_micros + EXCLUDED.spent_micros
        RETURNING k.spent_micros INTO total;
        IF total <> spend_before[s] + spend_added[s] THEN
            RAISE EXCEPTION 'a key spend row changed under the batch' USING ERRCODE = 'TGRTY';
        END IF;
    END LOOP;
    RETURN outcome;
END
$$;
"""


def upgrade() -> None:
    op.execute(SUBMIT_BATCH)


def downgrade() -> None:
    op.execute("DROP FUNCTION tollgate_submit_batch")
