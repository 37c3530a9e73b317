"""`facemine forget`: after forgetting one identity of real LFW faces, nothing of those faces is
left anywhere in the data folder (SQL rows, bytes of every file, chip files, vectors by value,
exports), and every other face is intact."""
from __future__ import annotations

import hashlib
import importlib
import pkgutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from review_helpers import lfw_paths
from sqlalchemy import select

import flows
from facemine_cli import main
from usecases.mining import mine_paths
from labeling.actions import Labeler
from pipeline.config import ExportConfig
from storage.exports import export_dataset
from storage.identities import assignments, face_table, latest_run_id
from storage.schema import Base, Decision, DatasetExport, Identity, PhotoPath
from storage.settings import Settings
from storage.store import Store
from usecases.clustering import run_cluster

PEOPLE = ("Hans_Blix", "Serena_Williams", "Vladimir_Putin")
NAME = "Forgettable Person"


def sql_text(store: Store) -> str:
    """Every row of every table, as text."""
    with store.session() as session:
        return "\n".join(
            repr(tuple(row)) for table in Base.metadata.sorted_tables for row in session.execute(table.select())
        )


def every_file(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file())


def vector_files(root: Path) -> list[Path]:
    return [path for path in (root / "embeddings").rglob("*.npy") if not path.name.endswith(".ids.npy")]


@pytest.fixture
def mined(tmp_path, monkeypatch):
    data = tmp_path / "data"
    monkeypatch.setenv("FACEMINE_DATA_DIR", str(data))
    settings = Settings(data_dir=data)
    mine_paths("lfw", lfw_paths(PEOPLE, per_person=3), settings)
    store = Store(settings)
    run_cluster(store, settings)
    return store


def test_forget_identity_leaves_no_trace(mined, capsys):
    store, data = mined, mined.data_dir
    run_id = latest_run_id(store)
    table = assignments(store, run_id).dropna(subset=["identity_id"])
    sizes = table.groupby("identity_id").size().sort_values(ascending=False)
    assert len(sizes) >= 2 and sizes.iloc[1] >= 2, sizes
    forgotten_identity, kept_identity = int(sizes.index[0]), int(sizes.index[1])
    labeler = Labeler(store, "tester")
    labeler.name(forgotten_identity, NAME, why=f"this is {NAME}")
    kept_faces = sorted(table[table.identity_id == kept_identity].face_id.astype(int))
    labeler.reject(kept_identity, kept_faces[-1:], why="not the same person")
    export = export_dataset(store, "ds", ExportConfig(min_faces_per_identity=1, val_fraction=0.0))

    faces = face_table(store).set_index("face_id")
    forgotten = sorted(table[table.identity_id == forgotten_identity].face_id.astype(int))
    others = sorted(set(faces.index) - set(forgotten))
    chips = set(faces.chip_path[forgotten])
    # Photos all of whose faces are forgotten go whole; a photo with another face keeps its path.
    gone_photos = set(faces.image_id[forgotten]) - set(faces.image_id[others])
    gone_paths = set(faces.source_path[faces.image_id.isin(gone_photos)])
    gone_hashes = set(faces.content_hash[faces.image_id.isin(gone_photos)])
    assert gone_paths
    model_id = store.current_model().id
    _, forgotten_vectors = store.load_embeddings(model_id, forgotten)
    other_ids, other_vectors = store.load_embeddings(model_id, others)
    manifest_before = pd.read_parquet(Path(export["path"]) / "manifest.parquet")
    assert set(forgotten) & set(manifest_before.face_id)

    log_file = data / "logs" / "facemine.log"
    log_file.parent.mkdir()
    log_file.write_text(f"INFO mined {sorted(gone_paths)[0]}\nINFO mine summary: 9 photos\n")

    assert main(["forget", "--identity", str(forgotten_identity)]) == 2  # no terminal and no --yes: refused
    assert main(["forget", "--identity", str(forgotten_identity), "--yes"]) == 0

    # SQL: no face id in a column naming faces, no path, hash, chip or name anywhere.
    text = sql_text(store)
    for secret in chips | gone_paths | gone_hashes | {NAME}:
        assert secret not in text, secret
    assert sorted(face_table(store).face_id) == others
    with store.session() as session:
        assert not set(session.scalars(select(PhotoPath.path))) & gone_paths
        identity = session.get_one(Identity, forgotten_identity)
        assert (identity.name, identity.status) == (None, "retired")
        decisions = list(session.scalars(select(Decision).order_by(Decision.id)))
        card = session.get_one(DatasetExport, export["export_id"]).card
    for row in decisions[:-1]:
        assert not set(row.payload["faces"]) & set(forgotten)
        assert not {entry[0] for entry in row.payload["before"]["assignments"]} & set(forgotten)
    assert [row.action for row in decisions] == ["name", "reject", "forget"]
    reject = decisions[1].payload
    assert reject["faces"] == kept_faces[-1:] and reject["summary"].startswith("reject")  # others' decisions kept
    audit = decisions[-1].payload["details"]
    assert (audit["faces"], audit["vectors"], audit["photos"]) == (len(forgotten), len(forgotten), len(gone_photos))
    assert card["forgotten"]["faces_removed"] == len(forgotten)
    assert log_file.read_text().splitlines()[1] == "INFO mine summary: 9 photos"  # other lines kept

    # Files: no byte string of a forgotten path, hash, chip name or name, in any file (the SQLite
    # database and its WAL included); no copy of a forgotten chip (by content hash).
    secrets = [s.encode() for s in chips | gone_paths | gone_hashes | {NAME}]
    chip_hashes = {Path(chip).stem for chip in chips}
    for path in every_file(data):
        content = path.read_bytes()
        assert hashlib.sha256(content).hexdigest() not in chip_hashes, path
        for secret in secrets:
            assert secret not in content, (path, secret)
    # Vectors, by value, in every shard file.
    for path in vector_files(data):
        vectors = np.load(path)
        for vector in forgotten_vectors:
            assert not np.all(vectors == vector, axis=1).any(), path
        assert not set(np.load(str(path).removesuffix(".npy") + ".ids.npy").tolist()) & set(forgotten)
    # The export: its manifests without them, its card recounted; the other faces intact.
    manifest = pd.read_parquet(Path(export["path"]) / "manifest.parquet")
    csv = pd.read_csv(Path(export["path"]) / "manifest.csv")
    assert sorted(manifest.face_id) == sorted(set(manifest_before.face_id) - set(forgotten)) == sorted(csv.face_id)
    assert not set(manifest.source_path) & gone_paths
    assert card["faces"] == int((manifest.split != "duplicate").sum())
    for chip in manifest.chip_path[manifest.chip_path != ""]:
        assert (Path(export["path"]) / chip).is_file()
    ids, vectors = store.load_embeddings(model_id, others)
    assert ids.tolist() == other_ids.tolist()
    np.testing.assert_array_equal(vectors, other_vectors)
    for chip in face_table(store).chip_path:
        assert (data / chip).is_file()
    assert main(["doctor"]) == 0


