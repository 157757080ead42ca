"""End to end on S3: a gateway and two worker processes share one bucket on a real S3
API server (moto's, on loopback). Both workers store results there, the gateway
streams them from it, and retention, run by whichever worker's cron takes the tick,
empties the bucket once the links have expired and the grace period has passed."""

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Sim
from s3_server import S3Server, s3_server, s3_settings
from test_spine import Stack, poll, start_gateway, tenant_key
from test_spine import stack as stack  # the fixture

from workers.simulator.png import png_size

TASKS = 8


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    with s3_server(tmp_path) as server:
        yield server


def completed_in(log: Path) -> int:
    return sum(": completed:" in line for line in log.read_text().splitlines())


@pytest.mark.usefixtures("simulator")
def test_two_workers_share_one_bucket_and_retention_empties_it(
    stack: Stack, s3: S3Server, simulator: Sim, tmp_path: Path
) -> None:
    bucket = s3.create_bucket()
    for name, value in s3_settings(s3, bucket, "tollgate").items():
        stack.env[f"TOLLGATE_{name.upper()}"] = str(value)
    stack.env.update(
        {
            "TOLLGATE_RESULT_URL_TTL_SECONDS": "10",
            "TOLLGATE_RESULT_GRACE_SECONDS": "1",
            "TOLLGATE_RETENTION_INTERVAL_SECONDS": "2",
            # Two jobs at a time each: eight tasks need both workers.
            "TOLLGATE_WORKER_MAX_JOBS": "2",
            "TOLLGATE_METRICS_PORT": "0",
        }
    )
    simulator.configure_now(latency=1.0)
    base = start_gateway(stack)
    assert httpx.get(f"{base}/readyz").json() == {"status": "ready"}
    stack.start("worker", "-m", "workers")
    stack.start("worker-2", "-m", "workers")
    key = tenant_key(stack)
    ids = []
    for n in range(TASKS):
        response = httpx.post(
            f"{base}/v1/images/generations",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "flux-1-schnell", "prompt": f"a lighthouse {n}", "size": "512x512"},
        )
        assert response.status_code == 200, response.text
        ids.append(response.json()["id"])
    done = [poll(base, key, task_id, {"completed", "failed"}, wait=60) for task_id in ids]
    for task in done:
        assert task["status"] == "completed", task
        [url] = task["results"]
        assert url.startswith(f"{base}/v1/files/")
        image = httpx.get(url)
        assert image.status_code == 200
        assert png_size(image.content) == (512, 512)
    assert s3.keys(bucket) == sorted(f"tollgate/{task_id}/0.png" for task_id in ids)
    # Both workers stored results in the one bucket.
    assert completed_in(tmp_path / "worker.log") > 0
    assert completed_in(tmp_path / "worker-2.log") > 0
    assert completed_in(tmp_path / "worker.log") + completed_in(tmp_path / "worker-2.log") == TASKS

    # Links expire (10 s), the grace passes (1 s), a retention tick (every 2 s) deletes.
    last_expiry = max(task["expires_at"] for task in done)
    deadline = last_expiry + 30
    while s3.keys(bucket) and time.time() < deadline:
        time.sleep(0.5)
    assert s3.keys(bucket) == []
    expired = httpx.get(done[0]["results"][0])
    assert expired.status_code == 410
    assert expired.json()["error"]["code"] == "link_expired"
    logs = (tmp_path / "worker.log").read_text() + (tmp_path / "worker-2.log").read_text()
    assert "retention:" in logs
