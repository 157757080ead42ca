"""A simulated image upstream, jobs kept in memory, speaking two protocols.

Krea 2 async jobs are described here; SiliconFlow-style synchronous generation
(``POST /v1/images/generations``) in ``workers.simulator.siliconflow``. Both share the job store,
the image route, the knobs and the counters.

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
``GET /images/{job_id}/{index}.png`` (no auth, like a CDN URL)
    The PNG; 404 unless the job completed and has that index (0-based).

Test control, unauthenticated (bind the simulator to loopback):
``GET /_sim/config``, ``POST /_sim/config`` with the knobs to change (answers all knobs);
``GET /_sim/stats`` -> ``{"submits", "polls", "jobs_active", "max_jobs_active",
"image_downloads"}``; ``POST /_sim/reset`` forgets jobs, zeroes counters, reseeds the RNG.

Rules:
- A job's life is a function of time since its submit and of the latency at that moment:
  queued, processing from latency/3, final at latency (completed, or failed when it was drawn
  to fail at submit). Latency 0 means final at once. Only DELETE takes a job off that schedule.
- Randomness (which jobs fail, the seed of a job submitted without one) comes from one
  ``random.Random(rng_seed)``, so the same requests against the same config replay the same.
- Faults are applied after auth and before the body is read: ``fail_first_n`` (the next N
  submits answer 500), then ``error_kind``. A submit answering 500, 429 or a malformed body
  creates no job; ``hang`` sleeps ``hang_seconds`` and then answers normally.
- A synchronous generation is a job like any other, submitted when its request passes, and
  answered once the job is final (completed, or 500 when it was drawn to fail). So it counts as
  a submit, and as active while its request waits: ``max_jobs_active`` is the most requests
  in flight at once. A client that gives up does not stop it, as at a real upstream.
- Images render on first download, in a worker thread, and are cached on the job.
- At most ``max_jobs`` jobs are kept, oldest forgotten first; their ids then answer 404.
"""

import asyncio
import dataclasses
import heapq
import hmac
import random
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal, get_args

import msgspec
from litestar import Litestar, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.params import FromPath

from workers.simulator import siliconflow
from workers.simulator.png import render_png
from workers.simulator.sizes import ASPECT_RATIOS, RESOLUTIONS, image_size

ErrorKind = Literal[
    "none", "submit_500", "submit_429", "job_failed", "hang", "malformed", "bad_image"
]
ERROR_KINDS: Final[tuple[ErrorKind, ...]] = get_args(ErrorKind)
JobStatus = Literal["queued", "processing", "completed", "failed", "cancelled"]
FINAL_STATUSES: Final = frozenset({"completed", "failed", "cancelled"})
CREATIVITY: Final = ("raw", "low", "medium", "high")
SLIDERS: Final = ("intensity", "complexity", "movement")
MAX_SEED: Final = 2**32 - 1

# Krea's image tool gives four images per generation for these models, one otherwise.
DEFAULT_IMAGES_PER_MODEL: Final[Mapping[str, int]] = {"krea/krea-2/turbo": 4, "krea/krea-1": 4}

# Looks like the start of a JSON object and is cut off, as a proxy dropping a body would do.
_MALFORMED_BODY: Final = b'{"job_id": "'
_BAD_IMAGE: Final = b"<html><body>502 Bad Gateway</body></html>\n"
_IMAGE_NAME: Final = re.compile(r"(\d{1,3})\.png")


@dataclass
class SimulatorConfig:
    """Identity and knobs. Every field but ``api_key`` can be changed via ``POST /_sim/config``."""

    api_key: str = "sim-key"
    latency: float = 0.5
    failure_rate: float = 0.0
    error_kind: ErrorKind = "none"
    retry_after: int = 1
    hang_seconds: float = 30.0
    fail_first_n: int = 0
    rng_seed: int = 0
    default_num_images: int = 1
    images_per_model: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_IMAGES_PER_MODEL))
    max_jobs: int = 100_000


KNOBS: Final = tuple(f.name for f in dataclasses.fields(SimulatorConfig) if f.name != "api_key")


class InvalidRequest(ValueError):
    """A request body or a config change that breaks the protocol; the message names the field."""


