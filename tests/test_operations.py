"""Operations a person can read: Prefect artifacts of real flow runs, `facemine status`, `models`,
`identities`, `evaluate`, and the GPU slot's silence where its limit does not exist.

One small store of real LFW faces (4 people x 4 photos) is mined, clustered and exported once
through the real flows on a temporary Prefect API; the tests read it back."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import select, update

from conftest import DATA
from facemine_cli import main
from pipeline.quality import RULES, report_from_reasons
from storage import registry
from storage.reports import stored_reasons
from storage.schema import Face, Identity, Model
from storage.settings import Settings
from storage.store import Store

LFW = DATA / "lfw" / "images"
# Larger photos than LFW's 150 px: a detector batch of them takes long enough to be seen on screen.
CELEBA = DATA / "celeba" / "images"
PEOPLE = ("Jennifer_Lopez", "Jennifer_Aniston", "Carlos_Menem", "Paul_Bremer")
PHOTOS_PER_PERSON = 4


def copy_photos(folder: Path) -> pd.DataFrame:
    """Copies of the first photos of each person; the truth as (path relative to `folder`, identity)."""
    rows = []
    for person in PEOPLE:
        for photo in sorted((LFW / person).glob("*.jpg"))[:PHOTOS_PER_PERSON]:
            (folder / photo.name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(photo, folder / photo.name)
            rows.append({"path": photo.name, "identity": person})
    return pd.DataFrame(rows)


def artifact(client, key: str, flow_run_id):  # noqa: ANN001, ANN201 - prefect client, Artifact
    """The newest artifact with `key`, which must belong to `flow_run_id`."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    found = client.read_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC, limit=1
    )
    assert found, f"no artifact with key {key!r}"
    assert found[0].flow_run_id == flow_run_id, f"artifact {key!r} is not linked to the flow run"
    return found[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, prefect_harness) -> dict:  # noqa: ANN001
    """Mine, cluster and export the photos through the flows; read back their artifacts."""
    from prefect import get_client

    from flows.cluster import cluster
    from flows.export import export
    from flows.mine import mine

    root = tmp_path_factory.mktemp("operations")
    photos = root / "photos"
    photos.mkdir()
    truth = copy_photos(photos)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FACEMINE_DATA_DIR", str(root / "data"))
        mined = mine(folders=[str(photos)], subset="lfw", return_state=True)
        clustered = cluster(return_state=True)
        exported = export(name="ops", return_state=True)
        store = Store(Settings())
        with get_client(sync_client=True) as client:
            artifacts = {
                key: artifact(client, key, state.state_details.flow_run_id)
                for key, state in (("mine-summary", mined), ("mine-quality", mined),
                                   ("clustering-summary", clustered), ("export-card", exported))
            }
        yield {
            "root": root, "photos": photos, "truth": truth, "store": store, "artifacts": artifacts,
            "mine": mined.result().model_dump(), "cluster": clustered.result(), "export": exported.result(),
        }


@pytest.fixture
def cli(world: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):  # noqa: ANN201
    """Run `facemine ...` in this process on the world's store; returns (exit status, stdout, stderr)."""
    monkeypatch.setenv("FACEMINE_DATA_DIR", str(world["root"] / "data"))
    monkeypatch.setenv("COLUMNS", "200")  # Rich would wrap table cells at 80 columns

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        status = main(list(args))
        out, err = capsys.readouterr()
        return status, out, err

    return run


def stored_quality(store: Store) -> dict:
    with store.session() as session:
        reasons = [stored_reasons(text) for text in session.scalars(select(Face.fail_reasons).order_by(Face.id))]
    return report_from_reasons(reasons)


# ---- artifacts --------------------------------------------------------------------------------


def test_mine_summary_artifact_is_the_flows_summary(world: dict):
    table = json.loads(world["artifacts"]["mine-summary"].data)
    assert {row[""]: row["value"] for row in table} == world["mine"]
    assert world["mine"]["photos_new"] == len(PEOPLE) * PHOTOS_PER_PERSON


def test_mine_quality_artifact_counts_what_each_rule_removed(world: dict):
    table = json.loads(world["artifacts"]["mine-quality"].data)
    expected = stored_quality(world["store"])
    # Every rule is listed, in rule order, with the faces it removed (alone) among the new faces.
    assert [row["rule"] for row in table] == list(RULES)
    assert {row["rule"]: (row["faces removed"], row["by this rule alone"]) for row in table} == {
        rule: (counts["removed"], counts["only"]) for rule, counts in expected["rules"].items()
    }
    assert expected["total"] == world["mine"]["faces_found"]
    assert expected["failed"] == world["mine"]["faces_found"] - world["mine"]["faces_passed"] > 0


