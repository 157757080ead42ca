"""Result storage: both backends keep the same contract, against a real S3 API server
(moto's, on loopback) and a real directory; presigned links; settings; the gateway's
file route and /readyz over S3, and what they answer when the store goes away."""

import asyncio
import datetime
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from conftest import (
    ENCRYPTION_KEYS,
    bearer,
    make_settings,
    start_worker,
    stop_worker,
    wait_for_status,
)
from litestar.testing import AsyncTestClient
from s3_server import ACCESS_KEY, REGION, SECRET_KEY, S3Server, s3_server, s3_settings

from gateway.app import create_app
from gateway.settings import Settings, SettingsError, load_settings
from gateway.storage import (
    LocalStorage,
    S3Location,
    S3Presigner,
    S3Storage,
    Storage,
    StorageUnavailable,
    build_signer,
    build_storage,
)
from workers.simulator.png import png_size

Client = AsyncTestClient[Any]
PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(300_000)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


def location(server: S3Server, bucket: str, prefix: str = "", **over: Any) -> S3Location:
    values: dict[str, Any] = {
        "endpoint": server.url,
        "region": REGION,
        "addressing_style": "auto",
        "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET_KEY,
        "environ": {},
    }
    values.update(over)
    url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    return S3Location.resolve(url, **values)


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "file":
        return LocalStorage(tmp_path / "results")
    server: S3Server = request.getfixturevalue("s3")
    return S3Storage(location(server, server.create_bucket()), timeout_seconds=5)


async def read_all(store: Storage, key: str) -> bytes | None:
    found = await store.open(key)
    if found is None:
        return None
    body = b"".join([chunk async for chunk in found.chunks])
    assert len(body) == found.size
    return body


async def test_put_get_and_delete_round_trip_on_both_backends(store: Storage) -> None:
    big = b"\x89PNG\r\n\x1a\n" + os.urandom(3_000_000)  # several chunks when streamed
    await store.put("task-1/0.png", PNG)
    await store.put("task-1/1.png", big)
    await store.put("task-10/0.jpg", b"\xff\xd8\xff" + b"x" * 100)
    await store.put("task-1/0.png", PNG)  # a job run twice writes the same key again
    assert await store.get("task-1/0.png") == PNG
    assert await read_all(store, "task-1/1.png") == big
    assert await store.get("task-1/7.png") is None
    assert await store.open("task-2/0.png") is None

    deleted = await store.delete_task("task-1")
    assert (deleted.files, deleted.bytes) == (2, len(PNG) + len(big))
    assert await store.get("task-1/0.png") is None
    # task-10 shares a prefix of characters with task-1, not its folder.
    assert await store.get("task-10/0.jpg") is not None
    again = await store.delete_task("task-1")
    assert (again.files, again.bytes) == (0, 0)
    await store.check()


async def test_objects_land_under_the_urls_prefix_with_their_content_type(s3: S3Server) -> None:
    bucket = s3.create_bucket()
    store = S3Storage(location(s3, bucket, "results/prod"), timeout_seconds=5)
    await store.put("task-a/0.png", PNG)
    assert s3.keys(bucket) == ["results/prod/task-a/0.png"]
    assert s3.read(bucket, "results/prod/task-a/0.png") == (PNG, "image/png")
    assert (await store.delete_task("task-a")).files == 1
    assert s3.keys(bucket) == []


async def test_a_store_that_is_not_there_raises_storage_unavailable_quickly(tmp_path: Path) -> None:
    with mock.patch.dict(os.environ, {}):
        dead = S3Location.resolve(
            "s3://nowhere",
            endpoint=f"http://127.0.0.1:{_closed_port()}",
            region=REGION,
            addressing_style="path",
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
        )
    store = S3Storage(dead, timeout_seconds=2)
    started = time.monotonic()
    for call in (
        store.put("t/0.png", PNG),
        store.open("t/0.png"),
        store.get("t/0.png"),
        store.delete_task("t"),
        store.check(),
    ):
        with pytest.raises(StorageUnavailable, match="s3://nowhere"):
            await call
    assert time.monotonic() - started < 15


async def test_a_missing_bucket_is_unavailable_not_missing(s3: S3Server) -> None:
    store = S3Storage(location(s3, "no-such-bucket"), timeout_seconds=3)
    with pytest.raises(StorageUnavailable):
        await store.put("t/0.png", PNG)
    with pytest.raises(StorageUnavailable):
        await store.check()


def _closed_port() -> int:
    from conftest import free_port

    return free_port()


