"""The Krea 2 front door: a client that knows only seeds/001, over the same tasks and billing.

``KreaClient`` is the Python example of seeds/001 written out (httpx for
requests): POST to ``{base}/generate/image/krea/krea-2/medium`` with a Bearer
token, poll ``{base}/jobs/{job_id}`` until ``completed``, read
``job["result"]["urls"]``, download an image. It runs in a thread against the
app served by uvicorn (``serve_app``), with a real worker and the simulator;
only its base URL and token are Tollgate's.

The rest drive the routes with the test client: billing against the unified
endpoint's, limits, idempotency, field errors, variants, isolation, and the
callback of a Krea-door task.
"""

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import standardwebhooks
from conftest import (
    Sim,
    bearer,
    make_settings,
    make_tenant_key,
    rows_of,
    serve_app,
    start_worker,
    stop_worker,
)
from https_receiver import (
    HOST,
    LOOPBACK,
    Cert,
    FakeResolver,
    Receiver,
)
from litestar.testing import AsyncTestClient
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.app import create_app
from gateway.callbacks.service import callback_body
from gateway.db import create_engine, session_factory
from gateway.settings import Settings
from gateway.storage import UrlSigner
from gateway.tasks.models import Task
from workers.main import create_callback_worker

Client = AsyncTestClient[Any]

MEDIUM = "/generate/image/krea/krea-2/medium"
LARGE = "/generate/image/krea/krea-2/large"
PNG = b"\x89PNG\r\n\x1a\n"
STYLE = [{"url": "https://example.com/style.png", "strength": 0.8}]
MOODBOARD = [{"id": "mb_1"}]


# ---------------------------------------------------------------- the seed's client


class KreaClient:
    """seeds/001's Python example, with its API_BASE and API_TOKEN as parameters."""

    def __init__(self, api_base: str, api_token: str, http: httpx.Client) -> None:
        self.api_base = api_base
        self.api_token = api_token
        self.http = http
        self.poll_seconds = 0.2  # the seed sleeps 3 s; a test has less time

    def wait_for_job(self, job_id: str) -> Any:
        while True:
            response = self.http.get(
                f"{self.api_base}/jobs/{job_id}",
                headers={"Authorization": f"Bearer {self.api_token}"},
            )
            response.raise_for_status()
            job = response.json()
            if job["status"] == "completed":
                return job
            if job["status"] in ("failed", "cancelled"):
                raise RuntimeError(f"Job {job['status']}")
            time.sleep(self.poll_seconds)

    def generate(self, body: dict[str, Any]) -> tuple[Any, Any]:
        """(the submit answer, the completed job)."""
        response = self.http.post(
            f"{self.api_base}/generate/image/krea/krea-2/medium",
            headers={
                "Authorization": f"Bearer {self.api_token}",
                "Content-Type": "application/json",
            },
            json=body,
        )
        response.raise_for_status()
        created = response.json()
        return created, self.wait_for_job(created["job_id"])


class PublicHost(httpx.HTTPTransport):
    """The test's DNS: the public host of signed links (``public_base_url``) is where
    uvicorn serves the app; every other request goes out unchanged."""

    def __init__(self, public: str, served: str) -> None:
        super().__init__()
        self.public = httpx.URL(public)
        self.served = httpx.URL(served)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == self.public.host:
            request.url = request.url.copy_with(
                scheme=self.served.scheme, host=self.served.host, port=self.served.port
            )
        return super().handle_request(request)


@pytest.fixture
async def served(settings: Settings, simulator: Sim) -> AsyncIterator[str]:
    """The app under uvicorn and a generation worker: the base URL."""
    arq_worker, running = start_worker(settings)
    try:
        async with serve_app(settings) as url:
            yield url
    finally:
        await stop_worker(arq_worker, running)


