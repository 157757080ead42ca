"""Structured logs: JSON lines, one request id from the gateway through the worker to the
callback, and no key, secret or prompt in any line.

The in-process test captures what ``configure_logging`` writes (the same handler the
processes install) while the app, a generation worker and a callback worker run in
this event loop and a real HTTPS receiver takes the callback (as in
``tests/workers/test_callbacks.py``). The process test reads what ``tollgate serve``
and ``tollgate-worker`` print on stderr.
"""

import asyncio
import io
import json
import logging
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    ROOT,
    SIM_KEY,
    Sim,
    bearer,
    cli_env,
    free_port,
    make_settings,
    make_tenant_key,
    scalar,
    start_worker,
    stop_worker,
    wait_for_status,
)
from litestar.testing import AsyncTestClient
from redis.asyncio import Redis
from sqlalchemy.exc import DBAPIError

from gateway import logs
from gateway.app import create_app
from gateway.db import create_engine
from gateway.settings import Settings
from workers.main import create_callback_worker

sys.path.insert(0, str(ROOT / "tests" / "workers"))
from https_receiver import HOST, Cert, FakeResolver, Receiver

Client = AsyncTestClient[Any]
Lines = Callable[[], list[dict[str, Any]]]

MODEL = "krea-2-turbo"


@pytest.fixture
def capture(settings: Settings) -> Iterator[Callable[[Settings], Lines]]:
    """``capture(settings)``: install the JSON handler writing into a buffer; returns a
    function that parses every line written so far (each must be JSON)."""
    root = logging.getLogger()
    level, httpx_level = root.level, logging.getLogger("httpx").level
    installed: list[logging.Handler] = []

    def start(with_settings: Settings) -> Lines:
        buffer = io.StringIO()
        installed.append(logs.configure_logging(with_settings, stream=buffer))

        def lines() -> list[dict[str, Any]]:
            return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]

        return lines

    yield start
    for handler in installed:
        root.removeHandler(handler)
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(httpx_level)


def start_callbacks(settings: Settings, resolver: FakeResolver) -> tuple[Any, "asyncio.Task[None]"]:
    worker = create_callback_worker(settings, handle_signals=False)
    startup = worker.on_startup
    assert startup is not None

    async def with_resolver(ctx: dict[str, Any]) -> None:
        await startup(ctx)
        ctx["callback_deps"].resolver = resolver

    worker.on_startup = with_resolver
    return worker, asyncio.create_task(worker.async_run())


async def test_one_request_id_follows_a_task_to_its_callback_and_nothing_secret_is_logged(
    database_url: str,
    simulator_url: str,
    simulator: Sim,
    tmp_path: Path,
    cert: Cert,
    receiver: Receiver,
    capture: Callable[[Settings], Lines],
) -> None:
    settings = make_settings(
        database_url,
        simulator_url,
        tmp_path / "storage",
        callback_queue_name=f"tollgate:test-cb:{uuid.uuid4().hex}",
        outbound_allowed_hosts=[HOST],
        outbound_ca_bundle=cert.cert,
        access_log=True,
    )
    lines = capture(settings)
    _, key = await make_tenant_key(settings)
    request_id = f"req-{uuid.uuid4().hex}"
    prompt = f"a private prompt {uuid.uuid4().hex}"
    redis = Redis.from_url(settings.redis_url)
    engine = create_engine(settings)
    async with AsyncTestClient(app=create_app(settings), base_url="http://testserver.local") as c:
        generation = start_worker(settings)
        callbacks = start_callbacks(settings, FakeResolver({HOST: [["127.0.0.1"]]}))
        try:
            response = await c.post(
                "/v1/images/generations",
                json={"model": MODEL, "prompt": prompt, "callback_url": receiver.url("/hook")},
                headers={**bearer(key), "X-Request-ID": request_id},
            )
            assert response.status_code == 200, response.text
            assert response.headers["x-request-id"] == request_id
            task_id = response.json()["id"]
            await wait_for_status(c, key, task_id, {"completed"})
            await receiver.wait_for("/hook", 1)
            secret = (await c.get("/v1/webhooks/secret", headers=bearer(key))).json()["secret"]
            deadline = time.monotonic() + 10
            while not any(line["logger"] == "tollgate.callbacks" for line in lines()):
                assert time.monotonic() < deadline, "the callback was not logged"
                await asyncio.sleep(0.05)
        finally:
            await stop_worker(*generation)
            await stop_worker(*callbacks)
            await redis.delete(settings.queue_name, settings.callback_queue_name)
            await redis.aclose()
    stored = await scalar(engine, "SELECT request_id FROM tasks WHERE id = :id", id=task_id)
    await engine.dispose()
    assert stored == request_id

    found = lines()
    for line in found:
        assert {"ts", "level", "logger", "message"} <= line.keys(), line
        assert line["ts"].endswith("Z")
    ours = [line for line in found if line.get("request_id") == request_id]
    by = {(line["logger"], line["message"]) for line in ours}
    assert ("tollgate.tasks", f"task {task_id} submitted") in by  # the gateway
    assert ("tollgate.tasks", f"task {task_id} completed") in by  # the worker
    assert any(logger == "tollgate.callbacks" for logger, _ in by)  # the callback
    assert any(logger == "tollgate.access" for logger, _ in by)  # the request itself
    for line in found:
        if line.get("task_id") == task_id:
            assert line.get("request_id") == request_id, line
    callback = next(line for line in ours if line["logger"] == "tollgate.callbacks")
    assert callback["task_id"] == task_id
    assert callback["outcome"] == "delivered"

    text = "\n".join(json.dumps(line) for line in found)
    for leak in (
        key,
        key.removeprefix("tg_"),
        secret,
        settings.admin_token,
        settings.signing_secret,
        SIM_KEY,
        prompt,
        "Bearer tg_",
    ):
        assert leak not in text, leak


