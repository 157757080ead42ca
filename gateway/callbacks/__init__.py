"""Callbacks: a task's final state, POSTed to the tenant's URL, signed and recorded.

Rules:
- A delivery is created in the same transaction that makes its task final
  (``gateway/tasks/lifecycle.py``), after the task's billing has settled in
  that transaction; it cannot be lost by a crash.
- The body is exactly what ``GET /v1/tasks/{id}`` returns, rendered at each
  attempt from the (final, unchanging) task row, so every attempt sends the
  same bytes.
- Signed with the Standard Webhooks scheme under the tenant's secret:
  ``webhook-id`` (the delivery id, the same on every attempt),
  ``webhook-timestamp``, ``webhook-signature: v1,<base64 HMAC-SHA256 of
  "id.timestamp.body">``.
- Attempts follow the delivery's schedule: retries 1, 2 and 4 seconds after a
  failure (4 attempts), then the delivery is given up; a tenant may be put on
  the extended schedule by an operator. Any 2xx is success; nothing else is.
- Every attempt is a row (when, status or error, duration). Deliveries run on
  their own queue, so slow receivers never hold up generation.
"""
