"""The tenant's self-service API, with its own bearer key: account, usage, tasks, keys,
redemption. Service (``service.py``: what the web console calls too) and routes
(``routes.py``, thin).

Rules:
- Every answer is about the caller's tenant only: the tenant comes from the key,
  never from the request, and another tenant's task or key is answered exactly
  like one that does not exist.
- ``GET /v1/tasks`` pages by keyset, newest first: the cursor is the last row's
  ``(created_at, id)``, read on the index ``ix_tasks_tenant_created_id``, so a page
  costs the same however deep it is.
- The key routes need the key's ``can_manage_keys`` scope (``gateway/tenants/keys.py``).
"""
