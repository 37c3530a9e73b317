"""The `mine` flow end to end on real photos: accounting, idempotency, crash-safety, concurrency."""
from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import func, select

from conftest import DATA, REPO
from odd_files import TEST_MAX_PIXELS, make_odd_folder
from storage.schema import Embedding, Face, Image, PhotoPath
from storage.settings import Settings
from storage.store import Store

LFW = DATA / "lfw" / "images"


def lfw_photos(count: int, start: int = 0) -> list[Path]:
    return sorted(LFW.rglob("*.jpg"))[start : start + count]


def link_photos(folder: Path, photos: list[Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for photo in photos:
        (folder / photo.name).symlink_to(photo)
    return folder


def stored_rows(data_dir: Path, database_url: str | None = None) -> pd.DataFrame:
    """Everything mining stores, keyed by content rather than by autoincrement ids."""
    store = Store(Settings(data_dir=data_dir, database_url=database_url))
    with store.session() as session:
        images = pd.DataFrame(
            session.execute(
                select(Image.id, PhotoPath.path, PhotoPath.status, PhotoPath.reason, Image.content_hash)
                .select_from(PhotoPath)
                .outerjoin(Image, Image.id == PhotoPath.image_id)
            ).mappings().all()
        )
        faces = pd.DataFrame(
            session.execute(
                select(Face.id, Face.image_id, Face.face_index, Face.x1, Face.y1, Face.x2, Face.y2, Face.passed,
                       Face.quality, Face.chip_path)
            ).mappings().all()
        )
    model = store.current_model()
    ids, vectors = store.load_embeddings(model.id)
    embeddings = pd.DataFrame({"id": ids, "vector": list(vectors)})
    rows = images.merge(faces, left_on="id", right_on="image_id", how="left", suffixes=("_image", ""))
    rows = rows.merge(embeddings, on="id", how="left")
    rows = rows.drop(columns=["id_image", "id", "image_id"]).sort_values(["path", "face_index"]).reset_index(drop=True)
    return rows


def assert_same_rows(left: pd.DataFrame, right: pd.DataFrame, vector_atol: float = 1e-4) -> None:
    assert len(left) == len(right)
    plain = [c for c in left.columns if c != "vector"]
    pd.testing.assert_frame_equal(left[plain], right[plain], check_exact=False, atol=1e-3)
    for a, b in zip(left.vector, right.vector):
        if isinstance(a, float) or isinstance(b, float):  # photo without faces: NaN on both sides
            assert isinstance(a, float) and isinstance(b, float)
            continue
        np.testing.assert_allclose(a, b, atol=vector_atol)


def run_cli(data_dir: Path, *args: str, **kwargs) -> subprocess.Popen:
    # Without PREFECT_HOME the CLI keeps Prefect's database inside the data folder, as users get it.
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_HOME"} | {"FACEMINE_DATA_DIR": str(data_dir)}
    return subprocess.Popen([sys.executable, "-m", "facemine_cli", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.fixture(scope="module")
def odd_and_real(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("odd")
    expected = make_odd_folder(root)
    link_photos(root / "real", lfw_photos(4))
    return root, expected


def test_every_file_is_accounted_for(odd_and_real, data_dir, prefect_harness, monkeypatch):
    from flows.mine import mine

    root, expected = odd_and_real
    monkeypatch.setenv("FACEMINE_INGEST__MAX_IMAGE_PIXELS", str(TEST_MAX_PIXELS))
    summary = mine(folders=[str(root)], subset="odd", shard_size=7)
    rows = stored_rows(data_dir).drop_duplicates("path")
    recorded = {Path(p).relative_to(root).as_posix(): (s, r) for p, s, r in zip(rows.path, rows.status, rows.reason)}
    expected = expected | {f"real/{photo.name}": "ok" for photo in lfw_photos(4)}
    assert set(recorded) == set(expected), "every listed file is recorded, each once"
    for name, outcome in expected.items():
        status, reason = recorded[name]
        assert f"{status}: {reason}".startswith(outcome) if reason else outcome == status == "ok", (name, status, reason)
    counted = summary.photos_new + summary.photos_linked + summary.photos_skipped + summary.photos_failed
    assert summary.photos_seen == len(recorded) == counted
    # UPPER_CASE.JPG holds plain.jpg's bytes: one content, two paths, mined once.
    hashed = rows.dropna(subset=["content_hash"])
    assert summary.photos_linked == len(hashed) - hashed.content_hash.nunique() > 0
    assert summary.faces_found >= 4  # every LFW photo has a face


def test_rerun_adds_nothing_and_changed_photo_is_redone(tmp_path, data_dir, prefect_harness):
    from flows.mine import mine

    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in lfw_photos(3):
        shutil.copy(photo, folder / photo.name)
    first = mine(folders=[str(folder)], subset="s")
    before = stored_rows(data_dir)
    again = mine(folders=[str(folder)], subset="s")
    assert (first.photos_new, again.photos_new, again.photos_unchanged) == (3, 0, 3)
    assert_same_rows(before, stored_rows(data_dir))

    changed = folder / lfw_photos(3)[0].name
    shutil.copy(lfw_photos(1, start=500)[0], changed)
    third = mine(folders=[str(folder)], subset="s")
    after = stored_rows(data_dir)
    assert (third.photos_new, third.photos_unchanged) == (1, 2)
    assert len(after.path.unique()) == 3
    old_hash = before[before.path == str(changed)].content_hash.iloc[0]
    assert after[after.path == str(changed)].content_hash.iloc[0] != old_hash


def test_shards_shrink_so_that_workers_finish_together() -> None:
    from usecases.mining import shard_paths

    paths = [f"{index}.jpg" for index in range(3214)]
    assert [len(shard) for shard in shard_paths(paths, 1000)] == [1000, 1000, 1000, 214]
    balanced = shard_paths(paths, 1000, workers=2)
    assert [path for shard in balanced for path in shard] == paths
    assert len(balanced) == 8 and max(map(len, balanced)) == 402
    assert shard_paths(paths[:150], 1000, workers=2) == [paths[:100], paths[100:150]]  # never below 100


def test_worker_processes_store_what_one_process_stores(tmp_path, prefect_harness, monkeypatch):
    from flows.mine import mine

    photos = link_photos(tmp_path / "photos", lfw_photos(12, start=3000))
    stored = []
    for workers in (1, 2):
        data = tmp_path / f"workers-{workers}"
        monkeypatch.setenv("FACEMINE_DATA_DIR", str(data))
        monkeypatch.setenv("FACEMINE_MINE__WORKERS", str(workers))
        summary = mine(folders=[str(photos)], subset="w", shard_size=4)
        assert (summary.photos_new, summary.faces_found > 0) == (12, True)
        stored.append(stored_rows(data))
    # Workers run torch on one thread, this process on two: MTCNN's float sums differ in the last
    # bits, so a chip may differ by a grey level (another content hash) and its embedding slightly.
    assert_same_rows(*(rows.drop(columns="chip_path") for rows in stored), vector_atol=1e-2)


def test_killed_run_resumes_to_the_same_rows(tmp_path):
    photos = link_photos(tmp_path / "photos", lfw_photos(48, start=1000))
    reference = tmp_path / "reference" / "data"
    reference.parent.mkdir()
    complete = run_cli(reference, "mine", str(photos), "--subset", "k", "--shard-size", "8")
    assert complete.wait(timeout=900) == 0, complete.stdout.read()

    crashed = tmp_path / "crashed" / "data"
    crashed.parent.mkdir()
    victim = run_cli(crashed, "mine", str(photos), "--subset", "k", "--shard-size", "8", start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and victim.poll() is None:
        if _image_count(crashed) >= 8:  # at least one shard committed
            break
        time.sleep(0.5)
    assert victim.poll() is None, "the run finished before it could be killed"
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    partial = _image_count(crashed)
    assert 0 < partial < 48
    resumed = run_cli(crashed, "mine", str(photos), "--subset", "k", "--shard-size", "8")
    assert resumed.wait(timeout=900) == 0, resumed.stdout.read()
    assert_same_rows(stored_rows(reference), stored_rows(crashed))


def _image_count(data_dir: Path) -> int:
    database = data_dir / "facemine.db"
    if not database.exists():
        return 0
    try:
        store = Store(Settings(data_dir=data_dir), create=False)
        with store.session() as session:
            return session.scalar(select(func.count()).select_from(Image)) or 0
    except Exception:  # noqa: BLE001 - schema not created yet
        return 0


def _mine_in_process(settings: Settings, paths: list[str]) -> None:
    from usecases.mining import mine_paths

    mine_paths("c", paths, settings)


def assert_concurrent_runs_create_no_duplicates(settings: Settings) -> None:
    """Two processes mine overlapping photos into one store at the same time (also used for PostgreSQL)."""

    photos = [str(p) for p in lfw_photos(12, start=2000)]
    Store(settings)  # schema first, as any run would
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_mine_in_process, args=(settings, photos[:8])),
        context.Process(target=_mine_in_process, args=(settings, photos[4:])),
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=600)
        assert worker.exitcode == 0
    rows = stored_rows(settings.data_dir, settings.database_url)
    assert rows.path.nunique() == 12
    assert not rows.duplicated(["path", "face_index"]).any()
    with Store(settings).session() as session:
        faces = session.scalar(select(func.count()).select_from(Face))
        indexed = session.scalar(select(func.count()).select_from(Embedding))
    assert faces == indexed == len(rows)


def test_concurrent_runs_on_overlapping_photos_create_no_duplicates(tmp_path):
    assert_concurrent_runs_create_no_duplicates(Settings(data_dir=tmp_path / "data"))
