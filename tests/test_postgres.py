"""Storage on PostgreSQL: migrations, idempotent shard writes and concurrent runs on real photos.

A throwaway server is started per module (tests/postgres_server.py); every test gets a fresh
database in it.
"""
# ruff: noqa: F811
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import create_engine, text

# The server's fixtures, used by name (hence the file-wide noqa: pytest's idiom for shared fixtures).
from postgres_server import postgres_server, postgres_url  # noqa: F401
from storage.db import get_engine
from storage.settings import Settings
from storage.store import Store
from test_mine_flow import assert_concurrent_runs_create_no_duplicates, assert_same_rows, lfw_photos, stored_rows
from test_storage import schema_differences

pytest.importorskip("psycopg", reason="the PostgreSQL driver is in the `postgres` and `test` extras")


def test_migrations_create_exactly_the_models_schema(tmp_path, postgres_url):
    settings = Settings(data_dir=tmp_path, database_url=postgres_url)
    Store(settings)
    Store(settings)  # migrating twice is harmless
    assert get_engine(postgres_url).dialect.name == "postgresql"
    assert schema_differences(postgres_url) == []


def test_mined_shard_is_stored_once(tmp_path, postgres_url):
    from usecases.mining import mine_paths

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