def test_clustering_summary_artifact(world: dict):
    table = {row[""]: row["value"] for row in json.loads(world["artifacts"]["clustering-summary"].data)}
    info = world["cluster"]
    assert table["run_id"] == info["run_id"]
    assert table["identities"] == info["identities"] >= len(PEOPLE)
    assert table["faces"] == info["faces"] == world["mine"]["faces_found"]
    assert table["subsets"] == "all"


def test_export_card_artifact(world: dict):
    markdown = world["artifacts"]["export-card"].data
    card = world["export"]
    assert markdown.startswith("# Dataset export `ops` v1\n")
    assert f"| identities | {card['identities']} |" in markdown
    assert f"| faces | {card['faces']} |" in markdown
    assert f"clustering run {world['cluster']['run_id']}" in markdown
    assert card["identities"] >= 1


# ---- facemine status, identities, evaluate, models ---------------------------------------------


def test_status_shows_faces_removed_per_rule(world: dict, cli):  # noqa: ANN001
    status, out, _ = cli("status")
    assert status == 0
    expected = stored_quality(world["store"])["rules"]
    shown = {rule: tuple(int(n) for n in numbers) for rule, *numbers in
             re.findall(r"│ lfw\s+│ (\w+)\s+│\s+(\d+)\s+│\s+(\d+)\s+│", out)}
    assert shown == {rule: (c["removed"], c["only"]) for rule, c in expected.items() if c["removed"]}
    assert shown, "no face failed a rule: the test would not see the table"


def test_identities_says_how_many_it_shows_and_names_the_unnamed(world: dict, cli):  # noqa: ANN001
    total = world["cluster"]["identities"]
    status, out, _ = cli("identities", "--limit", "2")
    assert status == 0
    assert out.rstrip().splitlines()[-1] == f"2 of {total} identities (largest first; --limit N shows more)"
    assert out.count("(unnamed)") == 2

    largest = int(re.search(r"│\s+(\d+)\s+│", out).group(1))
    with world["store"].session() as session:
        session.execute(update(Identity).where(Identity.id == largest).values(name="Jennifer"))
    try:
        status, out, _ = cli("identities", "--limit", str(total))
    finally:
        with world["store"].session() as session:
            session.execute(update(Identity).where(Identity.id == largest).values(name=None))
    assert out.rstrip().splitlines()[-1] == f"{total} of {total} identities"
    assert out.count("Jennifer") == 1 and out.count("(unnamed)") == total - 1
    assert "None" not in out and "nan" not in out


def test_evaluate_refuses_truth_that_matches_no_photo(world: dict, cli, tmp_path: Path):  # noqa: ANN001
    elsewhere = tmp_path / "labels.csv"
    world["truth"].to_csv(elsewhere, index=False)  # same names, but beside no mined photo
    status, out, err = cli("evaluate", "--truth", str(elsewhere))
    assert status == 2
    assert err == (f"facemine: error: none of the {len(world['truth'])} paths in {elsewhere} is a mined photo "
                   "(paths are read relative to the file's folder): is it the truth for this store?\n")
    assert out == ""


def test_evaluate_prints_coverage_and_scores_mined_photos_only(world: dict, cli):  # noqa: ANN001
    from usecases.evaluation import evaluate_run

    mined = world["truth"]
    labels = world["photos"] / "labels.csv"
    mined.to_csv(labels, index=False)
    with_unmined = world["photos"] / "labels_more.csv"
    unmined = pd.DataFrame({"path": [f"not_mined_{i}.jpg" for i in range(4)], "identity": "Someone_Else"})
    pd.concat([mined, unmined]).to_csv(with_unmined, index=False)

    status, out, _ = cli("evaluate", "--truth", str(with_unmined))
    assert status == 0
    assert out.rstrip().splitlines()[-1] == "coverage: 16 of 20 truth paths are mined photos (80.0%); scored on those"
    partial, full = evaluate_run(world["store"], with_unmined), evaluate_run(world["store"], labels)
    assert (partial["photos"], partial["photos_mined"], full["photos_mined"], full["coverage"]) == (20, 16, 16, 1.0)
    scores = [key for key in full if key not in ("photos", "coverage")]
    assert {key: partial[key] for key in scores} == {key: full[key] for key in scores}
    assert full["n_faces"] == 16


