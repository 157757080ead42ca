"""The upstream simulator: PNG encoder, size table, wire protocol, knobs, and the real process."""

import asyncio
import base64
import json
import os
import struct
import sys
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient

from workers.simulator.app import SimulatorConfig, create_simulator_app
from workers.simulator.png import PNG_SIGNATURE, png_size, render_png
from workers.simulator.siliconflow import GENERATION_FAILED
from workers.simulator.sizes import ASPECT_RATIOS, SIZES, image_size

API_KEY = "sim-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MEDIUM = "/generate/image/krea/krea-2/medium"
GENERATIONS = "/v1/images/generations"
SCHNELL = "black-forest-labs/FLUX.1-schnell"
ROOT = Path(__file__).resolve().parents[2]


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """A strict little reader: checks every chunk CRC and returns (width, height, RGB rows)."""
    assert data.startswith(PNG_SIGNATURE)
    pos, chunks = len(PNG_SIGNATURE), []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR"
    assert chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(
        ">IIBBBBB", chunks[0][1]
    )
    assert (depth, colour, compression, filtering, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = 3 * width
    assert len(raw) == height * (stride + 1)
    rows: list[bytes] = []
    for y in range(height):
        kind, line = raw[y * (stride + 1)], raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]
        if kind == 2:  # Up: add the row above, byte by byte
            line = bytes((a + b) & 0xFF for a, b in zip(line, rows[-1], strict=True))
        else:
            assert kind == 0, f"unexpected filter {kind}"
        rows.append(line)
    return width, height, rows


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = create_simulator_app(SimulatorConfig(api_key=API_KEY, latency=0.0))
    async with AsyncTestClient(app, base_url="http://sim.test") as http:
        yield http


@pytest.fixture
async def concurrent_client() -> AsyncIterator[httpx.AsyncClient]:
    """Like `client`, but requests run concurrently (AsyncTestClient serves one at a time)."""
    app = create_simulator_app(SimulatorConfig(api_key=API_KEY, latency=0.0))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sim.test") as http:
        yield http


async def configure(client: httpx.AsyncClient, **changes: Any) -> dict[str, Any]:
    response = await client.post("/_sim/config", json=changes)
    assert response.status_code == 200, response.text
    knobs: dict[str, Any] = response.json()
    return knobs


async def submit(client: httpx.AsyncClient, path: str = MEDIUM, **body: Any) -> httpx.Response:
    return await client.post(path, json={"prompt": "a lighthouse at dusk", **body}, headers=AUTH)


async def submit_job(client: httpx.AsyncClient, path: str = MEDIUM, **body: Any) -> str:
    response = await submit(client, path, **body)
    assert response.status_code == 200, response.text
    job_id: str = response.json()["job_id"]
    return job_id


async def poll(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/jobs/{job_id}", headers=AUTH)
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


async def generate(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    """One SiliconFlow-style call; `body` overrides (or, as None, drops) the minimal fields."""
    minimal = {"model": SCHNELL, "prompt": "a lighthouse at dusk", "image_size": "1024x1024"}
    fields = {k: v for k, v in {**minimal, **body}.items() if v is not None}
    return await client.post(GENERATIONS, json=fields, headers=AUTH)


def assert_siliconflow_error(response: httpx.Response, status: int, code: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "message", "data"}
    assert (body["code"], body["data"]) == (code, None)
    message: str = body["message"]
    return message


# --- PNG encoder ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height"), [(1, 1), (5, 1), (1, 7), (333, 97), (1024, 1024), (1568, 672)]
)
@pytest.mark.parametrize("seed", [0, 7, 123456])
def test_render_png_is_a_valid_rgb_png_of_the_requested_size(
    width: int, height: int, seed: int
) -> None:
    data = render_png(width, height, prompt="odd sizes", seed=seed, index=1)
    # decode_png checks every CRC, and zlib.decompress the stream's Adler-32.
    assert decode_png(data)[:2] == (width, height) == png_size(data)


def test_render_png_draws_bands_of_gradients() -> None:
    rows = decode_png(render_png(256, 300, prompt="bands", seed=3, index=0))[2]
    assert 3 <= len(set(rows)) <= 11
    assert len({rows[0][i : i + 3] for i in range(0, len(rows[0]), 3)}) > 2


def test_render_png_is_deterministic_and_depends_on_every_input() -> None:
    first = render_png(64, 48, prompt="a cat", seed=1, index=0)
    assert render_png(64, 48, prompt="a cat", seed=1, index=0) == first
    others = [
        render_png(64, 48, prompt="a dog", seed=1, index=0),
        render_png(64, 48, prompt="a cat", seed=2, index=0),
        render_png(64, 48, prompt="a cat", seed=1, index=1),
    ]
    pixels = decode_png(first)[2]
    assert all(decode_png(other)[2] != pixels for other in others)


def test_render_png_is_fast_enough_to_serve() -> None:
    def best_of_three(size: int) -> float:
        timings = []
        for attempt in range(3):
            start = time.perf_counter()
            render_png(size, size, prompt="speed", seed=attempt, index=0)
            timings.append(time.perf_counter() - start)
        return min(timings)

    assert best_of_three(1024) < 0.1
    assert best_of_three(2048) < 0.5


@pytest.mark.parametrize("data", [b"", b"GIF89a" + bytes(30), PNG_SIGNATURE + bytes(16)])
def test_png_size_rejects_what_is_not_a_png(data: bytes) -> None:
    with pytest.raises(ValueError, match="not a PNG"):
        png_size(data)


# --- size table ------------------------------------------------------------------------------


def test_size_table_matches_the_provider_table_and_caps_4k_at_4096() -> None:
    assert len(ASPECT_RATIOS) == 12
    assert len(SIZES) == 36
    assert image_size("1:1", "1K") == (1024, 1024)
    assert image_size("5:4", "1K") == (1152, 896)
    assert image_size("5:4", "2K") == (2240, 1792)
    assert image_size("9:16", "2K") == (1472, 2688)
    assert image_size("2.35:1", "1K") == (1568, 672)
    assert image_size("2.35:1", "2K") == (3136, 1344)
    assert image_size("1:1", "4K") == (4096, 4096)
    assert image_size("16:9", "4K") == (4096, 2304)
    assert image_size("3:2", "4K") == (4096, 2720)
    assert image_size("2:3", "4K") == (2720, 4096)
    for ratio in ASPECT_RATIOS:
        assert max(SIZES[ratio, "4K"]) == 4096
    assert image_size("7:3", "1K") is None
    assert image_size("1:1", "8K") is None


# --- wire protocol -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}]
)
async def test_requests_without_the_right_bearer_key_get_401(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    job_id = await submit_job(client)
    for response in (
        await client.post(MEDIUM, json={"prompt": "x"}, headers=headers),
        await client.get(f"/jobs/{job_id}", headers=headers),
        await client.delete(f"/jobs/{job_id}", headers=headers),
    ):
        assert response.status_code == 401
        assert isinstance(response.json()["error"], str)


async def test_submit_poll_download_round_trip(client: httpx.AsyncClient) -> None:
    response = await submit(client, aspect_ratio="16:9", resolution="2K", seed=42)
    assert response.status_code == 200
    created = response.json()
    assert set(created) == {"job_id", "status", "created_at"}
    assert created["status"] == "queued"
    assert created["created_at"].endswith("Z")

    job = await poll(client, created["job_id"])
    assert job["status"] == "completed"
    assert job["completed_at"] is not None
    assert "error" not in job
    [url] = job["result"]["urls"]
    assert url == f"http://sim.test/images/{created['job_id']}/0.png"

    image = await client.get(url)  # no auth: image URLs behave like CDN links
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/png"
    assert png_size(image.content) == (2688, 1472)
    again = await client.get(url)
    assert again.content == image.content


@pytest.mark.parametrize(
    ("path", "body", "count"),
    [
        (MEDIUM, {}, 1),
        ("/generate/image/krea/krea-2/large", {}, 1),
        ("/generate/image/krea/krea-2/turbo", {}, 4),
        ("/generate/image/krea/krea-1", {}, 4),
        (MEDIUM, {"num_images": 3}, 3),
        ("/generate/image/krea/krea-1", {"num_images": 1}, 1),
    ],
)
async def test_image_count_comes_from_num_images_or_the_model_table(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], count: int
) -> None:
    job = await poll(client, await submit_job(client, path, **body))
    urls = job["result"]["urls"]
    assert len(urls) == count
    assert (await client.get(urls[-1])).status_code == 200
    beyond = urls[-1].replace(f"/{count - 1}.png", f"/{count}.png")
    assert (await client.get(beyond)).status_code == 404