# --- Where the bucket is: settings, then the standard AWS variables ---------------------


def test_settings_win_over_the_aws_variables_and_those_fill_the_rest() -> None:
    env = {
        "AWS_ENDPOINT_URL": "http://minio:9000",
        "AWS_REGION": "eu-west-3",
        "AWS_ACCESS_KEY_ID": "env-key",
        "AWS_SECRET_ACCESS_KEY": "env-secret",
        "AWS_SESSION_TOKEN": "env-token",
    }
    from_env = S3Location.resolve(
        "s3://b/p/q/",
        endpoint=None,
        region=None,
        addressing_style="auto",
        access_key_id=None,
        secret_access_key=None,
        environ=env,
    )
    assert (from_env.bucket, from_env.prefix, from_env.endpoint) == (
        "b",
        "p/q",
        "http://minio:9000",
    )
    assert (from_env.region, from_env.virtual_hosted) == ("eu-west-3", False)
    assert (from_env.access_key_id, from_env.session_token) == ("env-key", "env-token")
    mine = S3Location.resolve(
        "s3://b",
        endpoint="https://r2.example.com/",
        region="auto",
        addressing_style="virtual",
        access_key_id="mine",
        secret_access_key="my-secret",
        environ=env,
    )
    assert (mine.endpoint, mine.region, mine.virtual_hosted) == (
        "https://r2.example.com",
        "auto",
        True,
    )
    assert (mine.access_key_id, mine.session_token) == ("mine", None)
    aws = S3Location.resolve(
        "s3://b",
        endpoint=None,
        region=None,
        addressing_style="auto",
        access_key_id=None,
        secret_access_key=None,
        environ={},
    )
    # AWS itself: virtual-hosted, us-east-1, credentials left to the AWS chain.
    assert (aws.endpoint, aws.region, aws.virtual_hosted, aws.access_key_id) == (
        None,
        "us-east-1",
        True,
        None,
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TOLLGATE_STORAGE_URL": "ftp://x/y"}, "TOLLGATE_STORAGE_URL: Value error, must be"),
        ({"TOLLGATE_STORAGE_URL": "file://relative/dir"}, "TOLLGATE_STORAGE_URL: Value error"),
        ({"TOLLGATE_STORAGE_URL": "s3:///prefix"}, "must name a bucket"),
        ({"TOLLGATE_STORAGE_ENDPOINT_URL": "minio:9000"}, "TOLLGATE_STORAGE_ENDPOINT_URL"),
        ({"TOLLGATE_STORAGE_ADDRESSING_STYLE": "dns"}, "TOLLGATE_STORAGE_ADDRESSING_STYLE"),
        ({"TOLLGATE_STORAGE_ACCESS_KEY_ID": "AKIA1"}, "set both or neither"),
        (
            {"TOLLGATE_STORAGE_PRESIGNED_LINKS": "true"},
            "TOLLGATE_STORAGE_PRESIGNED_LINKS needs an s3:// TOLLGATE_STORAGE_URL",
        ),
        (
            {
                "TOLLGATE_STORAGE_URL": "s3://b",
                "TOLLGATE_STORAGE_PRESIGNED_LINKS": "true",
                "TOLLGATE_RESULT_URL_TTL_SECONDS": "604801",
            },
            "presigned links last at most 7 days",
        ),
    ],
)
def test_bad_storage_settings_are_refused_naming_the_variable(
    env: dict[str, str], message: str
) -> None:
    base = {
        "TOLLGATE_DATABASE_URL": "postgresql://x@127.0.0.1/x",
        "TOLLGATE_REDIS_URL": "redis://127.0.0.1:6379/0",
        "TOLLGATE_ADMIN_TOKEN": "a" * 20,
        "TOLLGATE_SIGNING_SECRET": "s" * 20,
        "TOLLGATE_ENCRYPTION_KEYS": ENCRYPTION_KEYS,
    }
    with mock.patch.dict(os.environ, {**base, **env}), pytest.raises(SettingsError) as caught:
        load_settings()
    assert message in str(caught.value)


def test_file_urls_and_the_default_directory_pick_local_storage(
    settings: Settings, tmp_path: Path
) -> None:
    default = build_storage(settings)
    assert isinstance(default, LocalStorage)
    assert default.root == settings.storage_dir
    spaced = tmp_path / "with space"
    chosen = build_storage(settings.model_copy(update={"storage_url": f"file://{spaced}"}))
    assert isinstance(chosen, LocalStorage)
    assert chosen.root == spaced
    url = "file:///var/lib/tollgate/results%20dir"
    assert build_storage(settings.model_copy(update={"storage_url": url})).root == Path(  # type: ignore[attr-defined]
        "/var/lib/tollgate/results dir"
    )


