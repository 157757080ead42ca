"""The waiters benchmark runs end to end (``--smoke``: a few hundred waiting requests).

It proves the measurement works and what must hold whatever the machine's load: every
request answered with its task's end (none before it), no database connection in use
while they wait. The latency figures are the benchmark's to report, not this test's.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REDIS_URL, ROOT, SERVER_URL

pytestmark = pytest.mark.timeout(300)


def test_the_waiters_benchmark_runs_and_no_waiter_holds_a_connection(tmp_path: Path) -> None:
    figures = tmp_path / "waiters.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.waiters",
            "--database-url",
            SERVER_URL,
            "--redis-url",
            REDIS_URL,
            "--smoke",
            "--json",
            str(figures),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(figures.read_text())
    assert result["waiters"] == 200
    assert result["statuses"] == ["completed"]
    assert result["answered_before_their_task_ended"] == 0
    assert result["db_connections_busy_while_waiting"] == 0
    assert "answered after their task's commit" in done.stdout
