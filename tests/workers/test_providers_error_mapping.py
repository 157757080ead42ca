"""The provider adapters' error tree against canned upstream answers (``httpx.MockTransport``):
every failure in our words, never the upstream's URL or key."""

import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from conftest import SIM_KEY, Sim
from provider_calls import (
    API_KEY,
    DEFAULTS,
    PREFIXES,
    SECRET_BASE,
    SECRET_HOST,
    assert_in_our_words,
    default_call,
    entry,
    provider,
    request_for,
)

from pricing.request import ImageRequest
from workers.providers import ADAPTERS
from workers.providers.base import (
    Endpoint,
    Provider,
    UpstreamBadResult,
    UpstreamCredentialsRefused,
    UpstreamError,
    UpstreamNotFound,
    UpstreamProtocolError,
    UpstreamRejected,
    UpstreamUnavailable,
)

Answer = Callable[[httpx.Request], httpx.Response]


def echoing(status: int, **kwargs: Any) -> Answer:
    """An answer whose body repeats the URL and the key, as careless upstreams do."""

    def answer(request: httpx.Request) -> httpx.Response:
        key = request.headers.get("authorization") or request.headers.get("x-key")
        text = f"{request.method} {request.url} {key}"
        if "content" in kwargs or "json" in kwargs:
            return httpx.Response(status, **kwargs)
        body = {"error": text, "code": status * 100, "message": text}
        return httpx.Response(status, json=body, **kwargs)

    return answer


def raising(kind: type[httpx.TransportError]) -> Answer:
    def answer(request: httpx.Request) -> httpx.Response:
        raise kind(f"{kind.__name__} talking to {request.url}", request=request)

    return answer


BFL_POLLING_URL = f"{SECRET_BASE}/v1/get_result?id=job-1"
CALLS: dict[str, tuple[str, Callable[[Provider], Awaitable[Any]]]] = {
    "krea submit": ("krea", default_call("krea")),
    "krea poll": ("krea", lambda adapter: adapter.poll("job-1")),
    "krea cancel": ("krea", lambda adapter: adapter.cancel("job-1")),
    "siliconflow submit": ("siliconflow", default_call("siliconflow")),
    "unified submit": ("unified", default_call("unified")),
    "unified poll": ("unified", lambda adapter: adapter.poll("task-1")),
    "unified cancel": ("unified", lambda adapter: adapter.cancel("task-1")),
    "openai submit": ("openai", default_call("openai")),
    "bfl submit": ("bfl", default_call("bfl")),
    "bfl poll": ("bfl", lambda adapter: adapter.poll(BFL_POLLING_URL)),
}


class ProtocolError:
    """An error in the calling protocol's own shape, echoing the URL and the key."""

    def __init__(self, status: int) -> None:
        self.status = status

    def answer(self, name: str) -> Answer:
        def answer(request: httpx.Request) -> httpx.Response:
            text = f"{request.url} {request.headers.get('authorization')}"
            return httpx.Response(self.status, json=ERROR_SHAPES[name](text))

        return answer


ERROR_SHAPES: dict[str, Callable[[str], dict[str, Any]]] = {
    "krea": lambda text: {"error": text},
    "siliconflow": lambda text: {"code": 20012, "message": text, "data": None},
    "unified": lambda text: {"error": {"code": "x", "message": text, "type": "invalid_request"}},
    "openai": lambda text: {"error": {"message": text, "type": "x", "param": None, "code": None}},
    "bfl": lambda text: {"detail": text},
}
HTML_400 = b"<html><body><h1>400</h1><p>Bad request syntax</p></body></html>"

