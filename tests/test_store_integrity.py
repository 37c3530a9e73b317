"""The store's identity and integrity: ids never reused, reads follow the index, one photo one set of faces."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from sqlalchemy import delete, select, text

from conftest import DATA
from facemine_cli import main
from usecases.mining import mine_paths
from labeling.actions import Labeler
from storage.decisions import load_review_state
from storage.identities import assignments, face_table, largest_face_identity
from storage.schema import Base, Constraint, Decision, Face, Image, PhotoPath
from storage.settings import Settings
from storage.schema import ORPHANED
from storage.store import Store
from usecases.clustering import run_cluster
from usecases.runtime import miner_for

LFW = DATA / "lfw" / "images"


def lfw_photos(count: int, start: int = 0) -> list[Path]:
    return sorted(LFW.rglob("*.jpg"))[start : start + count]


def copy_photos(folder: Path, photos: list[Path]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for photo in photos:
        shutil.copy(photo, folder / photo.name)
    return sorted(str(path) for path in folder.iterdir())


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path / "facemine-data")


def test_changed_photo_reads_its_new_vector_not_an_old_copy(tmp_path, settings):
    paths = copy_photos(tmp_path / "photos", lfw_photos(3, start=40))
    mine_paths("s", paths, settings)
    store = Store(settings)
    run_cluster(store, settings)
    (old_face,) = store_face_ids(store, paths[-1])
    marked = Labeler(store, who="tester").not_a_face([old_face])
    last = paths[-1]  # its faces are the newest rows: deleting them frees the highest ids
    PILImage.open(last).save(last, quality=60)
    miner, model = miner_for(settings)
    expected = miner.process([last])[0].faces
    assert len(expected) == 1
    assert mine_paths("s", paths, settings)["photos_new"] == 1
    (face_id,) = store_face_ids(store, last)
    assert face_id > old_face
    ids, vectors = store.load_embeddings(model.id, [face_id])
    assert ids.tolist() == [face_id]
    np.testing.assert_allclose(vectors[0], expected[0].embedding, atol=1e-5)
    # The old content's face went with its constraint; the log says which decision it undid.
    with store.session() as session:
        orphaned = session.scalars(select(Decision).where(Decision.action == ORPHANED)).one()
        assert session.scalar(select(Constraint.id).where(Constraint.face_a == old_face)) is None
    assert orphaned.payload["orphaned_faces"] == [old_face] and orphaned.payload["decisions"] == [marked.id]


def store_face_ids(store: Store, path: str) -> list[int]:
    faces = face_table(store)
    return faces[faces.source_path == path].face_id.tolist()


def face_row(image_id: int, index: int = 0) -> Face:
    return Face(image_id=image_id, face_index=index, x1=0, y1=0, x2=1, y2=1, landmarks=[0.0] * 10, det_score=1,
                eye_distance=1, sharpness=1, yaw=0, pitch=0, brightness=0, contrast=0, quality=1, passed=True,
                fail_reasons="", chip_path="c.png", chip_template="t")


def test_deleted_newest_ids_are_never_handed_out_again(tmp_path):
    store = Store(Settings(data_dir=tmp_path))
    with store.session() as session:
        image = Image(content_hash="a" * 64, status="ok")
        session.add(image)
        session.flush()
        face = face_row(image.id)
        session.add(face)
        session.flush()
        first_face, first_image = face.id, image.id
        session.add(Decision(who="t", action="a", payload={}))
    with store.session() as session:
        first_decision = session.scalar(select(Decision.id))
        session.execute(delete(Face))
        session.execute(delete(Image))
        session.execute(delete(Decision))
    with store.session() as session:
        image = Image(content_hash="a" * 64, status="ok")
        session.add(image)
        session.flush()
        face = face_row(image.id)
        decision = Decision(who="t", action="a", payload={})
        session.add_all([face, decision])
        session.flush()
        assert (face.id, image.id, decision.id) == (first_face + 1, first_image + 1, first_decision + 1)
    with store.session() as session:
        tables = dict(session.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'table'")).all())
    with_ids = [table.name for table in Base.metadata.sorted_tables if list(table.primary_key.columns.keys()) == ["id"]]
    assert with_ids and [name for name in with_ids if "AUTOINCREMENT" not in tables[name]] == []


def test_one_photo_one_set_of_faces_across_subsets_and_moves(tmp_path, settings, monkeypatch, capsys):
    folder = tmp_path / "album"
    paths = copy_photos(folder, sorted((LFW / "Aaron_Peirsol").glob("*.jpg")))  # one person: one identity
    first = mine_paths("one", paths, settings)
    again = mine_paths("two", paths, settings)
    store = Store(settings)
    faces = face_table(store)
    assert first["photos_new"] == 4 and first["faces_found"] == len(faces) >= 4
    assert (again["photos_linked"], again["photos_new"], again["faces_found"]) == (4, 0, 0)
    assert faces.face_id.is_unique and set(faces.subset) == {"one"}
    two = face_table(store, ["two"])
    assert two.face_id.tolist() == faces.face_id.tolist() and set(two.subset) == {"two"}

    run_id = run_cluster(store, settings)
    assert assignments(store, run_id).face_id.tolist() == faces.face_id.tolist()  # each face once
    chosen = int(faces.face_id.iloc[0])
    identity = int(assignments(store, run_id).set_index("face_id").identity_id.loc[chosen])
    accepted = Labeler(store, who="tester").accept(identity)

    moved = tmp_path / "renamed-album"
    folder.rename(moved)
    after_move = mine_paths("two", sorted(str(path) for path in moved.iterdir()), settings)
    assert (after_move["photos_linked"], after_move["photos_new"], after_move["faces_found"]) == (4, 0, 0)
    assert face_table(store).face_id.tolist() == faces.face_id.tolist()
    assert set(face_table(store).source_path) == {str(moved / Path(path).name) for path in paths}
    assert load_review_state(store).pinned.get(chosen) == identity
    rerun = run_cluster(store, settings)
    assert assignments(store, rerun).set_index("face_id").identity_id.loc[chosen] == identity
    # Ground truth names a photo by any path it was seen at, before or after the move.
    truth_paths = [paths[0], str(moved / Path(paths[0]).name), str(tmp_path / "never-mined.jpg")]
    scored = largest_face_identity(store, rerun, truth_paths)
    assert scored.face_id.iloc[0] == scored.face_id.iloc[1] == chosen and scored.face_id.isna().iloc[2]

    listed = {row["subset"]: row for row in store.subsets()}
    assert (listed["one"]["paths"], listed["one"]["photos"], listed["one"]["faces"]) == (4, 4, len(faces))
    assert (listed["two"]["paths"], listed["two"]["photos"], listed["two"]["faces"]) == (8, 4, len(faces))
    counts = {(row["subset"], row["what"]): row["count"] for row in store.status_counts()}
    assert (counts[("one", "photos ok")], counts[("two", "photos ok")]) == (4, 8)

    monkeypatch.setenv("FACEMINE_DATA_DIR", str(settings.data_dir))
    assert main(["subsets", "remove", "one"]) == 0
    assert "4 paths; 0 faces" in capsys.readouterr().out
    assert [row["subset"] for row in store.subsets()] == ["two"]
    assert len(face_table(store)) == len(faces)
    assert store.remove_subset("two")["faces_removed"] == len(faces)
    with store.session() as session:
        assert session.scalar(select(Face.id).limit(1)) is None and session.scalar(select(PhotoPath.id).limit(1)) is None
        assert session.scalar(select(Constraint.id).limit(1)) is None
        orphaned = session.scalars(select(Decision).where(Decision.action == ORPHANED)).one()
    assert orphaned.payload["orphaned_faces"] == faces.face_id.tolist()
    assert orphaned.payload["decisions"] == [accepted.id]
    assert chosen in {c["face_a"] for c in orphaned.payload["constraints"]}
