"""Storage on PostgreSQL: migrations, idempotent shard writes and concurrent runs on real photos.

A throwaway server is started per module (initdb + pg_ctl, unix socket only, so no port is
taken); every test gets a fresh database in it.
"""
from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import URL, create_engine, text

from storage.db import get_engine
from storage.settings import Settings
from storage.store import Store
from test_mine_flow import assert_concurrent_runs_create_no_duplicates, assert_same_rows, lfw_photos, stored_rows
from test_storage import schema_differences

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


@pytest.fixture
def postgres_url(postgres_server: Path) -> Iterator[str]:
    """SQLAlchemy URL of a fresh, empty database on the module's server."""
    name = f"facemine_{next(_database_numbers)}"
    admin = create_engine(_url(postgres_server, "postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = _url(postgres_server, name)
    yield url
    get_engine(url).dispose()


def test_migrations_create_exactly_the_models_schema(tmp_path, postgres_url):
    settings = Settings(data_dir=tmp_path, database_url=postgres_url)
    Store(settings)
    Store(settings)  # migrating twice is harmless
    assert get_engine(postgres_url).dialect.name == "postgresql"
    assert schema_differences(postgres_url) == []


def test_mined_shard_is_stored_once(tmp_path, postgres_url):
    from flows.mine import mine_paths

    settings = Settings(data_dir=tmp_path / "data", database_url=postgres_url)
    photos = [str(p) for p in lfw_photos(6, start=3000)]

    first = mine_paths("pg", photos, settings)
    rows = stored_rows(settings.data_dir, postgres_url)
    assert first["photos_new"] == 6 and first["faces_found"] >= 6  # every LFW photo shows a face
    assert sorted(rows.path.unique()) == sorted(photos)
    assert len(rows) == first["faces_found"] and rows.vector.map(len).eq(128).all()
    counts = {(c["what"], c["reason"]): c["count"] for c in Store(settings).status_counts() if c["subset"] == "pg"}
    assert counts[("photos ok", "")] == 6

    again = mine_paths("pg", photos, settings)
    assert (again["photos_new"], again["photos_unchanged"], again["faces_found"]) == (0, 6, 0)
    assert_same_rows(rows, stored_rows(settings.data_dir, postgres_url))


def _wait_for_lock_waiter(url: str, seconds: float = 120.0) -> bool:
    """Whether, within `seconds`, some session waits on a lock (the other writer, held up by us)."""
    # A plain engine: storage's own engine may take a lock at BEGIN, which this writer holds.
    observer = create_engine(url)
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with observer.connect() as connection:
                if connection.scalar(text("SELECT count(*) FROM pg_locks WHERE NOT granted")):
                    return True
            time.sleep(0.05)
        return False
    finally:
        observer.dispose()


def test_shard_writes_in_flight_together_store_each_photo_once(tmp_path, postgres_url, monkeypatch):
    from usecases.runtime import miner_for

    settings = Settings(data_dir=tmp_path / "data", database_url=postgres_url)
    store = Store(settings)
    miner, model = miner_for(settings)
    records = miner.process([str(p) for p in lfw_photos(4, start=3100)])
    overlapped = []
    add_shard = Store._add_shard

    def add_shard_once_the_other_writer_waits(self, *args):  # noqa: ANN001, ANN202
        # The first writer pauses before its commit until the second writer waits on a lock,
        # so both transactions storing the same photos are open at once.
        if not overlapped:
            overlapped.append(_wait_for_lock_waiter(postgres_url))
        return add_shard(self, *args)

    monkeypatch.setattr(Store, "_add_shard", add_shard_once_the_other_writer_waits)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(store.write_mine_shard, "race", model, records) for _ in range(2)]
        summaries = sorted((future.result() for future in futures), key=lambda s: s.photos_new)
    assert overlapped == [True]
    assert (summaries[0].photos_new, summaries[0].photos_unchanged) == (0, 4)
    assert (summaries[1].photos_new, summaries[1].photos_unchanged) == (4, 0)
    rows = stored_rows(settings.data_dir, postgres_url)
    assert rows.path.nunique() == 4 and len(rows) == summaries[1].faces_found
    assert not rows.duplicated(["path", "face_index"]).any()


def test_concurrent_runs_on_overlapping_photos_create_no_duplicates(tmp_path, postgres_url):
    assert_concurrent_runs_create_no_duplicates(Settings(data_dir=tmp_path / "data", database_url=postgres_url))


def test_migration_0002_merges_copies_on_postgresql(tmp_path, postgres_url):
    from test_migration import check_0002_merges_copies_keeping_every_decision

    check_0002_merges_copies_keeping_every_decision(Settings(data_dir=tmp_path, database_url=postgres_url))
