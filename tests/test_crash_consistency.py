"""Crash consistency through the command line: `facemine mine` killed (SIGKILL, its whole process
group) at random moments and re-run, and two runs at once over overlapping folders, end with the
rows of one clean uninterrupted run, no duplicate, and nothing `facemine doctor --fix` leaves.

Real LFW photos, copies of some under other names, and the odd and hostile inputs of
`odd_files`; shards of 3 photos, so kills land before, between and inside shard writes.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from review_helpers import lfw_paths
from sqlalchemy import func, select
from test_reliability import FACEMINE

from facemine_cli import main
from odd_files import TEST_MAX_PIXELS, make_hostile_folder, make_odd_folder, without_root_override
from storage.maintenance import DoctorReport, doctor
from storage.schema import Embedding, EmbeddingShard, Face, Image, PhotoPath, Subset
from storage.settings import Settings
from storage.store import Store

# Kill moments are drawn from this seed; set CRASH_TEST_SEED to try others.
SEED = int(os.environ.get("CRASH_TEST_SEED", "1101"))
SHARD_SIZE = 3
FOLDERS = ("a", "b", "c")
# Two runs at once: "b" is mined by both, "c" holds copies of photos of "a" under other names.
CONCURRENT_FOLDERS = (("a", "b"), ("b", "c"))
RUN_SECONDS = 600
# Environment of every run: one worker (shards in order), the odd folder's bomb counted as one,
# and one photo per detector and embedder call: batched MTCNN and SFace give results that differ in
# the last bits with the batch's other photos, and a re-run after a kill batches the photos left
# differently (chips named by their hash would then differ from the clean run's for that alone).
RUN_ENV = {
    "FACEMINE_MINE__WORKERS": "1",
    "FACEMINE_INGEST__MAX_IMAGE_PIXELS": str(TEST_MAX_PIXELS),
    "FACEMINE_DETECT__BATCH_SIZE": "1",
    "FACEMINE_EMBED__BATCH_SIZE": "1",
}
# Decodable variants of one portrait that test_reliability covers; left out here to keep runs short.
ODD_VARIANTS_LEFT_OUT = ("UPPER_CASE.JPG", "exif_6.jpg", "exif_8.jpg", "grey.jpg", "grey_alpha.png", "palette.png",
                         "rgba.png")
# What a SIGKILL may leave: files written before the transaction that would have named them.
KILL_LEFTOVERS = ("partial_writes", "orphan_chips", "unlisted_shard_files")


# ---- running facemine -------------------------------------------------------------------------


def launch(root: Path, data_dir: Path, folders: tuple[str, ...], log: Path) -> subprocess.Popen:
    """`facemine mine` in a process group of its own (Prefect's API server included), so a kill
    reaches every process of the run; Prefect keeps its database in the data folder, as users get it."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_HOME"} | RUN_ENV | {"FACEMINE_DATA_DIR": str(data_dir)}
    command = [str(FACEMINE), "mine", *folders, "--shard-size", str(SHARD_SIZE)]
    with log.open("ab") as output:
        return subprocess.Popen(without_root_override(command), cwd=root, env=env, stdout=output,
                                stderr=subprocess.STDOUT, start_new_session=True)


def finish(run: subprocess.Popen, log: Path) -> None:
    assert run.wait(timeout=RUN_SECONDS) == 0, log.read_text(errors="replace")[-4000:]


def store_files(data_dir: Path) -> set[str]:
    """Chip and embedding files (finished or partial) under the data folder (none before it exists)."""
    return {
        path.relative_to(data_dir).as_posix()
        for folder in ("chips", "embeddings")
        for path in (data_dir / folder).rglob("*")
        if path.is_file()
    }


def shard_files(data_dir: Path) -> set[str]:
    """Embedding shard files, finished or partial (one folder per model: cheap to poll)."""
    return {path.name for path in (data_dir / "embeddings").glob("*/*")}


def kill_during_run(root: Path, data_dir: Path, log: Path, new_shard_files: int, delay: float) -> bool:
    """Start a run, wait until it has begun writing its `new_shard_files`-th shard file (0: from
    its start), then `delay` seconds more, and SIGKILL its process group; False when it finished
    first. Without a delay the kill lands in the shard's write: chips, shard files, commit."""
    before = shard_files(data_dir)
    run = launch(root, data_dir, FOLDERS, log)
    deadline = time.monotonic() + RUN_SECONDS
    while run.poll() is None and len(shard_files(data_dir) - before) < new_shard_files:
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-4000:]
        time.sleep(0.001)
    time.sleep(delay)
    killed = run.poll() is None
    if killed:
        os.killpg(run.pid, signal.SIGKILL)
    run.wait(timeout=60)
    assert killed or run.returncode == 0, log.read_text(errors="replace")[-4000:]
    return killed


