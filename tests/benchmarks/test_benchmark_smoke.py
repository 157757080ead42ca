"""The benchmark's smoke mode runs end to end and prints every figure.

It asserts that the benchmark works, never how fast anything is: a few seconds of load on a
shared machine measure nothing worth a threshold.
"""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import REDIS_URL, ROOT, SERVER_URL

HTTP_PATHS = {
    "bare",
    "healthz",
    "models",
    "submit_1_tenant",
    "submit_50_tenants",
    "task_read_pending",
    "task_read_completed",
}


@pytest.mark.timeout(400)
def test_smoke_run_prints_every_figure() -> None:
    assert shutil.which("wrk"), "the benchmark needs wrk: apt-get install wrk"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--smoke",
            "--database-url",
            SERVER_URL,
            "--redis-url",
            REDIS_URL,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=380,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    table, _, raw = done.stdout.partition("\n\n{")
    result = json.loads("{" + raw)

    assert set(result["http"]) == HTTP_PATHS
    for name, load in result["http"].items():
        assert load["requests"] > 0, name
        assert load["non_2xx"] == 0, name
        for figure in ("rps", "p50_ms", "p99_ms", "ratio_to_bare", "bare_rps"):
            assert isinstance(load[figure], float | int), (name, figure)
        assert load["cpu_ms_per_request"] is not None, name
        # a submit is a PostgreSQL call and two Redis scripts: their servers' CPU shows
        assert load["stores_cpu_ms_per_request"] > (0 if name.startswith("submit") else -1), name
        assert load["machine_cpu_ms_per_request"] > 0, name
        assert "cpu_ratio_to_bare" in load, name
        assert f"| {name} |" in table
    half = result["submit_at_half_rate"]  # benchmarks/paced.py
    assert half["requests"] > 0
    assert half["non_2xx"] == 0
    assert half["p99_ms"] >= half["p50_ms"] > 0
    assert half["errors"] == 0
    assert "at half its maximum rate" in table
    worker = result["worker"]
    assert worker["completed"] == worker["tasks"] == 20
    assert worker["tasks_per_s"] > 0
    assert worker["start_latency_samples"] == 5
    assert worker["start_latency_p99_ms"] >= worker["start_latency_p50_ms"] >= 0
    assert result["callbacks"]["deliveries"] == 25
    assert result["callbacks"]["deliveries_per_s"] > 0
    assert result["callbacks"]["cpu_ms_per_delivery"] > 0
    for process in ("gateway", "worker", "callback_worker"):
        rss = result["rss_mib"][process]
        assert rss["before"] > 0
        assert rss["after"] > 0
        assert f"| {process} RSS MiB" in table
    assert "worker tasks/s" in table
    waiters = result["waiters"]  # benchmarks/waiters.py --smoke, hooked in
    assert waiters["waiters"] == 200
    assert waiters["statuses"] == ["completed"]
    assert waiters["db_connections_busy_while_waiting"] == 0
    for figure in ("latency_p99_ms", "after_signal_p99_ms", "kib_per_waiter"):
        assert isinstance(waiters[figure], float | int), figure
    assert "answered after their task's commit" in table
    soak = result["soak"]  # --smoke makes the long run a token one
    assert soak["requests"] > 0
    assert soak["non_2xx"] == 0
    assert result["rss_mib"]["gateway_soak"]["after"] > 0
    assert "| gateway_soak RSS MiB" in table
    assert "callback deliveries/s" in table
