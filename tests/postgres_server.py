"""A throwaway PostgreSQL server for tests: `postgres_server` (one per test module; initdb +
pg_ctl, unix socket only, so no port is taken) and `postgres_url` (a fresh database in it per test).
Import both fixtures into a test module that needs them; `create_database` gives a module-scoped
fixture a database of its own."""
from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import URL, create_engine, text

from storage.db import get_engine

pytest.importorskip("psycopg", reason="the PostgreSQL driver is in the `postgres` and `test` extras")

SUPERUSER = "facemine"


def _server_tool(name: str) -> str | None:
    """A PostgreSQL server binary: on PATH, else where Debian's `postgresql` package keeps it."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda d: int(d.parent.name), reverse=True)
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *map(str, debian)]))


def _as_server_user(root: Path) -> list[str]:
    """Command prefix to run the server's tools: PostgreSQL refuses to run as root."""
    if os.geteuid() != 0:
        return []
    try:
        account = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root without a `postgres` user to run the PostgreSQL server as")
    os.chown(root, account.pw_uid, account.pw_gid)
    return ["runuser", "-u", "postgres", "--"]


def _url(socket_dir: Path, database: str) -> str:
    url = URL.create("postgresql+psycopg", username=SUPERUSER, database=database, query={"host": str(socket_dir)})
    return url.render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[Path]:
    """A PostgreSQL server for this module; yields the folder of its unix socket."""
    initdb, pg_ctl = _server_tool("initdb"), _server_tool("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    # Not under pytest's tmp folder: that one is private to the user running pytest.
    root = Path(tempfile.mkdtemp(prefix="facemine-pg-"))
    data = root / "data"
    try:
        prefix = _as_server_user(root)
        run = [*prefix, initdb, "-D", str(data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-sync"]
        subprocess.run(run, check=True, capture_output=True)
        # Unix socket only (-h ''), no fsync: a throwaway server that takes no TCP port.
        server_options = f"-h '' -k {root} -F"
        log = root / "server.log"
        start = [*prefix, pg_ctl, "-D", str(data), "-l", str(log), "-w", "-o", server_options, "start"]
        started = subprocess.run(start, capture_output=True, text=True)
        if started.returncode != 0:
            server_log = log.read_text() if log.exists() else ""
            pytest.fail(f"PostgreSQL did not start: {started.stdout}{started.stderr}{server_log}")
        try:
            yield root
        finally:
            stop = [*prefix, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"]
            subprocess.run(stop, check=True, capture_output=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


_database_numbers = itertools.count()


def create_database(server: Path) -> str:
    """SQLAlchemy URL of a new, empty database on `server` (the `postgres_server` fixture's value)."""
    name = f"facemine_{next(_database_numbers)}"
    admin = create_engine(_url(server, "postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return _url(server, name)


@pytest.fixture
def postgres_url(postgres_server: Path) -> Iterator[str]:
    """SQLAlchemy URL of a fresh, empty database on the module's server."""
    url = create_database(postgres_server)
    yield url
    get_engine(url).dispose()