def membership_count(data_dir: Path) -> int:
    with Store(Settings(data_dir=data_dir), create=False).session() as session:
        return session.scalar(select(func.count()).select_from(PhotoPath))


# ---- what a store holds -----------------------------------------------------------------------


def store_rows(data_dir: Path) -> dict:
    """The store's rows keyed by content, not by ids (which differ between stores): memberships,
    contents, faces with their chips, and each face's embedding."""
    store = Store(Settings(data_dir=data_dir), create=False)
    with store.session() as session:
        memberships = session.execute(
            select(Subset.name, PhotoPath.path, PhotoPath.status, PhotoPath.reason, Image.content_hash)
            .join(Subset, Subset.id == PhotoPath.subset_id)
            .outerjoin(Image, Image.id == PhotoPath.image_id)
        ).tuples().all()
        contents = session.execute(
            select(Image.content_hash, Image.perceptual_hash, Image.size_bytes, Image.width, Image.height,
                   Image.status, Image.reason)
        ).tuples().all()
        faces = session.execute(
            select(Face.id, Image.content_hash, Face.face_index, Face.x1, Face.y1, Face.x2, Face.y2,
                   Face.passed, Face.fail_reasons, Face.chip_path).join(Image, Image.id == Face.image_id)
        ).tuples().all()
        index_rows = session.scalar(select(func.count()).select_from(Embedding))
        shard_rows = session.scalar(select(func.coalesce(func.sum(EmbeddingShard.count), 0)))
    key_of = {face_id: (content, index) for face_id, content, index, *_ in faces}
    face_ids, vectors = store.load_embeddings(store.current_model().id)
    return {
        "photo_paths": sorted(memberships, key=repr),
        "images": sorted(contents),
        "faces": sorted((content, index, (x1, y1, x2, y2), passed, reasons, chip)
                        for _, content, index, x1, y1, x2, y2, passed, reasons, chip in faces),
        "embeddings": {key_of[int(face_id)]: vector for face_id, vector in zip(face_ids, vectors)},
        "index_rows": index_rows,
        "shard_rows": shard_rows,
    }


def assert_same_rows(rows: dict, clean: dict) -> None:
    for table in ("photo_paths", "images", "faces"):
        assert rows[table] == clean[table], table
    assert sorted(rows["embeddings"]) == sorted(clean["embeddings"])
    for key, vector in clean["embeddings"].items():
        np.testing.assert_array_equal(rows["embeddings"][key], vector, err_msg=str(key))


def assert_no_duplicates(rows: dict) -> None:
    for table, key in (("photo_paths", lambda row: row[:2]), ("images", lambda row: row[0]),
                       ("faces", lambda row: row[:2])):
        counts = Counter(key(row) for row in rows[table])
        assert [item for item, count in counts.items() if count > 1] == [], table
    # One vector per face, and the shards hold no other.
    assert rows["index_rows"] == rows["shard_rows"] == len(rows["faces"]) == len(rows["embeddings"])


def problems_by_kind(report: DoctorReport) -> dict[str, int]:
    kinds = {
        "partial_writes": len(report.partial_writes),
        "orphan_chips": len(report.orphan_chips),
        "dead_vectors": sum(report.dead_vectors.values()),
        "missing_shards": len(report.missing_shards),
        "dangling_index": len(report.dangling_index),
        "faces_without_chip": len(report.faces_without_chip),
        "unlisted_shard_files": len(report.unlisted_shard_files),
    }
    assert sum(kinds.values()) == report.problems()
    return {kind: count for kind, count in kinds.items() if count}


def assert_doctor_fixes_only(data_dir: Path, allowed: tuple[str, ...], clean_dir: Path, monkeypatch) -> dict:
    """`doctor --grace-minutes 0` finds only `allowed` kinds of problem, `--fix` removes them, and
    then the chips and shards on disk are exactly those rows name (chips: the clean run's own)."""
    monkeypatch.setenv("FACEMINE_DATA_DIR", str(data_dir))
    store = Store(Settings(data_dir=data_dir), create=False)
    found = problems_by_kind(doctor(store, grace_seconds=0))
    assert set(found) <= set(allowed), found
    assert main(["doctor", "--grace-minutes", "0"]) == (1 if found else 0)
    assert main(["doctor", "--fix", "--grace-minutes", "0"]) == 0
    assert main(["doctor", "--grace-minutes", "0"]) == 0
    assert doctor(store, grace_seconds=0).problems() == 0
    chips = {path for path in store_files(data_dir) if path.startswith("chips/")}
    assert chips == {path for path in store_files(clean_dir) if path.startswith("chips/")}
    with store.session() as session:
        shards = set(session.scalars(select(EmbeddingShard.path)))
    assert {path for path in store_files(data_dir) if path.startswith("embeddings/")} == {
        f"{shard}{suffix}" for shard in shards for suffix in (".ids.npy", ".npy")
    }
    return found


