"""The simulator's unified, OpenAI and Black Forest Labs protocols, each in its own shapes."""

import asyncio
import base64
import json
import time
from typing import Any

import httpx
import pytest
from sim_calls import API_KEY, AUTH, configure, poll

from workers.simulator.png import png_size

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


async def submit_to(sim_client: httpx.AsyncClient, protocol: str, **body: Any) -> httpx.Response:
    """A submit; ``body`` overrides (or, as None, drops) the minimal fields."""
    path, minimal, headers = NEW_PROTOCOLS[protocol]
    fields = {k: v for k, v in {**minimal, **body}.items() if v is not None}
    return await sim_client.post(path, json=fields, headers=headers)


async def outcome(
    sim_client: httpx.AsyncClient, protocol: str, response: httpx.Response
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
        return "completed", [(await sim_client.get(item["url"])).content for item in items]
    assert response.status_code == 200, response.text
    if protocol == "unified":
        task = (await sim_client.get(f"/unified/v1/tasks/{body['id']}", headers=AUTH)).json()
        if task["status"] == "failed":
            return "failed", []
        assert task["status"] == "completed", task
        return "completed", [(await sim_client.get(url)).content for url in task["results"]]
    result = (await sim_client.get(body["polling_url"], headers=XKEY)).json()
    if result["status"] == "Error":
        return "failed", []
    assert result["status"] == "Ready", result
    return "completed", [(await sim_client.get(result["result"]["sample"])).content]


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
async def test_new_protocol_completes_with_pngs(
    sim_client: httpx.AsyncClient, protocol: str
) -> None:
    status, images = await outcome(sim_client, protocol, await submit_to(sim_client, protocol))
    assert status == "completed"
    assert images
    assert all(png_size(image) for image in images)
    stats = (await sim_client.get("/_sim/stats")).json()
    assert (stats["submits"], stats["image_downloads"]) == (1, len(images))


@pytest.mark.parametrize("protocol", NEW_PROTOCOLS)
async def test_new_protocol_submit_500_in_its_own_shape(
    sim_client: httpx.AsyncClient, protocol: str
) -> None:
    await configure(sim_client, error_kind="submit_500")
    response = await submit_to(sim_client, protocol)
    assert response.status_code == 500
    assert error_message(protocol, response)
    assert (await sim_client.get("/_sim/stats")).json()["jobs_active"] == 0


@pytest.mark.parametrize("protocol", NEW_PROTOCOLS)
async def test_new_protocol_submit_429_sends_retry_after(
    sim_client: httpx.AsyncClient, protocol: str
) -> None:
    await configure(sim_client, error_kind="submit_429", retry_after=7)
    response = await submit_to(sim_client, protocol)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert error_message(protocol, response)


@pytest.mark.parametrize("protocol", NEW_PROTOCOLS)
async def test_new_protocol_malformed_answers_200_that_is_not_json(
    sim_client: httpx.AsyncClient, protocol: str
) -> None:
    await configure(sim_client, error_kind="malformed")
    response = await submit_to(sim_client, protocol)
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        response.json()


@pytest.mark.parametrize("protocol", NEW_PROTOCOLS)
async def test_new_protocol_hang_delays_the_answer(
    sim_client: httpx.AsyncClient, protocol: str
) -> None:
    await configure(sim_client, error_kind="hang", hang_seconds=0.3)
    start = time.monotonic()
    response = await submit_to(sim_client, protocol)
    assert time.monotonic() - start >= 0.3
    assert response.status_code == 200


@pytest.mark.parametrize("protocol", NEW_PROTOCOLS)
async def test_new_protocol_job_failed_fails_the_generation(
    sim_client: httpx.AsyncClient, protocol: str
) -> None:
    await configure(sim_client, error_kind="job_failed")
    assert await outcome(sim_client, protocol, await submit_to(sim_client, protocol)) == (
        "failed",
        [],
    )


@pytest.mark.parametrize("protocol", NEW_PROTOCOLS)
async def test_new_protocol_fail_first_n_then_recovers(
    sim_client: httpx.AsyncClient, protocol: str
) -> None:
    await configure(sim_client, fail_first_n=2)
    statuses = [(await submit_to(sim_client, protocol)).status_code for _ in range(3)]
    assert statuses == [500, 500, 200]
    assert (await sim_client.get("/_sim/stats")).json()["submits"] == 3


@pytest.mark.parametrize("protocol", NEW_PROTOCOLS)
async def test_new_protocol_bad_image_serves_non_image_bytes(
    sim_client: httpx.AsyncClient, protocol: str
) -> None:
    await configure(sim_client, error_kind="bad_image")
    status, images = await outcome(sim_client, protocol, await submit_to(sim_client, protocol))
    assert status == "completed"
    for image in images:
        with pytest.raises(ValueError, match="not a PNG"):
            png_size(image)


@pytest.mark.parametrize("protocol", NEW_PROTOCOLS)
async def test_new_protocol_failure_rate_is_reproducible_from_the_rng_seed(
    sim_client: httpx.AsyncClient, protocol: str
) -> None:
    async def outcomes() -> list[str]:
        await sim_client.post("/_sim/reset")
        responses = [await submit_to(sim_client, protocol) for _ in range(16)]
        return [(await outcome(sim_client, protocol, response))[0] for response in responses]

    await configure(sim_client, failure_rate=0.5, rng_seed=7)
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
    sim_client: httpx.AsyncClient, protocol: str, headers: dict[str, str]
) -> None:
    path, body, _ = NEW_PROTOCOLS[protocol]
    response = await sim_client.post(path, json=body, headers=headers)
    assert response.status_code == 401
    assert error_message(protocol, response)
    assert (await sim_client.get("/_sim/stats")).json()["submits"] == 0


