"""The soak's drain figure: completions against capacity where a backlog could fill it."""

from typing import Any

from benchmarks.soak import drain


def task(created: float, finished: float | None, status: str = "completed") -> dict[str, Any]:
    return {"created": created, "finished": finished, "status": status}


def test_only_buckets_with_a_backlog_to_fill_capacity_and_no_kill_near_count() -> None:
    # Capacity 2/s, buckets of 10 s: a bucket needs 20 open tasks at its start to count.
    backlog = [task(0.0, 10.0 + i * 0.5) for i in range(30)]  # 30 open at t=10, 20 done by 20
    backlog += [task(0.0, 20.0 + i) for i in range(10)]  # 10 open at 20: too few to count
    result = drain(backlog, 0.0, 10, 2.0, kills=[])
    # Bucket 0 (t 0-10): 40 open, none done: share 0; bucket 1 (10-20): 39 open, 20 done: 1.
    assert result["saturated_buckets"] == 2
    assert result["share_of_capacity_min"] == 0.0
    assert result["share_of_capacity_median"] == 0.5
    killed = drain(backlog, 0.0, 10, 2.0, kills=[5.0])
    assert killed["saturated_buckets"] == 0
    assert drain([], 0.0, 10, 2.0, kills=[])["saturated_buckets"] == 0
