"""The benchmark's paced load (``benchmarks/paced.py``) against a real HTTP server: it
sends at the rate asked, spread out in time rather than in bursts, and counts what came
back. Nothing here measures the server."""

import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import ROOT


class Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the gateway serves
    arrivals: list[float] = []

    def do_POST(self) -> None:
        Recorder.arrivals.append(time.monotonic())
        body = self.rfile.read(int(self.headers["Content-Length"]))
        status = 500 if b"fail" in body else 202
        answer = b'{"ok":true}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    Recorder.arrivals = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1/images/generations"
    finally:
        httpd.shutdown()
        httpd.server_close()


def paced(*argv: str) -> tuple[int, dict[str, object]]:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.paced", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, json.loads(done.stdout)


def test_requests_are_sent_at_the_rate_spread_out_and_counted(server: str, tmp_path: Path) -> None:
    dump = tmp_path / "dump.txt"
    code, result = paced(
        server, "--rate", "200", "--seconds", "1.5", "--method", "POST",
        "--header", "Authorization: Bearer k", "--body", '{"prompt": "x"}', "--dump", str(dump),
    )  # fmt: skip
    assert code == 0
    assert result["requests"] == len(Recorder.arrivals) == 300
    assert result["non_2xx"] == result["errors"] == 0
    assert 0 < result["p50_ms"] <= result["p90_ms"] <= result["p99_ms"] <= result["max_ms"]  # type: ignore[operator]
    # Spread out: one request every 5 ms, not bunches (a burst's gaps are ~0).
    gaps = [b - a for a, b in zip(Recorder.arrivals, Recorder.arrivals[1:], strict=False)]
    assert statistics.median(gaps) > 0.0025
    span = Recorder.arrivals[-1] - Recorder.arrivals[0]
    assert 1.3 < span < 3.0
    lines = dump.read_text().splitlines()
    assert len(lines) == 300
    assert all(float(line.split()[1]) > 0 for line in lines)


def test_error_answers_and_unreachable_servers_are_counted(server: str) -> None:
    code, result = paced(
        server, "--rate", "50", "--seconds", "0.4", "--method", "POST", "--body", '"fail"'
    )
    assert code == 0  # answers came back, even if they are errors
    assert result["requests"] == result["non_2xx"] == 20

    closed = server.replace(server.split(":")[2].split("/")[0], "9")  # port 9: discard
    code, result = paced(closed, "--rate", "20", "--seconds", "0.2")
    assert code == 1
    assert result["requests"] == 0
    assert result["errors"] == 4