FAILURES: dict[str, tuple[Answer | ProtocolError, type[UpstreamError], float | None]] = {
    "500": (echoing(500), UpstreamUnavailable, None),
    "503": (echoing(503), UpstreamUnavailable, None),
    "429 with Retry-After": (
        echoing(429, headers={"Retry-After": "7"}),
        UpstreamUnavailable,
        7.0,
    ),
    "429 without Retry-After": (echoing(429), UpstreamUnavailable, None),
    "429 with a date as Retry-After": (
        echoing(429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),
        UpstreamUnavailable,
        None,
    ),
    "401": (echoing(401), UpstreamCredentialsRefused, None),
    "403": (echoing(403), UpstreamCredentialsRefused, None),
    "400 in the protocol's error shape": (ProtocolError(400), UpstreamRejected, None),
    "409 in the protocol's error shape": (ProtocolError(409), UpstreamRejected, None),
    "422 in the protocol's error shape": (ProtocolError(422), UpstreamRejected, None),
    "400 as an HTML page": (
        echoing(400, content=HTML_400, headers={"content-type": "text/html"}),
        UpstreamUnavailable,
        None,
    ),
    "400 as JSON of another shape": (
        echoing(400, json={"oops": [SECRET_BASE, API_KEY]}),
        UpstreamUnavailable,
        None,
    ),
    "400 as an error body past the limit": (
        echoing(400, json={"error": "x" * 70_000, "detail": "x", "code": 1, "message": "x"}),
        UpstreamUnavailable,
        None,
    ),
    "404": (echoing(404), UpstreamNotFound, None),
    "410": (echoing(410), UpstreamNotFound, None),
    "405": (echoing(405), UpstreamUnavailable, None),
    "302": (
        echoing(302, content=b"", headers={"location": f"{SECRET_BASE}/moved"}),
        UpstreamProtocolError,
        None,
    ),
    "200 past the body cap": (
        echoing(200, json={"padding": "x" * 1_100_000}),
        UpstreamProtocolError,
        None,
    ),
    "200 that is not JSON": (
        echoing(200, content=f"<html>{SECRET_BASE} {API_KEY}".encode()),
        UpstreamProtocolError,
        None,
    ),
    "200 with a JSON array": (
        echoing(200, json=[SECRET_BASE, API_KEY]),
        UpstreamProtocolError,
        None,
    ),
    "read timeout": (raising(httpx.ReadTimeout), UpstreamUnavailable, None),
    "connect timeout": (raising(httpx.ConnectTimeout), UpstreamUnavailable, None),
    "connect error": (raising(httpx.ConnectError), UpstreamUnavailable, None),
    "connection dropped": (raising(httpx.RemoteProtocolError), UpstreamUnavailable, None),
}


@pytest.mark.parametrize("call", [call for call in CALLS if call != "unified cancel"])
@pytest.mark.parametrize("failure", FAILURES)
async def test_upstream_failure_maps_to_the_error_tree_without_url_or_key(
    call: str, failure: str
) -> None:
    name, make_call = CALLS[call]
    canned, error, retry_after = FAILURES[failure]
    answer = canned.answer(name) if isinstance(canned, ProtocolError) else canned
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        with pytest.raises(error) as raised:
            # A small image cap, so OpenAI's inline-image body cap stays near the others.
            await make_call(provider(name, http, base=SECRET_BASE, max_image_bytes=1024))
    assert type(raised.value) is error
    assert raised.value.retryable == (error is not UpstreamRejected)
    assert raised.value.retry_after == retry_after
    assert raised.value.opens_circuit == (error is UpstreamCredentialsRefused)
    assert_in_our_words(raised.value)
    if failure == "302":
        assert raised.value.message.endswith("a redirect, not followed (HTTP 302)")
    if "past" in failure and "cap" in failure:
        assert "sent a body larger than" in raised.value.message


@pytest.mark.parametrize(
    ("call", "body"),
    [
        ("krea submit", {"status": "queued"}),
        ("krea submit", {"job_id": ""}),
        ("krea poll", {"job_id": "job-1", "status": "exploded"}),
        ("krea poll", {"job_id": "job-1", "status": "completed"}),
        ("krea poll", {"job_id": "job-1", "status": "completed", "result": {"urls": []}}),
        ("krea poll", {"job_id": "job-1", "status": "completed", "result": {"urls": [1]}}),
        ("siliconflow submit", {"data": [{"url": "https://x/0.png"}]}),
        ("siliconflow submit", {"images": []}),
        ("siliconflow submit", {"images": [{"b64_json": "AAAA"}]}),
        ("siliconflow submit", {"images": ["https://x/0.png"]}),
        ("unified submit", {"status": "pending"}),
        ("unified submit", {"id": 7}),
        ("unified submit", {"id": "../../admin"}),
        ("unified submit", {"id": "task 1"}),
        ("unified poll", {"id": "task-1", "status": "exploded"}),
        ("unified poll", {"id": "task-1", "status": "completed"}),
        ("unified poll", {"id": "task-1", "status": "completed", "results": []}),
        ("unified poll", {"id": "task-1", "status": "completed", "results": [None]}),
        ("openai submit", {"images": [{"url": "https://x/0.png"}]}),
        ("openai submit", {"data": []}),
        ("openai submit", {"data": [{"revised_prompt": "x"}]}),
        ("openai submit", {"data": ["https://x/0.png"]}),
        ("openai submit", {"data": [{"b64_json": "not base64!"}]}),
        ("openai submit", {"data": [{"b64_json": ""}]}),
        ("bfl submit", {"status": "Pending"}),
        ("bfl submit", {"id": ""}),
        ("bfl submit", {"id": "job-1", "polling_url": 5}),
        ("bfl poll", {"id": "job-1", "status": "Exploded"}),
        ("bfl poll", {"id": "job-1", "status": "Ready"}),
        ("bfl poll", {"id": "job-1", "status": "Ready", "result": {"sample": ""}}),
        ("bfl poll", {"id": "job-1", "status": "Ready", "result": "https://x/0.png"}),
    ],
)
async def test_json_that_breaks_the_protocol_is_a_protocol_error(
    call: str, body: dict[str, Any]
) -> None:
    name, make_call = CALLS[call]
    async with httpx.AsyncClient(transport=httpx.MockTransport(echoing(200, json=body))) as http:
        with pytest.raises(UpstreamProtocolError) as raised:
            await make_call(provider(name, http, base=SECRET_BASE))
    assert_in_our_words(raised.value)