def updated_config(config: SimulatorConfig, changes: Mapping[str, object]) -> SimulatorConfig:
    """A copy of ``config`` with ``changes`` applied, all validated before any is applied."""
    checked: dict[str, Any] = {name: _check_knob(name, value) for name, value in changes.items()}
    return dataclasses.replace(config, **checked)


def knobs(config: SimulatorConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in KNOBS}


def _check_knob(name: str, value: object) -> object:
    match name:
        case "latency" | "hang_seconds":
            return _number(name, value, 0.0, 3600.0)
        case "failure_rate":
            return _number(name, value, 0.0, 1.0)
        case "error_kind":
            if value not in ERROR_KINDS:
                raise InvalidRequest(f"error_kind must be one of {', '.join(ERROR_KINDS)}")
            return value
        case "retry_after" | "fail_first_n":
            return _integer(name, value, 0, 2**31)
        case "max_jobs":
            return _integer(name, value, 1, 2**31)
        case "rng_seed":
            return _integer(name, value, -(2**63), 2**63)
        case "default_num_images":
            return _integer(name, value, 1, 4)
        case "images_per_model":
            if not isinstance(value, dict):
                raise InvalidRequest("images_per_model must be an object of model path to count")
            return {str(k): _integer(f"images_per_model[{k}]", v, 1, 4) for k, v in value.items()}
        case _:
            raise InvalidRequest(f"{name} is not a simulator setting")


def _integer(name: str, value: object, low: int, high: int) -> int:
    # bool is an int subclass in Python, but `true` is not a number on the wire.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer")
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}")
    return value


def _number(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{name} must be a number")
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}")
    return float(value)


@dataclass(frozen=True)
class Generation:
    """A validated submit body, reduced to what shapes the result."""

    prompt: str
    width: int
    height: int
    seed: int | None
    num_images: int | None


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
            _integer(name, given[name], -100, 100)
    if not isinstance(given.get("negative_prompt", ""), str):
        raise InvalidRequest("negative_prompt must be a string")
    seed = _integer("seed", given["seed"], 0, MAX_SEED) if "seed" in given else None
    num_images = (
        _integer("num_images", given["num_images"], 1, 4) if "num_images" in given else None
    )
    return Generation(prompt, size[0], size[1], seed, num_images)


@dataclass(eq=False)
class Job:
    id: str
    model_path: str
    prompt: str
    seed: int
    width: int
    height: int
    num_images: int
    fails: bool
    latency: float
    created_at: datetime
    created_mono: float
    cancelled_at: datetime | None = None
    images: dict[int, bytes] = field(default_factory=dict)

    @property
    def ends_mono(self) -> float:
        return self.created_mono + self.latency

    def status(self, now: float) -> JobStatus:
        if self.cancelled_at is not None:
            return "cancelled"
        elapsed = now - self.created_mono
        if elapsed >= self.latency:
            return "failed" if self.fails else "completed"
        return "processing" if elapsed >= self.latency / 3 else "queued"

    def view(self, base_url: str) -> dict[str, Any]:
        status = self.status(time.monotonic())
        finished = self.cancelled_at
        if status in ("completed", "failed"):
            finished = self.created_at + timedelta(seconds=self.latency)
        body: dict[str, Any] = {
            "job_id": self.id,
            "status": status,
            "created_at": _iso(self.created_at),
            "completed_at": _iso(finished) if finished else None,
        }
        if status == "completed":
            body["result"] = {"urls": self.image_urls(base_url)}
        elif status == "failed":
            body["error"] = {"message": "simulated generation failure"}
        return body

    def image_urls(self, base_url: str) -> list[str]:
        return [f"{base_url}/images/{self.id}/{i}.png" for i in range(self.num_images)]


