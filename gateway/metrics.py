"""Prometheus metrics: the names that ``deploy/`` (dashboard, alert rules) is written against.

Rules:
- Names, labels and label values are a contract with the dashboard and the alert
  rules (docs/observability.md lists them); change them only together.
- No label takes unbounded values: no task, key or tenant id (the credits
  counters get a ``tenant`` label only with ``TOLLGATE_METRICS_TENANT_LABELS=true``),
  routes are templates (``unmatched`` when no route matched), methods outside a
  fixed set are ``OTHER``.
- Multi-process safe: with ``PROMETHEUS_MULTIPROC_DIR`` set before the process
  starts, every process writes its values to files there and a scrape sums them
  (prometheus-client's multiprocess mode); without it, one process's registry.
- What happens inside a database transaction (credits reserved and settled, a
  task submitted or ended) is recorded with ``after_commit`` and counted when
  that transaction commits: a rollback counts nothing. (It is counted as the
  COMMIT is sent; a COMMIT that itself fails, which is rare, is counted anyway.)
- State (tasks open, queue depth, the oldest waiting job) is read from
  PostgreSQL and Redis when the gateway is scraped (``read_state``), so every
  gateway reports the same values: aggregate them with ``max``, never ``sum``.

Over 450 lines because it is the one registry of the contract above: every
metric, its labels and the code that records or reads it stay together, so a
name is changed in one file with the dashboard and the rules.
"""

import asyncio
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from arq.constants import in_progress_key_prefix
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.settings import Settings

logger = logging.getLogger("tollgate.metrics")

# One series per counter, not two: the _created series double the count for little use.
disable_created_metrics()  # type: ignore[no-untyped-call]

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"
PHASES = ("submit", "poll", "cancel", "download")
OUTCOMES = ("ok", "timeout", "unavailable", "rate_limited", "rejected", "bad_response")
FINAL_STATUSES = ("completed", "failed", "cancelled")
OPEN_STATUSES = ("pending", "processing")
REFUSAL_SCOPES = ("key", "tenant", "in_flight", "key_budget")
QUEUES = ("generate", "callbacks")

# Gateway-added latency is budgeted in milliseconds; upstream calls take seconds.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
UPSTREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

HTTP_REQUESTS = Counter(
    "tollgate_http_requests_total",
    "HTTP requests answered by the gateway, by route template, method and status.",
    ["route", "method", "status"],
)
HTTP_DURATION = Histogram(
    "tollgate_http_request_duration_seconds",
    "Time from a request's arrival to the end of its response, by route template and method.",
    ["route", "method"],
    buckets=HTTP_BUCKETS,
)
TASKS_SUBMITTED = Counter(
    "tollgate_tasks_submitted_total",
    "Tasks created (committed), by model; Idempotency-Key replays are not counted.",
    ["model"],
)
TASKS_FINISHED = Counter(
    "tollgate_tasks_finished_total",
    "Tasks that reached a final state, by model and status (completed, failed, cancelled).",
    ["model", "status"],
)
GENERATION_RUNS = Counter(
    "tollgate_generation_runs_total",
    "Runs of generation jobs, by outcome (completed, failed, parked: waits in a line for an"
    " upstream slot, skipped: task final or owned by another attempt, stopped). Above one"
    " per task: jobs that ran more than once.",
    ["outcome"],
)
UPSTREAM_REQUESTS = Counter(
    "tollgate_upstream_requests_total",
    "Calls to upstream providers, by provider, channel, phase and outcome.",
    ["provider", "channel", "phase", "outcome"],
)
UPSTREAM_DURATION = Histogram(
    "tollgate_upstream_request_duration_seconds",
    "Duration of calls to upstream providers, by provider, channel and phase.",
    ["provider", "channel", "phase"],
    buckets=UPSTREAM_BUCKETS,
)
CIRCUIT_OPENED = Counter(
    "tollgate_channel_circuit_opened_total",
    "Times a channel's circuit breaker opened.",
    ["channel"],
)
UPSTREAM_JOBS_ABANDONED = Counter(
    "tollgate_upstream_jobs_abandoned_total",
    "Upstream jobs a run stopped waiting for while they may still run (and cost) there, by"
    " provider, channel, reason (deadline, failover) and cancel (confirmed, failed,"
    " unsupported: whether the upstream confirmed a cancel).",
    ["provider", "channel", "reason", "cancel"],
)
CALLBACK_ATTEMPTS = Counter(
    "tollgate_callback_attempts_total",
    "Callback delivery attempts, by outcome (delivered, failed).",
    ["outcome"],
)
CALLBACK_GIVE_UPS = Counter(
    "tollgate_callback_give_ups_total",
    "Callback deliveries abandoned after their last scheduled attempt failed.",
)
RATE_LIMIT_REFUSALS = Counter(
    "tollgate_rate_limit_refusals_total",
    "Requests refused by a limit, by scope (key, tenant, in_flight, key_budget).",
    ["scope"],
)
LEDGER_PROBLEMS = Gauge(
    "tollgate_ledger_check_problems",
    "Problems the last periodic ledger check found (0: the ledger adds up).",
    multiprocess_mode="mostrecent",
)
MODEL_BACKLOG = Gauge(
    "tollgate_model_backlog_seconds",
    "Estimated seconds until a task submitted now would finish, by model: open tasks over "
    "the model's upstream slots times its recent job time, or over its measured drain rate "
    "when that is longer (gateway/tasks/backlog.py).",
    ["model"],
    multiprocess_mode="livemax",
)
LEDGER_LAST_RUN = Gauge(
    "tollgate_ledger_check_last_run_timestamp_seconds",
    "Unix time the last periodic ledger check finished.",
    multiprocess_mode="mostrecent",
)
RESULTS_DELETED_FILES = Counter(
    "tollgate_results_deleted_files_total",
    "Result files deleted by retention, by storage backend (file, s3).",
    ["backend"],
)
RESULTS_DELETED_BYTES = Counter(
    "tollgate_results_deleted_bytes_total",
    "Bytes of result files deleted by retention, by storage backend (file, s3).",
    ["backend"],
)
DEPENDENCY_UP = Gauge(
    "tollgate_dependency_up",
    "1 while this worker process reaches the dependency (redis, postgres), 0 during an outage",
    ["dependency"],
    # Summed over processes it would count them: show the worst one.
    multiprocess_mode="livemin",
)
STORAGE_ERRORS = Counter(
    "tollgate_storage_errors_total",
    "Result store calls that failed (unreachable, refused, timed out), by operation (put, delete).",
    ["backend", "operation"],
)