def test_presigned_links_without_a_secret_key_refuse_to_start(settings: Settings) -> None:
    presigned = settings.model_copy(
        update={"storage_url": "s3://b", "storage_presigned_links": True}
    )
    with pytest.raises(SettingsError, match="AWS_SECRET_ACCESS_KEY"):
        build_signer(presigned, environ={})


# --- Presigned links ---------------------------------------------------------------------


def _botocore_url(loc: S3Location, key: str, start: int, window: int, style: str) -> str:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=loc.endpoint,
        region_name=loc.region,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(signature_version="s3v4", s3={"addressing_style": style}),
    )
    frozen = datetime.datetime.fromtimestamp(start, datetime.UTC).replace(tzinfo=None)
    with mock.patch("botocore.auth.get_current_datetime", return_value=frozen):
        url: str = client.generate_presigned_url(
            "get_object", Params={"Bucket": loc.bucket, "Key": key}, ExpiresIn=window
        )
    return url


@pytest.mark.parametrize("style", ["path", "virtual"])
def test_presigned_links_match_the_aws_sdks_signature(style: str) -> None:
    loc = S3Location.resolve(
        "s3://results-bucket/tenant files",
        # A host name: the SDK addresses an IP by path whatever the style.
        endpoint="http://s3.example.test:9000",
        region="eu-central-1",
        addressing_style=style,  # type: ignore[arg-type]
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
        environ={},
    )
    start, window = 1_795_229_627, 86_400
    ours = urlsplit(S3Presigner(loc, window).sign("task-x/0.png", start, window))
    theirs = urlsplit(_botocore_url(loc, "tenant files/task-x/0.png", start, window, style))
    assert (ours.scheme, ours.netloc, ours.path) == (theirs.scheme, theirs.netloc, theirs.path)
    assert parse_qs(ours.query) == parse_qs(theirs.query)


def test_a_presigned_link_ends_at_the_tasks_expiry_and_is_the_same_on_every_read() -> None:
    loc = S3Location.resolve(
        "s3://b",
        endpoint="http://127.0.0.1:9000",
        region=REGION,
        addressing_style="path",
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
        environ={},
    )
    now = 1_795_229_627.5
    expires = int(now) + 3000  # completed 600 s ago with a one-hour TTL
    presigner = S3Presigner(loc, 3600, clock=lambda: now)
    first = presigner.url("t/0.png", expires)
    assert presigner.url("t/0.png", expires) == first
    query = parse_qs(urlsplit(first).query)
    signed_at = datetime.datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ")
    end = signed_at.replace(tzinfo=datetime.UTC).timestamp() + int(query["X-Amz-Expires"][0])
    assert end == expires
    # The TTL shortened since the task completed: signed from now, still ending at expiry.
    later = S3Presigner(loc, 600, clock=lambda: now).url("t/0.png", expires)
    assert parse_qs(urlsplit(later).query)["X-Amz-Expires"] == ["3000"]


async def test_a_presigned_link_fetches_the_object_from_the_store(s3: S3Server) -> None:
    bucket = s3.create_bucket()
    loc = location(s3, bucket, "p")
    await S3Storage(loc, timeout_seconds=5).put("task-z/0.png", PNG)
    url = S3Presigner(loc, 3600).url("task-z/0.png", int(time.time()) + 3600)
    assert url.startswith(f"{s3.url}/{bucket}/p/task-z/0.png?")
    async with httpx.AsyncClient(trust_env=False) as plain:
        response = await plain.get(url)
    assert response.status_code == 200
    assert response.content == PNG
    assert response.headers["content-type"] == "image/png"


# --- The gateway over S3 -----------------------------------------------------------------


@pytest.fixture
def s3_app_settings(
    database_url: str, simulator_url: str, tmp_path: Path, s3: S3Server
) -> tuple[Settings, str]:
    bucket = s3.create_bucket()
    return make_settings(
        database_url, simulator_url, tmp_path / "unused", **s3_settings(s3, bucket, "r")
    ), bucket


@pytest.fixture
async def s3_client(s3_app_settings: tuple[Settings, str]) -> AsyncIterator[Client]:
    app = create_app(s3_app_settings[0])
    async with AsyncTestClient(app=app, base_url="http://testserver.local") as c:
        yield c


