"""Every Redis key and queue name Tollgate uses, in one place.

Redis holds only what can be lost without losing money: the job queue (every
job can be rebuilt from task rows by the reconciler), rate-limit state, upstream
slots and circuits, and markers such as the ledger check's. Job ids are
deterministic so that enqueueing twice is a no-op.
"""

from arq.constants import in_progress_key_prefix

GENERATE_JOB = "generate_task"
CALLBACK_JOB = "deliver_callback"


def generate_job_id(task_id: str, attempt: int) -> str:
    """One job id per (task, attempt): a re-run after a lost lease gets a new id."""
    return f"gen:{task_id}:{attempt}"


def arq_in_progress_key(job_id: str) -> str:
    """arq's own key, present while a worker runs the job (or died running it: it then
    lives for the worker's longest job timeout + 10 s). Read, never written, by Tollgate."""
    return in_progress_key_prefix + job_id


def callback_job_id(delivery_id: str, number: int) -> str:
    """One job id per attempt of a delivery: a duplicate enqueue is a no-op."""
    return f"cb:{delivery_id}:{number}"


def rate_key_for_key(key_id: str) -> str:
    """GCRA state (theoretical arrival time, ms) of one API key's request rate."""
    return f"tollgate:rate:key:{key_id}"


def rate_key_for_tenant(tenant_id: str) -> str:
    """GCRA state of one tenant's request rate, shared by all its keys."""
    return f"tollgate:rate:tenant:{tenant_id}"


def slot_name(queue_name: str, channel_id: str) -> str:
    """The name a channel's slots go by (the ``upstream`` of the four keys below),
    apart from other deployments sharing that Redis."""
    return f"{queue_name}|{channel_id}"


def upstream_slots_key(upstream: str) -> str:
    """Holders of an upstream account's concurrency slots, scored by lease expiry (Redis ms)."""
    return f"tollgate:upstream:{upstream}:slots"


def upstream_line_key(upstream: str) -> str:
    """Jobs waiting for one of its slots, scored by their task's submission time (ms)."""
    return f"tollgate:upstream:{upstream}:line"


def upstream_line_seen_key(upstream: str) -> str:
    """The same waiters' wake-up jobs (a hash: holder → arq payload; "" once handed a slot)."""
    return f"tollgate:upstream:{upstream}:line:seen"


def upstream_cap_key(upstream: str) -> str:
    """The account's cap as last asked with, for hand-offs made by a release or a sweep."""
    return f"tollgate:upstream:{upstream}:cap"


def slot_lines_key(queue_name: str) -> str:
    """The slot names whose line may have waiters: what the hand-off sweep visits."""
    return f"{queue_name}:slot-lines"


def parked_key(queue_name: str) -> str:
    """Holders (``<task>:<attempt>``) waiting in a line, with how many lines: a parked
    task has no job in the queue, and the reconciler leaves it alone."""
    return f"{queue_name}:parked"


def slots_epoch_key(queue_name: str) -> str:
    """Present while Redis still holds the slots: its absence tells the reconciler
    that Redis lost its state, and that the slots must be rebuilt from PostgreSQL."""
    return f"{queue_name}:slots-epoch"


def queue_epoch_key(queue_name: str) -> str:
    """Present while Redis still holds the queue: its absence tells a worker that Redis
    lost its state (a restart without persistence), and that every waiting task must be
    queued again from PostgreSQL at once (``workers/reconciler.recover_lost_queue``)."""
    return f"{queue_name}:queue-epoch"


def workers_key(queue_name: str) -> str:
    """The queue's generation workers, each scored by its last beat (``workers/liveness.py``)."""
    return f"{queue_name}:workers"


def runs_key(queue_name: str) -> str:
    """Which worker runs which claimed task: "<task>:<attempt>" → worker id."""
    return f"{queue_name}:runs"


def queue_wake_channel(queue_name: str) -> str:
    """Pub/sub: a message here wakes the queue's workers to look for jobs at once."""
    return f"{queue_name}:wake"


def upstream_backoff_key(upstream: str) -> str:
    """Present while the account backs off after a 429; its TTL is the Retry-After."""
    return f"tollgate:upstream:{upstream}:backoff"


def circuit_key(namespace: str, channel: str, part: str) -> str:
    """One part of a channel's circuit breaker (failures, open, tripped, probe)."""
    return f"tollgate:circuit:{namespace}:{channel}:{part}"


CANCEL_JOB = "cancel_upstream"
CHANNEL_TEST_JOB = "test_channel"


def channel_test_key(queue_name: str, test_id: str) -> str:
    """The outcome of an operator's channel test (the console's "Test" button)."""
    return f"tollgate:channel-test:{queue_name}:{test_id}"


def cancel_job_id(task_id: str) -> str:
    """One upstream cancel per task: a second enqueue is a no-op."""
    return f"cancel:{task_id}"


def ledger_check_key(queue_name: str) -> str:
    """Present while the last periodic ledger check is fresh (its TTL is the interval);
    one per deployment, which is one generation queue."""
    return f"{queue_name}:ledger-check"


def retention_key(queue_name: str) -> str:
    """Present while a retention run is recent: one run per interval across the fleet."""
    return f"{queue_name}:retention"


def task_events_channel(queue_name: str) -> str:
    """The pub/sub channel of task signals (gateway/tasks/events.py): a task id per
    visible change. One per deployment, which is one generation queue."""
    return f"{queue_name}:task-events"


def redeem_attempts_key(who: str, window: int) -> str:
    """Redemption attempts of one caller (``key:<id>``) in one minute (Unix time // 60);
    expires after two minutes."""
    return f"tollgate:redeem:{who}:{window}"


def job_times_key(queue_name: str, model: str) -> str:
    """The latest upstream job times of a model (seconds, newest first), which workers push
    and gateways read to estimate a backlog (gateway/tasks/backlog.py)."""
    return f"{queue_name}:job-times:{model}"


def jobs_done_key(queue_name: str, model: str) -> str:
    """How many upstream jobs of a model ended with their images stored (a counter workers
    increment and gateways sample to measure how fast a backlog really drains)."""
    return f"{queue_name}:jobs-done:{model}"