async def test_prompts_are_logged_only_when_asked(
    settings: Settings, capture: Callable[[Settings], Lines]
) -> None:
    for log_prompts in (False, True):
        chosen = settings.model_copy(update={"log_prompts": log_prompts})
        lines = capture(chosen)
        _, key = await make_tenant_key(chosen)
        prompt = f"prompt {uuid.uuid4().hex}"
        async with AsyncTestClient(app=create_app(chosen), base_url="http://t.local") as c:
            response = await c.post(
                "/v1/images/generations",
                json={"model": MODEL, "prompt": prompt},
                headers=bearer(key),
            )
            assert response.status_code == 200, response.text
            task_id = response.json()["id"]
            [submitted] = [line for line in lines() if line.get("task_id") == task_id]
            assert (prompt in json.dumps(lines())) is log_prompts
            assert submitted.get("prompt") == (prompt if log_prompts else None)
            # Leave the task final for the suite's ledger check.
            worker = start_worker(chosen)
            try:
                await wait_for_status(c, key, task_id, {"completed", "failed"})
            finally:
                await stop_worker(*worker)


async def test_request_ids_are_taken_when_sane_and_made_otherwise(client: Client) -> None:
    sane = "0f8fad5b-d9cb-469f-a165-70867728950e"
    response = await client.get("/healthz", headers={"X-Request-ID": sane})
    assert response.headers["x-request-id"] == sane
    for bad in ("has spaces", "x" * 101, "-leading-dash", 'quote"d', "semi;colon"):
        response = await client.get("/healthz", headers={"X-Request-ID": bad})
        made = response.headers["x-request-id"]
        assert made != bad
        assert len(made) == 32
    first = (await client.get("/no/such/route")).headers["x-request-id"]
    second = (await client.get("/no/such/route")).headers["x-request-id"]
    assert first != second


def _record(message: str, *args: object, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, message, args, None)
    record.__dict__.update(extra)
    return record


def test_the_redactor_removes_what_slipped_through() -> None:
    secret = "the-admin-token-0123456789"
    redactor = logs.Redactor([secret])
    key = "tg_" + "A" * 43
    cases = [
        _record("auth header %s", f"Bearer {key}"),
        _record("calling with Authorization: Basic dXNlcjpwYXNz and more"),
        _record("token %s in a message", secret),
        _record("a key %s alone", key),
        _record("webhook secret whsec_c2VjcmV0c2VjcmV0c2VjcmV0"),
        _record('headers {"authorization": "Bearer abc.def"}'),
    ]
    for record in cases:
        redactor.filter(record)
        out = record.getMessage()
        for leak in (key, secret, "dXNlcjpwYXNz", "c2VjcmV0c2VjcmV0", "abc.def"):
            assert leak not in out, out
        assert "[REDACTED]" in out

    extra = _record(
        "sent",
        authorization="Bearer x",
        api_key="sk-live",
        prompt="a cat",
        negative_prompt="a dog",
        detail=f"key {key}",
    )
    redactor.filter(extra)
    assert extra.authorization == extra.api_key == "[REDACTED]"
    assert extra.prompt == extra.negative_prompt == "[withheld]"
    assert key not in extra.detail
    allowed = _record("sent", prompt="a cat")
    logs.Redactor([], log_prompts=True).filter(allowed)
    assert allowed.prompt == "a cat"


