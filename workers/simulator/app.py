"""A simulated image upstream, jobs kept in memory, speaking five protocols at once.

Krea 2 async jobs are described here, at the root. The others live under their own modules,
each a wire format over the shared core (``workers.simulator.core``: job store, knobs,
counters, the rules every protocol follows):

- SiliconFlow-style synchronous generation, ``POST /v1/images/generations``
  (``workers.simulator.siliconflow``);
- the unified API of seeds/002, as Tollgate serves it, under ``/unified``
  (``workers.simulator.unified``);
- OpenAI Images, synchronous, under ``/openai`` (``workers.simulator.openai``);
- Black Forest Labs, submit then poll a ``polling_url``, under ``/bfl``
  (``workers.simulator.bfl``).

A channel's base URL includes the prefix (``http://127.0.0.1:8100/openai``). Every protocol
shares the image route below, the knobs and the counters. Adding one is a module with its wire
format and a ``router(sim)``, registered in ``create_simulator_app``.

Krea wire protocol (every error body is ``{"error": "<message>"}``):

``POST /generate/image/{model_path}``, ``Authorization: Bearer <api key>``
    Body: ``prompt`` (required string), ``aspect_ratio`` ("1:1"), ``resolution`` ("1K", "2K",
    "4K"), ``seed`` (int 0..2**32-1), ``creativity`` (raw|low|medium|high),
    ``image_style_references`` / ``styles`` (arrays), ``moodboards`` (array, at most 1),
    ``intensity`` / ``complexity`` / ``movement`` (int -100..100), ``negative_prompt`` (string),
    ``num_images`` (int 1..4; without it the per-model table of the config decides). Unknown
    fields and JSON nulls are ignored.
    200 ``{"job_id", "status": "queued", "created_at"}``; 400 bad body; 401 bad key.
``GET /jobs/{job_id}`` (Bearer)
    200 ``{"job_id", "status", "created_at", "completed_at": str | null}`` plus
    ``"result": {"urls": [...]}`` when completed or ``"error": {"message"}`` when failed; 404.
``DELETE /jobs/{job_id}`` (Bearer)
    200 the job object, now cancelled; 409 when the job is already final; 404.
``GET /images/{job_id}/{index}.png`` (no auth, like a CDN URL; every protocol's links)
    The PNG; 404 unless the job completed and has that index (0-based).

Test control, unauthenticated (bind the simulator to loopback):
``GET /_sim/config``, ``POST /_sim/config`` with the knobs to change (answers all knobs);
``GET /_sim/stats`` -> ``{"submits", "polls", "jobs_active", "max_jobs_active",
"image_downloads", "cancels", "connections"}``; ``POST /_sim/reset`` forgets jobs, zeroes
counters, reseeds the RNG.
The knobs and the rules they follow are those of ``workers.simulator.core``.
"""

import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from litestar import Litestar, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.params import FromPath

from workers.simulator import bfl, openai, siliconflow, unified
from workers.simulator.core import (
    ERROR_KINDS,
    KNOBS,
    MAX_SEED,
    ErrorKind,
    Generation,
    InvalidRequest,
    Job,
    RawAnswer,
    Simulator,
    SimulatorConfig,
    base_url,
    cancel_ignored,
    check_bearer,
    image_bytes,
    injected_fault,
    integer,
    iso,
    json_body,
    knobs,
    poll_fault,
    raw_answer,
    updated_config,
)
from workers.simulator.sizes import ASPECT_RATIOS, RESOLUTIONS, image_size

__all__ = [
    "ERROR_KINDS",
    "KNOBS",
    "ErrorKind",
    "Generation",
    "InvalidRequest",
    "Simulator",
    "SimulatorConfig",
    "create_simulator_app",
    "knobs",
    "parse_generation",
    "updated_config",
]

CREATIVITY: Final = ("raw", "low", "medium", "high")
SLIDERS: Final = ("intensity", "complexity", "movement")

# Looks like the start of a JSON object and is cut off, as a proxy dropping a body would do.
_MALFORMED_BODY: Final = b'{"job_id": "'
_IMAGE_NAME: Final = re.compile(r"(\d{1,3})\.png")