for _outcome in ("delivered", "failed"):
    CALLBACK_ATTEMPTS.labels(_outcome)
for _scope in REFUSAL_SCOPES:
    RATE_LIMIT_REFUSALS.labels(_scope)


class _Credits:
    """The three credits counters; their labels depend on a setting, so they are built late."""

    def __init__(self, tenant_labels: bool) -> None:
        self.tenant_labels = tenant_labels
        labels = ["tenant"] if tenant_labels else []
        made = "one per tenant" if tenant_labels else "all tenants"
        self.reserved = Counter(
            "tollgate_credits_reserved_microcredits_total",
            f"Micro-credits held for new tasks ({made}); 1 credit = 1,000,000.",
            labels,
            registry=None,
        )
        self.captured = Counter(
            "tollgate_credits_captured_microcredits_total",
            f"Micro-credits charged when tasks completed ({made}).",
            labels,
            registry=None,
        )
        self.released = Counter(
            "tollgate_credits_released_microcredits_total",
            f"Micro-credits of holds given back uncharged ({made}).",
            labels,
            registry=None,
        )

    def all(self) -> tuple[Counter, Counter, Counter]:
        return self.reserved, self.captured, self.released

    def count(self, counter: Counter, tenant_id: str, amount: int) -> None:
        (counter.labels(tenant_id) if self.tenant_labels else counter).inc(amount)


def _register(credits: _Credits) -> _Credits:
    for counter in credits.all():
        REGISTRY.register(counter)
    return credits


_credits = _register(_Credits(tenant_labels=False))


def configure(settings: Settings) -> None:
    """Apply the settings that shape the metrics (the credits counters' tenant label)."""
    global _credits
    if settings.metrics_tenant_labels == _credits.tenant_labels:
        return
    for counter in _credits.all():
        REGISTRY.unregister(counter)
    _credits = _register(_Credits(settings.metrics_tenant_labels))


# --- Counting what a transaction did, once it commits ------------------------------

_pending: "weakref.WeakKeyDictionary[Connection, list[Callable[[], None]]]" = (
    weakref.WeakKeyDictionary()
)
_hooked = False


def _on_commit(conn: Connection) -> None:
    for record in _pending.pop(conn, ()):
        try:
            record()
        except Exception:  # a metric or a log line must never break a commit
            logger.exception("recording a committed change failed")


def _on_rollback(conn: Connection) -> None:
    _pending.pop(conn, None)


def after_commit(conn: AsyncConnection, record: Callable[[], None]) -> None:
    """Run ``record`` (count, log) when ``conn``'s transaction commits; never if it rolls back."""
    global _hooked
    if not _hooked:
        # On the Engine class: every engine, including those made before this ran.
        event.listen(Engine, "commit", _on_commit)
        event.listen(Engine, "rollback", _on_rollback)
        _hooked = True
    _pending.setdefault(conn.sync_connection, []).append(record)  # type: ignore[arg-type]


