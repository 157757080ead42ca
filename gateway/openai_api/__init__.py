"""A third front door that speaks the OpenAI Images API, backed by the same tasks.

A client of the official ``openai`` package works against Tollgate by setting
``base_url="https://<gateway>/openai/v1"`` and its Tollgate key::

    POST /openai/v1/images/generations  -> {created, data: [{url | b64_json}], size, output_format}
    GET  /openai/v1/models              -> {object: "list", data: [{id, object, created, owned_by}]}

Rules:

- The body is mapped onto the catalogue by one rule (``mapping.py``,
  docs/openai.md) and submitted through the one ``submit_generation``: the same
  key, limits, model access, budgets, hold, ``Idempotency-Key`` and callbacks as
  ``POST /v1/images/generations``. The task records ``api="openai"``; its
  callback is the unified task object.
- The submit commits before the wait. The request then waits for the task's end
  on the completion signal (``gateway/tasks/waiting.py``), holding no database
  connection, for at most ``TOLLGATE_OPENAI_WAIT_SECONDS``.
- When the wait runs out or the client goes away, a task that can be cancelled
  is cancelled and its hold released; one that cannot runs on and is charged,
  and the error names its id so ``GET /v1/tasks/{id}`` can fetch the result.
- Errors are OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with
  the unified API's statuses and messages, ``param`` naming the OpenAI field;
  out of credits or budget is 429 ``insufficient_quota`` (OpenAI's own answer,
  the SDK's ``RateLimitError``), never retried (``x-should-retry: false``).
- The task id and credits travel in ``X-Tollgate-Task-Id``,
  ``X-Tollgate-Credits-Reserved`` and ``X-Tollgate-Credits-Charged``. OpenAI's
  ``usage`` counts tokens, which these upstreams do not report: it is left out.
"""
