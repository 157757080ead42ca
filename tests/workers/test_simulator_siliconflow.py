"""The simulator's SiliconFlow-style synchronous generation: answers, errors, faults."""

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from sim_calls import (
    API_KEY,
    AUTH,
    GENERATIONS,
    MEDIUM,
    SCHNELL,
    assert_siliconflow_error,
    configure,
    generate,
    submit_job,
)

from workers.simulator.png import png_size
from workers.simulator.siliconflow import GENERATION_FAILED


async def test_generation_answers_with_urls_of_images_at_the_requested_size(
    sim_client: httpx.AsyncClient,
) -> None:
    response = await generate(
        sim_client,
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
        image = await sim_client.get(url)  # no auth, like Krea's image URLs
        assert image.status_code == 200
        assert image.headers["content-type"] == "image/png"
        assert png_size(image.content) == (768, 512)
        pictures.append(image.content)
    assert len(set(pictures)) == 3
    assert (await sim_client.get(urls[0].replace("/0.png", "/3.png"))).status_code == 404


async def test_generation_defaults_to_one_image_and_reports_the_seed_it_drew(
    sim_client: httpx.AsyncClient,
) -> None:
    body = (await generate(sim_client)).json()
    assert len(body["images"]) == 1
    assert isinstance(body["seed"], int)
    again = (await generate(sim_client, seed=body["seed"])).json()
    first = (await sim_client.get(body["images"][0]["url"])).content
    assert (await sim_client.get(again["images"][0]["url"])).content == first


async def test_generation_accepts_the_full_optional_body(sim_client: httpx.AsyncClient) -> None:
    response = await generate(
        sim_client,
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
    sim_client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    body = {"model": SCHNELL, "prompt": "x", "image_size": "512x512"}
    response = await sim_client.post(GENERATIONS, json=body, headers=headers)
    assert assert_siliconflow_error(response, 401, 40100)
    assert response.headers["www-authenticate"] == "Bearer"
    assert (await sim_client.get("/_sim/stats")).json()["submits"] == 0


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
    sim_client: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    assert field in assert_siliconflow_error(await generate(sim_client, **body), 400, 40000)


@pytest.mark.parametrize("content", [b"{nope", b'["prompt"]'])
async def test_generation_body_that_is_not_a_json_object_gets_400(
    sim_client: httpx.AsyncClient, content: bytes
) -> None:
    response = await sim_client.post(GENERATIONS, content=content, headers=AUTH)
    assert "body" in assert_siliconflow_error(response, 400, 40000)


async def test_generation_answers_after_the_latency_and_counts_requests_in_flight(
    sim_http: httpx.AsyncClient,
) -> None:
    sim_client = sim_http
    await configure(sim_client, latency=0.3)
    start = time.monotonic()
    responses = await asyncio.gather(*(generate(sim_client) for _ in range(3)))
    assert time.monotonic() - start >= 0.3
    assert [response.status_code for response in responses] == [200, 200, 200]
    assert {response.json()["timings"]["inference"] for response in responses} == {0.3}
    stats = (await sim_client.get("/_sim/stats")).json()
    assert (stats["submits"], stats["jobs_active"], stats["max_jobs_active"]) == (3, 0, 3)

    await asyncio.gather(*(generate(sim_client) for _ in range(2)))
    assert (await sim_client.get("/_sim/stats")).json()["max_jobs_active"] == 3


async def test_generation_in_flight_is_active_beside_krea_jobs(
    sim_http: httpx.AsyncClient,
) -> None:
    sim_client = sim_http
    await configure(sim_client, latency=0.4)
    await submit_job(sim_client)
    pending = asyncio.ensure_future(generate(sim_client))
    await asyncio.sleep(0.15)
    assert (await sim_client.get("/_sim/stats")).json()["jobs_active"] == 2
    assert (await pending).status_code == 200
    stats = (await sim_client.get("/_sim/stats")).json()
    assert (stats["jobs_active"], stats["max_jobs_active"]) == (0, 2)


async def test_generation_submit_500(sim_client: httpx.AsyncClient) -> None:
    await configure(sim_client, error_kind="submit_500")
    assert_siliconflow_error(await generate(sim_client), 500, 50000)
    assert (await sim_client.get("/_sim/stats")).json()["jobs_active"] == 0


async def test_generation_submit_429_sends_retry_after(sim_client: httpx.AsyncClient) -> None:
    await configure(sim_client, error_kind="submit_429", retry_after=7)
    response = await generate(sim_client)
    assert_siliconflow_error(response, 429, 42900)
    assert response.headers["retry-after"] == "7"


async def test_generation_malformed_answers_200_with_a_body_that_is_not_json(
    sim_client: httpx.AsyncClient,
) -> None:
    await configure(sim_client, error_kind="malformed")
    response = await generate(sim_client)
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        response.json()


async def test_generation_hang_delays_the_answer(sim_client: httpx.AsyncClient) -> None:
    await configure(sim_client, error_kind="hang", hang_seconds=0.3)
    start = time.monotonic()
    response = await generate(sim_client)
    assert time.monotonic() - start >= 0.3
    assert response.status_code == 200


async def test_generation_job_failed_answers_500_generation_failed(
    sim_client: httpx.AsyncClient,
) -> None:
    await configure(sim_client, error_kind="job_failed")
    assert assert_siliconflow_error(await generate(sim_client), 500, GENERATION_FAILED)


async def test_generation_fail_first_n_then_recovers(sim_client: httpx.AsyncClient) -> None:
    await configure(sim_client, fail_first_n=2)
    statuses = [(await generate(sim_client)).status_code for _ in range(3)]
    assert statuses == [500, 500, 200]
    assert (await sim_client.get("/_sim/stats")).json()["submits"] == 3


async def test_generation_failure_rate_is_reproducible_from_the_rng_seed(
    sim_client: httpx.AsyncClient,
) -> None:
    async def outcomes() -> list[int]:
        await sim_client.post("/_sim/reset")
        return [(await generate(sim_client)).status_code for _ in range(20)]

    await configure(sim_client, failure_rate=0.5, rng_seed=99)
    first = await outcomes()
    assert set(first) == {200, 500}
    assert await outcomes() == first


async def test_generation_bad_image_serves_non_image_bytes(sim_client: httpx.AsyncClient) -> None:
    await configure(sim_client, error_kind="bad_image")
    response = await generate(sim_client)
    assert response.status_code == 200
    image = await sim_client.get(response.json()["images"][0]["url"])
    assert image.status_code == 200
    with pytest.raises(ValueError, match="not a PNG"):
        png_size(image.content)


async def test_krea_routes_keep_their_own_error_shape(sim_client: httpx.AsyncClient) -> None:
    await generate(sim_client)  # the SiliconFlow route's handler must not leak onto Krea's
    response = await sim_client.post(MEDIUM, json={"prompt": ""}, headers=AUTH)
    assert response.status_code == 400
    assert set(response.json()) == {"error"}