class Simulator:
    """The job store, the knobs and the counters; no HTTP in here beyond status codes."""

    def __init__(self, config: SimulatorConfig) -> None:
        # Rebuilding from the knobs validates them and copies the mutable ones, so one config
        # object can seed several independent simulators.
        self.config = updated_config(SimulatorConfig(api_key=config.api_key), knobs(config))
        self.reset()

    def reset(self) -> None:
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.rng = random.Random(self.config.rng_seed)
        self.submits = self.polls = self.image_downloads = self.max_jobs_active = 0
        # Jobs that may still be active, as a min-heap on when they end; a cancelled job stays
        # in the heap until its time passes and is discounted through `_cancelled` meanwhile.
        self._endings: list[tuple[float, str]] = []
        self._cancelled: set[str] = set()

    def configure(self, changes: Mapping[str, object]) -> None:
        self.config = updated_config(self.config, changes)
        if "rng_seed" in changes:
            self.rng = random.Random(self.config.rng_seed)

    def next_fault(self) -> ErrorKind | None:
        """The fault this submit must show, consuming one of ``fail_first_n`` if any are left."""
        if self.config.fail_first_n > 0:
            self.config.fail_first_n -= 1
            return "submit_500"
        kind = self.config.error_kind
        return kind if kind in ("submit_500", "submit_429", "hang", "malformed") else None

    def submit(self, model_path: str, generation: Generation) -> Job:
        config = self.config
        seed = self.rng.randrange(MAX_SEED + 1) if generation.seed is None else generation.seed
        fails = config.error_kind == "job_failed" or self.rng.random() < config.failure_rate
        num_images = generation.num_images or config.images_per_model.get(
            model_path, config.default_num_images
        )
        now = time.monotonic()
        job = Job(
            id=str(uuid.uuid4()),
            model_path=model_path,
            prompt=generation.prompt,
            seed=seed,
            width=generation.width,
            height=generation.height,
            num_images=num_images,
            fails=fails,
            latency=config.latency,
            created_at=datetime.now(UTC),
            created_mono=now,
        )
        self.jobs[job.id] = job
        while len(self.jobs) > config.max_jobs:
            self.jobs.popitem(last=False)
        heapq.heappush(self._endings, (job.ends_mono, job.id))
        # Active jobs only grow at a submit, so checking here catches every high-water mark.
        self.max_jobs_active = max(self.max_jobs_active, self.jobs_active())
        return job

    def job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise HTTPException(status_code=404, detail=f"job {job_id} not found")
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.job(job_id)
        status = job.status(time.monotonic())
        if status in FINAL_STATUSES:
            raise HTTPException(status_code=409, detail=f"job {job_id} is already {status}")
        self.jobs_active()  # prune first, so the heap surely still holds this job's entry
        job.cancelled_at = datetime.now(UTC)
        self._cancelled.add(job.id)
        return job

    def jobs_active(self) -> int:
        now = time.monotonic()
        while self._endings and self._endings[0][0] <= now:
            self._cancelled.discard(heapq.heappop(self._endings)[1])
        return len(self._endings) - len(self._cancelled)

    def stats(self) -> dict[str, int]:
        return {
            "submits": self.submits,
            "polls": self.polls,
            "jobs_active": self.jobs_active(),
            "max_jobs_active": self.max_jobs_active,
            "image_downloads": self.image_downloads,
        }


