"""The web console under ``/console``: server-rendered pages for tenants and operators.

``router.py`` assembles it; ``web.py`` is what every page shares (the session guard,
CSRF, rendering); ``accounts.py`` and ``sessions.py`` are the users and their
sessions; the page modules are ``auth_pages``, ``tenant_pages``, ``tenant_tasks``,
``playground`` and ``operator_pages``. Templates and the vendored static files
(htmx, uPlot) live beside the code. docs/console.md describes it.
"""