async def test_a_client_written_for_krea_2_works_by_changing_its_base_url(
    served: str, settings: Settings, tenant_key: tuple[str, str], engine: AsyncEngine
) -> None:
    _, key = tenant_key
    body = {
        "prompt": "A cinematic product photo of a glass lamp on a marble table",
        "aspect_ratio": "4:5",
        "resolution": "1K",
        "creativity": "medium",
    }

    def run() -> tuple[Any, Any, httpx.Response]:
        transport = PublicHost(settings.public_base_url, served)
        with httpx.Client(transport=transport, timeout=10, trust_env=False) as http:
            created, job = KreaClient(served, key, http).generate(body)
            image = http.get(job["result"]["urls"][0])
            return created, job, image

    created, job, image = await asyncio.wait_for(asyncio.to_thread(run), timeout=60)

    assert set(created) == {"job_id", "status", "created_at"}
    assert created["status"] == "queued"
    assert created["created_at"].endswith("Z")
    assert set(job) == {"job_id", "status", "created_at", "completed_at", "result"}
    assert job["job_id"] == created["job_id"]
    assert job["created_at"] == created["created_at"]
    assert job["completed_at"] >= job["created_at"]
    [url] = job["result"]["urls"]
    assert url.startswith(f"{settings.public_base_url}/v1/files/{job['job_id']}/")
    assert image.status_code == 200
    assert image.content.startswith(PNG)
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT api, model, request FROM tasks WHERE id = :id"),
                {"id": job["job_id"]},
            )
        ).one()
    assert row.api == "krea"
    assert row.model == "krea-2-medium"
    assert (row.request["size"], row.request["quality"]) == ("4:5", "1K")
    assert (row.request["width"], row.request["height"]) == (896, 1152)
    assert row.request["params"]["creativity"] == "medium"


# ---------------------------------------------------------------- helpers