async def test_same_prompt_and_seed_give_the_same_image(client: httpx.AsyncClient) -> None:
    async def first_image(seed: int) -> bytes:
        job = await poll(client, await submit_job(client, seed=seed))
        return (await client.get(job["result"]["urls"][0])).content

    assert await first_image(5) == await first_image(5)
    assert await first_image(5) != await first_image(6)


async def test_full_optional_body_is_accepted(client: httpx.AsyncClient) -> None:
    response = await submit(
        client,
        aspect_ratio="2.35:1",
        resolution="1K",
        seed=0,
        creativity="high",
        image_style_references=[{"url": "https://example.com/a.png", "strength": 0.5}],
        moodboards=[{"id": "mb_1"}],
        styles=[{"id": "lora_1", "strength": 1}],
        intensity=-100,
        complexity=100,
        movement=0,
        negative_prompt="blurry",
        some_future_field=True,
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"aspect_ratio": "1:1"}, "prompt"),
        ({"prompt": "x", "aspect_ratio": "7:3"}, "aspect_ratio"),
        ({"prompt": "x", "resolution": "8K"}, "resolution"),
        ({"prompt": "x", "seed": "12"}, "seed"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "creativity": "wild"}, "creativity"),
        ({"prompt": "x", "moodboards": [{"id": 1}, {"id": 2}]}, "moodboards"),
        ({"prompt": "x", "styles": "lora"}, "styles"),
        ({"prompt": "x", "image_style_references": {}}, "image_style_references"),
        ({"prompt": "x", "intensity": 101}, "intensity"),
        ({"prompt": "x", "movement": True}, "movement"),
        ({"prompt": "x", "negative_prompt": ["a"]}, "negative_prompt"),
        ({"prompt": "x", "num_images": 5}, "num_images"),
        ({"prompt": "x", "num_images": 0}, "num_images"),
        (["prompt"], "body"),
    ],
)
async def test_invalid_body_gets_400_naming_the_field(
    client: httpx.AsyncClient, body: Any, field: str
) -> None:
    response = await client.post(MEDIUM, json=body, headers=AUTH)
    assert response.status_code == 400
    assert field in response.json()["error"]


async def test_body_that_is_not_json_gets_400(client: httpx.AsyncClient) -> None:
    response = await client.post(MEDIUM, content=b"{nope", headers=AUTH)
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]


async def test_unknown_job_gets_404_everywhere(client: httpx.AsyncClient) -> None:
    assert (await client.get("/jobs/nope", headers=AUTH)).status_code == 404
    assert (await client.delete("/jobs/nope", headers=AUTH)).status_code == 404
    response = await client.get("/images/nope/0.png")
    assert response.status_code == 404
    assert "error" in response.json()


async def test_status_moves_queued_processing_completed_by_wall_clock(
    client: httpx.AsyncClient,
) -> None:
    await configure(client, latency=0.6)
    job_id = await submit_job(client)
    job = await poll(client, job_id)
    assert (job["status"], job["completed_at"]) == ("queued", None)
    assert "result" not in job
    assert (await client.get(f"/images/{job_id}/0.png")).status_code == 404

    await asyncio.sleep(0.3)
    assert (await poll(client, job_id))["status"] == "processing"

    await asyncio.sleep(0.4)
    job = await poll(client, job_id)
    assert job["status"] == "completed"
    assert len(job["result"]["urls"]) == 1


async def test_cancel_an_active_job_then_not_again(client: httpx.AsyncClient) -> None:
    await configure(client, latency=5)
    job_id = await submit_job(client)
    response = await client.delete(f"/jobs/{job_id}", headers=AUTH)
    assert response.status_code == 200
    job = response.json()
    assert job["status"] == "cancelled"
    assert job["completed_at"] is not None
    assert (await poll(client, job_id))["status"] == "cancelled"
    assert (await client.delete(f"/jobs/{job_id}", headers=AUTH)).status_code == 409
    assert (await client.get("/_sim/stats")).json()["jobs_active"] == 0


async def test_cancel_a_completed_job_gets_409(client: httpx.AsyncClient) -> None:
    job_id = await submit_job(client)
    response = await client.delete(f"/jobs/{job_id}", headers=AUTH)
    assert response.status_code == 409
    assert "completed" in response.json()["error"]


# --- knobs and faults ----------------------------------------------------------------------------