def test_database_errors_lose_their_parameters() -> None:
    orig = Exception("invalid input for query argument $2: 'a secret prompt' (value too long)")
    error = DBAPIError(
        "INSERT INTO tasks (id, request) VALUES ($1, $2)", ("t1", "the prompt"), orig
    )
    try:
        raise error
    except DBAPIError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "%s", (error,), sys.exc_info())
    logs.Redactor([]).filter(record)
    line = json.loads(logs.JsonFormatter().format(record))
    text = line["message"] + line["exc_info"]
    assert "the prompt" not in text
    assert "a secret prompt" not in text
    assert "[parameters: redacted]" in text
    assert "INSERT INTO tasks" in text  # the statement itself stays: it has no values


async def test_the_processes_log_json_lines_carrying_the_request_id(
    settings: Settings, simulator_url: str, simulator: Sim, tmp_path: Path
) -> None:
    port = free_port()
    upstreams = {"krea": {"base_url": simulator_url, "api_key": SIM_KEY}}
    env = cli_env(
        settings,
        TOLLGATE_UPSTREAMS=json.dumps(upstreams),
        TOLLGATE_STORAGE_DIR=str(tmp_path / "storage"),
        TOLLGATE_METRICS_PORT="0",
        TOLLGATE_ACCESS_LOG="true",
    )
    _, key = await make_tenant_key(settings)
    request_id = f"proc-{uuid.uuid4().hex}"
    prompt = f"a process prompt {uuid.uuid4().hex}"
    out = {name: (tmp_path / f"{name}.log").open("w+b") for name in ("gateway", "worker")}
    gateway = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)),
        cwd=ROOT,
        env=env,
        stdout=out["gateway"],
        stderr=out["gateway"],
    )
    worker = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "workers"),
        cwd=ROOT,
        env=env,
        stdout=out["worker"],
        stderr=out["worker"],
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=5) as http:
            deadline = time.monotonic() + 30
            while True:
                assert gateway.returncode is None, "the gateway exited"
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the gateway did not get ready"
                await asyncio.sleep(0.1)
            response = await http.post(
                "/v1/images/generations",
                json={"model": MODEL, "prompt": prompt},
                headers={**bearer(key), "X-Request-ID": request_id},
            )
            assert response.status_code == 200, response.text
            assert response.headers["x-request-id"] == request_id
            task_id = response.json()["id"]
            deadline = time.monotonic() + 30
            while True:
                task = (await http.get(f"/v1/tasks/{task_id}", headers=bearer(key))).json()
                if task["status"] in ("completed", "failed"):
                    break
                assert time.monotonic() < deadline, task
                await asyncio.sleep(0.1)
            assert task["status"] == "completed", task
    finally:
        for proc in (gateway, worker):
            proc.send_signal(signal.SIGTERM)
        for proc in (gateway, worker):
            await asyncio.wait_for(proc.wait(), timeout=30)
    written = {}
    for name, file in out.items():
        file.seek(0)
        written[name] = file.read().decode()
        file.close()
    for name, text in written.items():
        parsed = [json.loads(line) for line in text.splitlines() if line.strip()]
        assert parsed, f"{name} logged nothing"
        mine = [line for line in parsed if line.get("request_id") == request_id]
        assert mine, f"{name} has no line with the request id:\n{text}"
        assert all(line.get("task_id") in (None, task_id) for line in mine)
        for leak in (key, prompt, SIM_KEY, settings.admin_token, settings.signing_secret):
            assert leak not in text, (name, leak)
    assert gateway.returncode == 0


async def test_an_outage_is_one_warning_not_one_per_call(caplog: pytest.LogCaptureFixture) -> None:
    from workers.circuits import Circuits

    # A Redis nobody listens on: every call fails as in an outage.
    redis = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    circuits = Circuits(redis, namespace="test", threshold=3, window_seconds=10, cooldown_seconds=5)
    caplog.set_level(logging.DEBUG, logger="tollgate.circuits")
    try:
        for _ in range(5):
            await circuits.success("env:krea")
        await circuits.failure("env:krea")
    finally:
        await redis.aclose()
    levels = [r.levelname for r in caplog.records if r.name == "tollgate.circuits"]
    assert levels == ["WARNING"] + ["DEBUG"] * 5, levels
