"""``benchmarks/storage.py`` works: a handful of tasks per backend, every image stored."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import REDIS_URL, ROOT, SERVER_URL


def test_the_storage_benchmark_runs_each_backend_to_the_end(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "storage.py"),
            "--database-url",
            SERVER_URL,
            "--redis-url",
            REDIS_URL,
            "--tasks",
            "4",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert [f["backend"] for f in figures] == ["file", "s3"]
    for f in figures:
        assert f["completed"] == f["objects_stored"] == 4, f
        assert f["tasks_per_s"] > 0