async def test_config_reads_and_changes_at_runtime(client: httpx.AsyncClient) -> None:
    config = (await client.get("/_sim/config")).json()
    assert config["latency"] == 0.0
    assert config["error_kind"] == "none"
    assert config["images_per_model"] == {"krea/krea-2/turbo": 4, "krea/krea-1": 4}
    assert "api_key" not in config

    changed = await configure(client, latency=1, failure_rate=0.25, retry_after=3)
    assert (changed["latency"], changed["failure_rate"], changed["retry_after"]) == (1.0, 0.25, 3)


@pytest.mark.parametrize(
    "changes",
    [
        {"latency": -1},
        {"failure_rate": 1.5},
        {"error_kind": "explode"},
        {"retry_after": "soon"},
        {"api_key": "new"},
        {"images_per_model": {"krea/krea-1": 9}},
    ],
)
async def test_invalid_config_change_gets_400_and_changes_nothing(
    client: httpx.AsyncClient, changes: dict[str, Any]
) -> None:
    before = (await client.get("/_sim/config")).json()
    response = await client.post("/_sim/config", json={"latency": 2, **changes})
    assert response.status_code == 400
    assert next(iter(changes)) in response.json()["error"]
    assert (await client.get("/_sim/config")).json() == before


async def test_submit_500(client: httpx.AsyncClient) -> None:
    await configure(client, error_kind="submit_500")
    response = await submit(client)
    assert response.status_code == 500
    assert "error" in response.json()


async def test_submit_400_refuses_the_request_and_makes_no_job(client: httpx.AsyncClient) -> None:
    await configure(client, error_kind="submit_400")
    response = await submit(client)
    assert response.status_code == 400
    assert "error" in response.json()
    assert (await client.get("/_sim/stats")).json()["jobs_active"] == 0


async def test_submit_429_sends_retry_after(client: httpx.AsyncClient) -> None:
    await configure(client, error_kind="submit_429", retry_after=7)
    response = await submit(client)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"


async def test_malformed_submit_answers_200_with_a_body_that_is_not_json(
    client: httpx.AsyncClient,
) -> None:
    await configure(client, error_kind="malformed")
    response = await submit(client)
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        response.json()


async def test_hang_delays_the_submit_answer(client: httpx.AsyncClient) -> None:
    await configure(client, error_kind="hang", hang_seconds=0.3)
    start = time.monotonic()
    response = await submit(client)
    assert time.monotonic() - start >= 0.3
    assert response.status_code == 200


async def test_job_failed_makes_every_job_fail(client: httpx.AsyncClient) -> None:
    await configure(client, error_kind="job_failed")
    job = await poll(client, await submit_job(client))
    assert job["status"] == "failed"
    assert job["error"]["message"]
    assert job["completed_at"] is not None
    assert "result" not in job


async def test_bad_image_serves_non_image_bytes_as_png(client: httpx.AsyncClient) -> None:
    job = await poll(client, await submit_job(client))
    await configure(client, error_kind="bad_image")
    response = await client.get(job["result"]["urls"][0])
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    with pytest.raises(ValueError, match="not a PNG"):
        png_size(response.content)


async def test_fail_first_n_fails_that_many_submits_then_recovers(
    client: httpx.AsyncClient,
) -> None:
    await configure(client, fail_first_n=2)
    statuses = [(await submit(client)).status_code for _ in range(3)]
    assert statuses == [500, 500, 200]
    assert (await client.get("/_sim/config")).json()["fail_first_n"] == 0


async def test_failure_rate_is_reproducible_from_the_rng_seed(client: httpx.AsyncClient) -> None:
    async def outcomes() -> list[str]:
        await client.post("/_sim/reset")
        job_ids = [await submit_job(client) for _ in range(20)]
        return [(await poll(client, job_id))["status"] for job_id in job_ids]

    await configure(client, failure_rate=0.5, rng_seed=1234)
    first = await outcomes()
    assert set(first) == {"completed", "failed"}
    assert await outcomes() == first
    await configure(client, failure_rate=1.0)
    assert set(await outcomes()) == {"failed"}


async def test_jobs_without_a_seed_replay_the_same_images_after_reset(
    client: httpx.AsyncClient,
) -> None:
    async def first_image() -> bytes:
        await client.post("/_sim/reset")
        job = await poll(client, await submit_job(client))
        return (await client.get(job["result"]["urls"][0])).content

    assert await first_image() == await first_image()


async def test_stats_count_traffic_and_the_high_water_mark(client: httpx.AsyncClient) -> None:
    await configure(client, latency=0.4)
    job_ids = [await submit_job(client) for _ in range(3)]
    await client.post(MEDIUM, json={"prompt": "x"})  # unauthenticated: not a submit
    await client.delete(f"/jobs/{job_ids[0]}", headers=AUTH)
    stats = (await client.get("/_sim/stats")).json()
    assert stats == {
        "submits": 3,
        "polls": 0,
        "jobs_active": 2,
        "max_jobs_active": 3,
        "image_downloads": 0,
    }

    await asyncio.sleep(0.45)
    job = await poll(client, job_ids[1])
    await client.get(job["result"]["urls"][0])
    stats = (await client.get("/_sim/stats")).json()
    assert (stats["jobs_active"], stats["max_jobs_active"]) == (0, 3)
    assert (stats["polls"], stats["image_downloads"]) == (1, 1)

    reset = await client.post("/_sim/reset")
    assert reset.status_code == 200
    assert set(reset.json().values()) == {0}
    assert (await client.get(f"/jobs/{job_ids[1]}", headers=AUTH)).status_code == 404


# --- SiliconFlow-style synchronous generation ---------------------------------------------


async def test_generation_answers_with_urls_of_images_at_the_requested_size(
    client: httpx.AsyncClient,
) -> None:
    response = await generate(
        client,
        model="stabilityai/stable-diffusion-3-5-large-turbo",
        image_size="768x512",
        batch_size=3,
        num_inference_steps=4,
        seed=9_999_999_999,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"images", "timings", "seed"}
    assert body["timings"] == {"inference": 0.0}
    assert body["seed"] == 9_999_999_999
    urls = [image["url"] for image in body["images"]]
    assert len(urls) == 3
    assert all(url.startswith("http://sim.test/images/") for url in urls)
    pictures = []
    for url in urls:
        image = await client.get(url)  # no auth, like Krea's image URLs
        assert image.status_code == 200
        assert image.headers["content-type"] == "image/png"
        assert png_size(image.content) == (768, 512)
        pictures.append(image.content)
    assert len(set(pictures)) == 3
    assert (await client.get(urls[0].replace("/0.png", "/3.png"))).status_code == 404