async def submit_and_finish(
    client: Client, settings: Settings, key: str, model: str = "flux-1-schnell"
) -> dict[str, Any]:
    response = await client.post(
        "/v1/images/generations",
        json={"model": model, "prompt": "a lighthouse", "size": "512x512"},
        headers=bearer(key),
    )
    assert response.status_code == 200, response.text
    arq_worker, running = start_worker(settings)
    try:
        return await wait_for_status(client, key, response.json()["id"], {"completed", "failed"})
    finally:
        await stop_worker(arq_worker, running)


async def test_results_stored_in_s3_stream_through_the_gateway_and_missing_ones_are_404(
    s3_client: Client, s3_app_settings: tuple[Settings, str], s3: S3Server
) -> None:
    from conftest import make_tenant_key

    settings, bucket = s3_app_settings
    _, key = await make_tenant_key(settings)
    done = await submit_and_finish(s3_client, settings, key)
    assert done["status"] == "completed", done
    assert s3.keys(bucket) == [f"r/{done['id']}/0.png"]
    link = urlsplit(done["results"][0])
    assert link.path == f"/v1/files/{done['id']}/0.png"
    response = await s3_client.get(f"{link.path}?{link.query}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert int(response.headers["content-length"]) == len(response.content)
    assert png_size(response.content) == (512, 512)

    # The object vanished behind a valid link (a bucket rule, an operator): 404, never 500.
    s3.delete(bucket, f"r/{done['id']}/0.png")
    missing = await s3_client.get(f"{link.path}?{link.query}")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"

    ready = await s3_client.get("/readyz")
    assert ready.status_code == 200, ready.text


async def test_presigned_links_give_the_same_task_object_with_bucket_urls(
    database_url: str, simulator_url: str, tmp_path: Path, s3: S3Server
) -> None:
    from conftest import make_tenant_key

    bucket = s3.create_bucket()
    settings = make_settings(
        database_url,
        simulator_url,
        tmp_path / "unused",
        **s3_settings(s3, bucket),
        storage_presigned_links=True,
    )
    _, key = await make_tenant_key(settings)
    async with AsyncTestClient(app=create_app(settings), base_url="http://testserver.local") as c:
        done = await submit_and_finish(c, settings, key)
        again = (await c.get(f"/v1/tasks/{done['id']}", headers=bearer(key))).json()
        plain = make_settings(database_url, simulator_url, tmp_path / "x")
    assert done["status"] == "completed", done
    assert again == done  # the same links on every read
    # The same fields as a gateway-served task; only the links' host differs.
    gateway_task_keys = {"created", "id", "model", "object", "progress", "status", "task_info"}
    completed_keys = {"type", "usage", "results", "result_sizes", "expires_at"}
    assert gateway_task_keys | completed_keys == set(done)
    url = urlsplit(done["results"][0])
    assert f"{url.scheme}://{url.netloc}" == s3.url
    query = parse_qs(url.query)
    signed = datetime.datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ")
    ends = signed.replace(tzinfo=datetime.UTC).timestamp() + int(query["X-Amz-Expires"][0])
    assert ends == done["expires_at"]
    async with httpx.AsyncClient(trust_env=False) as direct:
        fetched = await direct.get(done["results"][0])
    assert fetched.status_code == 200
    assert png_size(fetched.content) == (512, 512)
    assert plain.storage_presigned_links is False


async def test_readyz_and_file_links_report_a_store_that_went_away(
    s3_client: Client, s3_app_settings: tuple[Settings, str], s3: S3Server
) -> None:
    settings, bucket = s3_app_settings
    store = build_storage(settings)
    await store.put("task-q/0.png", PNG)
    signer = build_signer(settings)
    link = urlsplit(signer.url("task-q/0.png", int(time.time()) + 600))
    assert (await s3_client.get(f"{link.path}?{link.query}")).status_code == 200
    s3.stop()
    try:
        started = time.monotonic()
        ready = await s3_client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["storage"] in ("unreachable", "timeout")
        assert ready.json()["checks"]["postgresql"] == "ok"
        assert time.monotonic() - started < 5
        down = await s3_client.get(f"{link.path}?{link.query}")
        assert down.status_code == 503
        assert down.json()["error"]["code"] == "service_unavailable"
        assert down.headers["retry-after"] == "5"
    finally:
        s3.start()
    s3.create_bucket(bucket)
    for _ in range(50):
        if (await s3_client.get("/readyz")).status_code == 200:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("/readyz did not recover with the store")
