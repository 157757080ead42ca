"""A second front door that speaks the Krea 2 API (seeds/001), backed by the same tasks.

A client written for Krea 2 works against Tollgate by changing only its base URL::

    POST /generate/image/krea/krea-2/{medium|large}  -> {"job_id", "status": "queued", "created_at"}
    GET  /jobs/{job_id}                              -> the job object (below)
    DELETE /jobs/{job_id}                            -> the job object, cancelled

Rules:

- A request is translated to the unified fields (``aspect_ratio`` -> ``size``,
  ``resolution`` -> ``quality``, every other field by its own name; the variant
  picks the catalogue model from ``MODELS``) and goes through the one
  ``submit_generation``: the same key, rate limits, cap on tasks in flight,
  model access, key budgets, hold, ``Idempotency-Key`` and ``X-Webhook-URL`` as
  ``POST /v1/images/generations``. The task records ``api="krea"``.
- A job is a task: ``job_id`` is the task id. Any task of the caller's tenant
  reads here, whichever door it came through; another tenant's is 404, like an
  id that does not exist.
- ``render_krea_job`` is the one renderer of the job object, for
  ``GET /jobs/{id}`` and for the callback of a task that came through this door
  (``gateway/callbacks/service.py``)::

      {"job_id", "status": queued|processing|completed|failed|cancelled,
       "created_at", "completed_at": ISO 8601 | null,
       "result": {"urls": [...]}          (completed: Tollgate's signed links)
       "error": {"code", "message"}}      (failed)

- Errors keep the unified API's statuses, headers (``Retry-After``) and
  messages, with a field error naming the Krea field; only the body takes
  Krea's shape, ``{"error": "<message>", "code": "<code>"}``: a Krea client
  reads ``error`` as a string, and ``code`` is our additive machine name.
"""
