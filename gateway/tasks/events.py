"""The completion signal: every gateway process learns within milliseconds that a task
changed, so a client can wait for a task instead of polling it.

Rules:

- **What is sent.** A task id, on one Redis pub/sub channel per deployment
  (``redis_keys.task_events_channel``), whenever a transition visible to clients
  commits: claimed (processing), progress recorded, cancellable or not, and every
  end. The message carries no state: PostgreSQL stays the one truth, and a
  subscriber reads the row.
- **Who sends it.** ``gateway/tasks/lifecycle.py`` calls ``task_changed`` inside
  the transaction of the change; the id is published only once that transaction
  has committed *and* its connection is back in the pool, so a subscriber that
  reads the row at once sees the change (a COMMIT still in flight would hide it).
  A change made by one autocommit statement (the worker's, ``gateway.db.Statements``)
  is signalled with ``committed`` once the statement has returned.
  A rollback publishes nothing. An engine with no ``Publisher`` attached (the
  CLI, a test) publishes nothing either. Publishing is best effort: a signal lost
  on its way costs a waiter its early answer, never its answer (below).
- **Who listens.** ``TaskEvents``, one per gateway process: ONE subscription,
  whatever the number of waiting requests. A request waiting on a task registers
  a ``Watch``; a signal for a watched task is turned into one read of the task
  row per process, on the hot asyncpg pool (signals that arrive together are read together, in one
  query), and the fresh row is handed to every watch of that task. No waiting
  request queries the database or holds a connection while it waits, and
  nothing polls.
- **Lost signals.** Pub/sub forgets what is sent while a subscriber is
  disconnected. After every (re)connection ``TaskEvents`` re-reads every watched
  task, so a waiter learns of an end it missed as soon as Redis is back; a
  waiter whose own deadline comes first re-reads its task then
  (``gateway/tasks/waiting.py``). Neither waits for the other.
"""

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterator
from typing import Any
from weakref import WeakKeyDictionary

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import Pool

from gateway.logs import OutageLog
from gateway.tasks.service import TaskRecord

logger = logging.getLogger("tollgate.events")

# Ids read per query when many watched tasks changed at once (well under asyncpg's limit).
READ_CHUNK = 1000
# The rows of signalled tasks, as ``GET /v1/tasks/{id}`` reads one (whatever their tenant:
# each watch's request read its task as its tenant's before it waited).
_READ_MANY = (
    f"SELECT {', '.join(TaskRecord.__dataclass_fields__)} FROM tasks WHERE id = ANY($1::text[])"
)
# Pauses between attempts to (re)connect the subscription: doubling up to the cap.
RECONNECT_FIRST_SECONDS = 0.05
RECONNECT_MAX_SECONDS = 2.0


# --- Publishing ---------------------------------------------------------------------


