"""Reliability through the command line, as a user meets it.

Bad inputs never hang or abort a run and each ends recorded with a reason; a re-run adds
nothing; user errors (bad config, bad arguments, errors raised inside a flow) print one line,
exit with status 2, show no traceback and are not retried.

Not here yet: kill -9 at random points and two concurrent runs, judged by `facemine doctor`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import func, select

from conftest import DATA
from odd_files import TEST_MAX_PIXELS, make_hostile_folder, make_odd_folder, without_root_override
from pipeline.errors import FacemineError, check_name
from pipeline.ingest import path_key
from storage.schema import Face, PhotoPath
from storage.settings import ServeConfig, Settings, SubsetName
from storage.store import Store

FACEMINE = Path(sys.executable).parent / "facemine"
# Two people with two photos each: clustering has identities to export and name.
REAL_PHOTOS = sorted((DATA / "lfw" / "images" / "Aaron_Sorkin").glob("*.jpg"))[:2] + sorted(
    (DATA / "lfw" / "images" / "Abdel_Nasser_Assidi").glob("*.jpg")
)[:2]
# Files of the odd and hostile folders that `facemine status` counts as "unreadable".
UNREADABLE_FILES = 8


def facemine(*args: str, cwd: Path, timeout: float = 900, **env: str) -> subprocess.CompletedProcess:
    """The installed `facemine` command, with file permissions applying even when run as root.

    Prefect keeps its database in the data folder, as users get it (no PREFECT_HOME)."""
    environment = {k: v for k, v in os.environ.items() if k != "PREFECT_HOME"} | env
    return subprocess.run(without_root_override([str(FACEMINE), *args]), cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def photo_rows(data_dir: Path) -> list[tuple[str, str, str | None, bool]]:
    """(path, status, reason, has content) of every photo record, sorted."""
    store = Store(Settings(data_dir=data_dir))
    with store.session() as session:
        rows = session.execute(select(PhotoPath.path, PhotoPath.status, PhotoPath.reason, PhotoPath.image_id)).all()
    return sorted((path, status, reason, image_id is not None) for path, status, reason, image_id in rows)


def face_count(data_dir: Path) -> int:
    with Store(Settings(data_dir=data_dir)).session() as session:
        return session.scalar(select(func.count()).select_from(Face))


@pytest.fixture(scope="module")
def mined(tmp_path_factory) -> dict:
    """`facemine mine .` twice in a folder of real photos beside every kind of bad input, with
    the store's data folder (default ./facemine-data) inside the folder it mines."""
    root = tmp_path_factory.mktemp("photos")
    for folder in ("odd", "hostile", "real"):
        (root / folder).mkdir()
    expected = {f"odd/{name}": outcome for name, outcome in make_odd_folder(root / "odd").items()}
    expected |= {f"hostile/{name}": outcome for name, outcome in make_hostile_folder(root / "hostile").items()}
    for photo in REAL_PHOTOS:
        shutil.copy(photo, root / "real" / photo.name)
        expected[f"real/{photo.name}"] = "ok"
    data_dir = root / "facemine-data"
    limit = {"FACEMINE_INGEST__MAX_IMAGE_PIXELS": str(TEST_MAX_PIXELS)}
    first = facemine("mine", ".", "--subset", "rel", cwd=root, **limit)
    rows, faces = photo_rows(data_dir), face_count(data_dir)
    second = facemine("mine", ".", "--subset", "rel", cwd=root, **limit)
    yield {"root": root, "data_dir": data_dir, "expected": expected, "runs": (first, second),
           "rows": rows, "faces": faces}
    (root / "hostile" / "locked").chmod(0o755)  # let pytest clean up


def test_mine_completes_and_records_every_offered_file(mined):
    first, _ = mined["runs"]
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Traceback" not in first.stderr
    prefix = path_key(mined["root"]) + "/"
    recorded = {path.removeprefix(prefix): (status, reason, content) for path, status, reason, content in mined["rows"]}
    assert set(recorded) == set(mined["expected"]), "each offered file once; nothing from the data folder"
    for name, expected in mined["expected"].items():
        status, reason, has_content = recorded[name]
        assert (f"{status}: {reason}" if reason else status).startswith(expected), (name, status, reason)
        assert has_content or status != "ok", name
    assert mined["faces"] >= len(REAL_PHOTOS)


def test_second_run_adds_nothing(mined):
    _, second = mined["runs"]
    assert second.returncode == 0, second.stderr[-3000:]
    assert photo_rows(mined["data_dir"]) == mined["rows"]
    assert face_count(mined["data_dir"]) == mined["faces"]


def test_status_counts_unreadable_files_and_folders(mined):
    status = facemine("status", cwd=mined["root"])
    assert status.returncode == 0, status.stderr
    [line] = [line for line in status.stdout.splitlines() if "photos failed" in line and "unreadable" in line]
    assert line.split()[-2] == str(UNREADABLE_FILES)


