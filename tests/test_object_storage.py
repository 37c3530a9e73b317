"""The data root on object storage: a local S3-compatible server (moto, `tests/s3_server.py`)
holds chips, embedding shards and exports; the database stays a local SQLite file (one machine)."""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from review_helpers import lfw_paths
from s3_server import s3_bucket, s3_server  # noqa: F401 - fixtures
from sqlalchemy import func, select
from test_mine_flow import assert_same_rows, stored_rows

from pipeline.config import ExportConfig
from pipeline.errors import FacemineError
from pipeline.ingest import FoundFile, walk_photos
from pipeline.train import ChipDataset
from storage import registry
from storage.dataroot import open_data_root, register_object_store
from storage.embeddings import EmbeddingShards
from storage.exports import MANIFEST, export_dataset
from storage.identities import assignments, face_table
from storage.maintenance import Selection, doctor, forget_faces
from storage.schema import DatasetExport, EmbeddingShard
from storage.settings import Settings
from storage.store import Store
from usecases.clustering import run_cluster


def test_data_root_on_s3_writes_whole_objects_lists_claims_and_deletes(s3_server, s3_bucket, tmp_path):  # noqa: F811
    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path}/f.db", **s3_server.settings_fields(s3_bucket))
    root = open_data_root(settings)
    assert not root.is_local and root.location("chips/a.png") == f"s3://{s3_bucket}/facemine/chips/a.png"
    root.write_bytes("chips/ab/one.png", b"first")
    root.write_bytes("embeddings/m/s.npy", b"vectors")
    assert root.read_bytes("chips/ab/one.png") == b"first"
    assert root.exists("chips/ab/one.png") and not root.exists("chips/ab/two.png")
    listed = {entry.relative: entry.modified for entry in root.list("chips")}
    assert list(listed) == ["chips/ab/one.png"]
    assert abs(listed["chips/ab/one.png"] - time.time()) < 5  # the server's clock is this machine's
    written = root.modified("chips/ab/one.png")
    time.sleep(1.1)  # S3 keeps times in whole seconds
    assert root.claim("chips/ab/one.png") and not root.claim("chips/ab/two.png")
    assert root.modified("chips/ab/one.png") >= written + 1
    assert root.read_bytes("chips/ab/one.png") == b"first"  # claiming keeps the bytes
    root.delete("chips/ab/one.png")
    assert [entry.relative for entry in root.list("")] == ["embeddings/m/s.npy"]
    assert s3_server.filesystem().ls(f"{s3_bucket}/facemine/embeddings/m") == [f"{s3_bucket}/facemine/embeddings/m/s.npy"]


def test_object_storage_data_root_needs_a_named_database(s3_server, s3_bucket, tmp_path):  # noqa: F811
    with pytest.raises(FacemineError, match="is object storage: set database_url too"):
        Settings(data_dir=tmp_path, **s3_server.settings_fields(s3_bucket))
    named = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path}/f.db", **s3_server.settings_fields(s3_bucket))
    assert named.data_root_is_remote
    assert not Settings(data_dir=tmp_path, data_root=str(tmp_path / "shared")).data_root_is_remote
    assert Settings(data_dir=tmp_path).data_root is None


# ---- a store on object storage, against the same photos in a folder --------------------------

PEOPLE = ("Hans_Blix", "Serena_Williams")


@pytest.fixture(scope="module")
def two_stores(s3_server, tmp_path_factory):  # noqa: F811
    """The same 8 LFW photos mined into a folder data root (a shared mount: not the data folder)
    and into an s3:// one."""
    from usecases.mining import mine_paths

    bucket = "facemine-mined"
    s3_server.filesystem().mkdir(bucket)
    local = Settings(data_dir=tmp_path_factory.mktemp("local"), data_root=str(tmp_path_factory.mktemp("mount")))
    folder = tmp_path_factory.mktemp("s3-machine")
    remote = Settings(data_dir=folder, database_url=f"sqlite:///{folder}/facemine.db", **s3_server.settings_fields(bucket))
    photos = lfw_paths(PEOPLE, per_person=4)
    for settings in (local, remote):
        mine_paths("lfw", photos, settings)
    return Store(local), Store(remote)


def chip_objects(store: Store) -> dict[str, bytes]:
    return {entry.relative: store.root.read_bytes(entry.relative) for entry in store.root.list("chips")}


def shard_objects(store: Store) -> set[str]:
    return {entry.relative for entry in store.root.list("embeddings")}


def stored_shards(store: Store) -> list[str]:
    with store.session() as session:
        return sorted(session.scalars(select(EmbeddingShard.path)))