class Publisher:
    """Sends the ids of changed tasks, in the order their transactions committed.

    ``emit`` never blocks and never fails: ids wait in memory for the sending
    task (started by ``start``), which publishes whatever has gathered in one
    round trip (a script of PUBLISHes). A Redis error drops that batch (logged):
    waiters re-read at their deadline.
    """

    def __init__(self, redis: Redis, channel: str) -> None:
        self.redis = redis
        self.channel = channel
        self._ids: list[str] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._sender: asyncio.Task[None] | None = None
        self.published = 0
        self.dropped = 0
        self._outage = OutageLog(logger)

    def start(self) -> None:
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_forever(), name="task-events-publisher")

    def emit(self, task_id: str) -> None:
        self._ids.append(task_id)
        self._wake.set()

    async def _send_forever(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            await self._send_gathered()
        await self._send_gathered()  # what came in while closing

    async def _send_gathered(self) -> None:
        ids, self._ids = self._ids, []
        if not ids:
            return
        try:
            await self.redis.eval(_PUBLISH_ALL, 1, self.channel, *ids)  # type: ignore[misc]
            self.published += len(ids)
        except (RedisError, OSError) as exc:
            self.dropped += len(ids)
            self._outage.failed("task signals not sent (%d): %s", len(ids), exc)

    async def close(self, grace_seconds: float = 1.0) -> None:
        """Send what is still waiting (for at most ``grace_seconds``), then stop."""
        sender, self._sender = self._sender, None
        if sender is None:
            return
        self._closing = True
        self._wake.set()
        try:
            async with asyncio.timeout(grace_seconds):
                await asyncio.shield(sender)
        except TimeoutError:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender


# One round trip for a batch of signals, without a pipeline object to leave half-used.
_PUBLISH_ALL = """
for i = 1, #ARGV do redis.call('PUBLISH', KEYS[1], ARGV[i]) end
return #ARGV
"""


# Which publisher sends the signals of an engine's transactions (one per process).
_publishers: "WeakKeyDictionary[Engine, Publisher]" = WeakKeyDictionary()
# Signals of transactions still open, by connection; then of committed ones, by the
# DBAPI connection, until it is back in the pool.
_open: "WeakKeyDictionary[Connection, list[tuple[Publisher, str]]]" = WeakKeyDictionary()
_committed: dict[int, list[tuple[Publisher, str]]] = {}
_hooked = False


def attach(engine: AsyncEngine, publisher: Publisher) -> None:
    """Publish the task changes committed through ``engine`` with ``publisher``."""
    _hook()
    _publishers[engine.sync_engine] = publisher


def detach(engine: AsyncEngine) -> None:
    _publishers.pop(engine.sync_engine, None)


def task_changed(conn: AsyncConnection, task_id: str) -> None:
    """Signal that ``task_id`` changed, once ``conn``'s transaction has committed."""
    publisher = _publishers.get(conn.sync_engine)
    if publisher is not None:
        _open.setdefault(conn.sync_connection, []).append((publisher, task_id))  # type: ignore[arg-type]


def committed(engine: AsyncEngine, task_id: str) -> None:
    """Signal that ``task_id`` changed in a statement that has already committed (one
    outside any of ``engine``'s transactions: ``gateway.db.Statements``)."""
    publisher = _publishers.get(engine.sync_engine)
    if publisher is not None:
        publisher.emit(task_id)


def _hook() -> None:
    global _hooked
    if not _hooked:
        # On the classes: every engine and pool, whenever it was made.
        event.listen(Engine, "commit", _on_commit)
        event.listen(Engine, "rollback", _on_rollback)
        event.listen(Pool, "checkin", _on_checkin)
        _hooked = True


def _on_commit(conn: Connection) -> None:
    # Called just before the COMMIT is sent: hold the signals until the connection
    # comes back to the pool, which is after the COMMIT has completed.
    signals = _open.pop(conn, None)
    if signals:
        _committed.setdefault(id(conn.connection.dbapi_connection), []).extend(signals)


def _on_rollback(conn: Connection) -> None:
    _open.pop(conn, None)


def _on_checkin(dbapi_connection: Any, record: Any) -> None:
    for publisher, task_id in _committed.pop(id(dbapi_connection), ()):
        publisher.emit(task_id)


# --- Listening ----------------------------------------------------------------------


class Watch:
    """One waiting request's view of a task: the newest row the subscriber read."""

    __slots__ = ("_changed", "task", "task_id")

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.task: TaskRecord | None = None
        self._changed = asyncio.Event()

    def deliver(self, task: TaskRecord) -> None:
        self.task = task
        self._changed.set()

    async def changed(self, within: float) -> TaskRecord | None:
        """The task once it is read fresh, or None when ``within`` seconds pass first."""
        if not self._changed.is_set():
            try:
                async with asyncio.timeout(max(within, 0)):
                    await self._changed.wait()
            except TimeoutError:
                return None
        self._changed.clear()
        return self.task


class TaskEvents:
    """The gateway process's one subscription to task signals, and its waiting requests."""

    def __init__(
        self,
        redis_url: str,
        channel: str,
        pg: Any,
        *,
        health_check_seconds: int = 5,
    ) -> None:
        self.redis_url = redis_url
        self.channel = channel
        self.pg = pg  # asyncpg.Pool (untyped): the hot paths' pool, gateway/db.create_hot_pool
        self.health_check_seconds = health_check_seconds
        # A name to find this subscription by in CLIENT LIST (operators, tests).
        self.client_name = f"tollgate-events-{uuid.uuid4().hex[:12]}"
        self._watches: dict[str, set[Watch]] = {}
        self._stale: set[str] = set()
        self._read_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.connected = asyncio.Event()
        self.connections = 0  # successful subscriptions, the first included
        self.signals = 0  # signals received for watched tasks
        self.reads = 0  # queries made to read signalled tasks

    # -- the waiting side

    @contextlib.contextmanager
    def watch(self, task_id: str) -> Iterator[Watch]:
        """Watch ``task_id`` for the block; register before reading the task, so no
        change between the read and the registration goes unseen."""
        watch = Watch(task_id)
        self._watches.setdefault(task_id, set()).add(watch)
        try:
            yield watch
        finally:
            watchers = self._watches.get(task_id)
            if watchers is not None:
                watchers.discard(watch)
                if not watchers:
                    del self._watches[task_id]

    @property
    def waiting(self) -> int:
        return sum(len(watchers) for watchers in self._watches.values())

    # -- running

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._subscribe_forever(), name="task-events-subscriber"),
            asyncio.create_task(self._read_forever(), name="task-events-reader"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self.connected.clear()

    async def _subscribe_forever(self) -> None:
        pause = RECONNECT_FIRST_SECONDS
        warned = False  # the loss is one warning, its failed reconnects debug lines
        while True:
            # A fresh client for every connection, so no reconnection happens unseen
            # inside redis-py: each one is followed by the re-read below.
            client: Redis = Redis.from_url(
                self.redis_url,
                client_name=self.client_name,
                health_check_interval=self.health_check_seconds,
                socket_connect_timeout=2,
            )
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.connections += 1
                self.connected.set()
                pause, warned = RECONNECT_FIRST_SECONDS, False
                if self.connections > 1:
                    logger.info("task signals: subscribed again; re-reading watched tasks")
                # Whatever was signalled while disconnected is lost: read every watched
                # task (after the first connection too, in case a waiter came early).
                self._mark_stale(list(self._watches))
                while True:
                    message = await pubsub.get_message(timeout=self.health_check_seconds)
                    if message is not None and message["type"] == "message":
                        self._signal(message["data"])
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self.connected.clear()
                log = logger.debug if warned else logger.warning
                log("task signals: subscription lost (%s); reconnecting", exc)
                warned = True
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(pause)
            pause = min(pause * 2, RECONNECT_MAX_SECONDS)

    def _signal(self, data: bytes) -> None:
        task_id = data.decode("utf-8", "replace")
        if task_id in self._watches:
            self.signals += 1
            self._mark_stale([task_id])

    def _mark_stale(self, task_ids: list[str]) -> None:
        if task_ids:
            self._stale.update(task_ids)
            self._read_wake.set()

    async def _read_forever(self) -> None:
        while True:
            await self._read_wake.wait()
            self._read_wake.clear()
            # Everything signalled while the previous read ran is read together.
            stale = [task_id for task_id in self._stale if task_id in self._watches]
            self._stale.clear()
            for start in range(0, len(stale), READ_CHUNK):
                chunk = stale[start : start + READ_CHUNK]
                try:
                    rows = await self._read(chunk)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # The waiters' own deadlines still end their waits with a re-read.
                    logger.exception("task signals: reading %d signalled tasks failed", len(chunk))
                    continue
                for task in rows:
                    for watch in list(self._watches.get(task.id, ())):
                        watch.deliver(task)

    async def _read(self, task_ids: list[str]) -> list[TaskRecord]:
        self.reads += 1
        return [TaskRecord(*row) for row in await self.pg.fetch(_READ_MANY, task_ids)]
