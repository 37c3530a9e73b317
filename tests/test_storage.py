"""Storage basics: migrations match the models, shards round-trip, writes are atomic."""
from pathlib import Path

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from storage.db import get_engine
from storage.embeddings import EmbeddingShards
from storage.files import ChipStore, atomic_write_bytes
from storage.schema import Base
from storage.settings import Settings
from storage.store import Store


def schema_differences(url: str) -> list:
    """How the migrated database at `url` differs from the models (empty: they match)."""
    with get_engine(url).connect() as connection:
        return compare_metadata(MigrationContext.configure(connection), Base.metadata)


def test_migrations_create_exactly_the_models_schema(tmp_path):
    store = Store(Settings(data_dir=tmp_path))
    Store(Settings(data_dir=tmp_path))  # migrating twice is harmless
    assert schema_differences(store.url) == []


def test_embedding_shards_gather_by_face_id_memory_mapped(tmp_path):
    shards = EmbeddingShards(tmp_path)
    rng = np.random.default_rng(0)
    first = shards.write("a" * 64, np.array([5, 1, 9]), rng.normal(size=(3, 4)))
    second = shards.write("a" * 64, np.array([7]), rng.normal(size=(1, 4)))
    ids, vectors = shards.gather([first, second], np.array([9, 7, 1]))
    assert ids.tolist() == [1, 7, 9]
    np.testing.assert_array_equal(vectors[2], shards.open(first)[1][2])
    assert isinstance(shards.open(first)[1], np.memmap)


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old")

    def explode(*_args):
        raise OSError("disk full")

    monkeypatch.setattr("storage.files.os.replace", explode)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]  # no temporary left behind


def test_chips_are_content_addressed(tmp_path):
    chips = ChipStore(tmp_path)
    chip = np.full((112, 112, 3), 7, np.uint8)
    path = chips.put(chip)
    assert chips.put(chip.copy()) == path and Path(path).stem == Path(path).name.removesuffix(".png")
    np.testing.assert_array_equal(chips.get(path), chip)