def test_models_shows_training_parameters_and_metrics(world: dict, cli):  # noqa: ANN001
    store = world["store"]
    current = store.current_model()
    candidate = store.register_model(name="finetuned", kind="checkpoint", weights_path=None, weights_hash="f" * 64,
                                     embedding_dim=current.embedding_dim, preprocessing=current.preprocessing,
                                     parent_id=current.id)
    run_id = registry.start_training_run(store, current.id, world["export"]["export_id"],
                                         {"epochs": 3, "loss": "arcface", "base_lr": 0.01})
    registry.finish_training_run(store, run_id, candidate.id, history=[], metrics={})
    with store.session() as session:
        session.get_one(Model, candidate.id).training_run_id = run_id
    registry.update_model_metrics(store, candidate.id, {"verification_accuracy": 0.987654,
                                                        "calibration": {"cluster_min_similarity": 0.41}})

    status, out, _ = cli("models")
    assert status == 0
    assert f"model {current.id} ({current.name}): no training run, no metrics yet" in out
    assert f"model {candidate.id} (finetuned): training parameters and metrics" in out
    rows = re.findall(r"│ (training parameter|metric)\s+│ (\S+)\s+│ (\S+)\s+│", out)
    assert rows == [
        ("training parameter", "base_lr", "0.01"),
        ("training parameter", "epochs", "3"),
        ("training parameter", "loss", "arcface"),
        ("metric", "calibration.cluster_min_similarity", "0.41"),
        ("metric", "verification_accuracy", "0.9877"),
    ]


# ---- progress ----------------------------------------------------------------------------------


def test_progress_counts_parts_once_and_only_where_started():
    from flows import progress

    heard: list[tuple[str, int, int]] = []

    def listener(*event) -> None:  # noqa: ANN002
        heard.append(event)

    progress.add_listener(listener)
    try:
        progress.update("mine", "shard-a", 5)  # not started in this process: a worker's report
        assert heard == []
        progress.start("mine", 10)
        for done in (1, 5, 7):  # a shard's photos through detection, as it goes
            progress.update("mine", "shard-a", done)
        progress.update("mine", "shard-a", 7)  # the flow's report when the shard ends agrees
        progress.update("mine", "shard-b", 2)
        progress.update("mine", "shard-b", 3)  # a retried shard counts once
        progress.update("mine", "shard-c", 9)  # never past the total
        progress.finish("mine")
        progress.update("mine", "shard-c", 1)
    finally:
        progress.remove_listener(listener)
    assert [done for _, done, _ in heard] == [0, 1, 5, 7, 7, 9, 10, 10]
    assert {(stage, total) for stage, _, total in heard} == {("mine", 10)}


# ---- the GPU slot --------------------------------------------------------------------------------


def test_gpu_slot_is_silent_without_its_limit_and_taken_with_it(prefect_harness, caplog: pytest.LogCaptureFixture):  # noqa: ANN001
    from prefect import flow, get_client, task
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from flows import gpu

    @task
    def slots_in_use() -> int:
        with gpu.gpu_slot(), get_client(sync_client=True) as client:
            try:
                return client.read_global_concurrency_limit_by_name(gpu.GPU_SLOT).active_slots
            except Exception:  # noqa: BLE001 - no limit: nothing in use
                return -1

    @flow
    def three_shards() -> list[int]:
        return [slots_in_use() for _ in range(3)]

    gpu._limit_exists.cache_clear()
    with caplog.at_level(logging.DEBUG):
        assert three_shards() == [-1, -1, -1]
    assert not [r for r in caplog.records if "do not exist" in r.getMessage()]

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=gpu.GPU_SLOT, limit=1))
        try:
            gpu._limit_exists.cache_clear()
            assert three_shards() == [1, 1, 1]
        finally:
            client.delete_global_concurrency_limit_by_name(gpu.GPU_SLOT)
            gpu._limit_exists.cache_clear()


# ---- the progress bar a person sees (a real terminal: tmux) -----------------------------------------

FACEMINE = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "facemine"
# Prefect's console format: "15:13:44.593 | INFO    | Flow run 'x' - ..."
PREFECT_LOG_LINE = re.compile(r"\d\d:\d\d:\d\d\.\d{3} \| (DEBUG|INFO|WARNING|ERROR|CRITICAL)")
BAR = re.compile(r"^(starting \([^)]*\)|mining photos) .*? (\d+)/(\d+|\?)")
# Starting Python, the Prefect API and the models on a busy 2-core machine: this only bounds a hang.
MINE_WAIT_SECONDS = 600


