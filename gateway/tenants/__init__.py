"""Tenants and their API keys: records (``models.py``), service (``service.py``), a key's
rotation and the tenant's own key routes (``keys.py``), admin routes (``routes.py``).

Rules:
- A key is ``tg_`` followed by 43 URL-safe characters (256 bits from
  ``secrets``). It is shown once, when issued or rotated; only its SHA-256 is
  stored, with a short display prefix so people can tell their keys apart. A fast
  hash is right here: the key is random, not a password, so there is nothing to guess.
- Revoking sets ``revoked_at``; suspending a tenant sets ``suspended_at`` (submits
  answer 403 ``tenant_suspended``, reads go on, open tasks finish); deleting sets
  ``deleted_at``, suspends and revokes every key, and keeps the ledger. Gateways
  cache a key, with its tenant's group and suspension, for at most
  ``key_cache_ttl_seconds`` (see ``auth.py``), so each of these reaches every
  process within that time.
- ``expires_at`` (a key's, or a rotated key's old secret's) is exact: checked on
  every request against the cached key (``auth.py``).
- ``can_manage_keys`` is the scope of the tenant's own key routes (``keys.py``).
"""