# --- Helpers the code calls ---------------------------------------------------------


# The children of the HTTP metrics by (route, method, status): every label is bounded, so
# is this; it spares two labels() lookups on every request.
_http_children: dict[tuple[str | None, str, int], tuple[Any, Any]] = {}


def observe_http(route: str | None, method: str, status: int, seconds: float) -> None:
    children = _http_children.get((route, method, status))
    if children is None:
        label = route or UNMATCHED
        verb = method if method in METHODS else "OTHER"
        children = (
            HTTP_REQUESTS.labels(label, verb, str(status)),
            HTTP_DURATION.labels(label, verb),
        )
        if method in METHODS:  # anything else is "OTHER": do not keep each spelling
            _http_children[(route, method, status)] = children
    children[0].inc()
    children[1].observe(seconds)


def task_submitted(model: str, tenant_id: str, reserved_micros: int) -> None:
    """Count a new task and the credits it holds; call it once its submit committed."""
    TASKS_SUBMITTED.labels(model).inc()
    _credits.count(_credits.reserved, tenant_id, reserved_micros)


def task_finished(model: str, status: str) -> None:
    """Count a task's end; call it once the ending transaction committed."""
    TASKS_FINISHED.labels(model, status).inc()


def generation_ran(outcome: str) -> None:
    """Count one run of a generation job by its outcome's first word."""
    GENERATION_RUNS.labels(outcome.partition(":")[0]).inc()


def credits_settled(tenant_id: str, captured: int, released: int) -> None:
    """Count a hold's settlement; call it once the settling transaction committed."""
    _credits.count(_credits.captured, tenant_id, captured)
    _credits.count(_credits.released, tenant_id, released)


def rate_limit_refused(scope: str) -> None:
    """``scope``: key, tenant, in_flight or key_budget."""
    RATE_LIMIT_REFUSALS.labels(scope).inc()


def callback_attempted(*, delivered: bool, gave_up: bool) -> None:
    CALLBACK_ATTEMPTS.labels("delivered" if delivered else "failed").inc()
    if gave_up:
        CALLBACK_GIVE_UPS.inc()


def callback_given_up(conn: AsyncConnection) -> None:
    """A delivery abandoned without a recorded last attempt (its worker died during it)."""
    after_commit(conn, CALLBACK_GIVE_UPS.inc)


def observe_upstream(provider: str, channel: str, phase: str, outcome: str, seconds: float) -> None:
    """One upstream call. ``phase``: submit, poll, cancel or download; ``outcome``: ok,
    timeout, unavailable, rate_limited, rejected, bad_response or job_failed."""
    UPSTREAM_REQUESTS.labels(provider, channel, phase, outcome).inc()
    UPSTREAM_DURATION.labels(provider, channel, phase).observe(seconds)


def upstream_job_abandoned(provider: str, channel: str, reason: str, cancel: str) -> None:
    UPSTREAM_JOBS_ABANDONED.labels(provider, channel, reason, cancel).inc()


def circuit_opened(channel: str) -> None:
    CIRCUIT_OPENED.labels(channel).inc()


def ledger_checked(problems: int, at: float | None = None) -> None:
    LEDGER_PROBLEMS.set(problems)
    LEDGER_LAST_RUN.set(time.time() if at is None else at)


def results_deleted(backend: str, files: int, size: int) -> None:
    RESULTS_DELETED_FILES.labels(backend).inc(files)
    RESULTS_DELETED_BYTES.labels(backend).inc(size)


def dependency_up(dependency: str, up: bool) -> None:
    DEPENDENCY_UP.labels(dependency).set(1 if up else 0)


def storage_failed(backend: str, operation: str) -> None:
    STORAGE_ERRORS.labels(backend, operation).inc()


# --- State read at scrape time (gateway) ---------------------------------------------

STATE_TIMEOUT_SECONDS = 2.0
QUEUE_PAGE = 1000
QUEUE_MAX_PAGES = 20

_OPEN_TASKS = text(
    "SELECT model, status, count(*) FROM tasks "
    "WHERE status IN ('pending', 'processing') GROUP BY model, status"
)


