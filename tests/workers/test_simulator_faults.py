"""The simulator's knobs and faults: runtime config, failing and hanging submits, stats."""

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from sim_calls import AUTH, GENERATIONS, MEDIUM, configure, poll, submit, submit_job

from workers.simulator.png import png_size


async def test_config_reads_and_changes_at_runtime(sim_client: httpx.AsyncClient) -> None:
    config = (await sim_client.get("/_sim/config")).json()
    assert config["latency"] == 0.0
    assert config["error_kind"] == "none"
    assert config["images_per_model"] == {"krea/krea-2/turbo": 4, "krea/krea-1": 4}
    assert "api_key" not in config

    changed = await configure(sim_client, latency=1, failure_rate=0.25, retry_after=3)
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
    sim_client: httpx.AsyncClient, changes: dict[str, Any]
) -> None:
    before = (await sim_client.get("/_sim/config")).json()
    response = await sim_client.post("/_sim/config", json={"latency": 2, **changes})
    assert response.status_code == 400
    assert next(iter(changes)) in response.json()["error"]
    assert (await sim_client.get("/_sim/config")).json() == before


async def test_submit_500(sim_client: httpx.AsyncClient) -> None:
    await configure(sim_client, error_kind="submit_500")
    response = await submit(sim_client)
    assert response.status_code == 500
    assert "error" in response.json()


async def test_submit_400_refuses_the_request_and_makes_no_job(
    sim_client: httpx.AsyncClient,
) -> None:
    await configure(sim_client, error_kind="submit_400")
    response = await submit(sim_client)
    assert response.status_code == 400
    assert "error" in response.json()
    assert (await sim_client.get("/_sim/stats")).json()["jobs_active"] == 0


async def test_submit_429_sends_retry_after(sim_client: httpx.AsyncClient) -> None:
    await configure(sim_client, error_kind="submit_429", retry_after=7)
    response = await submit(sim_client)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"


async def test_malformed_submit_answers_200_with_a_body_that_is_not_json(
    sim_client: httpx.AsyncClient,
) -> None:
    await configure(sim_client, error_kind="malformed")
    response = await submit(sim_client)
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        response.json()


async def test_hang_delays_the_submit_answer(sim_client: httpx.AsyncClient) -> None:
    await configure(sim_client, error_kind="hang", hang_seconds=0.3)
    start = time.monotonic()
    response = await submit(sim_client)
    assert time.monotonic() - start >= 0.3
    assert response.status_code == 200


async def test_job_failed_makes_every_job_fail(sim_client: httpx.AsyncClient) -> None:
    await configure(sim_client, error_kind="job_failed")
    job = await poll(sim_client, await submit_job(sim_client))
    assert job["status"] == "failed"
    assert job["error"]["message"]
    assert job["completed_at"] is not None
    assert "result" not in job


async def test_bad_image_serves_non_image_bytes_as_png(sim_client: httpx.AsyncClient) -> None:
    job = await poll(sim_client, await submit_job(sim_client))
    await configure(sim_client, error_kind="bad_image")
    response = await sim_client.get(job["result"]["urls"][0])
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    with pytest.raises(ValueError, match="not a PNG"):
        png_size(response.content)


async def test_submit_403_refuses_the_account_and_makes_no_job(
    sim_client: httpx.AsyncClient,
) -> None:
    await configure(sim_client, error_kind="submit_403")
    response = await submit(sim_client)
    assert response.status_code == 403
    assert "error" in response.json()
    assert (await sim_client.get("/_sim/stats")).json()["jobs_active"] == 0


@pytest.mark.parametrize("path", [MEDIUM, GENERATIONS, "/unified/v1/images/generations"])
async def test_html_400_answers_a_proxy_page_outside_every_protocol(
    sim_client: httpx.AsyncClient, path: str
) -> None:
    await configure(sim_client, error_kind="html_400")
    response = await sim_client.post(path, json={"prompt": "x"}, headers=AUTH)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("text/html")
    assert b"Bad request syntax" in response.content
    assert (await sim_client.get("/_sim/stats")).json()["jobs_active"] == 0


async def test_redirect_answers_302_elsewhere(sim_client: httpx.AsyncClient) -> None:
    await configure(sim_client, error_kind="redirect")
    response = await sim_client.post(
        MEDIUM, json={"prompt": "x"}, headers=AUTH, follow_redirects=False
    )
    assert response.status_code == 302
    assert response.headers["location"].startswith("https://elsewhere.invalid/")


