"""``python3 scripts/dev.py run`` supervises: a part that dies is restarted with a line
saying so, the others keep serving, and Ctrl-C still stops everything.

The runner is started as a real process against the suite's PostgreSQL database and Redis
(with queue names and ports of its own), then its worker is killed with SIGKILL.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import ADMIN_TOKEN, ENCRYPTION_KEYS, REDIS_URL, ROOT, free_port

sys.path.insert(0, str(ROOT / "scripts"))
import dev


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


class Lines:
    """The runner's stderr, read as it comes."""

    def __init__(self, stream: object) -> None:
        self.text = ""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            with self._lock:
                self.text += line

    def join(self) -> None:
        self._thread.join(10)

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = re.search(pattern, self.text)
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} in the runner's output:\n{self.text[-4000:]}")


def test_the_runner_restarts_a_part_that_dies(database_url: str) -> None:
    port, sim_port, metrics_port = free_port(), free_port(), free_port()
    queue = f"tollgate:test-dev-run:{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    env.update(
        TOLLGATE_DATABASE_URL=database_url,
        TOLLGATE_REDIS_URL=REDIS_URL,
        TOLLGATE_QUEUE_NAME=queue,
        TOLLGATE_CALLBACK_QUEUE_NAME=f"{queue}:callbacks",
        TOLLGATE_DEV_PORT=str(port),
        TOLLGATE_DEV_SIM_PORT=str(sim_port),
        TOLLGATE_METRICS_PORT=str(metrics_port),
        TOLLGATE_ADMIN_TOKEN=ADMIN_TOKEN,
        TOLLGATE_SIGNING_SECRET="test-signing-secret-0123456789",
        TOLLGATE_ENCRYPTION_KEYS=ENCRYPTION_KEYS,
        TOLLGATE_DEV_SIM_KEY="sim-test-key",
    )
    runner = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "dev.py"), "run"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = Lines(runner.stderr)
    try:
        worker = int(lines.wait_for(r"started the worker \(pid (\d+)\)")[1])
        lines.wait_for(r"waiting for the gateway")
        deadline = time.monotonic() + 60
        while not dev._healthy(f"http://127.0.0.1:{port}/healthz"):
            assert runner.poll() is None, lines.text[-4000:]
            assert time.monotonic() < deadline, lines.text[-4000:]
            time.sleep(0.2)
        time.sleep(1)
        os.kill(worker, signal.SIGKILL)
        lines.wait_for(r"the worker was killed by SIGKILL; restarting it in 1s")
        again = int(lines.wait_for(r"restarted the worker \(pid (\d+)\)")[1])
        assert again != worker
        time.sleep(1.5)
        assert _alive(again), lines.text[-4000:]
        assert runner.poll() is None, "the runner stopped when one part died"
        answer = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5, trust_env=False)
        assert answer.status_code == 200
    finally:
        runner.send_signal(signal.SIGINT)
        try:
            code = runner.wait(60)
        except subprocess.TimeoutExpired:
            runner.kill()
            raise
        lines.join()
        if runner.stderr is not None:
            runner.stderr.close()
    assert code == 0, lines.text[-4000:]
    assert not _alive(again), "Ctrl-C left the restarted worker running"


@pytest.mark.parametrize(
    ("ran_for", "restarts", "delay"),
    [(0.5, 0, 1), (0.5, 1, 2), (0.5, 3, 8), (0.5, 20, 30), (60.0, 5, 1)],
)
def test_back_off_grows_while_a_part_keeps_dying(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ran_for: float, restarts: int, delay: int
) -> None:
    log = tmp_path / "part.log"
    argv = [sys.executable, "-c", "raise SystemExit(3)"]
    process = subprocess.Popen(argv)
    process.wait()
    child = dev.Child("part", process, log, argv, dict(os.environ), started=100.0)
    child.restarts = restarts
    monkeypatch.setattr(dev, "REPO", tmp_path)  # the log is named relative to it
    dev.supervise([child], now=100.0 + ran_for)
    assert child.restart_at == pytest.approx(100.0 + ran_for + delay)
    dev.supervise([child], now=100.0 + ran_for + delay)
    assert child.restart_at is None
    assert child.process is not process
    child.process.wait()
    assert child.process.returncode == 3


def test_the_soak_command_runs_the_soak() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "dev.py"), "soak", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for option in ("--rate", "--duration", "--kills", "--short", "--json"):
        assert option in done.stdout


def test_the_runner_starts_its_embedded_redis_again_when_it_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    first = dev._start_redis(tmp_path, port)
    own = dev.OwnRedis(tmp_path, port, first)
    monkeypatch.setattr(dev, "_own_redis", own)
    try:
        first.send_signal(signal.SIGKILL)
        first.wait()
        dev.supervise_redis(now=100.0)
        assert own.restart_at == pytest.approx(101.0)  # the parts' first back-off
        assert not dev._redis_answers(("127.0.0.1", port))
        dev.supervise_redis(now=101.0)
        assert own.process.pid != first.pid
        assert dev._redis_answers(("127.0.0.1", port)), "not started again on its port"
        state = dev._read_json(tmp_path / "server.json")
        assert state["pid"] == own.process.pid, state  # the runner's exit stops this one
        dev.supervise_redis(now=102.0)  # alive: nothing to do
        assert own.restart_at is None
    finally:
        own.process.kill()
        own.process.wait()
