"""The simulator's Krea protocol: bearer keys, submit, poll, download, cancel."""

import asyncio
from typing import Any

import httpx
import pytest
from sim_calls import API_KEY, AUTH, MEDIUM, configure, poll, submit, submit_job

from workers.simulator.png import png_size


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}]
)
async def test_requests_without_the_right_bearer_key_get_401(
    sim_client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    job_id = await submit_job(sim_client)
    for response in (
        await sim_client.post(MEDIUM, json={"prompt": "x"}, headers=headers),
        await sim_client.get(f"/jobs/{job_id}", headers=headers),
        await sim_client.delete(f"/jobs/{job_id}", headers=headers),
    ):
        assert response.status_code == 401
        assert isinstance(response.json()["error"], str)


async def test_submit_poll_download_round_trip(sim_client: httpx.AsyncClient) -> None:
    response = await submit(sim_client, aspect_ratio="16:9", resolution="2K", seed=42)
    assert response.status_code == 200
    created = response.json()
    assert set(created) == {"job_id", "status", "created_at"}
    assert created["status"] == "queued"
    assert created["created_at"].endswith("Z")

    job = await poll(sim_client, created["job_id"])
    assert job["status"] == "completed"
    assert job["completed_at"] is not None
    assert "error" not in job
    [url] = job["result"]["urls"]
    assert url == f"http://sim.test/images/{created['job_id']}/0.png"

    image = await sim_client.get(url)  # no auth: image URLs behave like CDN links
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/png"
    assert png_size(image.content) == (2688, 1472)
    again = await sim_client.get(url)
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
    sim_client: httpx.AsyncClient, path: str, body: dict[str, Any], count: int
) -> None:
    job = await poll(sim_client, await submit_job(sim_client, path, **body))
    urls = job["result"]["urls"]
    assert len(urls) == count
    assert (await sim_client.get(urls[-1])).status_code == 200
    beyond = urls[-1].replace(f"/{count - 1}.png", f"/{count}.png")
    assert (await sim_client.get(beyond)).status_code == 404


async def test_same_prompt_and_seed_give_the_same_image(sim_client: httpx.AsyncClient) -> None:
    async def first_image(seed: int) -> bytes:
        job = await poll(sim_client, await submit_job(sim_client, seed=seed))
        return (await sim_client.get(job["result"]["urls"][0])).content

    assert await first_image(5) == await first_image(5)
    assert await first_image(5) != await first_image(6)


async def test_full_optional_body_is_accepted(sim_client: httpx.AsyncClient) -> None:
    response = await submit(
        sim_client,
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
    sim_client: httpx.AsyncClient, body: Any, field: str
) -> None:
    response = await sim_client.post(MEDIUM, json=body, headers=AUTH)
    assert response.status_code == 400
    assert field in response.json()["error"]


async def test_body_that_is_not_json_gets_400(sim_client: httpx.AsyncClient) -> None:
    response = await sim_client.post(MEDIUM, content=b"{nope", headers=AUTH)
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]


async def test_unknown_job_gets_404_everywhere(sim_client: httpx.AsyncClient) -> None:
    assert (await sim_client.get("/jobs/nope", headers=AUTH)).status_code == 404
    assert (await sim_client.delete("/jobs/nope", headers=AUTH)).status_code == 404
    response = await sim_client.get("/images/nope/0.png")
    assert response.status_code == 404
    assert "error" in response.json()


async def test_status_moves_queued_processing_completed_by_wall_clock(
    sim_client: httpx.AsyncClient,
) -> None:
    await configure(sim_client, latency=0.6)
    job_id = await submit_job(sim_client)
    job = await poll(sim_client, job_id)
    assert (job["status"], job["completed_at"]) == ("queued", None)
    assert "result" not in job
    assert (await sim_client.get(f"/images/{job_id}/0.png")).status_code == 404

    await asyncio.sleep(0.3)
    assert (await poll(sim_client, job_id))["status"] == "processing"

    await asyncio.sleep(0.4)
    job = await poll(sim_client, job_id)
    assert job["status"] == "completed"
    assert len(job["result"]["urls"]) == 1


async def test_cancel_an_active_job_then_not_again(sim_client: httpx.AsyncClient) -> None:
    await configure(sim_client, latency=5)
    job_id = await submit_job(sim_client)
    response = await sim_client.delete(f"/jobs/{job_id}", headers=AUTH)
    assert response.status_code == 200
    job = response.json()
    assert job["status"] == "cancelled"
    assert job["completed_at"] is not None
    assert (await poll(sim_client, job_id))["status"] == "cancelled"
    assert (await sim_client.delete(f"/jobs/{job_id}", headers=AUTH)).status_code == 409
    assert (await sim_client.get("/_sim/stats")).json()["jobs_active"] == 0


async def test_cancel_a_completed_job_gets_409(sim_client: httpx.AsyncClient) -> None:
    job_id = await submit_job(sim_client)
    response = await sim_client.delete(f"/jobs/{job_id}", headers=AUTH)
    assert response.status_code == 409
    assert "completed" in response.json()["error"]