async def test_async_protocols_count_polls_and_move_by_wall_clock(
    sim_client: httpx.AsyncClient,
) -> None:
    await configure(sim_client, latency=0.6)
    task = (await submit_to(sim_client, "unified")).json()
    job = (await submit_to(sim_client, "bfl")).json()
    assert (task["status"], task["progress"]) == ("pending", 0)
    assert "results" not in task

    async def statuses() -> tuple[Any, ...]:
        unified = (await sim_client.get(f"/unified/v1/tasks/{task['id']}", headers=AUTH)).json()
        bfl = (await sim_client.get(job["polling_url"], headers=XKEY)).json()
        return unified["status"], unified["progress"], bfl["status"]

    assert await statuses() == ("pending", 0, "Pending")
    await asyncio.sleep(0.3)
    assert await statuses() == ("processing", 50, "Pending")
    await asyncio.sleep(0.4)
    assert await statuses() == ("completed", 100, "Ready")
    stats = (await sim_client.get("/_sim/stats")).json()
    assert (stats["submits"], stats["polls"], stats["max_jobs_active"]) == (2, 6, 2)


# Unified.


async def test_unified_task_object_is_tollgates(sim_client: httpx.AsyncClient) -> None:
    response = await submit_to(sim_client, "unified", size="16:9", quality="2K", n=2, seed=4)
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
        assert png_size((await sim_client.get(url)).content) == (2688, 1472)


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
    sim_client: httpx.AsyncClient, body: dict[str, Any], count: int, size: tuple[int, int]
) -> None:
    status, images = await outcome(
        sim_client, "unified", await submit_to(sim_client, "unified", **body)
    )
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
    sim_client: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    response = await submit_to(sim_client, "unified", **body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"
    assert field in error_message("unified", response)


async def test_unified_cancel_then_not_again_and_unknown_tasks_404(
    sim_client: httpx.AsyncClient,
) -> None:
    await configure(sim_client, latency=5)
    task_id = (await submit_to(sim_client, "unified")).json()["id"]
    response = await sim_client.post(f"/unified/v1/tasks/{task_id}/cancel", headers=AUTH)
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    again = await sim_client.post(f"/unified/v1/tasks/{task_id}/cancel", headers=AUTH)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "conflict"
    for response in (
        await sim_client.get("/unified/v1/tasks/nope", headers=AUTH),
        await sim_client.post("/unified/v1/tasks/nope/cancel", headers=AUTH),
    ):
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
    assert (await sim_client.get("/_sim/stats")).json()["jobs_active"] == 0


async def test_unified_failed_task_carries_an_error_object(sim_client: httpx.AsyncClient) -> None:
    await configure(sim_client, error_kind="job_failed")
    task = (await submit_to(sim_client, "unified")).json()
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
    sim_client: httpx.AsyncClient, body: dict[str, Any], size: tuple[int, int], count: int
) -> None:
    response = await submit_to(sim_client, "openai", **body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert set(answer) == {"created", "data"}
    assert all(set(item) == {"b64_json"} for item in answer["data"])
    _, images = await outcome(sim_client, "openai", response)
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
    sim_client: httpx.AsyncClient, body: dict[str, Any], inline: bool, size: tuple[int, int]
) -> None:
    response = await submit_to(sim_client, "openai", **body)
    assert response.status_code == 200, response.text
    [item] = response.json()["data"]
    assert ("b64_json" in item) == inline
    assert ("url" in item) != inline
    assert ("revised_prompt" in item) == (body["model"] == "dall-e-3")
    if not inline:
        assert item["url"].startswith("http://sim.test/images/")
    _, [image] = await outcome(sim_client, "openai", response)
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
    sim_client: httpx.AsyncClient, body: dict[str, Any], param: str, code: str | None
) -> None:
    response = await submit_to(sim_client, "openai", **body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert param in error["message"]


async def test_openai_answers_after_the_latency_with_requests_in_flight_counted(
    sim_http: httpx.AsyncClient,
) -> None:
    sim_client = sim_http
    await configure(sim_client, latency=0.3)
    start = time.monotonic()
    responses = await asyncio.gather(*(submit_to(sim_client, "openai") for _ in range(3)))
    assert time.monotonic() - start >= 0.3
    assert [response.status_code for response in responses] == [200, 200, 200]
    stats = (await sim_client.get("/_sim/stats")).json()
    assert (stats["submits"], stats["jobs_active"], stats["max_jobs_active"]) == (3, 0, 3)
    assert stats["image_downloads"] == 3


async def test_openai_failed_generation_is_a_server_error(sim_client: httpx.AsyncClient) -> None:
    await configure(sim_client, error_kind="job_failed")
    response = await submit_to(sim_client, "openai")
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"


# Black Forest Labs.


async def test_bfl_submit_answers_an_id_and_a_polling_url_then_the_sample(
    sim_client: httpx.AsyncClient,
) -> None:
    response = await submit_to(
        sim_client, "bfl", width=1440, height=256, seed=3, output_format="png"
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert set(job) == {"id", "polling_url"}
    assert job["polling_url"] == f"http://sim.test/bfl/v1/get_result?id={job['id']}"
    result = (await sim_client.get(job["polling_url"], headers=XKEY)).json()
    assert set(result) == {"id", "status", "result", "progress"}
    assert (result["id"], result["status"]) == (job["id"], "Ready")
    assert result["result"]["seed"] == 3
    image = await sim_client.get(result["result"]["sample"])
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
    sim_client: httpx.AsyncClient, path: str, body: dict[str, Any], size: tuple[int, int]
) -> None:
    response = await sim_client.post(path, json={"prompt": "a lighthouse", **body}, headers=XKEY)
    status, [image] = await outcome(sim_client, "bfl", response)
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
    sim_client: httpx.AsyncClient, path: str, body: dict[str, Any], field: str
) -> None:
    fields = {k: v for k, v in {"prompt": "x", **body}.items() if v is not None}
    response = await sim_client.post(path, json=fields, headers=XKEY)
    assert response.status_code == 400
    assert field in error_message("bfl", response)