def assert_krea_error(response: Any, status: int, code: str, mentions: str = "") -> str:
    """Krea's error body: ``{"error": "<message>"}``, plus our ``code``."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "code"}, body
    assert isinstance(body["error"], str)
    assert body["code"] == code
    assert mentions in body["error"]
    assert "Traceback" not in response.text
    return str(body["error"])


async def create_job(
    client: Client, key: str, body: dict[str, Any], path: str = MEDIUM, **headers: str
) -> Any:
    return await client.post(path, json=body, headers={**bearer(key), **headers})


async def job_id_of(client: Client, key: str, body: dict[str, Any], path: str = MEDIUM) -> str:
    response = await create_job(client, key, body, path)
    assert response.status_code == 200, response.text
    return str(response.json()["job_id"])


async def wait_job(client: Client, key: str, job_id: str, within: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + within
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = await client.get(f"/jobs/{job_id}", headers=bearer(key))
        assert response.status_code == 200, response.text
        job = response.json()
        if job["status"] in ("completed", "failed", "cancelled"):
            return job
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} stayed {job.get('status')}")


async def ledger_of(engine: AsyncEngine, task_id: str) -> list[tuple[str, int]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT kind, amount_micros FROM ledger_entries WHERE task_id = :task ORDER BY id"
            ),
            {"task": task_id},
        )
        return [(row[0], int(row[1])) for row in rows]


@contextlib.asynccontextmanager
async def client_for(settings: Settings) -> AsyncIterator[Client]:
    async with AsyncTestClient(app=create_app(settings), base_url="http://testserver.local") as c:
        yield c


# ---------------------------------------------------------------- billing


@pytest.mark.usefixtures("worker", "simulator")
async def test_billing_is_the_unified_endpoints_hold_then_capture_at_catalogue_prices(
    client: Client, tenant_key: tuple[str, str], engine: AsyncEngine
) -> None:
    _, key = tenant_key
    cases = [  # (path, unified model, extra fields, shipped sale price in micro-credits)
        (MEDIUM, "krea-2-medium", {}, 45_000),
        (MEDIUM, "krea-2-medium", {"image_style_references": STYLE}, 52_500),
        (MEDIUM, "krea-2-medium", {"moodboards": MOODBOARD}, 60_000),
        (
            MEDIUM,
            "krea-2-medium",
            {"moodboards": MOODBOARD, "image_style_references": STYLE},
            60_000,
        ),
        (LARGE, "krea-2-large", {}, 90_000),
        (LARGE, "krea-2-large", {"image_style_references": STYLE}, 97_500),
    ]
    pairs = []
    for path, model, extra, price in cases:
        job_id = await job_id_of(client, key, {"prompt": "billed", **extra}, path)
        unified = await client.post(
            "/v1/images/generations",
            json={"model": model, "prompt": "billed", **extra},
            headers=bearer(key),
        )
        assert unified.status_code == 200, unified.text
        pairs.append((job_id, unified.json()["id"], price))
    for job_id, task_id, price in pairs:
        assert (await wait_job(client, key, job_id))["status"] == "completed"
        assert (await wait_job(client, key, task_id))["status"] == "completed"
        expected = [("hold", price), ("capture", price)]
        assert await ledger_of(engine, job_id) == expected
        assert await ledger_of(engine, task_id) == expected


async def test_no_credit_is_402_and_records_nothing(client: Client, settings: Settings) -> None:
    tenant_id, key = await make_tenant_key(settings, credits_micros=0)
    response = await create_job(client, key, {"prompt": "no credits"})
    assert_krea_error(response, 402, "insufficient_quota")
    engine = create_engine(settings)
    try:
        assert await rows_of(engine, tenant_id) == {"tasks": 0}
    finally:
        await engine.dispose()


async def test_a_model_the_key_may_not_use_is_403(
    client: Client, settings: Settings, tenant_key: tuple[str, str]
) -> None:
    tenant_id, key = tenant_key
    patched = await client.patch(
        f"/admin/tenants/{tenant_id}/limits",
        json={"allowed_models": ["krea-2-large"]},
        headers=bearer(settings.admin_token),
    )
    assert patched.status_code == 200, patched.text
    await asyncio.sleep(settings.key_cache_ttl_seconds + 0.1)
    denied = await create_job(client, key, {"prompt": "x"})
    assert_krea_error(denied, 403, "model_access_denied", "krea-2-medium")
    assert (await create_job(client, key, {"prompt": "x"}, LARGE)).status_code == 200


# ---------------------------------------------------------------- limits


async def test_the_keys_rate_limit_gives_429_with_retry_after(
    database_url: str, simulator_url: str, tmp_path: Path
) -> None:
    settings = make_settings(
        database_url,
        simulator_url,
        tmp_path / "storage",
        default_key_rate_limit_per_minute=60,
        default_key_rate_limit_burst=2,
    )
    _, key = await make_tenant_key(settings)
    async with client_for(settings) as client:
        job_id = await job_id_of(client, key, {"prompt": "one"})
        polled = await client.get(f"/jobs/{job_id}", headers=bearer(key))
        assert polled.status_code == 200
        assert "RateLimit" in polled.headers
        refused = await create_job(client, key, {"prompt": "three"})
        assert_krea_error(refused, 429, "rate_limit_exceeded", "key")
        assert refused.headers["Retry-After"] == "1"
        also_polling = await client.get(f"/jobs/{job_id}", headers=bearer(key))
        assert_krea_error(also_polling, 429, "rate_limit_exceeded")
        await asyncio.sleep(1.1)
        assert (await client.get(f"/jobs/{job_id}", headers=bearer(key))).status_code == 200


async def test_the_cap_on_jobs_in_flight_gives_429(
    database_url: str, simulator_url: str, tmp_path: Path
) -> None:
    settings = make_settings(
        database_url, simulator_url, tmp_path / "storage", default_max_in_flight=1
    )
    _, key = await make_tenant_key(settings)
    async with client_for(settings) as client:
        await job_id_of(client, key, {"prompt": "first"})
        refused = await create_job(client, key, {"prompt": "second"})
        assert_krea_error(refused, 429, "too_many_tasks_in_flight", "in flight")


# ---------------------------------------------------------------- idempotency


async def test_idempotency_key_returns_the_first_job_and_charges_once(
    client: Client, tenant_key: tuple[str, str], engine: AsyncEngine
) -> None:
    tenant_id, key = tenant_key
    body = {"prompt": "once", "aspect_ratio": "16:9"}
    first = await create_job(client, key, body, **{"Idempotency-Key": "k-1"})
    again = await create_job(client, key, body, **{"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    counts = await rows_of(engine, tenant_id, ("tasks", "idempotency_keys"))
    assert (counts["tasks"], counts["idempotency_keys"], counts["hold"]) == (1, 1, 1)

    other_body = await create_job(client, key, {**body, "seed": 7}, **{"Idempotency-Key": "k-1"})
    assert_krea_error(other_body, 409, "conflict", "Idempotency-Key")
    # The same request through the unified door is another request, not a retry.
    unified = await client.post(
        "/v1/images/generations",
        json={"model": "krea-2-medium", "prompt": "once", "size": "16:9"},
        headers={**bearer(key), "Idempotency-Key": "k-1"},
    )
    assert unified.status_code == 409, unified.text
    assert (await rows_of(engine, tenant_id))["tasks"] == 1


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": 7}, "prompt"),
        ({"prompt": "x" * 2561}, "prompt"),
        ({"prompt": "nul \x00 inside"}, "prompt"),
        ({"prompt": "x", "aspect_ratio": "7:5"}, "aspect_ratio"),
        ({"prompt": "x", "aspect_ratio": 16}, "aspect_ratio"),
        ({"prompt": "x", "resolution": "4K"}, "resolution"),
        ({"prompt": "x", "seed": "seven"}, "seed"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "seed": 2**32}, "seed"),
        ({"prompt": "x", "seed": 10**30}, "seed"),
        ({"prompt": "x", "creativity": "wild"}, "creativity"),
        ({"prompt": "x", "intensity": 101}, "intensity"),
        ({"prompt": "x", "complexity": -101}, "complexity"),
        ({"prompt": "x", "movement": 1.5}, "movement"),
        ({"prompt": "x", "moodboards": ["a", "b"]}, "moodboards"),
        ({"prompt": "x", "image_style_references": "one"}, "image_style_references"),
        ({"prompt": "x", "styles": [{"name": "\x00"}]}, "styles"),
        ({"prompt": "x", "model": "krea-1"}, "model"),
        ({"prompt": "x", "size": "16:9"}, "size"),
        ({"prompt": "x", "colour": "red"}, "colour"),
    ],
)
async def test_a_bad_field_is_a_400_naming_the_krea_field(
    client: Client, tenant_key: tuple[str, str], body: dict[str, Any], field: str
) -> None:
    _, key = tenant_key
    message = assert_krea_error(await create_job(client, key, body), 400, "invalid_request")
    assert message.startswith(f"{field}:"), message


@pytest.mark.parametrize("raw", [b'{"prompt": "x",', b"not json", b"[1, 2]", b"", b"\xff\xfe"])
async def test_a_malformed_body_is_400_never_500(
    client: Client, tenant_key: tuple[str, str], raw: bytes
) -> None:
    _, key = tenant_key
    response = await client.post(
        MEDIUM, content=raw, headers={**bearer(key), "Content-Type": "application/json"}
    )
    assert_krea_error(response, 400, "invalid_request")


async def test_a_bad_webhook_url_is_a_400_naming_the_header(
    client: Client, tenant_key: tuple[str, str]
) -> None:
    _, key = tenant_key
    for url in ("http://example.com/hook", "https://127.0.0.1/hook", "https://u:p@example.com/"):
        response = await create_job(client, key, {"prompt": "x"}, **{"X-Webhook-URL": url})
        message = assert_krea_error(response, 400, "invalid_request")
        assert message.startswith("X-Webhook-URL:"), message


async def test_an_oversized_body_is_413(client: Client, tenant_key: tuple[str, str]) -> None:
    _, key = tenant_key
    response = await create_job(client, key, {"prompt": "x" * 2_000_000})
    assert_krea_error(response, 413, "request_too_large")


@pytest.mark.parametrize(
    "header", [None, "Bearer", "Bearer tg_not-a-real-key", "Basic dXNlcjpwYXNz"]
)
async def test_bad_credentials_are_401(client: Client, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    posted = await client.post(MEDIUM, json={"prompt": "x"}, headers=headers)
    assert_krea_error(posted, 401, "unauthorized")
    polled = await client.get("/jobs/task-unified-0-nosuchtask", headers=headers)
    assert_krea_error(polled, 401, "unauthorized")


@pytest.mark.parametrize("variant", ["small", "turbo", "Medium", "krea-2-medium"])
async def test_an_unknown_variant_is_404(
    client: Client, tenant_key: tuple[str, str], engine: AsyncEngine, variant: str
) -> None:
    tenant_id, key = tenant_key
    response = await create_job(
        client, key, {"prompt": "x"}, f"/generate/image/krea/krea-2/{variant}"
    )
    assert_krea_error(response, 404, "not_found", "medium, large")
    assert (await rows_of(engine, tenant_id))["tasks"] == 0


# ---------------------------------------------------------------- reading jobs


async def test_another_tenants_job_is_404_like_a_job_that_does_not_exist(
    client: Client, settings: Settings, tenant_key: tuple[str, str]
) -> None:
    _, key_a = tenant_key
    _, key_b = await make_tenant_key(settings)
    job_id = await job_id_of(client, key_a, {"prompt": "mine"})
    theirs = await client.get(f"/jobs/{job_id}", headers=bearer(key_b))
    missing = await client.get("/jobs/task-unified-0-nosuchtask", headers=bearer(key_b))
    assert_krea_error(theirs, 404, "not_found")
    assert_krea_error(missing, 404, "not_found")
    assert theirs.json()["error"].replace(job_id, "ID") == missing.json()["error"].replace(
        "task-unified-0-nosuchtask", "ID"
    )
    assert (await client.get(f"/jobs/{job_id}", headers=bearer(key_a))).status_code == 200


async def test_a_task_from_either_door_reads_in_both_shapes(
    client: Client, tenant_key: tuple[str, str]
) -> None:
    _, key = tenant_key
    unified = await client.post(
        "/v1/images/generations", json={"model": "krea-1", "prompt": "x"}, headers=bearer(key)
    )
    task_id = unified.json()["id"]
    job = (await client.get(f"/jobs/{task_id}", headers=bearer(key))).json()
    assert job == {
        "job_id": task_id,
        "status": "queued",
        "created_at": job["created_at"],
        "completed_at": None,
    }
    job_id = await job_id_of(client, key, {"prompt": "y"})
    task = (await client.get(f"/v1/tasks/{job_id}", headers=bearer(key))).json()
    assert (task["id"], task["model"], task["status"]) == (job_id, "krea-2-medium", "pending")


@pytest.mark.usefixtures("worker")
async def test_a_failed_job_carries_an_error_message_and_costs_nothing(
    client: Client, simulator: Sim, tenant_key: tuple[str, str], engine: AsyncEngine
) -> None:
    _, key = tenant_key
    await simulator.configure(error_kind="job_failed", latency=0.1)
    job_id = await job_id_of(client, key, {"prompt": "doomed"})
    job = await wait_job(client, key, job_id)
    assert job["status"] == "failed"
    assert set(job) == {"job_id", "status", "created_at", "completed_at", "error"}
    assert job["completed_at"] is not None
    assert job["error"]["message"]
    assert job["error"]["code"] == "generation_failed"
    assert await ledger_of(engine, job_id) == [("hold", 45_000), ("release", 45_000)]


async def test_the_openapi_document_lists_the_krea_routes(client: Client) -> None:
    spec = (await client.get("/docs/openapi.json")).json()
    post = spec["paths"]["/generate/image/krea/krea-2/{variant}"]["post"]
    ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert schema["required"] == ["prompt"]
    assert {"aspect_ratio", "resolution", "moodboards", "movement"} <= set(schema["properties"])
    assert "get" in spec["paths"]["/jobs/{job_id}"]


# ---------------------------------------------------------------- callbacks


async def test_the_callback_body_of_a_krea_task_is_its_job_object(
    client: Client, settings: Settings, tenant_key: tuple[str, str], engine: AsyncEngine
) -> None:
    """One renderer: ``callback_body`` gives exactly the bytes the task's own door answers."""
    _, key = tenant_key
    job_id = await job_id_of(client, key, {"prompt": "krea door"})
    unified = await client.post(
        "/v1/images/generations",
        json={"model": "krea-2-medium", "prompt": "unified door"},
        headers=bearer(key),
    )
    task_id = unified.json()["id"]
    signer = UrlSigner(settings.signing_secret, settings.public_base_url)
    async with session_factory(engine)() as session:
        krea_task = await session.get(Task, job_id)
        unified_task = await session.get(Task, task_id)
    assert krea_task is not None
    assert unified_task is not None
    job = await client.get(f"/jobs/{job_id}", headers=bearer(key))
    assert callback_body(krea_task, signer) == job.content
    task = await client.get(f"/v1/tasks/{task_id}", headers=bearer(key))
    assert callback_body(unified_task, signer) == task.content


