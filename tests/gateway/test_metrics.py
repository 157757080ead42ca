"""Metrics: a known sequence of requests and tasks moves every counter by exactly that much.

Scrapes ``GET /metrics`` before and after, parsed with prometheus-client's own
parser. The worker here runs without its crons (no reconciler), so it only works
on the tasks this test queued, never on another test's leftovers. Multiprocess
mode runs real processes writing to one ``PROMETHEUS_MULTIPROC_DIR``.
"""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from arq.constants import in_progress_key_prefix
from conftest import (
    ADMIN_TOKEN,
    ROOT,
    SIM_KEY,
    Sim,
    bearer,
    cli_env,
    free_port,
    make_settings,
    make_tenant_key,
    scalar,
    stop_worker,
    wait_for_status,
)
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway import metrics
from gateway.app import create_app
from gateway.redis_keys import ledger_check_key
from gateway.settings import Settings
from gateway.tenants.models import hash_key
from workers.ledger_audit import check_ledger
from workers.main import create_worker

Client = AsyncTestClient[Any]

GENERATIONS = "/v1/images/generations"
MODEL = "krea-2-turbo"


# ---------------------------------------------------------------- scraping


class Scrape:
    """One scrape's samples, by name and labels."""

    def __init__(self, body: str) -> None:
        self.values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                self.values[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def get(self, name: str, **labels: str) -> float:
        return self.values.get((name, frozenset(labels.items())), 0.0)

    def sum(self, name: str, **labels: str) -> float:
        wanted = set(labels.items())
        return sum(v for (n, found), v in self.values.items() if n == name and wanted <= found)

    def label_values(self) -> set[str]:
        return {value for _, labels in self.values for _, value in labels}


async def scrape(client: Client, **headers: str) -> Scrape:
    response = await client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return Scrape(response.text)


def moved(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.get(name, **labels) - before.get(name, **labels)


def start_bare_worker(settings: Settings) -> tuple[Any, "asyncio.Task[None]"]:
    """A worker for this test's queue only: no reconciler, no ledger check."""
    worker = create_worker(settings, handle_signals=False, cron_jobs=[])
    return worker, asyncio.create_task(worker.async_run())


async def key_id(engine: AsyncEngine, key: str) -> str:
    found: str = await scalar(
        engine, "SELECT id FROM api_keys WHERE key_hash = :h", h=hash_key(key)
    )
    return found


async def submit(client: Client, key: str, **fields: Any) -> httpx.Response:
    return await client.post(GENERATIONS, json={"model": MODEL, **fields}, headers=bearer(key))


# ---------------------------------------------------------------- the counters


async def test_counters_move_by_exactly_what_happened(
    client: Client,
    settings: Settings,
    simulator: Sim,
    engine: AsyncEngine,
    tenant_key: tuple[str, str],
) -> None:
    tenant_id, key = tenant_key
    limited_tenant, limited_key = await make_tenant_key(settings)
    limited = await key_id(engine, limited_key)
    response = await client.patch(
        f"/admin/keys/{limited}/limits",
        json={"rate_limit_per_minute": 1, "rate_limit_burst": 1},
        headers=bearer(ADMIN_TOKEN),
    )
    assert response.status_code == 200, response.text
    worker = start_bare_worker(settings)
    try:
        before = await scrape(client)

        completed = []
        for n in range(3):
            response = await submit(client, key, prompt=f"counted {n}")
            assert response.status_code == 200, response.text
            completed.append(response.json()["id"])
        for task_id in completed:
            done = await wait_for_status(client, key, task_id, {"completed", "failed"})
            assert done["status"] == "completed", done

        await simulator.configure(error_kind="job_failed")
        response = await submit(client, key, prompt="fails upstream")
        failed = response.json()["id"]
        done = await wait_for_status(client, key, failed, {"completed", "failed"}, wait=30)
        assert done["status"] == "failed", done
        await simulator.reset()

        rejected = [
            await submit(client, key, prompt="x", seed="not a number"),
            await client.post(
                GENERATIONS, json={"model": "no-such-model", "prompt": "x"}, headers=bearer(key)
            ),
        ]
        assert [r.status_code for r in rejected] == [400, 400]
        assert (await client.get("/v1/models", headers=bearer(limited_key))).status_code == 200
        assert (await client.get("/v1/models", headers=bearer(limited_key))).status_code == 429
        assert (await client.get("/v1/no-such-route")).status_code == 404

        after = await scrape(client)
    finally:
        await stop_worker(*worker)

    submitted = [*completed, failed]
    reserved = await scalar(
        engine,
        "SELECT sum(credits_reserved_micros) FROM tasks WHERE id = ANY(:ids)",
        ids=submitted,
    )
    captured = await scalar(
        engine,
        "SELECT sum(credits_charged_micros) FROM tasks WHERE id = ANY(:ids)",
        ids=submitted,
    )
    assert reserved > captured > 0

    post = {"route": GENERATIONS, "method": "POST"}
    assert moved(before, after, "tollgate_http_requests_total", **post, status="200") == 4
    assert moved(before, after, "tollgate_http_requests_total", **post, status="400") == 2
    assert moved(before, after, "tollgate_http_request_duration_seconds_count", **post) == 6
    models = {"route": "/v1/models", "method": "GET"}
    assert moved(before, after, "tollgate_http_requests_total", **models, status="200") == 1
    assert moved(before, after, "tollgate_http_requests_total", **models, status="429") == 1
    unmatched = {"route": "unmatched", "method": "GET", "status": "404"}
    assert moved(before, after, "tollgate_http_requests_total", **unmatched) == 1
    task_route = {"route": "/v1/tasks/{task_id}", "method": "GET", "status": "200"}
    assert moved(before, after, "tollgate_http_requests_total", **task_route) >= 4

    assert moved(before, after, "tollgate_tasks_submitted_total", model=MODEL) == 4
    finished = "tollgate_tasks_finished_total"
    assert moved(before, after, finished, model=MODEL, status="completed") == 3
    assert moved(before, after, finished, model=MODEL, status="failed") == 1
    assert moved(before, after, finished, model=MODEL, status="cancelled") == 0

    credits = "tollgate_credits_{}_microcredits_total"
    assert moved(before, after, credits.format("reserved")) == reserved
    assert moved(before, after, credits.format("captured")) == captured
    assert moved(before, after, credits.format("released")) == reserved - captured

    refusals = "tollgate_rate_limit_refusals_total"
    assert moved(before, after, refusals, scope="key") == 1
    for scope in ("tenant", "in_flight", "key_budget"):
        assert moved(before, after, refusals, scope=scope) == 0

    # No label names a task, a key or a tenant.
    ids = {tenant_id, limited_tenant, limited, *submitted}
    for value in after.label_values():
        assert value not in ids
        assert not re.match(r"task-|tg_|(ten|key)_[0-9a-f]{16}$", value), value


async def test_each_limit_refusal_counts_under_its_scope(
    client: Client, settings: Settings, engine: AsyncEngine
) -> None:
    tenant_id, key = await make_tenant_key(settings)
    admin = bearer(ADMIN_TOKEN)
    response = await client.patch(
        f"/admin/tenants/{tenant_id}/limits",
        json={"max_in_flight": 1, "rate_limit_per_minute": 1, "rate_limit_burst": 2},
        headers=admin,
    )
    assert response.status_code == 200, response.text
    before = await scrape(client)

    first = await submit(client, key, prompt="holds the only slot")
    assert first.status_code == 200, first.text
    second = await submit(client, key, prompt="one too many")
    assert second.json()["error"]["code"] == "too_many_tasks_in_flight"
    # Both submits counted against the tenant's rate (burst 2): the third request is over.
    third = await client.get("/v1/models", headers=bearer(key))
    assert third.json()["error"]["code"] == "rate_limit_exceeded"

    _, other_key = await make_tenant_key(settings)
    response = await client.patch(
        f"/admin/keys/{await key_id(engine, other_key)}/limits",
        json={"budget_total": "0"},
        headers=admin,
    )
    assert response.status_code == 200, response.text
    over = await submit(client, other_key, prompt="over budget")
    assert over.json()["error"]["code"] == "key_budget_exceeded"

    after = await scrape(client)
    refusals = "tollgate_rate_limit_refusals_total"
    assert moved(before, after, refusals, scope="in_flight") == 1
    assert moved(before, after, refusals, scope="tenant") == 1
    assert moved(before, after, refusals, scope="key_budget") == 1
    assert moved(before, after, refusals, scope="key") == 0
    # The refused submits were rolled back: neither reserved nor counted as submitted.
    task = first.json()
    reserved = await scalar(
        engine, "SELECT credits_reserved_micros FROM tasks WHERE id = :id", id=task["id"]
    )
    assert moved(before, after, "tollgate_credits_reserved_microcredits_total") == reserved
    assert moved(before, after, "tollgate_tasks_submitted_total", model=MODEL) == 1

    # Leave the task final, so the suite's ledger check finds in-flight counts right
    # (read from the table: the key is over its tenant's rate for a minute).
    worker = start_bare_worker(settings)
    try:
        for _ in range(200):
            sql = "SELECT status FROM tasks WHERE id = :id"
            if await scalar(engine, sql, id=task["id"]) in ("completed", "failed"):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the task did not finish")
    finally:
        await stop_worker(*worker)


# ---------------------------------------------------------------- state read at scrape time


async def test_open_tasks_and_the_queue_are_read_at_scrape_time(
    database_url: str, simulator_url: str, tmp_path: Path, simulator: Sim
) -> None:
    settings = make_settings(
        database_url,
        simulator_url,
        tmp_path / "storage",
        callback_queue_name=f"tollgate:test-cb:{uuid.uuid4().hex}",
    )
    _, key = await make_tenant_key(settings)
    redis = Redis.from_url(settings.redis_url)
    async with AsyncTestClient(app=create_app(settings), base_url="http://testserver.local") as c:
        try:
            before = await scrape(c)
            ids = []
            for n in range(3):
                response = await submit(c, key, prompt=f"queued {n}")
                ids.append(response.json()["id"])
            await asyncio.sleep(0.3)
            queued = await scrape(c)
            pending = {"model": MODEL, "status": "pending"}
            assert moved(before, queued, "tollgate_tasks_open", **pending) == 3
            assert queued.get("tollgate_queue_depth", queue="generate") == 3
            assert queued.get("tollgate_queue_oldest_job_age_seconds", queue="generate") >= 0.3
            assert queued.get("tollgate_queue_depth", queue="callbacks") == 0
            assert queued.get("tollgate_queue_oldest_job_age_seconds", queue="callbacks") == 0
            # Every model is reported, at 0 when nothing is open.
            idle = frozenset({("model", "flux-1-pro"), ("status", "processing")})
            assert ("tollgate_tasks_open", idle) in queued.values

            worker = start_bare_worker(settings)
            try:
                for task_id in ids:
                    await wait_for_status(c, key, task_id, {"completed", "failed"})
            finally:
                await stop_worker(*worker)
            done = await scrape(c)
            assert done.get("tollgate_tasks_open", **pending) == before.get(
                "tollgate_tasks_open", **pending
            )
            assert done.get("tollgate_queue_depth", queue="generate") == 0
        finally:
            await redis.delete(settings.queue_name, settings.callback_queue_name)
            await redis.aclose()


async def test_queue_depth_leaves_out_running_and_deferred_jobs(settings: Settings) -> None:
    redis = Redis.from_url(settings.redis_url)
    queue = settings.queue_name
    now_ms = int(time.time() * 1000)
    jobs = {"running": now_ms - 9000, "oldest": now_ms - 5000, "newer": now_ms - 1000}
    try:
        await redis.zadd(queue, {**jobs, "later": now_ms + 60_000})
        await redis.set(in_progress_key_prefix + "running", b"1", px=60_000)
        waiting, age = await metrics._queue_state(redis, queue, now_ms)
        assert waiting == 2
        assert age == pytest.approx(5.0)
        await redis.delete(queue)
        assert await metrics._queue_state(redis, queue, now_ms) == (0, 0.0)
    finally:
        await redis.delete(queue, in_progress_key_prefix + "running")
        await redis.aclose()


async def test_a_scrape_still_answers_when_redis_is_gone(
    settings: Settings, client: Client
) -> None:
    """The state gauges are left out, the counters are served."""
    app = client.app
    services = app.state.services
    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    live, services.redis = services.redis, dead
    try:
        found = await scrape(client)
    finally:
        services.redis = live
        await dead.aclose()
    assert not any(name == "tollgate_queue_depth" for name, _ in found.values)
    assert any(name == "tollgate_tasks_open" for name, _ in found.values)
    assert any(name == "tollgate_http_requests_total" for name, _ in found.values)


# ---------------------------------------------------------------- access and shape


async def test_the_metrics_token_guards_the_endpoint_when_set(settings: Settings) -> None:
    token = "metrics-token-0123456789"
    guarded = settings.model_copy(update={"metrics_token": token})
    async with AsyncTestClient(app=create_app(guarded), base_url="http://testserver.local") as c:
        assert (await c.get("/metrics")).status_code == 401
        wrong = await c.get("/metrics", headers=bearer("metrics-token-wrong-0000"))
        assert wrong.status_code == 401
        await scrape(c, Authorization=f"Bearer {token}")
        schema = (await c.get("/docs/openapi.json")).json()
        assert "/metrics" not in schema["paths"]
        assert "/readyz" not in schema["paths"]


async def test_tenant_labels_on_the_credits_counters_only_when_asked(
    settings: Settings, simulator: Sim
) -> None:
    labelled = settings.model_copy(update={"metrics_tenant_labels": True})
    tenant_id, key = await make_tenant_key(labelled)
    try:
        async with AsyncTestClient(
            app=create_app(labelled), base_url="http://testserver.local"
        ) as c:
            response = await submit(c, key, prompt="labelled")
            assert response.status_code == 200, response.text
            found = await scrape(c)
            reserved = found.get("tollgate_credits_reserved_microcredits_total", tenant=tenant_id)
            assert reserved == 6_000  # krea-2-turbo: 0.006 credits a call (2 KCU × 0.002 × 1.5)
            assert found.get("tollgate_tasks_submitted_total", model=MODEL) >= 1
            assert not any(
                ("tenant", tenant_id) in labels
                for name, labels in found.values
                if not name.startswith("tollgate_credits_")
            )
            worker = start_bare_worker(labelled)
            try:
                await wait_for_status(c, key, response.json()["id"], {"completed", "failed"})
            finally:
                await stop_worker(*worker)
    finally:
        metrics.configure(settings)  # back to no tenant label for the rest of the run
    assert not metrics._credits.tenant_labels


# ---------------------------------------------------------------- the ledger check cron


async def test_the_ledger_check_sets_its_gauges_once_per_interval(
    settings: Settings, engine: AsyncEngine
) -> None:
    redis = Redis.from_url(settings.redis_url)
    ctx = {"deps": _Deps(settings, engine), "redis": redis}
    try:
        started = time.time()
        problems = await check_ledger(ctx)
        assert problems == 0
        body, _ = metrics.exposition()
        found = Scrape(body.decode())
        assert found.get("tollgate_ledger_check_problems") == 0
        assert found.get("tollgate_ledger_check_last_run_timestamp_seconds") >= started
        ran_at = found.get("tollgate_ledger_check_last_run_timestamp_seconds")
        # Within the interval it does not run again, but reports the last run (as a worker
        # that restarted since, or never ran it, would).
        metrics.ledger_checked(99, at=1.0)
        assert await check_ledger(ctx) is None
        again = Scrape(metrics.exposition()[0].decode())
        assert again.get("tollgate_ledger_check_problems") == 0
        assert again.get("tollgate_ledger_check_last_run_timestamp_seconds") == ran_at
        ttl = await redis.ttl(ledger_check_key(settings.queue_name))
        assert 0 < ttl <= settings.ledger_check_interval_seconds
    finally:
        await redis.delete(ledger_check_key(settings.queue_name))
        await redis.aclose()
    crons = {job.name for job in create_worker(settings).cron_jobs}
    assert "ledger_check" in crons


class _Deps:
    def __init__(self, settings: Settings, engine: AsyncEngine) -> None:
        self.settings = settings
        self.engine = engine


# ---------------------------------------------------------------- processes


_WRITER = """
import sys
from gateway import metrics
n = int(sys.argv[1])
for _ in range(n):
    metrics.observe_http("/v1/models", "GET", 200, 0.002)
    metrics.rate_limit_refused("tenant")
    metrics.callback_attempted(delivered=False, gave_up=True)
metrics.ledger_checked(n, at=float(sys.argv[2]))
"""


def test_processes_sharing_a_multiprocess_dir_are_summed(tmp_path: Path) -> None:
    folder = tmp_path / "prometheus"
    folder.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    for count, at in ((3, 1000.0), (4, 2000.0)):
        subprocess.run(
            [sys.executable, "-c", _WRITER, str(count), str(at)], cwd=ROOT, env=env, check=True
        )
    assert len({p.name.rsplit("_", 1)[1] for p in folder.glob("counter_*.db")}) == 2
    body, _ = metrics.exposition(multiproc_dir=str(folder))
    found = Scrape(body.decode())
    labels = {"route": "/v1/models", "method": "GET"}
    assert found.get("tollgate_http_requests_total", **labels, status="200") == 7
    assert found.get("tollgate_http_request_duration_seconds_count", **labels) == 7
    assert found.get("tollgate_rate_limit_refusals_total", scope="tenant") == 7
    assert found.get("tollgate_callback_attempts_total", outcome="failed") == 7
    assert found.get("tollgate_callback_give_ups_total") == 7
    # Gauges: the most recent value, not a sum, and no pid label.
    assert found.get("tollgate_ledger_check_problems") == 4
    assert found.get("tollgate_ledger_check_last_run_timestamp_seconds") == 2000.0


@pytest.fixture
async def two_process_gateway(
    settings: Settings, tmp_path: Path
) -> AsyncIterator[tuple[str, Path, int]]:
    folder = tmp_path / "prometheus"
    folder.mkdir()
    port = free_port()
    env = cli_env(
        settings,
        PROMETHEUS_MULTIPROC_DIR=str(folder),
        TOLLGATE_STORAGE_DIR=str(tmp_path / "storage"),
        TOLLGATE_LOG_LEVEL="WARNING",
    )
    log = (tmp_path / "gateway.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--workers", "2"),
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        # The supervisor and its two children each have their files.
        while len(list(folder.glob("counter_*.db"))) < 3 or not await _answers(url):
            assert proc.returncode is None, (tmp_path / "gateway.log").read_text()
            assert time.monotonic() < deadline, "the gateway processes did not start"
            await asyncio.sleep(0.1)
        yield url, folder, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), timeout=30)
        log.close()


