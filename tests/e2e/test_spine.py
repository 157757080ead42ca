"""End to end: gateway, worker and simulator as separate processes, driven over HTTP.

The tenant and key come from the ``tollgate`` CLI, as an operator would make them.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    ADMIN_TOKEN,
    ENCRYPTION_KEYS,
    REDIS_URL,
    ROOT,
    SIM_KEY,
    Sim,
    free_port,
    wait_http,
)

from workers.simulator.png import png_size


class Stack:
    """Processes sharing one environment; everything is stopped at the end."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, *args], cwd=ROOT, env=self.env, stdout=log, stderr=log
            )
        self.procs[name] = proc
        return proc

    def cli(self, *args: str) -> Any:
        done = subprocess.run(
            [sys.executable, "-m", "gateway.cli", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(done.stdout)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def stack(database_url: str, simulator_url: str, tmp_path: Path) -> Iterator[Stack]:
    port = free_port()
    upstream = {"base_url": simulator_url, "api_key": SIM_KEY}
    env = {
        **os.environ,
        "TOLLGATE_DATABASE_URL": database_url,
        "TOLLGATE_REDIS_URL": REDIS_URL,
        "TOLLGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "TOLLGATE_SIGNING_SECRET": "e2e-signing-secret-0123456789",
        "TOLLGATE_ENCRYPTION_KEYS": ENCRYPTION_KEYS,
        "TOLLGATE_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "TOLLGATE_STORAGE_DIR": str(tmp_path / "storage"),
        "TOLLGATE_QUEUE_NAME": f"tollgate:e2e:{port}",
        "TOLLGATE_UPSTREAMS": json.dumps({"krea": upstream, "siliconflow": upstream}),
        "TOLLGATE_POLL_INTERVAL_SECONDS": "0.2",
        "TOLLGATE_LEASE_SECONDS": "1.5",
        "TOLLGATE_RECONCILE_INTERVAL_SECONDS": "1",
        "TOLLGATE_RESULT_URL_TTL_SECONDS": "6",
    }
    built = Stack(env, tmp_path)
    built.env["E2E_PORT"] = str(port)
    try:
        yield built
    finally:
        built.stop()


def start_gateway(stack: Stack) -> str:
    port = stack.env["E2E_PORT"]
    proc = stack.start("gateway", "-m", "gateway.cli", "serve", "--port", port)
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/healthz", proc=proc)
    return base


def tenant_key(stack: Stack) -> str:
    tenant = stack.cli("tenants", "create", f"e2e-{time.monotonic_ns()}")
    topped = stack.cli("credits", "topup", tenant["id"], "10", "--reason", "e2e")
    assert topped["available_micros"] == 10_000_000
    issued = stack.cli("keys", "issue", tenant["id"], "--name", "e2e")
    key: str = issued["key"]
    assert key.startswith("tg_")
    return key


def poll(base: str, key: str, task_id: str, until: set[str], wait: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + wait
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = httpx.get(
            f"{base}/v1/tasks/{task_id}", headers={"Authorization": f"Bearer {key}"}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        if body["status"] in until:
            return body
        time.sleep(0.1)
    raise AssertionError(f"task stayed {body.get('status')}: {body}")


def test_submit_poll_download_then_the_link_expires(stack: Stack, simulator: Sim) -> None:
    base = start_gateway(stack)
    stack.start("worker", "-m", "workers")
    key = tenant_key(stack)
    response = httpx.post(
        f"{base}/v1/images/generations",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "krea-2-medium", "prompt": "a glass cabin", "size": "16:9"},
    )
    assert response.status_code == 200, response.text
    task = response.json()
    done = poll(base, key, task["id"], {"completed", "failed"})
    assert done["status"] == "completed", done
    [url] = done["results"]
    assert url.startswith(f"{base}/v1/files/")
    image = httpx.get(url)
    assert image.status_code == 200
    assert png_size(image.content) == (1344, 768)
    # After the expiry the same link is refused, with the error envelope.
    time.sleep(max(0.0, done["expires_at"] - time.time()) + 1)
    expired = httpx.get(url)
    assert expired.status_code == 410
    assert expired.json()["error"]["code"] == "link_expired"
    listed = stack.cli("tasks", "list", "--limit", "5")
    assert task["id"] in {t["id"] for t in listed}


def test_a_worker_killed_mid_task_is_replaced_and_the_task_completes(
    stack: Stack, simulator: Sim
) -> None:
    simulator.configure_now(latency=4.0)
    base = start_gateway(stack)
    first = stack.start("worker", "-m", "workers")
    key = tenant_key(stack)
    response = httpx.post(
        f"{base}/v1/images/generations",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "krea-2-large", "prompt": "survive a crash"},
    )
    task_id = response.json()["id"]
    poll(base, key, task_id, {"processing"})
    deadline = time.monotonic() + 10
    while simulator.stats_now()["submits"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    stack.start("worker-2", "-m", "workers")
    done = poll(base, key, task_id, {"completed", "failed"}, wait=40)
    assert done["status"] == "completed", done
    # The new attempt resumed the upstream job rather than paying for a second one.
    assert simulator.stats_now()["submits"] == 1


def submit_and_wait_for_the_upstream(stack: Stack, simulator: Sim, prompt: str) -> tuple[str, str]:
    base = start_gateway(stack)
    key = tenant_key(stack)
    response = httpx.post(
        f"{base}/v1/images/generations",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "krea-2-large", "prompt": prompt},
    )
    task_id: str = response.json()["id"]
    deadline = time.monotonic() + 10
    while simulator.stats_now()["submits"] < 1:
        assert time.monotonic() < deadline, "the worker never reached the upstream"
        time.sleep(0.05)
    poll(base, key, task_id, {"processing"})
    return base, key + " " + task_id


def test_sigterm_lets_a_running_task_finish_within_the_grace_period(
    stack: Stack, simulator: Sim
) -> None:
    simulator.configure_now(latency=2.0)
    stack.env["TOLLGATE_WORKER_SHUTDOWN_GRACE_SECONDS"] = "20"
    worker = stack.start("worker", "-m", "workers")
    base, ids = submit_and_wait_for_the_upstream(stack, simulator, "finish before leaving")
    key, task_id = ids.split(" ")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0
    # It left only after the task was done: nothing is left for another worker.
    done = poll(base, key, task_id, {"completed", "failed"}, wait=1)
    assert done["status"] == "completed", done
    assert simulator.stats_now()["submits"] == 1


def test_sigterm_past_the_grace_period_hands_the_task_back_to_another_worker(
    stack: Stack, simulator: Sim
) -> None:
    simulator.configure_now(latency=6.0)
    stack.env["TOLLGATE_WORKER_SHUTDOWN_GRACE_SECONDS"] = "1"
    # A long lease: without the hand-back the task would sit for half a minute.
    stack.env["TOLLGATE_LEASE_SECONDS"] = "30"
    worker = stack.start("worker", "-m", "workers")
    base, ids = submit_and_wait_for_the_upstream(stack, simulator, "hand me back")
    key, task_id = ids.split(" ")
    stopped_at = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=15) == 0
    assert time.monotonic() - stopped_at < 10
    running = poll(base, key, task_id, {"processing", "completed", "failed"}, wait=1)
    assert running["status"] == "processing", running
    stack.start("worker-2", "-m", "workers")
    done = poll(base, key, task_id, {"completed", "failed"}, wait=20)
    assert done["status"] == "completed", done
    # Resumed, not run twice, and well before the old lease would have run out.
    assert simulator.stats_now()["submits"] == 1
    assert time.monotonic() - stopped_at < 25
