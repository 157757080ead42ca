"""The ledger: every change to a tenant's credits, as an append-only row.

Rules (the database enforces them too):
- Amounts are integer micro-credits (BIGINT), always positive; ``kind`` says
  which way they move.
- ``topup``, ``refund`` and ``adjustment`` (signed) change the balance;
  ``hold`` reserves part of it for a task; a hold is closed exactly once, by a
  ``capture`` (the charge leaves the balance, the rest of the hold is freed)
  or a ``release`` (all of it is freed). Capture and release of one task share
  the idempotency key ``settle:<task>``, so UNIQUE makes a second settlement of
  any kind impossible.
- Rows are never updated or deleted (a trigger refuses it).
- ``tenants.balance_micros`` and ``tenants.held_micros`` are running totals
  kept in the same transaction as each row; CHECK constraints keep
  ``0 <= held <= balance``, so credits can never be spent twice.
  ``tollgate ledger check`` recomputes both from the rows.
- Only this package writes ledger rows or those two columns, with two
  exceptions, both database functions called as one statement: the submit's
  hold, by ``tollgate_submit`` (migration 0007, ADR 0005), in the transaction
  that inserts the task (``hold:<task>``, held <= balance); and every
  settlement, by ``tollgate_settle`` (migration 0014, ADR 0006), in the
  transaction of the ending UPDATE that makes the task final (``settle:<task>``,
  charge <= hold).
"""
