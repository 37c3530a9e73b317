"""Engine, sessions and migrations. SQLite (WAL) by default; PostgreSQL or any SQLAlchemy URL by setting."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Stay far below every database's limit on bound parameters per statement.
IN_CLAUSE_CHUNK = 5000
# Key of the advisory lock every facemine transaction on a PostgreSQL database takes ("face").
POSTGRES_LOCK_KEY = 0x66616365
T = TypeVar("T")


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection, _record) -> None:  # noqa: ANN001 - DBAPI types
        # Let SQLAlchemy issue BEGIN itself so writers can take the lock up front (below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection) -> None:  # noqa: ANN001
        # IMMEDIATE takes the write lock at BEGIN: two concurrent runs serialise their shard
        # writes instead of failing mid-transaction on lock upgrade.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _configure_postgresql(engine: Engine) -> None:
    @event.listens_for(engine, "begin")
    def on_begin(connection) -> None:  # noqa: ANN001
        # Storage relies on one transaction at a time, as BEGIN IMMEDIATE gives on SQLite
        # (get-or-create of subsets, photos and models; max + 1 versions). Under READ COMMITTED
        # two runs would both miss a row and both insert it, and one would fail on the unique
        # constraint; this lock serialises them instead and is released at COMMIT or ROLLBACK.
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({POSTGRES_LOCK_KEY})")


def in_chunks(values: Sequence[T]) -> Iterator[Sequence[T]]:
    """`values` in slices small enough for one `IN (...)` clause."""
    for start in range(0, len(values), IN_CLAUSE_CHUNK):
        yield values[start : start + IN_CLAUSE_CHUNK]


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        db_path = url.split("///", 1)[-1]
        if db_path and db_path != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60})
        _configure_sqlite(engine)
        return engine
    engine = create_engine(url, pool_pre_ping=True)
    if backend == "postgresql":
        _configure_postgresql(engine)
    return engine


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(url: str) -> None:
    """Bring the schema to the newest migration (idempotent)."""
    engine = get_engine(url)
    config = alembic_config(url)
    with engine.connect() as connection:
        sqlite = engine.dialect.name == "sqlite"
        if sqlite:
            # SQLite migrations rebuild tables (copy, drop, rename); with foreign keys on, dropping
            # the old copy would cascade-delete every row that refers to it. The pragma only
            # takes effect outside a transaction, hence on the driver's connection before BEGIN.
            connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
        try:
            with connection.begin():
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
                if sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(f"migration left dangling references: {broken[:5]}")
        finally:
            if sqlite:
                connection.connection.driver_connection.execute("PRAGMA foreign_keys=ON")


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """One transaction: committed on success, rolled back on any error."""
    factory = sessionmaker(bind=get_engine(url), expire_on_commit=False)
    with factory() as session, session.begin():
        yield session
