"""Storage basics: migrations match the models, shards round-trip, writes are atomic."""
from pathlib import Path

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from pipeline.errors import FacemineError
from storage.db import get_engine
from storage.dataroot import DataRoot, atomic_write_bytes
from storage.embeddings import EmbeddingShards
from storage.files import ChipStore
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


def test_embedding_shards_gather_reads_the_indexed_row_memory_mapped(tmp_path):
    shards = EmbeddingShards(DataRoot(tmp_path))
    rng = np.random.default_rng(0)
    first = shards.write("a" * 64, np.array([5, 1, 9]), rng.normal(size=(3, 4)))
    second = shards.write("a" * 64, np.array([7, 1]), rng.normal(size=(2, 4)))  # face 1 again: a newer vector
    vectors = shards.gather(np.array([9, 7, 1]), np.array([0, 1, 1]), np.array([2, 0, 1]), [first, second])
    np.testing.assert_array_equal(vectors[0], shards.open(first)[1][2])
    np.testing.assert_array_equal(vectors[2], shards.open(second)[1][1])  # the indexed copy, not the first found
    assert isinstance(shards.open(first)[1], np.memmap)
    with pytest.raises(FacemineError, match="does not hold the faces its index names"):
        shards.gather(np.array([1]), np.array([0]), np.array([0]), [first])


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old")

    def explode(*_args):
        raise OSError("disk full")

    monkeypatch.setattr("storage.dataroot.os.replace", explode)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]  # no temporary left behind


def test_chips_are_content_addressed(tmp_path):
    chips = ChipStore(DataRoot(tmp_path))
    chip = np.full((112, 112, 3), 7, np.uint8)
    path = chips.put(chip)
    assert chips.put(chip.copy()) == path and Path(path).stem == Path(path).name.removesuffix(".png")
    np.testing.assert_array_equal(chips.get(path), chip)
