"""The whole mining path on the scene photos: no face passes quality where there is no face."""
from __future__ import annotations

import pytest

from conftest import DATA
from usecases.mining import mine_paths
from pipeline.config import IngestConfig
from pipeline.ingest import iter_image_files
from storage import identities as identity_store
from storage.settings import Settings
from storage.store import Store

pytestmark = pytest.mark.slow


def mine_folder(tmp_path, folder: str) -> Store:
    settings = Settings(data_dir=tmp_path / "data")
    paths = [str(p) for p in iter_image_files([DATA / "scenes" / folder], IngestConfig().extensions)]
    mine_paths(folder, paths, settings)
    return Store(settings)


def test_no_face_passes_quality_on_no_face_scenes(tmp_path):
    store = mine_folder(tmp_path, "no_face")
    counts = {(row["what"], row["reason"]): row["count"] for row in store.status_counts()}
    assert counts[("photos ok", "")] == 22  # every photo decoded
    faces = identity_store.face_table(store)
    assert not faces.passed.any(), faces[faces.passed][["source_path", "det_score", "quality"]]


def test_group_photos_yield_many_passing_faces(tmp_path):
    store = mine_folder(tmp_path, "multi_face")
    faces = identity_store.face_table(store)
    per_photo = faces[faces.passed].groupby("source_path").size()
    # Group photos hold 2-20+ faces each: most must come through detection and quality.
    assert len(per_photo) == 14 and per_photo.median() >= 3, per_photo