async def test_huge_body_streams_a_json_object_of_the_configured_size(
    sim_client: httpx.AsyncClient,
) -> None:
    await configure(sim_client, error_kind="huge_body", huge_body_bytes=300_000)
    response = await submit(sim_client)
    assert response.status_code == 200
    assert len(response.content) == 300_000
    assert set(response.json()) == {"padding"}


async def test_wrong_size_renders_images_at_another_size(sim_client: httpx.AsyncClient) -> None:
    await configure(sim_client, error_kind="wrong_size")
    job = await poll(sim_client, await submit_job(sim_client, aspect_ratio="16:9", resolution="2K"))
    image = await sim_client.get(job["result"]["urls"][0])
    assert png_size(image.content) == (1024, 768)


async def test_slow_poll_delays_every_poll(sim_client: httpx.AsyncClient) -> None:
    job_id = await submit_job(sim_client)
    await configure(sim_client, error_kind="slow_poll", hang_seconds=0.3)
    start = time.monotonic()
    await poll(sim_client, job_id)
    assert time.monotonic() - start >= 0.3


@pytest.mark.parametrize(
    ("path", "method"), [("/jobs/{}", "DELETE"), ("/unified/v1/tasks/{}/cancel", "POST")]
)
async def test_cancel_ignored_answers_200_with_the_job_still_running(
    sim_client: httpx.AsyncClient, path: str, method: str
) -> None:
    await configure(sim_client, latency=5)
    if method == "DELETE":
        job_id = await submit_job(sim_client)
    else:
        created = await sim_client.post(
            "/unified/v1/images/generations", json={"model": "m", "prompt": "x"}, headers=AUTH
        )
        job_id = created.json()["id"]
    await configure(sim_client, error_kind="cancel_ignored")
    response = await sim_client.request(method, path.format(job_id), headers=AUTH)
    assert response.status_code == 200
    assert response.json()["status"] in ("queued", "pending")
    stats = (await sim_client.get("/_sim/stats")).json()
    assert (stats["cancels"], stats["jobs_active"]) == (1, 1)


async def test_fail_first_n_fails_that_many_submits_then_recovers(
    sim_client: httpx.AsyncClient,
) -> None:
    await configure(sim_client, fail_first_n=2)
    statuses = [(await submit(sim_client)).status_code for _ in range(3)]
    assert statuses == [500, 500, 200]
    assert (await sim_client.get("/_sim/config")).json()["fail_first_n"] == 0


async def test_failure_rate_is_reproducible_from_the_rng_seed(
    sim_client: httpx.AsyncClient,
) -> None:
    async def outcomes() -> list[str]:
        await sim_client.post("/_sim/reset")
        job_ids = [await submit_job(sim_client) for _ in range(20)]
        return [(await poll(sim_client, job_id))["status"] for job_id in job_ids]

    await configure(sim_client, failure_rate=0.5, rng_seed=1234)
    first = await outcomes()
    assert set(first) == {"completed", "failed"}
    assert await outcomes() == first
    await configure(sim_client, failure_rate=1.0)
    assert set(await outcomes()) == {"failed"}


async def test_jobs_without_a_seed_replay_the_same_images_after_reset(
    sim_client: httpx.AsyncClient,
) -> None:
    async def first_image() -> bytes:
        await sim_client.post("/_sim/reset")
        job = await poll(sim_client, await submit_job(sim_client))
        return (await sim_client.get(job["result"]["urls"][0])).content

    assert await first_image() == await first_image()


async def test_stats_count_traffic_and_the_high_water_mark(sim_client: httpx.AsyncClient) -> None:
    await configure(sim_client, latency=0.4)
    job_ids = [await submit_job(sim_client) for _ in range(3)]
    await sim_client.post(MEDIUM, json={"prompt": "x"})  # unauthenticated: not a submit
    await sim_client.delete(f"/jobs/{job_ids[0]}", headers=AUTH)
    stats = (await sim_client.get("/_sim/stats")).json()
    assert stats == {
        "submits": 3,
        "polls": 0,
        "jobs_active": 2,
        "max_jobs_active": 3,
        "image_downloads": 0,
        "cancels": 1,
        "connections": 1,
    }

    await asyncio.sleep(0.45)
    job = await poll(sim_client, job_ids[1])
    await sim_client.get(job["result"]["urls"][0])
    stats = (await sim_client.get("/_sim/stats")).json()
    assert (stats["jobs_active"], stats["max_jobs_active"]) == (0, 3)
    assert (stats["polls"], stats["image_downloads"]) == (1, 1)

    reset = await sim_client.post("/_sim/reset")
    assert reset.status_code == 200
    assert set(reset.json().values()) == {0}
    assert (await sim_client.get(f"/jobs/{job_ids[1]}", headers=AUTH)).status_code == 404
