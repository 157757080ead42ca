"""A real S3 API server on loopback for the storage tests: moto's server mode.

No MinIO server installs from PyPI or Debian, so the suite runs moto's S3
(``moto[s3]`` with flask, pinned in requirements.lock) as its own process on a
free port. It keeps objects in memory: a ``restart`` on the same port is a store
that went away and came back empty. Under ``CI=true`` a server that cannot start
fails the tests that need it; elsewhere they are skipped with the reason.
"""

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ROOT, free_port, wait_http

ACCESS_KEY = "test-access-key"
SECRET_KEY = "test-secret-key-0123456789"
REGION = "us-east-1"


class S3Server:
    def __init__(self, logs: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._logs = logs
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self._logs / "moto.log").open("ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                cwd=ROOT,
                stdout=log,
                stderr=log,
                env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
            )
        wait_http(f"{self.url}/moto-api/", proc=self._proc)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_bucket(self, name: str | None = None) -> str:
        bucket = name or f"tg-{uuid.uuid4().hex[:12]}"
        # moto accepts unsigned requests: a plain PUT makes the bucket.
        httpx.put(f"{self.url}/{bucket}", trust_env=False).raise_for_status()
        return bucket

    def client(self) -> Any:
        """A boto3 client of the server: a client other than ours, to check what we did."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        # Each client closed after use: one left to the garbage collector warns of its
        # socket in whichever test is running then, and fails it.
        with contextlib.closing(self.client()) as client:
            found = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        return sorted(item["Key"] for item in found)

    def read(self, bucket: str, key: str) -> tuple[bytes, str]:
        """An object's bytes and content type."""
        with contextlib.closing(self.client()) as client:
            got = client.get_object(Bucket=bucket, Key=key)
            return got["Body"].read(), got["ContentType"]

    def delete(self, bucket: str, key: str) -> None:
        """Remove an object behind Tollgate's back (a bucket rule, an operator)."""
        with contextlib.closing(self.client()) as client:
            client.delete_object(Bucket=bucket, Key=key)


@contextlib.contextmanager
def s3_server(logs: Path) -> Iterator[S3Server]:
    try:
        import moto.server  # noqa: F401
    except ImportError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the S3 test server (moto[s3] with flask) is not installed: {exc}")
        pytest.skip(f"the S3 test server is not installed: {exc}")
    server = S3Server(logs)
    try:
        server.start()
    except (RuntimeError, TimeoutError) as exc:
        server.stop()
        if os.environ.get("CI") == "true":
            pytest.fail(f"the S3 test server did not start: {exc}")
        pytest.skip(f"the S3 test server did not start: {exc}")
    try:
        yield server
    finally:
        server.stop()


def s3_settings(server: S3Server, bucket: str, prefix: str = "") -> dict[str, object]:
    """Settings that point storage at ``bucket`` on ``server``."""
    return {
        "storage_url": f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}",
        "storage_endpoint_url": server.url,
        "storage_region": REGION,
        "storage_access_key_id": ACCESS_KEY,
        "storage_secret_access_key": SECRET_KEY,
        "storage_timeout_seconds": 3.0,
    }
