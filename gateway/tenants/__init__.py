"""Tenants and their API keys: records (``models.py``), service (``service.py``), admin routes
(``routes.py``).

Rules:
- A key is ``tg_`` followed by 43 URL-safe characters (256 bits from
  ``secrets``). It is shown once, when issued; only its SHA-256 is stored, with
  a short display prefix so people can tell their keys apart. A fast hash is
  right here: the key is random, not a password, so there is nothing to guess.
- Revoking sets ``revoked_at``; gateways cache a key for at most
  ``key_cache_ttl_seconds`` (see ``auth.py``), so a revocation reaches every
  process within that time.
"""