def test_forget_a_photo_by_path_or_content_then_a_subset(mined):
    store = mined
    export = export_dataset(store, "all", ExportConfig(min_faces_per_identity=1))
    faces = face_table(store)
    path, other = faces.source_path.iloc[0], faces.source_path.iloc[-1]
    content = faces.content_hash.iloc[-1]
    assert main(["forget", "--path", path, "--yes"]) == 0
    assert main(["forget", "--content", content, "--yes"]) == 0
    gone = faces.source_path.isin([path, other])
    assert sorted(face_table(store).face_id) == sorted(faces.face_id[~gone])
    text = sql_text(store)
    assert path not in text and other not in text and content not in text
    assert main(["forget", "--path", path, "--yes"]) == 2  # nothing left to match
    assert main(["forget", "--subset", "lfw", "--yes"]) == 0
    assert face_table(store).empty and store.subsets() == []
    assert not list((store.data_dir / "chips").rglob("*.png"))
    assert not vector_files(store.data_dir)  # every shard held only forgotten vectors
    assert not Path(export["path"]).exists()  # the export was left with no face: deleted
    with store.session() as session:
        card = session.get_one(DatasetExport, export["export_id"]).card
    assert card["forgotten"]["deleted"] and card["forgotten"]["faces_removed"] == export["faces"]


def test_no_flow_or_task_persists_its_results():
    """Prefect would write task results (faces' paths, ids) under its home, which `forget` does not
    search: no flow or task may turn persistence on."""
    from prefect import Flow, Task
    from prefect.settings import PREFECT_RESULTS_PERSIST_BY_DEFAULT, PREFECT_TASKS_DEFAULT_PERSIST_RESULT

    assert not PREFECT_RESULTS_PERSIST_BY_DEFAULT.value()
    assert not PREFECT_TASKS_DEFAULT_PERSIST_RESULT.value()
    found = 0
    for module_info in pkgutil.iter_modules(flows.__path__):
        module = importlib.import_module(f"flows.{module_info.name}")
        for value in vars(module).values():
            if isinstance(value, (Flow, Task)):
                found += 1
                assert not value.persist_result, value.name
                assert not value.with_options(retries=1).persist_result, value.name
    assert found >= 8


def test_decision_payloads_lose_every_reference_to_forgotten_faces():
    from storage.maintenance import _without_faces

    settings = {
        "faces": [1, 2, 3],
        "before": {"assignments": [[1, 5, 1.0, "cluster"], [3, 5, 0.9, "cluster"]], "created_identities": [1]},
        "orphaned_faces": [2, 4],
        "constraints": [{"face_a": 4, "face_b": 2}, {"face_a": 4, "face_b": None, "identity_id": 1}],
        "details": {"identity": 2},
    }
    assert _without_faces(settings, {1, 2}) == {
        "faces": [3],
        "before": {"assignments": [[3, 5, 0.9, "cluster"]], "created_identities": [1]},
        "orphaned_faces": [4],
        "constraints": [{"face_a": 4, "face_b": None, "identity_id": 1}],
        "details": {"identity": 2},
    }