# ---- the tests --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """a/, b/: real LFW photos of ten people; b/odd: odd and broken files; c/: copies of photos
    of a/ under other names, and c/hostile: inputs that hang, abort or pollute a naive miner."""
    root = tmp_path_factory.mktemp("crash")
    sources = lfw_paths(("Abel_Pacheco", "Ai_Sugiyama", "Alec_Baldwin", "Amelia_Vega", "Ana_Guevara",
                         "Angela_Bassett", "Antony_Leung", "Art_Howe", "Ashanti", "Azra_Akin"), per_person=4)
    for folder in ("a", "b/odd", "c/hostile"):
        (root / folder).mkdir(parents=True)
    for index, source in enumerate(sources):
        shutil.copy(source, root / ("a" if index < len(sources) // 2 else "b"))
    for source in sorted((root / "a").iterdir())[::3]:
        shutil.copy(source, root / "c" / f"copy_of_{source.name}")
    make_odd_folder(root / "b" / "odd")
    for variant in ODD_VARIANTS_LEFT_OUT:
        (root / "b" / "odd" / variant).unlink()
    make_hostile_folder(root / "c" / "hostile")
    yield root
    (root / "c" / "hostile" / "locked").chmod(0o755)  # let pytest clean up


@pytest.fixture(scope="module")
def clean(photos) -> dict:
    """One uninterrupted run over all folders into a data folder of its own."""
    data_dir = photos / "clean-data"
    log = photos / "clean.log"
    finish(launch(photos, data_dir, FOLDERS, log), log)
    rows = store_rows(data_dir)
    assert_no_duplicates(rows)
    assert len(rows["faces"]) >= 40
    return {"data_dir": data_dir, "rows": rows}


def test_kill_at_random_moments_then_rerun_matches_a_clean_run(photos, clean, monkeypatch):
    data_dir = photos / "killed-data"
    log = photos / "killed.log"
    rng = random.Random(SEED)
    # Random moments: one of start-up or early mining, one while a later shard is mined, and two
    # as a shard's write has begun (a random one of the next few shards).
    schedule = [(0, rng.uniform(2.0, 20.0)), (rng.randint(1, 4), rng.uniform(0.2, 1.5))]
    schedule += [(rng.randint(1, 4), 0.0) for _ in range(2)]
    killed = [kill_during_run(photos, data_dir, log, shard_file, delay) for shard_file, delay in schedule]
    assert sum(killed) >= 3, (schedule, killed)
    assert membership_count(data_dir) < len(clean["rows"]["photo_paths"]), "the kills left work to do"

    finish(launch(photos, data_dir, FOLDERS, log), log)
    rows = store_rows(data_dir)
    assert_same_rows(rows, clean["rows"])
    assert_no_duplicates(rows)
    found = assert_doctor_fixes_only(data_dir, KILL_LEFTOVERS, clean["data_dir"], monkeypatch)
    assert_same_rows(store_rows(data_dir), clean["rows"])
    print(f"seed {SEED}: kills {schedule} landed {killed}; doctor fixed {found}")


def test_two_concurrent_runs_over_overlapping_folders_match_a_clean_run(photos, clean, monkeypatch):
    data_dir = photos / "concurrent-data"
    logs = [photos / f"concurrent_{index}.log" for index in range(len(CONCURRENT_FOLDERS))]
    runs = [launch(photos, data_dir, folders, log) for folders, log in zip(CONCURRENT_FOLDERS, logs)]
    for run, log in zip(runs, logs):
        finish(run, log)
    rows = store_rows(data_dir)
    assert_same_rows(rows, clean["rows"])
    assert_no_duplicates(rows)
    # A run that mined a content the other stored first wrote the winner's chips (named by content).
    found = assert_doctor_fixes_only(data_dir, ("orphan_chips",), clean["data_dir"], monkeypatch)
    assert_same_rows(store_rows(data_dir), clean["rows"])
    print(f"doctor fixed {found}")