def create_simulator_app(config: SimulatorConfig) -> Litestar:
    sim = Simulator(config)

    def authorize(request: Request[Any, Any, Any]) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        challenge = {"WWW-Authenticate": "Bearer"}
        if scheme.lower() != "bearer" or not token:
            raise HTTPException(status_code=401, detail="missing bearer token", headers=challenge)
        if not hmac.compare_digest(token.encode(), sim.config.api_key.encode()):
            raise HTTPException(status_code=401, detail="invalid api key", headers=challenge)

    async def json_body(request: Request[Any, Any, Any]) -> Any:
        try:
            return msgspec.json.decode(await request.body())
        except msgspec.DecodeError:
            raise HTTPException(status_code=400, detail="body must be valid JSON") from None

    @post("/generate/image/{model_path:path}", status_code=200)
    async def submit(request: Request[Any, Any, Any], model_path: FromPath[Path]) -> Response[Any]:
        authorize(request)
        sim.submits += 1
        match sim.next_fault():
            case "submit_500":
                return Response({"error": "simulated upstream error"}, status_code=500)
            case "submit_429":
                headers = {"Retry-After": str(sim.config.retry_after)}
                return Response({"error": "rate limited"}, status_code=429, headers=headers)
            case "malformed":
                return Response(_MALFORMED_BODY, media_type="application/json")
            case "hang":
                await asyncio.sleep(sim.config.hang_seconds)
        try:
            generation = parse_generation(await json_body(request))
        except InvalidRequest as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        job = sim.submit(model_path.as_posix().strip("/"), generation)
        return Response({"job_id": job.id, "status": "queued", "created_at": _iso(job.created_at)})

    @post(
        siliconflow.ROUTE,
        status_code=200,
        exception_handlers={HTTPException: _siliconflow_error_response},
    )
    async def generate_sync(request: Request[Any, Any, Any]) -> Response[Any]:
        authorize(request)
        sim.submits += 1
        match sim.next_fault():
            case "submit_500":
                return _siliconflow_error(500, "simulated upstream error")
            case "submit_429":
                headers = {"Retry-After": str(sim.config.retry_after)}
                return _siliconflow_error(429, "rate limited", headers=headers)
            case "malformed":
                return Response(siliconflow.MALFORMED_BODY, media_type="application/json")
            case "hang":
                await asyncio.sleep(sim.config.hang_seconds)
        try:
            wanted = siliconflow.parse_images_request(await json_body(request))
        except siliconflow.InvalidBody as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        generation = Generation(
            wanted.prompt, wanted.width, wanted.height, wanted.seed, wanted.batch_size
        )
        job = sim.submit(wanted.model, generation)
        # Until the job's own end, not a fresh `latency`: a knob changed meanwhile must not make
        # the answer and the job's status disagree.
        await asyncio.sleep(max(0.0, job.ends_mono - time.monotonic()))
        if job.fails:
            return _siliconflow_error(500, "generation failed", code=siliconflow.GENERATION_FAILED)
        urls = job.image_urls(_base_url(request))
        return Response(siliconflow.images_body(urls, seconds=job.latency, seed=job.seed))

    @get("/jobs/{job_id:str}")
    async def poll(request: Request[Any, Any, Any], job_id: FromPath[str]) -> dict[str, Any]:
        authorize(request)
        sim.polls += 1
        return sim.job(job_id).view(_base_url(request))

    @delete("/jobs/{job_id:str}", status_code=200)
    async def cancel(request: Request[Any, Any, Any], job_id: FromPath[str]) -> dict[str, Any]:
        authorize(request)
        return sim.cancel(job_id).view(_base_url(request))

    @get("/images/{job_id:str}/{name:str}")
    async def image(job_id: FromPath[str], name: FromPath[str]) -> Response[bytes]:
        job = sim.jobs.get(job_id)
        match = _IMAGE_NAME.fullmatch(name)
        index = int(match[1]) if match else -1
        if job is None or job.status(time.monotonic()) != "completed":
            raise HTTPException(status_code=404, detail=f"no completed job {job_id}")
        if not 0 <= index < job.num_images:
            raise HTTPException(status_code=404, detail=f"job {job_id} has no image {name}")
        data = _BAD_IMAGE if sim.config.error_kind == "bad_image" else job.images.get(index)
        if data is None:
            # A 4K image takes 10-20 ms to encode: keep the event loop free meanwhile.
            data = await asyncio.to_thread(
                render_png, job.width, job.height, prompt=job.prompt, seed=job.seed, index=index
            )
            job.images[index] = data
        sim.image_downloads += 1
        return Response(data, media_type="image/png")

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
            generate_sync,
            poll,
            cancel,
            image,
            read_config,
            change_config,
            stats,
            reset,
        ],
        exception_handlers={HTTPException: _error_response},
        openapi_config=None,
        state=State({"simulator": sim}),
    )


def _error_response(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    return Response({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def _siliconflow_error_response(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    return _siliconflow_error(exc.status_code, exc.detail, headers=exc.headers)


def _siliconflow_error(
    status: int,
    message: str,
    *,
    code: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response[Any]:
    body = siliconflow.error_body(status, message, code=code)
    return Response(body, status_code=status, headers=headers)


def _base_url(request: Request[Any, Any, Any]) -> str:
    return str(request.base_url).rstrip("/")


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