async def test_generation_defaults_to_one_image_and_reports_the_seed_it_drew(
    client: httpx.AsyncClient,
) -> None:
    body = (await generate(client)).json()
    assert len(body["images"]) == 1
    assert isinstance(body["seed"], int)
    again = (await generate(client, seed=body["seed"])).json()
    first = (await client.get(body["images"][0]["url"])).content
    assert (await client.get(again["images"][0]["url"])).content == first


async def test_generation_accepts_the_full_optional_body(client: httpx.AsyncClient) -> None:
    response = await generate(
        client,
        model="black-forest-labs/FLUX.1-dev",
        image_size="64x4096",
        batch_size=4,
        num_inference_steps=100,
        negative_prompt="blurry",
        seed=0,
        prompt_enhancement=True,
        guidance_scale=7.5,
        some_future_field=[1],
        image=None,
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["images"]) == 4


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}]
)
async def test_generation_without_the_right_bearer_key_gets_401_in_siliconflow_shape(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    body = {"model": SCHNELL, "prompt": "x", "image_size": "512x512"}
    response = await client.post(GENERATIONS, json=body, headers=headers)
    assert assert_siliconflow_error(response, 401, 40100)
    assert response.headers["www-authenticate"] == "Bearer"
    assert (await client.get("/_sim/stats")).json()["submits"] == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": None}, "model"),
        ({"model": "FLUX.1-schnell"}, "model"),
        ({"model": 7}, "model"),
        ({"prompt": None}, "prompt"),
        ({"prompt": "  "}, "prompt"),
        ({"image_size": None}, "image_size"),
        ({"image_size": "1024"}, "image_size"),
        ({"image_size": "1024*1024"}, "image_size"),
        ({"image_size": "32x512"}, "image_size"),
        ({"image_size": "512x4097"}, "image_size"),
        ({"image_size": [512, 512]}, "image_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 5}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 101}, "num_inference_steps"),
        ({"num_inference_steps": 4.0}, "num_inference_steps"),
        ({"negative_prompt": ["boats"]}, "negative_prompt"),
        ({"seed": -1}, "seed"),
        ({"seed": 10_000_000_000}, "seed"),
        ({"seed": "42"}, "seed"),
        ({"prompt_enhancement": "yes"}, "prompt_enhancement"),
        ({"guidance_scale": "high"}, "guidance_scale"),
    ],
)
async def test_invalid_generation_gets_400_naming_the_field(
    client: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    assert field in assert_siliconflow_error(await generate(client, **body), 400, 40000)


@pytest.mark.parametrize("content", [b"{nope", b'["prompt"]'])
async def test_generation_body_that_is_not_a_json_object_gets_400(
    client: httpx.AsyncClient, content: bytes
) -> None:
    response = await client.post(GENERATIONS, content=content, headers=AUTH)
    assert "body" in assert_siliconflow_error(response, 400, 40000)


async def test_generation_answers_after_the_latency_and_counts_requests_in_flight(
    concurrent_client: httpx.AsyncClient,
) -> None:
    client = concurrent_client
    await configure(client, latency=0.3)
    start = time.monotonic()
    responses = await asyncio.gather(*(generate(client) for _ in range(3)))
    assert time.monotonic() - start >= 0.3
    assert [response.status_code for response in responses] == [200, 200, 200]
    assert {response.json()["timings"]["inference"] for response in responses} == {0.3}
    stats = (await client.get("/_sim/stats")).json()
    assert (stats["submits"], stats["jobs_active"], stats["max_jobs_active"]) == (3, 0, 3)

    await asyncio.gather(*(generate(client) for _ in range(2)))
    assert (await client.get("/_sim/stats")).json()["max_jobs_active"] == 3


async def test_generation_in_flight_is_active_beside_krea_jobs(
    concurrent_client: httpx.AsyncClient,
) -> None:
    client = concurrent_client
    await configure(client, latency=0.4)
    await submit_job(client)
    pending = asyncio.ensure_future(generate(client))
    await asyncio.sleep(0.15)
    assert (await client.get("/_sim/stats")).json()["jobs_active"] == 2
    assert (await pending).status_code == 200
    stats = (await client.get("/_sim/stats")).json()
    assert (stats["jobs_active"], stats["max_jobs_active"]) == (0, 2)


async def test_generation_submit_500(client: httpx.AsyncClient) -> None:
    await configure(client, error_kind="submit_500")
    assert_siliconflow_error(await generate(client), 500, 50000)
    assert (await client.get("/_sim/stats")).json()["jobs_active"] == 0


async def test_generation_submit_429_sends_retry_after(client: httpx.AsyncClient) -> None:
    await configure(client, error_kind="submit_429", retry_after=7)
    response = await generate(client)
    assert_siliconflow_error(response, 429, 42900)
    assert response.headers["retry-after"] == "7"


async def test_generation_malformed_answers_200_with_a_body_that_is_not_json(
    client: httpx.AsyncClient,
) -> None:
    await configure(client, error_kind="malformed")
    response = await generate(client)
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        response.json()


async def test_generation_hang_delays_the_answer(client: httpx.AsyncClient) -> None:
    await configure(client, error_kind="hang", hang_seconds=0.3)
    start = time.monotonic()
    response = await generate(client)
    assert time.monotonic() - start >= 0.3
    assert response.status_code == 200


async def test_generation_job_failed_answers_500_generation_failed(
    client: httpx.AsyncClient,
) -> None:
    await configure(client, error_kind="job_failed")
    assert assert_siliconflow_error(await generate(client), 500, GENERATION_FAILED)


async def test_generation_fail_first_n_then_recovers(client: httpx.AsyncClient) -> None:
    await configure(client, fail_first_n=2)
    statuses = [(await generate(client)).status_code for _ in range(3)]
    assert statuses == [500, 500, 200]
    assert (await client.get("/_sim/stats")).json()["submits"] == 3


async def test_generation_failure_rate_is_reproducible_from_the_rng_seed(
    client: httpx.AsyncClient,
) -> None:
    async def outcomes() -> list[int]:
        await client.post("/_sim/reset")
        return [(await generate(client)).status_code for _ in range(20)]

    await configure(client, failure_rate=0.5, rng_seed=99)
    first = await outcomes()
    assert set(first) == {200, 500}
    assert await outcomes() == first


async def test_generation_bad_image_serves_non_image_bytes(client: httpx.AsyncClient) -> None:
    await configure(client, error_kind="bad_image")
    response = await generate(client)
    assert response.status_code == 200
    image = await client.get(response.json()["images"][0]["url"])
    assert image.status_code == 200
    with pytest.raises(ValueError, match="not a PNG"):
        png_size(image.content)


async def test_krea_routes_keep_their_own_error_shape(client: httpx.AsyncClient) -> None:
    await generate(client)  # the SiliconFlow route's handler must not leak onto Krea's
    response = await client.post(MEDIUM, json={"prompt": ""}, headers=AUTH)
    assert response.status_code == 400
    assert set(response.json()) == {"error"}


# --- the unified, OpenAI and Black Forest Labs protocols ---------------------------------------

XKEY = {"x-key": API_KEY}
UNIFIED = "/unified/v1/images/generations"
OPENAI = "/openai/v1/images/generations"
BFL_PRO = "/bfl/v1/flux-pro-1.1"
BFL_ULTRA = "/bfl/v1/flux-pro-1.1-ultra"
# Per protocol: where a submit goes, its minimal body and its credentials.
NEW_PROTOCOLS: dict[str, tuple[str, dict[str, Any], dict[str, str]]] = {
    "unified": (UNIFIED, {"model": "krea-2-medium", "prompt": "a lighthouse at dusk"}, AUTH),
    "openai": (OPENAI, {"model": "gpt-image-1", "prompt": "a lighthouse at dusk"}, AUTH),
    "bfl": (BFL_PRO, {"prompt": "a lighthouse at dusk"}, XKEY),
}


async def submit_to(client: httpx.AsyncClient, protocol: str, **body: Any) -> httpx.Response:
    """A submit; ``body`` overrides (or, as None, drops) the minimal fields."""
    path, minimal, headers = NEW_PROTOCOLS[protocol]
    fields = {k: v for k, v in {**minimal, **body}.items() if v is not None}
    return await client.post(path, json=fields, headers=headers)


async def outcome(
    client: httpx.AsyncClient, protocol: str, response: httpx.Response
) -> tuple[str, list[bytes]]:
    """How a submitted generation ended: ("completed", image bytes) or ("failed", [])."""
    body = response.json()
    if protocol == "openai":
        if response.status_code == 500:
            return "failed", []
        assert response.status_code == 200, response.text
        items = body["data"]
        if "b64_json" in items[0]:
            return "completed", [base64.b64decode(item["b64_json"]) for item in items]
        return "completed", [(await client.get(item["url"])).content for item in items]
    assert response.status_code == 200, response.text
    if protocol == "unified":
        task = (await client.get(f"/unified/v1/tasks/{body['id']}", headers=AUTH)).json()
        if task["status"] == "failed":
            return "failed", []
        assert task["status"] == "completed", task
        return "completed", [(await client.get(url)).content for url in task["results"]]
    result = (await client.get(body["polling_url"], headers=XKEY)).json()
    if result["status"] == "Error":
        return "failed", []
    assert result["status"] == "Ready", result
    return "completed", [(await client.get(result["result"]["sample"])).content]


def error_message(protocol: str, response: httpx.Response) -> str:
    """The message of an error in the protocol's own shape, checking that shape."""
    body = response.json()
    if protocol == "bfl":
        assert set(body) == {"detail"}
        message: str = body["detail"]
        return message
    error = body["error"]
    if protocol == "unified":
        assert set(error) == {"code", "message", "type"}
    else:
        assert set(error) == {"message", "type", "param", "code"}
    message = error["message"]
    return message


@pytest.mark.parametrize("protocol", NEW_PROTOCOLS)
async def test_new_protocol_completes_with_pngs(client: httpx.AsyncClient, protocol: str) -> None:
    status, images = await outcome(client, protocol, await submit_to(client, protocol))
    assert status == "completed"
    assert images
    assert all(png_size(image) for image in images)
    stats = (await client.get("/_sim/stats")).json()
    assert (stats["submits"], stats["image_downloads"]) == (1, len(images))


@pytest.mark.parametrize("protocol", NEW_PROTOCOLS)
async def test_new_protocol_submit_500_in_its_own_shape(
    client: httpx.AsyncClient, protocol: str
) -> None:
    await configure(client, error_kind="submit_500")
    response = await submit_to(client, protocol)
    assert response.status_code == 500
    assert error_message(protocol, response)
    assert (await client.get("/_sim/stats")).json()["jobs_active"] == 0


@pytest.mark.parametrize("protocol", NEW_PROTOCOLS)
async def test_new_protocol_submit_429_sends_retry_after(
    client: httpx.AsyncClient, protocol: str
) -> None:
    await configure(client, error_kind="submit_429", retry_after=7)
    response = await submit_to(client, protocol)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert error_message(protocol, response)


@pytest.mark.parametrize("protocol", NEW_PROTOCOLS)
async def test_new_protocol_malformed_answers_200_that_is_not_json(
    client: httpx.AsyncClient, protocol: str
) -> None:
    await configure(client, error_kind="malformed")
    response = await submit_to(client, protocol)
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        response.json()


@pytest.mark.parametrize("protocol", NEW_PROTOCOLS)
async def test_new_protocol_hang_delays_the_answer(
    client: httpx.AsyncClient, protocol: str
) -> None:
    await configure(client, error_kind="hang", hang_seconds=0.3)
    start = time.monotonic()
    response = await submit_to(client, protocol)
    assert time.monotonic() - start >= 0.3
    assert response.status_code == 200


@pytest.mark.parametrize("protocol", NEW_PROTOCOLS)
async def test_new_protocol_job_failed_fails_the_generation(
    client: httpx.AsyncClient, protocol: str
) -> None:
    await configure(client, error_kind="job_failed")
    assert await outcome(client, protocol, await submit_to(client, protocol)) == ("failed", [])


@pytest.mark.parametrize("protocol", NEW_PROTOCOLS)
async def test_new_protocol_fail_first_n_then_recovers(
    client: httpx.AsyncClient, protocol: str
) -> None:
    await configure(client, fail_first_n=2)
    statuses = [(await submit_to(client, protocol)).status_code for _ in range(3)]
    assert statuses == [500, 500, 200]
    assert (await client.get("/_sim/stats")).json()["submits"] == 3


@pytest.mark.parametrize("protocol", NEW_PROTOCOLS)
async def test_new_protocol_bad_image_serves_non_image_bytes(
    client: httpx.AsyncClient, protocol: str
) -> None:
    await configure(client, error_kind="bad_image")
    status, images = await outcome(client, protocol, await submit_to(client, protocol))
    assert status == "completed"
    for image in images:
        with pytest.raises(ValueError, match="not a PNG"):
            png_size(image)


@pytest.mark.parametrize("protocol", NEW_PROTOCOLS)
async def test_new_protocol_failure_rate_is_reproducible_from_the_rng_seed(
    client: httpx.AsyncClient, protocol: str
) -> None:
    async def outcomes() -> list[str]:
        await client.post("/_sim/reset")
        responses = [await submit_to(client, protocol) for _ in range(16)]
        return [(await outcome(client, protocol, response))[0] for response in responses]

    await configure(client, failure_rate=0.5, rng_seed=7)
    first = await outcomes()
    assert set(first) == {"completed", "failed"}
    assert await outcomes() == first


@pytest.mark.parametrize(
    ("protocol", "headers"),
    [
        ("unified", {}),
        ("unified", {"Authorization": "Bearer wrong"}),
        ("unified", XKEY),
        ("openai", {"Authorization": f"Basic {API_KEY}"}),
        ("openai", {"Authorization": "Bearer wrong"}),
        ("bfl", {}),
        ("bfl", {"x-key": "wrong"}),
        ("bfl", AUTH),  # BFL takes its key in x-key only
    ],
)
async def test_new_protocol_without_the_right_key_gets_401_in_its_shape(
    client: httpx.AsyncClient, protocol: str, headers: dict[str, str]
) -> None:
    path, body, _ = NEW_PROTOCOLS[protocol]
    response = await client.post(path, json=body, headers=headers)
    assert response.status_code == 401
    assert error_message(protocol, response)
    assert (await client.get("/_sim/stats")).json()["submits"] == 0


async def test_async_protocols_count_polls_and_move_by_wall_clock(
    client: httpx.AsyncClient,
) -> None:
    await configure(client, latency=0.6)
    task = (await submit_to(client, "unified")).json()
    job = (await submit_to(client, "bfl")).json()
    assert (task["status"], task["progress"]) == ("pending", 0)
    assert "results" not in task

    async def statuses() -> tuple[Any, ...]:
        unified = (await client.get(f"/unified/v1/tasks/{task['id']}", headers=AUTH)).json()
        bfl = (await client.get(job["polling_url"], headers=XKEY)).json()
        return unified["status"], unified["progress"], bfl["status"]

    assert await statuses() == ("pending", 0, "Pending")
    await asyncio.sleep(0.3)
    assert await statuses() == ("processing", 50, "Pending")
    await asyncio.sleep(0.4)
    assert await statuses() == ("completed", 100, "Ready")
    stats = (await client.get("/_sim/stats")).json()
    assert (stats["submits"], stats["polls"], stats["max_jobs_active"]) == (2, 6, 2)


# Unified.


async def test_unified_task_object_is_tollgates(client: httpx.AsyncClient) -> None:
    response = await submit_to(client, "unified", size="16:9", quality="2K", n=2, seed=4)
    assert response.status_code == 200, response.text
    task = response.json()
    assert set(task) == {
        "created",
        "id",
        "model",
        "object",
        "progress",
        "status",
        "task_info",
        "type",
        "usage",
        "results",
    }
    assert (task["object"], task["type"], task["model"]) == (
        "image.generation.task",
        "image",
        "krea-2-medium",
    )
    assert task["task_info"] == {"can_cancel": True, "estimated_time": 0}
    assert set(task["usage"]) == {"billing_rule", "credits_reserved", "user_group"}
    assert (task["status"], task["progress"]) == ("completed", 100)
    assert len(task["results"]) == 2
    for url in task["results"]:
        assert png_size((await client.get(url)).content) == (2688, 1472)


@pytest.mark.parametrize(
    ("body", "count", "size"),
    [
        ({}, 1, (1024, 1024)),
        ({"model": "krea/krea-1"}, 4, (1024, 1024)),  # the per-model table of the config
        ({"size": "9:16", "quality": "4K"}, 1, (2304, 4096)),
        ({"size": "640x1088", "n": 3}, 3, (640, 1088)),
        (
            {
                "size": "1:1",
                "seed": 9_999_999_999,
                "nsfw_check": True,
                "creativity": "raw",
                "moodboards": [{"id": "m"}],
                "image_style_references": [],
                "styles": [],
                "intensity": -100,
                "complexity": 100,
                "movement": 0,
                "negative_prompt": "boats",
                "num_inference_steps": 4,
                "prompt_enhancement": True,
                "callback_url": "https://tenant.test/hook",
                "quality": None,
            },
            1,
            (1024, 1024),
        ),
    ],
)
async def test_unified_sizes_counts_and_the_full_body(
    client: httpx.AsyncClient, body: dict[str, Any], count: int, size: tuple[int, int]
) -> None:
    status, images = await outcome(client, "unified", await submit_to(client, "unified", **body))
    assert status == "completed"
    assert [png_size(image) for image in images] == [size] * count


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": None}, "model"),
        ({"model": " "}, "model"),
        ({"prompt": ""}, "prompt"),
        ({"size": "7:3"}, "size"),
        ({"size": 16}, "size"),
        ({"size": "32x32"}, "size"),
        ({"size": "512x512", "quality": "1K"}, "quality"),
        ({"quality": "8K"}, "quality"),
        ({"n": 5}, "n"),
        ({"n": True}, "n"),
        ({"seed": -1}, "seed"),
        ({"nsfw_check": "yes"}, "nsfw_check"),
        ({"creativity": "wild"}, "creativity"),
        ({"moodboards": [1, 2]}, "moodboards"),
        ({"styles": "lora"}, "styles"),
        ({"intensity": 101}, "intensity"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"negative_prompt": 3}, "negative_prompt"),
        ({"callback_url": "http://tenant.test/hook"}, "callback_url"),
        ({"guidance_scale": 7}, "guidance_scale"),  # Tollgate refuses unknown fields
    ],
)
async def test_unified_invalid_body_gets_400_naming_the_field(
    client: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    response = await submit_to(client, "unified", **body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"
    assert field in error_message("unified", response)


async def test_unified_cancel_then_not_again_and_unknown_tasks_404(
    client: httpx.AsyncClient,
) -> None:
    await configure(client, latency=5)
    task_id = (await submit_to(client, "unified")).json()["id"]
    response = await client.post(f"/unified/v1/tasks/{task_id}/cancel", headers=AUTH)
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    again = await client.post(f"/unified/v1/tasks/{task_id}/cancel", headers=AUTH)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "conflict"
    for response in (
        await client.get("/unified/v1/tasks/nope", headers=AUTH),
        await client.post("/unified/v1/tasks/nope/cancel", headers=AUTH),
    ):
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
    assert (await client.get("/_sim/stats")).json()["jobs_active"] == 0


async def test_unified_failed_task_carries_an_error_object(client: httpx.AsyncClient) -> None:
    await configure(client, error_kind="job_failed")
    task = (await submit_to(client, "unified")).json()
    assert task["status"] == "failed"
    assert set(task["error"]) == {"code", "message"}
    assert "results" not in task


# OpenAI.


@pytest.mark.parametrize(
    ("body", "size", "count"),
    [
        ({}, (1024, 1024), 1),
        ({"size": "auto", "quality": "auto"}, (1024, 1024), 1),
        ({"size": "1536x1024", "quality": "low", "n": 3}, (1536, 1024), 3),
        ({"size": "1024x1536", "quality": "high", "output_format": "png"}, (1024, 1536), 1),
        (
            {"moderation": "low", "background": "opaque", "output_compression": 100, "user": "u"},
            (1024, 1024),
            1,
        ),
    ],
)
async def test_openai_gpt_image_answers_base64_pngs(
    client: httpx.AsyncClient, body: dict[str, Any], size: tuple[int, int], count: int
) -> None:
    response = await submit_to(client, "openai", **body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert set(answer) == {"created", "data"}
    assert all(set(item) == {"b64_json"} for item in answer["data"])
    _, images = await outcome(client, "openai", response)
    assert [png_size(image) for image in images] == [size] * count
    assert len(set(images)) == count


@pytest.mark.parametrize(
    ("body", "inline", "size"),
    [
        ({"model": "dall-e-3"}, False, (1024, 1024)),
        (
            {"model": "dall-e-3", "size": "1792x1024", "quality": "hd", "style": "vivid"},
            False,
            (1792, 1024),
        ),
        ({"model": "dall-e-3", "response_format": "b64_json"}, True, (1024, 1024)),
        ({"model": "dall-e-2", "size": "256x256", "response_format": "url"}, False, (256, 256)),
        ({"model": "dall-e-2", "size": "512x512", "response_format": "b64_json"}, True, (512, 512)),
    ],
)
async def test_openai_dall_e_answers_links_or_base64_as_asked(
    client: httpx.AsyncClient, body: dict[str, Any], inline: bool, size: tuple[int, int]
) -> None:
    response = await submit_to(client, "openai", **body)
    assert response.status_code == 200, response.text
    [item] = response.json()["data"]
    assert ("b64_json" in item) == inline
    assert ("url" in item) != inline
    assert ("revised_prompt" in item) == (body["model"] == "dall-e-3")
    if not inline:
        assert item["url"].startswith("http://sim.test/images/")
    _, [image] = await outcome(client, "openai", response)
    assert png_size(image) == size


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"response_format": "b64_json"}, "response_format", "unknown_parameter"),
        ({"style": "vivid"}, "style", "unknown_parameter"),
        ({"image_size": "1024x1024"}, "image_size", "unknown_parameter"),
        ({"model": "dall-e-2", "output_format": "png"}, "output_format", "unknown_parameter"),
        ({"model": "gpt-image-9"}, "model", "invalid_value"),
        ({"model": None}, "model", "invalid_value"),
        ({"prompt": " "}, "prompt", None),
        ({"n": 11}, "n", None),
        ({"model": "dall-e-3", "n": 2}, "n", None),
        ({"n": "2"}, "n", None),
        ({"size": "1792x1024"}, "size", None),
        ({"size": "1024x1024 "}, "size", None),
        ({"quality": "hd"}, "quality", None),
        ({"model": "dall-e-3", "quality": "high"}, "quality", None),
        ({"model": "dall-e-2", "response_format": "png"}, "response_format", None),
        ({"output_format": "gif"}, "output_format", None),
        ({"output_compression": 101}, "output_compression", None),
        ({"background": "none"}, "background", None),
        ({"user": 5}, "user", None),
    ],
)
async def test_openai_invalid_body_gets_400_naming_the_param(
    client: httpx.AsyncClient, body: dict[str, Any], param: str, code: str | None
) -> None:
    response = await submit_to(client, "openai", **body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert param in error["message"]


async def test_openai_answers_after_the_latency_with_requests_in_flight_counted(
    concurrent_client: httpx.AsyncClient,
) -> None:
    client = concurrent_client
    await configure(client, latency=0.3)
    start = time.monotonic()
    responses = await asyncio.gather(*(submit_to(client, "openai") for _ in range(3)))
    assert time.monotonic() - start >= 0.3
    assert [response.status_code for response in responses] == [200, 200, 200]
    stats = (await client.get("/_sim/stats")).json()
    assert (stats["submits"], stats["jobs_active"], stats["max_jobs_active"]) == (3, 0, 3)
    assert stats["image_downloads"] == 3


async def test_openai_failed_generation_is_a_server_error(client: httpx.AsyncClient) -> None:
    await configure(client, error_kind="job_failed")
    response = await submit_to(client, "openai")
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"


# Black Forest Labs.


async def test_bfl_submit_answers_an_id_and_a_polling_url_then_the_sample(
    client: httpx.AsyncClient,
) -> None:
    response = await submit_to(client, "bfl", width=1440, height=256, seed=3, output_format="png")
    assert response.status_code == 200, response.text
    job = response.json()
    assert set(job) == {"id", "polling_url"}
    assert job["polling_url"] == f"http://sim.test/bfl/v1/get_result?id={job['id']}"
    result = (await client.get(job["polling_url"], headers=XKEY)).json()
    assert set(result) == {"id", "status", "result", "progress"}
    assert (result["id"], result["status"]) == (job["id"], "Ready")
    assert result["result"]["seed"] == 3
    image = await client.get(result["result"]["sample"])
    assert png_size(image.content) == (1440, 256)


@pytest.mark.parametrize(
    ("path", "body", "size"),
    [
        (BFL_PRO, {}, (1024, 768)),
        ("/bfl/v1/flux-dev", {"width": 256, "height": 1440}, (256, 1440)),
        ("/bfl/v1/flux-pro", {"width": 800, "height": 608}, (800, 608)),
        (BFL_ULTRA, {}, (2048, 1152)),
        (BFL_ULTRA, {"aspect_ratio": "1:1", "raw": True}, (2048, 2048)),
        (BFL_ULTRA, {"aspect_ratio": "3:2"}, (2048, 1344)),
        (BFL_ULTRA, {"aspect_ratio": "21:9"}, (2048, 864)),
        (BFL_ULTRA, {"aspect_ratio": "9:21"}, (864, 2048)),
        (BFL_ULTRA, {"aspect_ratio": "3:4", "prompt_upsampling": True}, (1536, 2048)),
        (
            BFL_PRO,
            {
                "safety_tolerance": 6,
                "prompt_upsampling": False,
                "webhook_url": "https://t.test/",
                "some_future_field": 1,
            },
            (1024, 768),
        ),
    ],
)
async def test_bfl_models_render_their_size_form(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], size: tuple[int, int]
) -> None:
    response = await client.post(path, json={"prompt": "a lighthouse", **body}, headers=XKEY)
    status, [image] = await outcome(client, "bfl", response)
    assert status == "completed"
    assert png_size(image) == size


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (BFL_PRO, {"prompt": None}, "prompt"),
        (BFL_PRO, {"width": 1000}, "width"),
        (BFL_PRO, {"height": 1472}, "height"),
        (BFL_PRO, {"width": "1024"}, "width"),
        (BFL_PRO, {"aspect_ratio": "16:9"}, "aspect_ratio"),
        (BFL_ULTRA, {"width": 1024}, "width"),
        (BFL_ULTRA, {"aspect_ratio": "22:9"}, "aspect_ratio"),
        (BFL_ULTRA, {"aspect_ratio": "2.35:1"}, "aspect_ratio"),
        (BFL_ULTRA, {"aspect_ratio": "0:1"}, "aspect_ratio"),
        (BFL_ULTRA, {"raw": "yes"}, "raw"),
        (BFL_PRO, {"seed": -1}, "seed"),
        (BFL_PRO, {"safety_tolerance": 7}, "safety_tolerance"),
        (BFL_PRO, {"output_format": "webp"}, "output_format"),
        (BFL_PRO, {"prompt_upsampling": 1}, "prompt_upsampling"),
    ],
)
async def test_bfl_invalid_body_gets_400_naming_the_field(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], field: str
) -> None:
    fields = {k: v for k, v in {"prompt": "x", **body}.items() if v is not None}
    response = await client.post(path, json=fields, headers=XKEY)
    assert response.status_code == 400
    assert field in error_message("bfl", response)