def start_callback_worker(settings: Settings) -> tuple[Any, "asyncio.Task[None]"]:
    """The callback worker, finding ``receiver.test`` on loopback through a test resolver."""
    worker = create_callback_worker(settings, handle_signals=False)
    startup = worker.on_startup
    assert startup is not None

    async def startup_with_resolver(ctx: dict[str, Any]) -> None:
        await startup(ctx)
        ctx["callback_deps"].resolver = FakeResolver({HOST: [[LOOPBACK]]})

    worker.on_startup = startup_with_resolver
    return worker, asyncio.create_task(worker.async_run())


async def test_x_webhook_url_receives_the_signed_job_object(
    database_url: str,
    simulator_url: str,
    simulator: Sim,
    tmp_path: Path,
    cert: Cert,
    receiver: Receiver,
) -> None:
    await simulator.configure(latency=0.1)
    settings = make_settings(
        database_url,
        simulator_url,
        tmp_path / "storage",
        callback_queue_name=f"tollgate:test-cb:{uuid.uuid4().hex}",
        outbound_allowed_hosts=[HOST],
        outbound_ca_bundle=cert.cert,
    )
    _, key = await make_tenant_key(settings)
    workers = [start_worker(settings), start_callback_worker(settings)]
    try:
        async with client_for(settings) as client:
            hook = receiver.url("/krea-hook")
            posted = await create_job(client, key, {"prompt": "call me"}, **{"X-Webhook-URL": hook})
            assert posted.status_code == 200, posted.text
            job_id = posted.json()["job_id"]
            [arrival] = await receiver.wait_for("/krea-hook", 1)
            secret = (await client.get("/v1/webhooks/secret", headers=bearer(key))).json()
            job = await client.get(f"/jobs/{job_id}", headers=bearer(key))
    finally:
        for running in workers:
            await stop_worker(*running)
        redis = Redis.from_url(settings.redis_url)
        await redis.delete(settings.queue_name, settings.callback_queue_name)
        await redis.aclose()
    body = standardwebhooks.Webhook(secret["secret"]).verify(arrival.body, arrival.headers)
    assert arrival.headers["webhook-id"].startswith("msg_")
    assert body["job_id"] == job_id
    assert body["status"] == "completed"
    assert set(body) == {"job_id", "status", "created_at", "completed_at", "result"}
    assert arrival.body == job.content
