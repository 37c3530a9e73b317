"""A local S3-compatible server for tests: moto's (`moto[server]`, in the `test` extra).

moto is pure Python and installs with pip, so CI and every developer machine get it from the
project's own dependencies: no daemon or binary to install, no account, no network. It runs as a
separate process (`python -m moto.server`) on 127.0.0.1, on a free port, for the test session, and
is stopped after it; its objects live in its memory only.

Stable names (other test modules import them; keep them):
- `s3_server` (pytest fixture, session scope): the running server, an `S3Server`.
- `s3_bucket` (pytest fixture): a fresh, empty bucket on it for one test; yields its name.
- `S3Server.settings_fields(bucket, prefix)`: keyword arguments of `Settings` for a data root
  `s3://bucket/prefix` on this server (`data_root`, `object_store`); `S3Server.environment(...)`:
  the same as `FACEMINE_*` variables, for processes that read their settings from the environment
  (Dask workers, CLI subprocesses). An object-storage data root needs `database_url` too.

Use: `from s3_server import s3_bucket, s3_server  # noqa: F401` in the test module.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from storage.settings import ObjectStoreConfig

KEY = SECRET = "facemine-test"  # moto accepts any credentials
START_TIMEOUT_SECONDS = 60


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    key: str = KEY
    secret: str = SECRET

    def object_store(self) -> ObjectStoreConfig:
        return ObjectStoreConfig(endpoint_url=self.endpoint_url, key=self.key, secret=self.secret,
                                 options={"client_kwargs": {"region_name": "eu-west-1"}})

    def settings_fields(self, bucket: str, prefix: str = "facemine") -> dict:
        return {"data_root": f"s3://{bucket}/{prefix}", "object_store": self.object_store()}

    def environment(self, bucket: str, prefix: str = "facemine") -> dict[str, str]:
        return {
            "FACEMINE_DATA_ROOT": f"s3://{bucket}/{prefix}",
            "FACEMINE_OBJECT_STORE__ENDPOINT_URL": self.endpoint_url,
            "FACEMINE_OBJECT_STORE__KEY": self.key,
            "FACEMINE_OBJECT_STORE__SECRET": self.secret,
            "FACEMINE_OBJECT_STORE__OPTIONS": '{"client_kwargs": {"region_name": "eu-west-1"}}',
        }

    def filesystem(self):  # noqa: ANN201 - s3fs.S3FileSystem
        import s3fs

        return s3fs.S3FileSystem(key=self.key, secret=self.secret, endpoint_url=self.endpoint_url,
                                 client_kwargs={"region_name": "eu-west-1"}, use_listings_cache=False,
                                 skip_instance_cache=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # it answered
    except OSError:
        return False


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    pytest.importorskip("moto.server", reason="moto[server] is in the `test` extra")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # Its log (a line per request) goes to a file: a pipe nobody reads fills up after a few
    # hundred requests, and then the server blocks on its next log line.
    log_path = tmp_path_factory.mktemp("moto") / "server.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=log,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not _answers(f"{endpoint}/moto-api/"):
            if process.poll() is not None:
                raise RuntimeError(f"moto server exited: {log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto server did not answer on {endpoint} within {START_TIMEOUT_SECONDS} s")
            time.sleep(0.2)
        yield S3Server(endpoint)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket for one test."""
    name = f"facemine-{uuid.uuid4().hex[:12]}"
    s3_server.filesystem().mkdir(name)
    return name