def rows_of(store: Store, monkeypatch) -> pd.DataFrame:  # noqa: ANN001
    """`test_mine_flow.stored_rows` of this store (its data root given as the environment)."""
    with monkeypatch.context() as patch:
        patch.setenv("FACEMINE_DATA_ROOT", store.settings.data_root)
        patch.setenv("FACEMINE_OBJECT_STORE", store.settings.object_store.model_dump_json())
        return stored_rows(store.data_dir, store.settings.database_url)


def test_mining_into_s3_stores_exactly_what_a_folder_stores(two_stores, s3_server, monkeypatch):  # noqa: F811
    local, remote = two_stores
    local_rows, remote_rows = rows_of(local, monkeypatch), rows_of(remote, monkeypatch)
    assert len(local_rows) == 12 and local_rows.chip_path.notna().all()  # 8 photos, 12 faces
    assert_same_rows(local_rows, remote_rows)
    for left, right in zip(local_rows.vector, remote_rows.vector):
        assert left.tobytes() == right.tobytes()  # bit for bit
    chips = chip_objects(local)
    assert len(chips) == 12 and chip_objects(remote) == chips  # same keys, same bytes
    assert set(remote_rows.chip_path) == set(chips)
    # Nothing went to the machines' own folders but the database: chips and shards are in the root.
    for store in (local, remote):
        assert {path.name for path in store.data_dir.iterdir()} <= {"facemine.db", "facemine.db-wal", "facemine.db-shm"}
    assert sorted(path.name for path in local.root.local_path().iterdir()) == ["chips", "embeddings"]
    assert len(shard_objects(remote)) == 2 * len(stored_shards(remote)) == 2
    listed = s3_server.filesystem().find("facemine-mined/facemine/embeddings")
    assert sorted(f"facemine-mined/facemine/{entry}" for entry in shard_objects(remote)) == listed
    assert doctor(remote).problems() == 0


def test_cluster_and_export_on_s3_match_the_folder(two_stores):
    local, remote = two_stores
    exports = []
    for store in (local, remote):
        run_id = run_cluster(store, store.settings)
        table = assignments(store, run_id).merge(face_table(store), on="face_id")
        exports.append((table, export_dataset(store, "ds", ExportConfig(min_faces_per_identity=1, val_fraction=0.0))))
    (local_table, local_export), (remote_table, remote_export) = exports
    # The same faces (by chip) grouped the same way.
    groups = [sorted(sorted(group.chip_path) for _, group in table.groupby("identity_id")) for table in (local_table, remote_table)]
    assert groups[0] == groups[1] and [len(group) for group in groups[0]] == [4, 4]
    assert remote_export["path"] == f"s3://facemine-mined/facemine/exports/ds/v{remote_export['version']}"
    local_files = {entry.relative: local.root.read_bytes(entry.relative) for entry in local.root.list("exports")}
    remote_files = {entry.relative: remote.root.read_bytes(entry.relative) for entry in remote.root.list("exports")}
    assert sorted(local_files) == sorted(remote_files) and len(local_files) == 8 + 3  # chips, manifest, csv, card
    assert {key: value for key, value in local_files.items() if key.endswith(".png")} == {
        key: value for key, value in remote_files.items() if key.endswith(".png")
    }
    manifests = [pd.read_parquet(io.BytesIO(files[f"exports/ds/v1/{MANIFEST}"])) for files in (local_files, remote_files)]
    pd.testing.assert_frame_equal(manifests[0], manifests[1])
    # Training reads the export where it is: chips of the s3:// export through fsspec.
    samples = [registry.export_samples(export["path"])["train"] for export in (local_export, remote_export)]
    assert samples[1][0][0] == f"{remote_export['path']}/{Path(samples[0][0][0]).relative_to(local_export['path'])}"
    assert [label for _, label in samples[0]] == [label for _, label in samples[1]] and len(samples[0]) == 8
    chips = [ChipDataset([path for path, _ in rows], range(len(rows)), size=112) for rows in samples]
    for index in range(8):
        assert torch.equal(chips[0][index][0], chips[1][index][0])