@pytest.mark.parametrize(
    ("call", "method", "path"),
    [
        ("krea submit", "POST", "/api/generate/image/krea/krea-2/medium"),
        ("krea poll", "GET", "/api/jobs/job-1"),
        ("krea cancel", "DELETE", "/api/jobs/job-1"),
        ("siliconflow submit", "POST", "/api/v1/images/generations"),
        ("unified submit", "POST", "/api/v1/images/generations"),
        ("unified poll", "GET", "/api/v1/tasks/task-1"),
        ("unified cancel", "POST", "/api/v1/tasks/task-1/cancel"),
        ("openai submit", "POST", "/api/v1/images/generations"),
        ("bfl submit", "POST", "/api/v1/flux-pro-1.1"),
        ("bfl poll", "GET", "/api/v1/get_result"),
    ],
)
async def test_calls_go_under_the_account_base_url_with_its_key(
    call: str, method: str, path: str
) -> None:
    name, make_call = CALLS[call]
    seen: list[httpx.Request] = []
    ok = {
        "job_id": "job-1",
        "id": "task-1",
        "polling_url": BFL_POLLING_URL,
        "status": "Pending" if name == "bfl" else "cancelled",
        "images": [{"url": "https://cdn.test/0.png"}],
        "data": [{"url": "https://cdn.test/0.png"}],
    }

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=ok)

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        await make_call(provider(name, http, base=SECRET_BASE))
    [request] = seen
    assert (request.method, request.url.host, request.url.path) == (method, SECRET_HOST, path)
    if name == "bfl":
        assert request.headers["x-key"] == API_KEY
        assert "authorization" not in request.headers
    else:
        assert request.headers["authorization"] == f"Bearer {API_KEY}"


async def test_siliconflow_body_carries_the_resolved_request() -> None:
    bodies: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        return httpx.Response(200, json={"images": [{"url": "https://cdn.test/0.png"}]})

    request = request_for(
        "stable-diffusion-3-5-large",
        size="512x768",
        n=2,
        num_inference_steps=30,
        seed=77,
        prompt_enhancement=True,
        negative_prompt="boats",
    )
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        await provider("siliconflow", http, base=SECRET_BASE).submit(
            "stabilityai/stable-diffusion-3-5-large", request
        )
    assert json.loads(bodies[0]) == {
        "model": "stabilityai/stable-diffusion-3-5-large",
        "prompt": "a lighthouse at dusk",
        "image_size": "512x768",
        "batch_size": 2,
        "num_inference_steps": 30,
        "negative_prompt": "boats",
        "prompt_enhancement": True,
        "seed": 77,
    }


async def sent_body(name: str, upstream_model: str, request: ImageRequest) -> dict[str, Any]:
    """The JSON body ``name``'s adapter submits for ``request``."""
    bodies: list[dict[str, Any]] = []

    def answer(sent: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(sent.content))
        return httpx.Response(
            200, json={"id": "task-1", "polling_url": BFL_POLLING_URL, "data": [{"url": "u"}]}
        )

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        await provider(name, http, base=SECRET_BASE).submit(upstream_model, request)
    [body] = bodies
    return body


