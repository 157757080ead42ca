"""Every Redis key and queue name Tollgate uses, in one place.

Redis holds only what can be lost without losing money: the job queue (every
job can be rebuilt from task rows by the reconciler) and, later, limit counters
and caches. Job ids are deterministic so that enqueueing twice is a no-op.
"""

GENERATE_JOB = "generate_task"


def generate_job_id(task_id: str, attempt: int) -> str:
    """One job id per (task, attempt): a re-run after a lost lease gets a new id."""
    return f"gen:{task_id}:{attempt}"