async def _answers(url: str) -> bool:
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=1) as http:
            return (await http.get(f"{url}/healthz")).status_code == 200
    except httpx.TransportError:
        return False


async def test_a_gateway_of_two_processes_reports_the_sum(
    two_process_gateway: tuple[str, Path, int],
) -> None:
    url, folder, supervisor = two_process_gateway
    body = (await _scrape_url(url)).values
    base = {k: v for k, v in body.items() if k[0] == "tollgate_http_requests_total"}
    for _ in range(40):  # a new connection each, so either process may take it
        async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
            assert (await http.get(f"{url}/v1/no-such-route")).status_code == 404
    found = await _scrape_url(url)
    key = (
        "tollgate_http_requests_total",
        frozenset({("route", "unmatched"), ("method", "GET"), ("status", "404")}),
    )
    assert found.values[key] - base.get(key, 0.0) == 40
    pids = {p.name.rsplit("_", 1)[1].removesuffix(".db") for p in folder.glob("counter_*.db")}
    assert len(pids - {str(supervisor)}) == 2


async def _scrape_url(url: str) -> Scrape:
    async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
        response = await http.get(f"{url}/metrics")
    assert response.status_code == 200, response.text
    return Scrape(response.text)


async def test_a_worker_process_serves_its_metrics(
    settings: Settings, simulator_url: str, tmp_path: Path
) -> None:
    port = free_port()
    upstreams = {"krea": {"base_url": simulator_url, "api_key": SIM_KEY}}
    env = cli_env(
        settings,
        TOLLGATE_METRICS_PORT=str(port),
        TOLLGATE_UPSTREAMS=json.dumps(upstreams),
        TOLLGATE_STORAGE_DIR=str(tmp_path / "storage"),
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "workers",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.returncode is None, "the worker exited"
            try:
                async with httpx.AsyncClient(trust_env=False, timeout=1) as http:
                    response = await http.get(f"http://127.0.0.1:{port}/metrics")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the worker's /metrics did not answer"
                await asyncio.sleep(0.1)
        assert response.status_code == 200
        found = Scrape(response.text)
        assert ("tollgate_callback_give_ups_total", frozenset()) in found.values
        assert re.search(r"^tollgate_ledger_check_problems ", response.text, re.M)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert lines, "the worker logged nothing"
    for line in lines:
        assert json.loads(line)["level"], line