async def test_unified_body_is_the_request_in_the_unified_words_without_callback() -> None:
    request = request_for("krea-2-medium", size="4:5", seed=3, moodboards=["mb"])
    # A callback_url that reached the params by mistake still never leaves.
    request = ImageRequest(
        **{**request.to_json(), "params": {**request.params, "callback_url": "https://t.test/"}}
    )
    assert await sent_body("unified", "krea-2-medium", request) == {
        "model": "krea-2-medium",
        "prompt": "a lighthouse at dusk",
        "size": "4:5",
        "quality": "1K",
        "seed": 3,
        "nsfw_check": False,
        "creativity": "medium",
        "moodboards": ["mb"],
        "intensity": 0,
        "complexity": 0,
        "movement": 0,
    }
    wxh = await sent_body("unified", "flux-1-dev", request_for("flux-1-dev", size="512x256", n=2))
    assert wxh["size"] == "512x256"
    assert "quality" not in wxh
    assert (wxh["n"], wxh["num_inference_steps"]) == (2, 20)


async def test_openai_body_asks_for_the_catalogue_pixels_and_quality_only() -> None:
    request = request_for("chatgpt-image", size="3:2", quality="low")
    # No response_format: GPT image models refuse it, and both answers are read.
    assert await sent_body("openai", "gpt-image-1", request) == {
        "model": "gpt-image-1",
        "prompt": "a lighthouse at dusk",
        "n": 2,
        "size": "1536x1024",
        "quality": "low",
    }


@pytest.mark.parametrize(
    ("model_id", "fields", "expected"),
    [
        (
            "flux-1-1-pro",
            {"size": "16:9", "seed": 9, "prompt_enhancement": True, "nsfw_check": True},
            {
                "width": 1344,
                "height": 768,
                "seed": 9,
                "prompt_upsampling": True,
                "safety_tolerance": 0,
            },
        ),
        (
            "flux-1-1-pro-ultra",
            {"size": "21:9", "seed": 0},
            {"aspect_ratio": "21:9", "prompt_upsampling": False},
        ),
    ],
)
async def test_bfl_body_sends_the_size_in_the_form_the_catalogue_names(
    model_id: str, fields: dict[str, Any], expected: dict[str, Any]
) -> None:
    body = await sent_body("bfl", entry(model_id).upstream_model, request_for(model_id, **fields))
    assert body == {"prompt": "a lighthouse at dusk", "output_format": "png", **expected}


@pytest.mark.parametrize(
    ("answer", "status", "error"),
    [
        ({"status": "Pending", "progress": 0.4}, "processing", None),
        ({"status": "Error"}, "failed", "the upstream could not generate the image"),
        ({"status": "Failed"}, "failed", "the upstream could not generate the image"),
        ({"status": "Request Moderated"}, "failed", "the upstream's moderation refused the prompt"),
        ({"status": "Content Moderated"}, "failed", "the upstream's moderation withheld the image"),
    ],
)
async def test_bfl_statuses_map_to_job_states_in_our_words(
    answer: dict[str, Any], status: str, error: str | None
) -> None:
    body = {"id": "job-1", "result": None, "details": {"raw": SECRET_BASE}, **answer}
    async with httpx.AsyncClient(transport=httpx.MockTransport(echoing(200, json=body))) as http:
        state = await provider("bfl", http, base=SECRET_BASE).poll(BFL_POLLING_URL)
    assert (state.status, state.error) == (status, error)


async def test_bfl_task_not_found_is_unavailable_as_a_404_would_be() -> None:
    body = {"id": "job-1", "status": "Task not found"}
    async with httpx.AsyncClient(transport=httpx.MockTransport(echoing(200, json=body))) as http:
        with pytest.raises(UpstreamUnavailable, match="no longer knows the job") as raised:
            await provider("bfl", http, base=SECRET_BASE).poll(BFL_POLLING_URL)
    assert_in_our_words(raised.value)


async def test_bfl_ready_job_gives_its_sample_link() -> None:
    body = {"id": "job-1", "status": "Ready", "result": {"sample": "https://cdn.test/s.png"}}
    async with httpx.AsyncClient(transport=httpx.MockTransport(echoing(200, json=body))) as http:
        state = await provider("bfl", http, base=SECRET_BASE).poll(BFL_POLLING_URL)
    assert (state.status, state.urls) == ("completed", ("https://cdn.test/s.png",))