@pytest.fixture(scope="module")
def clustered(mined) -> dict:
    done = facemine("cluster", cwd=mined["root"])
    assert done.returncode == 0, done.stderr[-3000:]
    from storage import identities as identity_store

    store = Store(Settings(data_dir=mined["data_dir"]))
    summary = identity_store.identities_summary(store, identity_store.latest_run_id(store))
    return mined | {"identity": str(int(summary.identity_id.iloc[0]))}


def assert_one_line_error(done: subprocess.CompletedProcess, expected: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert done.stderr.splitlines() == [done.stderr.strip()], f"one line expected:\n{done.stderr}"
    assert expected in done.stderr, done.stderr


CONFIG_FILES = {
    "malformed": (b"[detect\nmin_face_size = 24\n", "not valid TOML"),
    "not_utf8": (b'data_dir = "caf\xe9"\n', "not UTF-8 text"),
    "misspelt_section": (b"[detcet]\nmin_face_size = 24\n", "unknown section [detcet] (did you mean 'detect'?)"),
    "misspelt_key": (b"[detect]\nmin_face_sise = 24\n", "unknown key 'min_face_sise' in section [detect]"),
    "bad_value": (b"[mine]\nshard_size = 0\n", "invalid setting or parameter mine.shard_size"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_FILES))
def test_bad_config_file_is_one_line(tmp_path, case):
    content, expected = CONFIG_FILES[case]
    config = tmp_path / "facemine.toml"
    config.write_bytes(content)
    assert_one_line_error(facemine("status", cwd=tmp_path, FACEMINE_CONFIG=str(config)), expected)


def test_missing_config_file_is_one_line(tmp_path):
    missing = tmp_path / "nowhere.toml"
    done = facemine("status", cwd=tmp_path, FACEMINE_CONFIG=str(missing))
    assert_one_line_error(done, f"FACEMINE_CONFIG names {missing}, which does not exist")


LONG_NAME = "x" * 256
ARGUMENT_ERRORS = {
    "shard_size_0": (["mine", "real", "--shard-size", "0"], "argument --shard-size: must be at least 1, got 0"),
    "empty_subset": (["mine", "real", "--subset", ""], "a subset name cannot be empty"),
    "long_subset": (["mine", "real", "--subset", LONG_NAME], "a subset name is 256 characters long; at most 255 fit"),
    "newline_subset": (["mine", "real", "--subset", "a\nb"], "cannot hold control characters such as NUL or newline"),
    "export_unknown_run": (["export", "x", "--run", "999"], "no clustering run 999"),
    "export_nothing": (["export", "x", "--min-faces", "1000"], "nothing to export"),
    "identities_unknown_run": (["identities", "--run", "999"], "no clustering run 999"),
    "long_identity_name": (["label", "name", "IDENTITY", LONG_NAME], "a name is 256 characters long; at most 255 fit"),
    "newline_identity_name": (["label", "name", "IDENTITY", "Ann\nBob"], "a name cannot hold control characters"),
}


@pytest.mark.parametrize("case", sorted(ARGUMENT_ERRORS))
def test_bad_argument_is_one_line(clustered, case):
    args, expected = ARGUMENT_ERRORS[case]
    args = [clustered["identity"] if arg == "IDENTITY" else arg for arg in args]
    assert_one_line_error(facemine(*args, cwd=clustered["root"]), expected)


def test_names_with_nul_are_refused_everywhere():
    """NUL cannot reach argv; it can come through settings, flow parameters and the review app."""
    with pytest.raises(ValidationError, match="control characters"):
        TypeAdapter(SubsetName).validate_python("a\x00b")
    with pytest.raises(ValidationError, match="control characters"):
        ServeConfig(watch_subset="a\x00b")
    with pytest.raises(FacemineError, match="control characters"):
        check_name("Ann\x00", "a name")


def assert_flow_error_is_one_line(done: subprocess.CompletedProcess, expected: str) -> None:
    """Prefect logs the failed run (its own lines), but with no traceback and no retry."""
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr and "Retry" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("facemine: error:")]
    assert len(errors) == 1 and expected in errors[0], done.stderr[-3000:]


def test_missing_weights_inside_the_flow_is_one_line_and_not_retried(mined, tmp_path):
    done = facemine("mine", str(mined["root"] / "real"), cwd=tmp_path,
                    FACEMINE_EMBED__WEIGHTS=str(tmp_path / "missing.onnx"), FACEMINE_MINE__RETRY_DELAY_SECONDS="0")
    assert_flow_error_is_one_line(done, f"weights not found: {tmp_path / 'missing.onnx'}")


def test_unknown_method_inside_the_flow_is_one_line(clustered):
    done = facemine("cluster", "--method", "nosuch", cwd=clustered["root"])
    assert_flow_error_is_one_line(done, "unknown clustering method 'nosuch'")