def test_doctor_removes_what_a_crash_before_the_commit_left_on_s3(two_stores, monkeypatch):
    """A shard whose chip and shard PUTs were done when its process died before the commit."""
    from usecases.mining import mine_paths

    _, remote = two_stores
    before_chips, before_shards = chip_objects(remote), shard_objects(remote)
    write = EmbeddingShards.write

    def write_then_die(self, *args, **kwargs):  # noqa: ANN001, ANN202
        write(self, *args, **kwargs)
        raise SystemExit("killed between the shard's PUTs and its commit")

    monkeypatch.setattr(EmbeddingShards, "write", write_then_die)
    with pytest.raises(SystemExit):
        mine_paths("lfw", lfw_paths(("Vladimir_Putin",), per_person=1), remote.settings)
    monkeypatch.undo()
    left_chips = sorted(set(chip_objects(remote)) - set(before_chips))
    left_shards = sorted(shard_objects(remote) - before_shards)
    assert len(left_chips) == 1 and len(left_shards) == 2  # one face's chip; ids and vectors
    young = doctor(remote)  # within the grace period: a running shard's files, left alone
    assert young.problems() == 0 and young.young_files_kept == sorted(left_chips + left_shards)
    found = doctor(remote, grace_seconds=0)
    assert (found.orphan_chips, found.unlisted_shard_files, found.problems()) == (left_chips, left_shards, 3)
    rows = len(face_table(remote))
    fixed = doctor(remote, fix=True, grace_seconds=0)
    assert fixed.fixed and fixed.problems() == 3
    assert chip_objects(remote) == before_chips and shard_objects(remote) == before_shards
    assert len(face_table(remote)) == rows and doctor(remote, grace_seconds=0).problems() == 0


def test_forget_deletes_the_objects_of_forgotten_faces(two_stores):
    _, remote = two_stores
    faces = face_table(remote)
    gone = faces[faces.source_path.str.contains("Serena_Williams")]
    assert len(gone) == 5  # 4 photos, 5 faces
    with remote.session() as session:
        exported = session.scalar(select(func.count()).select_from(DatasetExport))
    counts = forget_faces(remote, select_subset_faces(remote, gone), who="tester")
    assert (counts["faces"], counts["chips_removed"], counts["shards_rewritten"], counts["export_files_removed"]) == (5, 5, 1, 4)
    kept = face_table(remote)
    assert len(kept) == 7 and set(chip_objects(remote)) == set(kept.chip_path)
    shards = stored_shards(remote)
    assert shard_objects(remote) == {file for shard in shards for file in remote.shards.files(shard)}
    ids, _ = remote.load_embeddings(remote.current_model().id)
    assert sorted(ids) == sorted(kept.face_id)
    # The export lost the forgotten faces' chip objects too.
    export_chips = [entry.relative for entry in remote.root.list("exports") if entry.relative.endswith(".png")]
    assert len(export_chips) == 4 and exported == 1
    assert doctor(remote, grace_seconds=0).problems() == 0


def select_subset_faces(store: Store, faces: pd.DataFrame) -> Selection:
    return Selection("Serena's photos", tuple(sorted(faces.face_id.astype(int))), photos=tuple(sorted(set(faces.image_id.astype(int)))))


def test_a_missing_bucket_or_unreachable_server_is_one_line(s3_server, tmp_path):  # noqa: F811
    database = {"data_dir": tmp_path, "database_url": f"sqlite:///{tmp_path}/f.db"}
    with pytest.raises(FacemineError, match=r"data root s3://no-such-bucket/x: bucket 'no-such-bucket' does not exist"):
        Store(Settings(**database, **s3_server.settings_fields("no-such-bucket", "x")))
    fields = s3_server.settings_fields("any", "x")
    fields["object_store"] = fields["object_store"].model_copy(update={"endpoint_url": "http://127.0.0.1:9"})
    with pytest.raises(FacemineError, match=r"^data root s3://any/x cannot be reached: "):
        Store(Settings(**database, **fields))


def test_photos_are_mined_from_an_s3_url_as_from_their_folder(s3_server, tmp_path):  # noqa: F811
    from usecases.mining import mine_paths

    photos = lfw_paths(("Hans_Blix",), per_person=3)
    fs = s3_server.filesystem()
    fs.mkdir("facemine-photos")
    for photo in photos:
        fs.put_file(photo, f"facemine-photos/lfw/{Path(photo).name}")
    fs.pipe_file("facemine-photos/lfw/notes.txt", b"not a photo")
    # A data root inside the folder (chips are PNGs): never mined.
    fs.pipe_file("facemine-photos/lfw/store/chips/ab/cd/chip.png", Path(photos[0]).read_bytes())
    fs.pipe_file("facemine-photos/lfw/store/embeddings/m/shard.npy", b"vectors")
    urls = [f"s3://facemine-photos/lfw/{Path(photo).name}" for photo in photos]
    by_url = Settings(data_dir=tmp_path / "by-url", object_store=s3_server.object_store())
    register_object_store(by_url)  # as the mine flow does before its walk
    assert list(walk_photos(["s3://facemine-photos/lfw"], by_url.ingest.extensions)) == [FoundFile(url) for url in urls]
    with pytest.raises(FacemineError, match="folder not found: s3://facemine-photos/elsewhere"):
        list(walk_photos(["s3://facemine-photos/elsewhere"], by_url.ingest.extensions))
    by_path = Settings(data_dir=tmp_path / "by-path")
    mine_paths("lfw", urls, by_url)
    mine_paths("lfw", photos, by_path)
    tables = [face_table(Store(settings)).sort_values(["content_hash", "face_index"]) for settings in (by_url, by_path)]
    assert sorted(tables[0].source_path.unique()) == urls
    columns = ["content_hash", "face_index", "chip_path", "passed"]
    assert len(tables[0]) == 6  # Hans Blix 0001 and 0003 hold more than one face
    pd.testing.assert_frame_equal(tables[0][columns].reset_index(drop=True), tables[1][columns].reset_index(drop=True))


