"""Redemption codes: an operator makes a batch of codes worth credits; a tenant redeems one.

Records (``models.py``), service (``service.py``), routes (``routes.py``: the operator's
under ``/admin``; the tenant's ``POST /v1/account/redeem`` is in ``gateway/account``).

Rules:
- A code is ``TG-`` and four groups of five characters of Crockford's base 32
  (100 bits from ``secrets``). It is shown once, in the answer that makes it; only
  its SHA-256 is stored (of the code upper-cased, without dashes or spaces, so a
  code typed in lower case or without its dashes still matches).
- A code is redeemed at most once: one ``UPDATE … WHERE redeemed_at IS NULL``
  takes it, in the same transaction as the ledger's top-up (idempotency key
  ``redeem:<code id>``, a second guard). A hundred concurrent redemptions of one
  code credit once; the others are told it was used.
- Unknown: 404 ``redemption_code_not_found``; used: 409 ``redemption_code_used``;
  expired: 410 ``redemption_code_expired``. None of them credits anything.
- Attempts, good or bad, are limited per key (``TOLLGATE_REDEEM_RATE_LIMIT_PER_MINUTE``,
  a fixed one-minute window in Redis): past it, 429 with ``Retry-After``, so codes
  cannot be guessed at speed.
"""
