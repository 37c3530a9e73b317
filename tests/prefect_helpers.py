"""A real local Prefect server and a `facemine serve` process for the end-to-end tests.

Both run as subprocesses in their own process groups (so flow runs they spawn stop with
them), log to files in the test's folder, and every wait is bounded with a clear message.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVER_START_SECONDS = 180
# A cron that never comes due while a test runs: keeps the scheduled cluster out of the way.
NEVER_DURING_TESTS = "0 0 1 1 *"
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def wait_for(check: Callable[[], T | None], timeout: float, what: str, logs: list[Path], every: float = 2.0) -> T:
    """Poll `check` until it returns something truthy; fail with the logs' tails after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    tails = "\n".join(f"--- {log.name} ---\n{log_tail(log)}" for log in logs)
    pytest.fail(f"gave up after {timeout:.0f} s waiting for {what}\n{tails}")


def prefect_env(home: Path, api_url: str, **extra: str) -> dict[str, str]:
    """Environment of the server and serve processes: their own Prefect home, no telemetry.

    As in the README, the server too gets PREFECT_API_URL: its UI calls the API there (it
    would assume port 4200 otherwise)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("PREFECT_", "FACEMINE_"))}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        FACEMINE_CONFIG=os.devnull,  # no config file: an empty one (a missing one is an error)
    )
    env.update(extra)
    return env


def _start(command: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    """Ctrl-C the process group (serve pauses its schedules), then kill what is left of it."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # flow-run subprocesses left in the group
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def prefect_server(folder: Path) -> Iterator[tuple[str, Path]]:
    """`prefect server start` on a free 127.0.0.1 port; yields (API URL, Prefect home)."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    home = folder / "prefect-home"
    log = folder / "prefect-server.log"
    prefect = str(Path(sys.executable).parent / "prefect")
    command = [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    process = _start(command, prefect_env(home, api_url), log, folder)
    try:
        wait_for(
            lambda: _healthy(api_url) or process.poll() is not None,
            SERVER_START_SECONDS, f"the Prefect server at {api_url}/health", [log],
        )
        if process.poll() is not None:
            pytest.fail(f"the Prefect server exited with code {process.returncode}\n{log_tail(log)}")
        yield api_url, home
    finally:
        _stop(process)


@contextmanager
def facemine_serve(folder: Path, env: dict[str, str]) -> Iterator[Path]:
    """`facemine serve` with `env`; yields its log file."""
    log = folder / "facemine-serve.log"
    process = _start([sys.executable, "-m", "facemine_cli", "serve"], env, log, folder)
    try:
        yield log
    finally:
        _stop(process)
        assert process.returncode is not None


@contextmanager
def api_client(api_url: str):  # noqa: ANN201 - prefect SyncPrefectClient
    """A Prefect client of this test's server (the session may have another one configured)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        yield client


def read_deployment(client, name: str):  # noqa: ANN001, ANN201 - prefect DeploymentResponse | None
    """The deployment "flow/deployment", or None until `facemine serve` has registered it."""
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(name)
    except ObjectNotFound:
        return None


def deployment_runs(client, deployment_id) -> list:  # noqa: ANN001
    """Flow runs of a deployment, oldest expected start first."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC,
    )


def require_chromium(path: str = "/usr/bin/chromium") -> str:
    """The Debian chromium the browser test drives; fails (never skips) without it."""
    if not Path(path).exists():
        pytest.fail(f"{path} not found: install Debian's chromium (`apt-get install -y chromium`), "
                    "as scripts/test.sh does")
    return path
