"""Prices at run time: groups, their prices, exchange rates and the record of changes.

The catalogue (``pricing/catalog.toml``) is the default; what the operator sets
through ``/admin`` or the CLI is stored in PostgreSQL (``models.py``) and layered
over it (``book.py``). Every change bumps one version number in the same
transaction; each gateway process reads that number at most once per
``key_cache_ttl_seconds`` and reloads the layers when it moved, so a change
reaches every process within that time with no restart and no query per submit.
"""
