"""`facemine doctor`: every kind of orphan and dangling reference, reported and fixed exactly, on a
store of real LFW faces; files younger than the grace period (a running mine's) are kept."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from review_helpers import lfw_paths
from sqlalchemy import select

from facemine_cli import main
from storage.dataroot import DataRoot
from storage.files import ChipStore
from storage.identities import face_table
from storage.maintenance import DEFAULT_GRACE_SECONDS, doctor
from storage.schema import EmbeddingShard
from storage.settings import Settings
from storage.store import Store
from usecases.mining import mine_paths

HOURS_AGO = time.time() - 2 * DEFAULT_GRACE_SECONDS


def age(path: Path) -> Path:
    os.utime(path, (HOURS_AGO, HOURS_AGO))
    return path


def all_vectors(store: Store) -> dict[int, np.ndarray]:
    ids, vectors = store.load_embeddings(store.current_model().id)
    return dict(zip(ids.tolist(), vectors))


def shard_paths(store: Store) -> list[str]:
    with store.session() as session:
        return list(session.scalars(select(EmbeddingShard.path).order_by(EmbeddingShard.id)))


def test_chip_put_claims_an_existing_chip_again(tmp_path):
    chips = ChipStore(DataRoot(tmp_path))
    chip = np.full((4, 4, 3), 7, np.uint8)
    path = age(tmp_path / chips.put(chip))
    assert chips.put(chip) == path.relative_to(tmp_path).as_posix()
    assert time.time() - path.stat().st_mtime < 60  # a reused chip restarts its grace period


def test_doctor_reports_and_fixes_each_kind_exactly(tmp_path, monkeypatch):
    data = tmp_path / "data"
    monkeypatch.setenv("FACEMINE_DATA_DIR", str(data))
    settings = Settings(data_dir=data)
    photos = tmp_path / "photos"
    photos.mkdir()
    sources = lfw_paths(("Hans_Blix",), per_person=4)
    for source in sources:
        shutil.copy(source, photos)
    paths = sorted(str(p) for p in photos.iterdir())
    first, lone = paths[:3], paths[3]
    mine_paths("s", first, settings)
    mine_paths("s", [lone], settings)  # a shard of its own, whose files go missing below
    store = Store(Settings(data_dir=data))
    faces = face_table(store)
    face_of = {path: sorted(group.face_id.astype(int)) for path, group in faces.groupby("source_path")}
    assert sorted(face_of) == paths
    model_id = store.current_model().id
    shard_first, shard_lone = shard_paths(store)
    assert main(["doctor"]) == 0

    # A dead vector: the changed photo's new face replaces its old one, whose vector stays in shard 1.
    changed = first[2]
    PILImage.open(changed).save(changed, quality=50)
    mine_paths("s", first, settings)
    replaced_chips = sorted(faces[faces.source_path == changed].chip_path)
    for chip in replaced_chips:  # the replaced faces' chips, as a mine long ago left them
        age(data / chip)
    new_faces = sorted(set(face_table(store).face_id.astype(int)) - {f for fs in face_of.values() for f in fs})
    assert len(new_faces) >= 1
    before = all_vectors(store)
    # A face whose chip file is gone (its vector is counted with the face, not as dead).
    chipless = face_of[first[1]][0]
    (data / faces.set_index("face_id").chip_path[chipless]).unlink()
    # Shard files gone: its index row now names nothing.
    for suffix in (".ids.npy", ".npy"):
        (data / f"{shard_lone}{suffix}").unlink()
    # Partial writes, old and fresh; chips nobody refers to, old and fresh; an unlisted shard.
    old_tmp = data / "chips" / "ab" / ".deadbeef.png.x1y2.tmp"
    old_tmp.parent.mkdir(parents=True, exist_ok=True)
    old_tmp.write_bytes(b"half a chip")
    age(old_tmp)
    fresh_tmp = data / "embeddings" / ".abc.npy.q9.tmp"
    fresh_tmp.write_bytes(b"half a shard")
    old_chip = data / ChipStore(DataRoot(data)).put(np.full((8, 8, 3), 1, np.uint8))
    age(old_chip)
    fresh_chip = data / ChipStore(DataRoot(data)).put(np.full((8, 8, 3), 2, np.uint8))
    unlisted = store.shards.write(store.current_model().weights_hash, np.array([999]), np.ones((1, 128), np.float32))
    for suffix in (".ids.npy", ".npy"):
        age(data / f"{unlisted}{suffix}")
    staging = data / "exports" / "ds" / ".v1.k2j3"
    staging.mkdir(parents=True)
    age(staging)
    rel = lambda path: path.relative_to(data).as_posix()  # noqa: E731

    report = doctor(store)
    assert report.partial_writes == sorted([rel(old_tmp), "exports/ds/.v1.k2j3"])
    assert report.orphan_chips == sorted([rel(old_chip), *replaced_chips])
    assert report.dead_vectors == {shard_first: len(face_of[changed])}
    assert report.missing_shards == [shard_lone]
    assert report.dangling_index == [(model_id, face) for face in face_of[lone]]
    assert report.faces_without_chip == [chipless]
    assert report.unlisted_shard_files == sorted([f"{unlisted}.ids.npy", f"{unlisted}.npy"])
    assert report.young_files_kept == sorted([rel(fresh_tmp), rel(fresh_chip)])
    assert report.problems() == 2 + 1 + len(replaced_chips) + len(face_of[changed]) + 1 + len(face_of[lone]) + 1 + 2
    assert main(["doctor"]) == 1
    assert old_chip.exists() and old_tmp.exists()  # reporting changes nothing

    fixed = doctor(store, fix=True)
    assert fixed.fixed and fixed.problems() == report.problems()
    assert not old_tmp.exists() and not old_chip.exists() and not staging.exists()
    assert not (data / f"{unlisted}.npy").exists()
    assert fresh_tmp.exists() and fresh_chip.exists()
    live_first = sorted(set(face_of[first[0]] + face_of[first[1]]) - {chipless})
    assert sorted(face_table(store).face_id.astype(int)) == sorted(live_first + face_of[lone] + new_faces)
    # Shard 1 now holds exactly its live vectors, under a new name; the lone faces await re-embedding.
    new_first = shard_paths(store)[0]
    assert new_first != shard_first
    assert np.load(data / f"{new_first}.ids.npy").tolist() == live_first
    assert store.faces_without_embedding(model_id) == face_of[lone]
    after = all_vectors(store)
    assert sorted(after) == live_first + new_faces
    for face, vector in after.items():
        np.testing.assert_array_equal(vector, before[face])

    # The replaced shard files stay one grace period for readers that looked them up before.
    again = doctor(store)
    assert again.problems() == 0
    assert again.young_files_kept == sorted(
        [rel(fresh_tmp), rel(fresh_chip), f"{shard_first}.ids.npy", f"{shard_first}.npy"]
    )
    assert main(["doctor"]) == 0
    assert main(["doctor", "--fix", "--grace-minutes", "0"]) == 0
    assert not fresh_tmp.exists() and not fresh_chip.exists() and not (data / f"{shard_first}.npy").exists()
    assert doctor(store, grace_seconds=0).problems() == 0


def test_fix_beside_a_running_mine_keeps_the_chips_it_is_about_to_commit(tmp_path, monkeypatch):
    """A killed run left chips nobody refers to, long ago; a new run mines the same photo, so its
    chips are those files. `doctor --fix` runs between the run's chip writes and its commit."""
    photo = lfw_paths(("Serena_Williams",), per_person=1)
    earlier, data = tmp_path / "earlier", tmp_path / "data"
    mine_paths("s", photo, Settings(data_dir=earlier))
    for chip in (earlier / "chips").rglob("*.png"):
        target = data / chip.relative_to(earlier)
        target.parent.mkdir(parents=True, exist_ok=True)
        age(Path(shutil.copy(chip, target)))
    store = Store(Settings(data_dir=data))
    assert len(doctor(store).orphan_chips) >= 1
    fixes = []
    put = ChipStore.put

    def put_then_doctor(self, chip_rgb):  # noqa: ANN001, ANN202
        relative = put(self, chip_rgb)
        fixes.append(doctor(Store(Settings(data_dir=data)), fix=True))
        return relative

    monkeypatch.setattr(ChipStore, "put", put_then_doctor)
    mine_paths("s", photo, Settings(data_dir=data))
    monkeypatch.undo()
    faces = face_table(store)
    assert len(fixes) == len(faces) >= 1
    assert all(report.orphan_chips == [] for report in fixes[1:])
    for chip in faces.chip_path:
        assert (data / chip).is_file()
    assert doctor(store).problems() == 0