async def _queue_state(redis: Redis, queue: str, now_ms: int) -> tuple[int, float]:
    """Jobs due and not yet started, and how long the oldest of them has been due (s).

    arq keeps a job in its queue (a sorted set scored by the time it is due, in ms)
    until it finishes; a running one also has an in-progress key. Deferred jobs
    (retries after a gap) are not due yet and are not counted.
    """
    due = int(await redis.zcount(queue, "-inf", now_ms))
    running = 0
    oldest: float | None = None
    for page in range(min(QUEUE_MAX_PAGES, -(-due // QUEUE_PAGE))):
        entries: list[tuple[bytes, float]] = await redis.zrangebyscore(
            queue, "-inf", now_ms, start=page * QUEUE_PAGE, num=QUEUE_PAGE, withscores=True
        )
        if not entries:
            break
        flags = await redis.mget([in_progress_key_prefix + job.decode() for job, _ in entries])
        for (_, score), flag in zip(entries, flags, strict=True):
            if flag is not None:
                running += 1
            elif oldest is None:
                oldest = score
    # Past the pages read (a huge backlog), every job counts as waiting.
    age = max(0.0, (now_ms - oldest) / 1000) if oldest is not None else 0.0
    return max(0, due - running), age


async def _queue_families(redis: Redis, settings: Settings) -> list[Metric]:
    depth = GaugeMetricFamily(
        "tollgate_queue_depth",
        "Jobs due and waiting for a worker, by queue (generate, callbacks).",
        labels=["queue"],
    )
    age = GaugeMetricFamily(
        "tollgate_queue_oldest_job_age_seconds",
        "How long the oldest waiting job has been due, by queue (0: none waits).",
        labels=["queue"],
    )
    now_ms = int(time.time() * 1000)
    for label, name in zip(
        QUEUES, (settings.queue_name, settings.callback_queue_name), strict=True
    ):
        waiting, oldest = await _queue_state(redis, name, now_ms)
        depth.add_metric([label], waiting)
        age.add_metric([label], oldest)
    return [depth, age]


async def _task_families(engine: AsyncEngine, models: Iterable[str]) -> list[Metric]:
    counts = {(model, status): 0 for model in models for status in OPEN_STATUSES}
    async with engine.connect() as conn:
        for model, status, count in await conn.execute(_OPEN_TASKS):
            counts[(model, status)] = int(count)
    family = GaugeMetricFamily(
        "tollgate_tasks_open",
        "Tasks pending or processing, by model and status (read from PostgreSQL).",
        labels=["model", "status"],
    )
    for (model, status), count in sorted(counts.items()):
        family.add_metric([model, status], count)
    return [family]


async def read_state(
    *, redis: Redis, engine: AsyncEngine, settings: Settings, models: Iterable[str]
) -> list[Metric]:
    """The scrape-time gauges; a source that fails or is slow is left out (and logged)."""

    async def bounded(what: str, read: Any) -> list[Metric]:
        try:
            async with asyncio.timeout(STATE_TIMEOUT_SECONDS):
                found: list[Metric] = await read
                return found
        except Exception as exc:
            logger.warning("metrics: could not read %s: %s", what, exc)
            return []

    queues, tasks = await asyncio.gather(
        bounded("the queues from Redis", _queue_families(redis, settings)),
        bounded("open tasks from PostgreSQL", _task_families(engine, models)),
    )
    return [*queues, *tasks]


# --- Exposition --------------------------------------------------------------------


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class _Fixed(Collector):
    """Yields what its sources collect and some families read beforehand."""

    def __init__(self, sources: Sequence[Any], families: Sequence[Metric]) -> None:
        self._sources = sources
        self._families = families

    def collect(self) -> Iterator[Metric]:
        for source in self._sources:
            yield from source.collect()
        yield from self._families


def _sources(multiproc_dir: str | None) -> list[Any]:
    if multiproc_dir:
        # Every process's files in the directory, summed (gauges: the most recent value).
        return [MultiProcessCollector(None, path=multiproc_dir)]  # type: ignore[no-untyped-call]
    return [REGISTRY]


def exposition(
    families: Sequence[Metric] = (), *, multiproc_dir: str | None = None
) -> tuple[bytes, str]:
    """The text exposition of this process's (or, in multiprocess mode, every process's)
    metrics plus ``families``: (body, content type)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(_sources(multiproc_dir or multiprocess_dir()), families))
    return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4


def serve_worker_metrics(port: int, addr: str = "0.0.0.0") -> Callable[[], None] | None:
    """Serve this process's metrics on ``port`` from a thread; returns how to stop it.

    None when the port is 0 or taken (in multiprocess mode another process on this
    host may already serve the same files).
    """
    if port == 0:
        return None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(_sources(multiprocess_dir()), ()))
    try:
        server, thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        logger.warning("metrics: cannot serve /metrics on port %d: %s", port, exc)
        return None
    logger.info("metrics: serving /metrics on port %d", port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