def parse_generation(body: object) -> Generation:
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object")
    given = {key: value for key, value in body.items() if value is not None}
    prompt = given.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequest("prompt is required and must be a non-empty string")
    aspect_ratio = given.get("aspect_ratio", "1:1")
    if aspect_ratio not in ASPECT_RATIOS:
        raise InvalidRequest(f"aspect_ratio must be one of {', '.join(ASPECT_RATIOS)}")
    resolution = given.get("resolution", "1K")
    if resolution not in RESOLUTIONS:
        raise InvalidRequest(f"resolution must be one of {', '.join(RESOLUTIONS)}")
    size = image_size(aspect_ratio, resolution)
    if size is None:
        raise InvalidRequest(f"aspect_ratio {aspect_ratio} is not offered at {resolution}")
    if given.get("creativity", "medium") not in CREATIVITY:
        raise InvalidRequest(f"creativity must be one of {', '.join(CREATIVITY)}")
    for name in ("image_style_references", "moodboards", "styles"):
        if not isinstance(given.get(name, []), list):
            raise InvalidRequest(f"{name} must be an array")
    if len(given.get("moodboards", [])) > 1:
        raise InvalidRequest("moodboards accepts at most 1 moodboard per request")
    for name in SLIDERS:
        if name in given:
            integer(name, given[name], -100, 100)
    if not isinstance(given.get("negative_prompt", ""), str):
        raise InvalidRequest("negative_prompt must be a string")
    seed = integer("seed", given["seed"], 0, MAX_SEED) if "seed" in given else None
    num_images = integer("num_images", given["num_images"], 1, 4) if "num_images" in given else None
    return Generation(prompt, size[0], size[1], seed, num_images)


def krea_job(job: Job, base: str) -> dict[str, Any]:
    """A job as Krea's ``GET /jobs/{id}`` shows it."""
    now = time.monotonic()
    status = job.status(now)
    finished = job.finished_at(now)
    body: dict[str, Any] = {
        "job_id": job.id,
        "status": status,
        "created_at": iso(job.created_at),
        "completed_at": iso(finished) if finished else None,
    }
    if status == "completed":
        body["result"] = {"urls": job.image_urls(base)}
    elif status == "failed":
        body["error"] = {"message": "simulated generation failure"}
    return body


def create_simulator_app(config: SimulatorConfig) -> Litestar:
    sim = Simulator(config)

    @post("/generate/image/{model_path:path}", status_code=200)
    async def submit(request: Request[Any, Any, Any], model_path: FromPath[Path]) -> Response[Any]:
        check_bearer(request, sim.config.api_key)
        sim.submits += 1
        if await injected_fault(sim):
            return Response(_MALFORMED_BODY, media_type="application/json")
        try:
            generation = parse_generation(await json_body(request))
        except InvalidRequest as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        job = sim.submit(model_path.as_posix().strip("/"), generation)
        return Response({"job_id": job.id, "status": "queued", "created_at": iso(job.created_at)})

    @get("/jobs/{job_id:str}")
    async def poll(request: Request[Any, Any, Any], job_id: FromPath[str]) -> dict[str, Any]:
        check_bearer(request, sim.config.api_key)
        sim.polls += 1
        await poll_fault(sim)
        return krea_job(sim.job(job_id), base_url(request))

    @delete("/jobs/{job_id:str}", status_code=200)
    async def cancel(request: Request[Any, Any, Any], job_id: FromPath[str]) -> dict[str, Any]:
        check_bearer(request, sim.config.api_key)
        if cancel_ignored(sim):
            return krea_job(sim.job(job_id), base_url(request))
        return krea_job(sim.cancel(job_id), base_url(request))

    @get("/images/{job_id:str}/{name:str}")
    async def image(job_id: FromPath[str], name: FromPath[str]) -> Response[bytes]:
        job = sim.jobs.get(job_id)
        match = _IMAGE_NAME.fullmatch(name)
        index = int(match[1]) if match else -1
        if job is None or job.status(time.monotonic()) != "completed":
            raise HTTPException(status_code=404, detail=f"no completed job {job_id}")
        if not 0 <= index < job.num_images:
            raise HTTPException(status_code=404, detail=f"job {job_id} has no image {name}")
        return Response(await image_bytes(sim, job, index), media_type="image/png")

    @get("/_sim/config")
    async def read_config() -> dict[str, Any]:
        return knobs(sim.config)

    @post("/_sim/config", status_code=200)
    async def change_config(request: Request[Any, Any, Any]) -> dict[str, Any]:
        changes = await json_body(request)
        if not isinstance(changes, dict):
            raise HTTPException(status_code=400, detail="body must be a JSON object")
        try:
            sim.configure(changes)
        except InvalidRequest as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        return knobs(sim.config)

    @get("/_sim/stats")
    async def stats() -> dict[str, int]:
        return sim.stats()

    @post("/_sim/reset", status_code=200)
    async def reset() -> dict[str, int]:
        sim.reset()
        return sim.stats()

    return Litestar(
        route_handlers=[
            submit,
            poll,
            cancel,
            image,
            read_config,
            change_config,
            stats,
            reset,
            siliconflow.router(sim),
            unified.router(sim),
            openai.router(sim),
            bfl.router(sim),
        ],
        exception_handlers={HTTPException: _error_response, RawAnswer: raw_answer},
        before_request=_counting(sim),
        openapi_config=None,
        state=State({"simulator": sim}),
    )


def _counting(sim: Simulator) -> Callable[[Request[Any, Any, Any]], Awaitable[None]]:
    async def count(request: Request[Any, Any, Any]) -> None:
        if not request.url.path.startswith("/_sim/"):  # the test's own control calls
            sim.saw(request)

    return count


def _error_response(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    return Response({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)