async def test_bfl_unknown_model_and_unknown_job_get_404(client: httpx.AsyncClient) -> None:
    response = await client.post("/bfl/v1/flux-pro-9", json={"prompt": "x"}, headers=XKEY)
    assert response.status_code == 404
    assert "flux-pro-9" in error_message("bfl", response)
    unknown = await client.get("/bfl/v1/get_result?id=nope", headers=XKEY)
    assert unknown.status_code == 404
    assert unknown.json()["status"] == "Task not found"
    missing = await client.get("/bfl/v1/get_result", headers=XKEY)
    assert missing.status_code == 400


async def test_bfl_failed_job_reports_error(client: httpx.AsyncClient) -> None:
    await configure(client, error_kind="job_failed")
    job = (await submit_to(client, "bfl")).json()
    result = (await client.get(job["polling_url"], headers=XKEY)).json()
    assert (result["status"], result["result"]) == ("Error", None)


async def test_new_protocols_share_the_store_with_krea(client: httpx.AsyncClient) -> None:
    await configure(client, latency=5)
    task_id = (await submit_to(client, "unified")).json()["id"]
    # A job is a job: Krea's poll sees the unified task too.
    assert (await poll(client, task_id))["status"] == "queued"
    assert (await client.get("/_sim/stats")).json()["jobs_active"] == 1