def mine_in_tmux(tmp_path: Path, photos: int, *options: str, source: Path = LFW) -> tuple[set[tuple[str, str, str]], str]:
    """`facemine mine` on the first `photos` photos of `source` in a 120x40 tmux terminal; returns the
    bar states seen while it ran (description, done, total) and the terminal's whole history after it ended."""
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed: apt-get install tmux (scripts/test.sh installs it)")
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in sorted(source.rglob("*.jpg"))[:photos]:
        shutil.copyfile(photo, folder / photo.name)
    (tmp_path / "facemine.toml").write_text("")
    env = {"FACEMINE_DATA_DIR": tmp_path / "data", "FACEMINE_CONFIG": tmp_path / "facemine.toml",
           "PREFECT_HOME": tmp_path / "prefect", "TERM": "xterm-256color"}
    command = " ".join([*(f"{k}={v}" for k, v in env.items()), str(FACEMINE), "mine", str(folder), *options])
    socket, session = f"facemine-ops-{tmp_path.name}", "mine"

    def tmux(*args: str) -> str:
        return subprocess.run(["tmux", "-L", socket, *args], capture_output=True, text=True, check=True).stdout

    # COLUMNS/LINES (set under pytest) would override the terminal's size; the pane stays after exit.
    tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "40",
         f"env -u COLUMNS -u LINES {command}; echo FACEMINE_EXIT=$?; sleep 3600")
    states: set[tuple[str, str, str]] = set()
    try:
        deadline = time.monotonic() + MINE_WAIT_SECONDS
        while time.monotonic() < deadline:
            screen = tmux("capture-pane", "-p", "-t", session)
            states.update(match.groups() for line in screen.splitlines() if (match := BAR.match(line)))
            if "FACEMINE_EXIT=" in screen:
                break
            time.sleep(0.2)
        history = tmux("capture-pane", "-p", "-S", "-", "-t", session)
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True)
    assert "FACEMINE_EXIT=0" in history, f"mine did not finish well:\n{history}"
    return states, history


@pytest.mark.e2e
def test_mine_shows_one_clean_progress_bar(tmp_path: Path):
    states, history = mine_in_tmux(tmp_path, 40, source=CELEBA)
    lines = history.splitlines()
    assert not [line for line in lines if PREFECT_LOG_LINE.search(line)], history
    assert "Concurrency limits" not in history
    # The bar was drawn in place: the history keeps only its last state, once.
    assert [line for line in lines if BAR.match(line)] == [next(line for line in lines if BAR.match(line))]
    assert BAR.match(next(line for line in lines if BAR.match(line))).groups() == ("mining photos", "40", "40")
    # It said what it was doing before the first photo, then moved before the shard ended.
    assert ("starting (loading models)", "0", "40") in states
    # One report per detector batch of 16 photos: each state lasts while the next batch is detected.
    assert {done for description, done, _ in states if description == "mining photos"} >= {"16", "32", "40"}
    assert "Beginning flow run" in (tmp_path / "data" / "logs" / "facemine.log").read_text()


@pytest.mark.e2e
def test_mine_verbose_prints_log_lines_above_the_bar(tmp_path: Path):
    _, history = mine_in_tmux(tmp_path, 3, "-v")
    lines = history.splitlines()
    bars = [index for index, line in enumerate(lines) if BAR.match(line)]
    began = [index for index, line in enumerate(lines) if "Beginning flow run" in line]
    assert len(bars) == 1 and len(began) == 1 and began[0] < bars[0], history
    assert not [line for line in lines if PREFECT_LOG_LINE.search(line)], history


def report_from_another_process(stage: str, part: str, done: int) -> None:
    from flows import progress

    progress.update(stage, part, done)


def test_progress_reaches_the_bar_from_a_spawned_worker():
    import multiprocessing

    from flows import progress

    heard: list[int] = []

    def listener(_stage: str, done: int, _total: int) -> None:
        heard.append(done)

    progress.add_listener(listener)
    try:
        progress.start("mine", 10)
        worker = multiprocessing.get_context("spawn").Process(target=report_from_another_process,
                                                              args=("mine", "shard-b", 4))
        worker.start()
        worker.join(120)
        deadline = time.monotonic() + 30
        while heard[-1] != 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        progress.finish("mine")
    finally:
        progress.remove_listener(listener)
    assert worker.exitcode == 0
    assert heard == [0, 4]
    assert progress.RELAY not in os.environ  # closed with the stage: later workers report nothing
