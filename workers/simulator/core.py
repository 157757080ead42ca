"""The simulator's core, shared by every protocol: knobs, the job store, counters, helpers.

Each protocol (Krea in ``workers.simulator.app``, the others in their own modules) is a
wire format over this core. It is over 450 lines because every fault on command lives here,
once for all five protocols. Rules every protocol follows:

- A job's life is a function of time since its submit and of the latency at that moment:
  queued, processing from latency/3, final at latency (completed, or failed when it was drawn
  to fail at submit). Latency 0 means final at once. Only a cancel takes a job off that
  schedule.
- Randomness (which jobs fail, the seed of a job submitted without one) comes from one
  ``random.Random(rng_seed)``, so the same requests against the same config replay the same.
- Faults are applied after auth and before the body is read (``injected_fault``):
  ``fail_first_n`` (the next N submits answer 500), then ``error_kind``. A submit answering
  500, 429, 400, 403, a malformed body, an HTML ``400 Bad request syntax`` page (``html_400``,
  as a load balancer answers, keeping the connection open), a ``302`` to elsewhere
  (``redirect``) or a JSON body of ``huge_body_bytes`` (``huge_body``, streamed) creates no
  job; ``hang`` sleeps ``hang_seconds`` and then answers normally. ``job_failed`` and
  ``failure_rate`` fail jobs; ``bad_image`` serves bytes that are not an image, by link or
  inline; ``wrong_size`` renders every image at 1024x768 (768x1024 when that was asked).
- Faults of the other calls: ``slow_poll`` makes every poll sleep ``hang_seconds`` before it
  answers; ``cancel_ignored`` makes a cancel answer 200 with the job as it is, still running,
  without cancelling it (a cancel that is not confirmed).
- ``connections`` counts the distinct client connections (address and port) seen, so a test
  can tell a reused connection from a new one; ``cancels`` counts cancel requests.
- A synchronous generation is a job like any other, submitted when its request passes, and
  answered once the job is final (``until_final``). So it counts as a submit, and as active
  while its request waits: ``max_jobs_active`` is the most requests in flight at once. A
  client that gives up does not stop it, as at a real upstream.
- Images render on first use, in a worker thread, and are cached on the job. Every image
  served, downloaded or inline, counts in ``image_downloads``.
- At most ``max_jobs`` jobs are kept, oldest forgotten first; their ids then answer 404.
- Errors are ``HTTPException``s; each protocol renders them in its own error shape.
"""

import asyncio
import dataclasses
import heapq
import hmac
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, get_args

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.response import Stream

from workers.simulator.png import render_png

ErrorKind = Literal[
    "none",
    "submit_500",
    "submit_429",
    "submit_400",
    "job_failed",
    "hang",
    "malformed",
    "bad_image",
    "submit_403",
    "html_400",
    "redirect",
    "huge_body",
    "wrong_size",
    "slow_poll",
    "cancel_ignored",
]
# The faults a submit shows before it reads its body (``injected_fault``).
SUBMIT_FAULTS: Final = frozenset(
    {"submit_500", "submit_429", "submit_400", "submit_403", "html_400", "redirect", "huge_body"}
    | {"hang", "malformed"}
)
ERROR_KINDS: Final[tuple[ErrorKind, ...]] = get_args(ErrorKind)
JobStatus = Literal["queued", "processing", "completed", "failed", "cancelled"]
FINAL_STATUSES: Final = frozenset({"completed", "failed", "cancelled"})
MAX_SEED: Final = 2**32 - 1

# Krea's image tool gives four images per generation for these models, one otherwise.
DEFAULT_IMAGES_PER_MODEL: Final[Mapping[str, int]] = {"krea/krea-2/turbo": 4, "krea/krea-1": 4}

BAD_IMAGE: Final = b"<html><body>502 Bad Gateway</body></html>\n"
# What a proxy or Python's http.server answers to a request it cannot parse.
HTML_400: Final = (
    b"<!DOCTYPE HTML>\n<html><head><title>Error response</title></head>\n<body>"
    b"<h1>Error response</h1><p>Error code: 400</p><p>Message: Bad request syntax.</p>"
    b"</body></html>\n"
)
WRONG_SIZE: Final = (1024, 768)


@dataclass
class SimulatorConfig:
    """Identity and knobs. Every field but ``api_key`` can be changed via ``POST /_sim/config``."""

    api_key: str = "sim-key"
    latency: float = 0.5
    failure_rate: float = 0.0
    error_kind: ErrorKind = "none"
    retry_after: int = 1
    hang_seconds: float = 30.0
    huge_body_bytes: int = 64 * 1024 * 1024
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
            return number(name, value, 0.0, 3600.0)
        case "failure_rate":
            return number(name, value, 0.0, 1.0)
        case "error_kind":
            if value not in ERROR_KINDS:
                raise InvalidRequest(f"error_kind must be one of {', '.join(ERROR_KINDS)}")
            return value
        case "retry_after" | "fail_first_n":
            return integer(name, value, 0, 2**31)
        case "max_jobs":
            return integer(name, value, 1, 2**31)
        case "huge_body_bytes":
            return integer(name, value, 1, 2**31)
        case "rng_seed":
            return integer(name, value, -(2**63), 2**63)
        case "default_num_images":
            return integer(name, value, 1, 4)
        case "images_per_model":
            if not isinstance(value, dict):
                raise InvalidRequest("images_per_model must be an object of model path to count")
            return {str(k): integer(f"images_per_model[{k}]", v, 1, 4) for k, v in value.items()}
        case _:
            raise InvalidRequest(f"{name} is not a simulator setting")