async def test_bfl_unknown_model_and_unknown_job_get_404(sim_client: httpx.AsyncClient) -> None:
    response = await sim_client.post("/bfl/v1/flux-pro-9", json={"prompt": "x"}, headers=XKEY)
    assert response.status_code == 404
    assert "flux-pro-9" in error_message("bfl", response)
    unknown = await sim_client.get("/bfl/v1/get_result?id=nope", headers=XKEY)
    assert unknown.status_code == 404
    assert unknown.json()["status"] == "Task not found"
    missing = await sim_client.get("/bfl/v1/get_result", headers=XKEY)
    assert missing.status_code == 400


async def test_bfl_failed_job_reports_error(sim_client: httpx.AsyncClient) -> None:
    await configure(sim_client, error_kind="job_failed")
    job = (await submit_to(sim_client, "bfl")).json()
    result = (await sim_client.get(job["polling_url"], headers=XKEY)).json()
    assert (result["status"], result["result"]) == ("Error", None)


async def test_new_protocols_share_the_store_with_krea(sim_client: httpx.AsyncClient) -> None:
    await configure(sim_client, latency=5)
    task_id = (await submit_to(sim_client, "unified")).json()["id"]
    # A job is a job: Krea's poll sees the unified task too.
    assert (await poll(sim_client, task_id))["status"] == "queued"
    assert (await sim_client.get("/_sim/stats")).json()["jobs_active"] == 1