@pytest.mark.parametrize(
    "polling_url",
    [
        "https://evil.example/v1/get_result?id=job-1",
        f"http://{SECRET_HOST}:8443/api/v1/get_result?id=job-1",  # another scheme
        f"https://{SECRET_HOST}/api/v1/get_result?id=job-1",  # another port
        f"https://{SECRET_HOST}.evil.example:8443/v1/get_result?id=job-1",
        f"https://{SECRET_HOST}:8443@evil.example/v1/get_result?id=job-1",
        "/v1/get_result?id=job-1",
        "",
    ],
)
async def test_bfl_polling_url_off_the_channel_host_is_refused_and_never_called(
    polling_url: str,
) -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"id": "job-1", "polling_url": polling_url})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        adapter = provider("bfl", http, base=SECRET_BASE)
        with pytest.raises(UpstreamBadResult) as at_submit:
            await adapter.submit("flux-pro-1.1", request_for("flux-1-1-pro"))
        with pytest.raises(UpstreamBadResult) as at_poll:
            await adapter.poll(polling_url)
    # Only the submit went out: the key never travels to another host.
    assert [request.url.path for request in seen] == ["/api/v1/flux-pro-1.1"]
    for raised in (at_submit, at_poll):
        # Not the request's fault: routing tries another channel, never this one again.
        assert not raised.value.retryable
        assert raised.value.try_elsewhere
        assert_in_our_words(raised.value)
        assert "evil" not in raised.value.message


async def test_bfl_answer_without_polling_url_is_polled_on_the_base_url() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"id": "job/1"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        submitted = await provider("bfl", http, base=SECRET_BASE).submit(
            "flux-pro-1.1", request_for("flux-1-1-pro")
        )
    assert submitted.job_id == f"{SECRET_BASE}/v1/get_result?id=job%2F1"


@pytest.mark.parametrize(
    ("answer", "error", "retry_after"),
    [
        # No cancel route (404, 405), or a task already final (409): it cannot cancel.
        (echoing(404), UpstreamRejected, None),
        (echoing(405), UpstreamRejected, None),
        (echoing(409), UpstreamRejected, None),
        (echoing(400), UpstreamRejected, None),
        (echoing(429, headers={"Retry-After": "7"}), UpstreamUnavailable, 7.0),
        (echoing(500), UpstreamUnavailable, None),
        (echoing(401), UpstreamCredentialsRefused, None),
        (echoing(302, content=b""), UpstreamProtocolError, None),
        # A 2xx is a cancel only when the task object shows it cancelled.
        (echoing(200, json={"id": "task-1", "status": "processing"}), UpstreamUnavailable, None),
        (echoing(200, json={"id": "task-1", "status": "pending"}), UpstreamUnavailable, None),
        (echoing(200, content=b""), UpstreamUnavailable, None),
        (echoing(200, content=b"<html>ok</html>"), UpstreamUnavailable, None),
        (echoing(200, json={"id": "task-1", "status": "completed"}), UpstreamRejected, None),
        (raising(httpx.ReadTimeout), UpstreamUnavailable, None),
        (raising(httpx.ConnectError), UpstreamUnavailable, None),
    ],
)
async def test_unified_cancel_maps_its_answers_in_our_words(
    answer: Answer, error: type[UpstreamError], retry_after: float | None
) -> None:
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        with pytest.raises(error) as raised:
            await provider("unified", http, base=SECRET_BASE).cancel("task-1")
    assert type(raised.value) is error
    assert raised.value.retry_after == retry_after
    assert_in_our_words(raised.value)
    if error is UpstreamRejected:
        assert "cannot cancel" in raised.value.message or "refused" in raised.value.message


@pytest.mark.parametrize("name", ["krea", "unified"])
async def test_cancel_succeeds_only_when_the_job_shows_cancelled(name: str) -> None:
    answer = echoing(200, json={"job_id": "j", "id": "j", "status": "cancelled"})
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        await provider(name, http, base=SECRET_BASE).cancel("j")


@pytest.mark.parametrize("name", ["krea", "unified"])
async def test_a_cancel_answered_200_with_the_job_still_running_is_not_a_cancel(
    simulator: Sim, name: str
) -> None:
    await simulator.configure(latency=30)
    upstream_model, model_id = DEFAULTS[name]
    async with httpx.AsyncClient() as http:
        adapter = ADAPTERS[name](http, Endpoint(simulator.url + PREFIXES[name], SIM_KEY))
        submitted = await adapter.submit(upstream_model, request_for(model_id))
        assert submitted.job_id is not None
        await simulator.configure(error_kind="cancel_ignored")
        with pytest.raises(UpstreamUnavailable, match="did not confirm the cancel"):
            await adapter.cancel(submitted.job_id)
        await simulator.configure(error_kind="none")
        await adapter.cancel(submitted.job_id)
        assert (await adapter.poll(submitted.job_id)).status == "cancelled"
    assert (await simulator.stats())["cancels"] == 2


async def test_unified_task_id_is_escaped_in_the_path() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"status": "pending"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        await provider("unified", http, base=SECRET_BASE).poll("a/../b")
    assert seen[0].url.raw_path == b"/api/v1/tasks/a%2F..%2Fb"
