"""Limits: request rates, tasks in flight, model access and key budgets.

``service.py`` enforces them (its docstring has the rules); ``overrides.py`` sets and
shows a tenant's or a key's own values; ``routes.py`` is their admin API.
"""