# --- the real process -----------------------------------------------------------------------


async def test_simulator_runs_as_a_process_and_serves_the_protocol_over_http() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_SIM_")}
    env["TOLLGATE_SIM_LATENCY"] = "0.2"  # from the environment, since no flag overrides it
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "workers.simulator",
        "--host",
        "127.0.0.1",
        "--port",
        "0",  # the OS picks a free port; the announcement line tells which
        "--api-key",
        "proc-key",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=15)).decode().strip()
        prefix = "simulator listening on "
        assert line.startswith(prefix + "http://127.0.0.1:"), line
        base_url = line.removeprefix(prefix)
        headers = {"Authorization": "Bearer proc-key"}
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
            assert (await http.get("/_sim/config")).json()["latency"] == 0.2
            response = await http.post(
                "/generate/image/krea/krea-2/large",
                json={"prompt": "over the wire", "aspect_ratio": "3:2"},
                headers=headers,
            )
            assert response.status_code == 200, response.text
            job_id = response.json()["job_id"]
            for _ in range(50):
                job = (await http.get(f"/jobs/{job_id}", headers=headers)).json()
                if job["status"] == "completed":
                    break
                await asyncio.sleep(0.05)
            assert job["status"] == "completed"
            [url] = job["result"]["urls"]
            assert url.startswith(base_url + "/images/")
            image = await http.get(url)
            assert png_size(image.content) == (1280, 832)

            response = await http.post(
                GENERATIONS,
                json={"model": SCHNELL, "prompt": "over the wire", "image_size": "640x384"},
                headers=headers,
            )
            assert response.status_code == 200, response.text
            [generated] = response.json()["images"]
            assert generated["url"].startswith(base_url + "/images/")
            assert png_size((await http.get(generated["url"])).content) == (640, 384)

            # The prefixed protocols, over the wire: a channel's base URL carries the prefix.
            response = await http.post(
                "/openai/v1/images/generations",
                json={"model": "gpt-image-1", "prompt": "over the wire", "size": "1536x1024"},
                headers=headers,
            )
            assert response.status_code == 200, response.text
            [item] = response.json()["data"]
            assert png_size(base64.b64decode(item["b64_json"])) == (1536, 1024)
            response = await http.post(
                "/bfl/v1/flux-pro-1.1-ultra",
                json={"prompt": "over the wire", "aspect_ratio": "16:9"},
                headers={"x-key": "proc-key"},
            )
            assert response.status_code == 200, response.text
            polling_url = response.json()["polling_url"]
            assert polling_url.startswith(base_url + "/bfl/v1/get_result?id=")
            response = await http.post(
                "/unified/v1/images/generations",
                json={"model": "any", "prompt": "over the wire", "size": "512x512"},
                headers=headers,
            )
            assert response.status_code == 200, response.text
            task_path = f"/unified/v1/tasks/{response.json()['id']}"
            for _ in range(50):
                result = (await http.get(polling_url, headers={"x-key": "proc-key"})).json()
                task = (await http.get(task_path, headers=headers)).json()
                if result["status"] == "Ready" and task["status"] == "completed":
                    break
                await asyncio.sleep(0.05)
            sample = (await http.get(result["result"]["sample"])).content
            assert png_size(sample) == (2048, 1152)
            [url] = task["results"]
            assert png_size((await http.get(url)).content) == (512, 512)
    finally:
        if process.returncode is None:
            process.terminate()
        assert await asyncio.wait_for(process.wait(), timeout=10) in (0, -15)