def test_exports_racing_for_one_version_take_different_ones(two_stores, monkeypatch):
    """Two exports of one name started at once on two machines: on S3 each claims its version
    with a create-only PUT, in a folder a rename never replaces the other's version."""
    from storage import exports

    config = ExportConfig(min_faces_per_identity=1, val_fraction=0.0)
    local, remote = two_stores
    for store in (local, remote):
        run_cluster(store, store.settings)
    # S3: another machine has just claimed the next version and is writing it.
    assert remote.root.create_exclusive("exports/race/v1/.claim")
    assert not remote.root.create_exclusive("exports/race/v1/.claim")
    written = export_dataset(remote, "race", config)
    assert written["version"] == 2
    keys = sorted(entry.relative for entry in remote.root.list("exports/race"))
    assert keys[0] == "exports/race/v1/.claim"  # the other machine's claim, untouched
    assert not [key for key in keys[1:] if not key.startswith("exports/race/v2/") or key.endswith(".claim")]
    manifest = pd.read_parquet(io.BytesIO(remote.root.read_bytes(f"exports/race/v2/{MANIFEST}")))
    chips = {f"exports/race/v2/{path}" for path in manifest.chip_path if path}
    assert chips and set(keys[1:]) == chips | {f"exports/race/v2/{name}" for name in (MANIFEST, "manifest.csv", "dataset_card.json")}
    # Folder: the other export finished v1 between this one choosing 1 and renaming its staging folder.
    first = export_dataset(local, "race", config)
    stale = iter([first["version"]])
    real = exports._next_version
    monkeypatch.setattr(exports, "_next_version", lambda *args: next(stale, None) or real(*args))
    second = export_dataset(local, "race", config)
    assert (first["version"], second["version"]) == (1, 2)
    assert second["path"].endswith("/exports/race/v2")
    folders = sorted(path.name for path in local.root.local_path("exports/race").iterdir())
    assert folders == ["v1", "v2"]
    manifests = [local.root.read_bytes(f"exports/race/{folder}/{MANIFEST}") for folder in folders]
    assert manifests[0] == manifests[1]


def test_trained_weights_reach_every_machine_through_the_data_root(two_stores, tmp_path):
    """A checkpoint registered on one machine is put on S3 under its hash; another machine (no
    file of it) loads it from the model row's URL and embeds exactly as the first one."""
    from pipeline.embed import create_embedder, save_checkpoint
    from usecases import runtime

    _, remote = two_stores
    sface = runtime.load_embedder("sface", str(remote.settings.default_weights("sface")), "cpu")
    checkpoint = save_checkpoint(sface, tmp_path / "machine-a" / "trained.pt")
    trained = create_embedder("checkpoint", checkpoint, device="cpu")
    model = runtime.register(remote, trained, name="trained")
    assert model.weights_path == f"s3://facemine-mined/facemine/models/{trained.weights_hash}.pt"
    assert remote.root.read_bytes(f"models/{trained.weights_hash}.pt") == checkpoint.read_bytes()
    checkpoint.unlink()  # the other machine never had the file
    Store(remote.settings)  # which opens its store first, making its object-store settings fsspec's
    elsewhere = runtime.load_embedder(model.kind, model.weights_path, "cpu")
    assert elsewhere.weights_hash == trained.weights_hash
    chips = ChipDataset([remote.root.location(key) for key in sorted(chip_objects(remote))[:4]], range(4), size=112)
    batch = torch.stack([chips[index][0] for index in range(4)]).numpy()
    assert np.array_equal(elsewhere.embed(batch), sface.embed(batch))