def integer(name: str, value: object, low: int, high: int) -> int:
    # bool is an int subclass in Python, but `true` is not a number on the wire.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer")
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}")
    return value


def number(name: str, value: object, low: float, high: float) -> float:
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

    def finished_at(self, now: float) -> datetime | None:
        """When the job reached its final status, or None while it runs."""
        status = self.status(now)
        if status in ("completed", "failed"):
            return self.created_at + timedelta(seconds=self.latency)
        return self.cancelled_at

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
        self.cancels = 0
        self._connections: set[tuple[str, int]] = set()
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
        return kind if kind in SUBMIT_FAULTS else None

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
            "cancels": self.cancels,
            "connections": len(self._connections),
        }

    def saw(self, request: Request[Any, Any, Any]) -> None:
        """Count the connection a request came on (its client address and port)."""
        client = request.client
        if client is not None:
            self._connections.add((client.host, client.port))


class RawAnswer(Exception):
    """A fault answered outside any protocol's shape: an HTML page, a redirect, a huge body.

    The app renders it as it is, whichever protocol raised it.
    """

    def __init__(self, response: Response[Any]) -> None:
        super().__init__("raw answer")
        self.response = response


def raw_answer(_: Request[Any, Any, Any], exc: RawAnswer) -> Response[Any]:
    return exc.response


def _huge_body(size: int) -> Stream:
    """A JSON object of ``size`` bytes, streamed in chunks (never held whole here)."""

    async def chunks() -> AsyncIterator[bytes]:
        head, tail = b'{"padding": "', b'"}'
        yield head
        left = max(0, size - len(head) - len(tail))
        while left > 0:
            step = min(left, 65_536)
            yield b"x" * step
            left -= step
        yield tail

    return Stream(chunks(), media_type="application/json")


async def injected_fault(sim: Simulator) -> bool:
    """Apply the fault this submit draws: errors raise, ``hang`` sleeps first.

    Returns True when the answer must be a malformed body (the protocol knows its shape).
    """
    match sim.next_fault():
        case "submit_500":
            raise HTTPException(status_code=500, detail="simulated upstream error")
        case "submit_429":
            headers = {"Retry-After": str(sim.config.retry_after)}
            raise HTTPException(status_code=429, detail="rate limited", headers=headers)
        case "submit_400":
            # The upstream refuses the request itself as invalid (say, a moderation rule).
            raise HTTPException(status_code=400, detail="simulated invalid request")
        case "submit_403":
            # The account is refused (suspended, out of credit): the channel's fault.
            raise HTTPException(status_code=403, detail="simulated forbidden account")
        case "html_400":
            # Keeping the connection open, as a proxy may: the client must not trust it.
            raise RawAnswer(Response(HTML_400, status_code=400, media_type="text/html"))
        case "redirect":
            moved = Response(
                b"", status_code=302, headers={"Location": "https://elsewhere.invalid/moved"}
            )
            raise RawAnswer(moved)
        case "huge_body":
            raise RawAnswer(_huge_body(sim.config.huge_body_bytes))
        case "malformed":
            return True
        case "hang":
            await asyncio.sleep(sim.config.hang_seconds)
    return False


async def poll_fault(sim: Simulator) -> None:
    """Apply the fault a poll draws: ``slow_poll`` sleeps ``hang_seconds`` first."""
    if sim.config.error_kind == "slow_poll":
        await asyncio.sleep(sim.config.hang_seconds)


def cancel_ignored(sim: Simulator) -> bool:
    """True when a cancel must answer 200 with the job as it is, without cancelling it."""
    sim.cancels += 1
    return sim.config.error_kind == "cancel_ignored"


async def until_final(job: Job) -> None:
    """Wait out a synchronous generation's job."""
    # Until the job's own end, not a fresh `latency`: a knob changed meanwhile must not make
    # the answer and the job's status disagree.
    await asyncio.sleep(max(0.0, job.ends_mono - time.monotonic()))


async def image_bytes(sim: Simulator, job: Job, index: int) -> bytes:
    """Image ``index`` of a completed job, rendered once; counts as served."""
    data = BAD_IMAGE if sim.config.error_kind == "bad_image" else job.images.get(index)
    if data is None:
        width, height = job.width, job.height
        if sim.config.error_kind == "wrong_size":
            wrong = WRONG_SIZE if (width, height) != WRONG_SIZE else WRONG_SIZE[::-1]
            width, height = wrong
        # A 4K image takes 10-20 ms to encode: keep the event loop free meanwhile.
        data = await asyncio.to_thread(
            render_png, width, height, prompt=job.prompt, seed=job.seed, index=index
        )
        job.images[index] = data
    sim.image_downloads += 1
    return data


def check_bearer(request: Request[Any, Any, Any], api_key: str) -> None:
    """``Authorization: Bearer <api key>`` or 401."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    challenge = {"WWW-Authenticate": "Bearer"}
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(status_code=401, detail="missing bearer token", headers=challenge)
    check_key(token, api_key, headers=challenge)


def check_key(given: str, api_key: str, *, headers: Mapping[str, str] | None = None) -> None:
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise HTTPException(status_code=401, detail="invalid api key", headers=dict(headers or {}))


async def json_body(request: Request[Any, Any, Any]) -> Any:
    try:
        return msgspec.json.decode(await request.body())
    except msgspec.DecodeError:
        raise HTTPException(status_code=400, detail="body must be valid JSON") from None


def base_url(request: Request[Any, Any, Any]) -> str:
    return str(request.base_url).rstrip("/")


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
