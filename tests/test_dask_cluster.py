"""Mining on a Dask cluster: an operator's scheduler and 2 worker processes (each in a working
folder of its own, as on separate machines), a throwaway PostgreSQL server and the data root on a
local S3-compatible server (moto, tests/s3_server.py).

The `mine` flow on the cluster stores exactly the rows (paths, contents, faces, chips, embeddings
bit for bit) of a single-machine run over the same real LFW photos, even when one worker is killed
mid-run: the shard it held is run again elsewhere (a retry), never stored twice or lost.
Detector and embedder batches of one photo, as in test_crash_consistency: batched models give
results that differ in the last bits with the batch's other photos, and shards land differently.
"""
# ruff: noqa: F811
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from prefect import flow, task
from sqlalchemy import create_engine, func, select

from conftest import REPO
from facemine_cli import main
from flows.runners import SCHEDULER_CONNECT_SECONDS, task_runner
from storage.schema import EmbeddingShard
from storage.settings import Settings
from storage.store import Store
from test_crash_consistency import assert_no_duplicates, assert_same_rows, store_rows
from test_mine_flow import link_photos, lfw_photos
from test_object_storage import chip_objects

# The servers' fixtures, used by name (hence the file-wide noqa: pytest's idiom for shared fixtures).
from postgres_server import create_database, postgres_server  # noqa: F401, I001
from s3_server import s3_bucket, s3_server  # noqa: F401

PHOTOS = 24
SHARD_SIZE = 3
RUN_ENV = {
    "FACEMINE_DETECT__BATCH_SIZE": "1",
    "FACEMINE_EMBED__BATCH_SIZE": "1",
    "FACEMINE_MINE__RETRY_DELAY_SECONDS": "0",
}
START_SECONDS = 180
GPU = "GPU"


@dataclass
class DaskCluster:
    address: str
    workers: list[subprocess.Popen]

    def tasks_held_by_removed_workers(self) -> list[set[str]]:
        """For each worker the scheduler lost, the tasks it was running then (to be run elsewhere)."""
        from distributed import Client

        with Client(self.address, timeout=30) as client:
            events = client.get_events("all")
        return [event["processing-tasks"] for _, event in events if event.get("action") == "remove-worker"]

    def busy_worker(self) -> int:
        """Index of a worker that holds a task now (running it, or queued next on it)."""
        from distributed import Client

        with Client(self.address, timeout=30) as client:
            processing = client.processing()
            names = {info["id"]: address for address, info in client.scheduler_info()["workers"].items()}
        for index in range(len(self.workers)):
            if processing.get(names[f"worker-{index}"]):
                return index
        raise AssertionError(f"no worker holds a task: {processing}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory) -> Iterator[DaskCluster]:
    """`dask scheduler` and 2 `dask worker` processes as an operator starts them, one task at a time
    each, every process in a session of its own (a kill takes a worker's nanny with it); worker-1
    says it has a GPU. The test that kills a worker comes last in this module."""
    from distributed import Client

    tmp_path = tmp_path_factory.mktemp("dask")
    # Workers import facemine, and this module for its test task.
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    scheduler_file = tmp_path / "scheduler.json"
    dask = str(Path(sys.executable).parent / "dask")
    processes = []

    def start(command: list[str], cwd: Path) -> subprocess.Popen:
        cwd.mkdir(parents=True, exist_ok=True)
        with (cwd / "log.txt").open("wb") as log:
            process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        processes.append(process)
        return process

    try:
        scheduler = start([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                           "--scheduler-file", str(scheduler_file)], tmp_path / "scheduler")
        deadline = time.monotonic() + START_SECONDS
        while not scheduler_file.exists():
            assert scheduler.poll() is None and time.monotonic() < deadline, "the scheduler did not start"
            time.sleep(0.2)
        workers = [
            start([dask, "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1", "--no-dashboard",
                   "--name", f"worker-{index}", "--local-directory", str(tmp_path / f"worker-{index}" / "scratch"),
                   *resources], tmp_path / f"worker-{index}")
            for index, resources in enumerate([[], ["--resources", f"{GPU}=1"]])
        ]
        address = json.loads(scheduler_file.read_text())["address"]
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=START_SECONDS)
        yield DaskCluster(address, workers)
    finally:
        for process in processes:
            _stop(process)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    return link_photos(tmp_path_factory.mktemp("photos") / "lfw", lfw_photos(PHOTOS, start=1200))


def mine_folder(folder: Path, data_dir: Path, environment: dict[str, str]):  # noqa: ANN201 - prefect State
    """The `mine` flow's final state over `folder`, with settings from the environment as a user sets them."""
    from flows.mine import mine

    with pytest.MonkeyPatch.context() as patch:
        for name, value in (RUN_ENV | {"FACEMINE_DATA_DIR": str(data_dir)} | environment).items():
            patch.setenv(name, value)
        return mine(folders=[str(folder)], subset="lfw", shard_size=SHARD_SIZE, return_state=True)


def rows_of(data_dir: Path, environment: dict[str, str] | None = None) -> dict:
    """`test_crash_consistency.store_rows` of the store these settings (as environment) name."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (environment or {}).items():
            patch.setenv(name, value)
        return store_rows(data_dir)


@dataclass
class SingleRun:
    rows: dict
    chips: dict[str, bytes]


@pytest.fixture(scope="module")
def single_machine(photo_folder, tmp_path_factory, prefect_harness) -> SingleRun:
    """One machine, one worker in-process, the default store: SQLite and files in the data folder."""
    data_dir = tmp_path_factory.mktemp("single") / "data"
    summary = mine_folder(photo_folder, data_dir, {"FACEMINE_MINE__WORKERS": "1"}).result()
    assert (summary.photos_seen, summary.photos_new) == (PHOTOS, PHOTOS)
    return SingleRun(rows_of(data_dir), chip_objects(Store(Settings(data_dir=data_dir), create=False)))


def differences(rows: list, expected: list) -> tuple[list, list]:
    """(rows not expected, expected rows missing)."""
    return [row for row in rows if row not in expected], [row for row in expected if row not in rows]


def task_runs_of(flow_run_id) -> list:  # noqa: ANN001 - UUID
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


@task
def worker_of(number: int) -> tuple[str, str]:
    """Name and working folder of the Dask worker that runs this task."""
    from distributed import get_worker

    worker = get_worker()
    return str(worker.name), worker.local_directory


def test_gpu_tasks_land_on_gpu_workers_only(dask_cluster, prefect_harness):
    on_cuda = Settings(embed={"device": "cuda"}, execution={"task_runner": "dask", "dask_address": dask_cluster.address})

    @flow
    def spread(gpu: bool) -> set[str]:
        with task_runner(on_cuda, 2, gpu=gpu) as runner:
            futures = [runner.submit(worker_of, {"number": number}) for number in range(6)]
            return {future.result()[0] for future in futures}

    # Six tasks at once on two one-thread workers: CPU tasks take both, GPU tasks wait for worker-1.
    assert spread(gpu=True) == {"worker-1"}
    assert spread(gpu=False) == {"worker-0", "worker-1"}


@task
def hold_gpu_slot(seconds: float) -> tuple[str, float, float]:
    """(worker, start, end) of holding the `facemine-gpu` slot for `seconds`."""
    from distributed import get_worker

    from flows import gpu

    gpu._limit_exists.cache_clear()  # a worker may have asked before this test created the limit
    with gpu.gpu_slot():
        started = time.time()
        time.sleep(seconds)
        return str(get_worker().name), started, time.time()


def test_the_gpu_concurrency_limit_holds_across_dask_workers(dask_cluster, prefect_harness):
    """`facemine serve`'s `facemine-gpu` limit of 1: tasks on two workers take turns holding it."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from flows.gpu import GPU_SLOT

    on_cluster = Settings(execution={"task_runner": "dask", "dask_address": dask_cluster.address})

    @flow
    def take_turns() -> list[tuple[str, float, float]]:
        with task_runner(on_cluster, 2) as runner:
            futures = [runner.submit(hold_gpu_slot, {"seconds": 1.0}) for _ in range(4)]
            return sorted(future.result() for future in futures)

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_SLOT, limit=1))
        try:
            held = take_turns()
        finally:
            client.delete_global_concurrency_limit_by_name(GPU_SLOT)
    assert {worker for worker, _, _ in held} == {"worker-0", "worker-1"}
    spans = sorted((start, end) for _, start, end in held)
    assert all(later_start >= end for (_, end), (later_start, _) in zip(spans, spans[1:])), spans


def test_local_cluster_runs_tasks_in_worker_processes_of_their_own(prefect_harness):
    local = Settings(execution={"task_runner": "dask", "dask_workers": 2})

    @flow
    def spread() -> set[tuple[str, str]]:
        with task_runner(local, 2, gpu=True) as runner:
            futures = [runner.submit(worker_of, {"number": number}) for number in range(6)]
            return {future.result() for future in futures}

    workers = spread()
    assert len({name for name, _ in workers}) == len({folder for _, folder in workers}) == 2


def test_unreachable_or_bad_scheduler_address_is_one_line_and_exit_status_2(photo_folder, data_dir, prefect_harness,
                                                                           monkeypatch, capsys):
    def mine_with_scheduler(address: str) -> list[str]:
        monkeypatch.setenv("FACEMINE_EXECUTION__TASK_RUNNER", "dask")
        monkeypatch.setenv("FACEMINE_EXECUTION__DASK_ADDRESS", address)
        assert main(["mine", str(photo_folder)]) == 2
        output = capsys.readouterr()
        assert "Traceback" not in output.out + output.err
        return [line for line in output.err.splitlines() if line.startswith("facemine: error:")]

    nobody = f"tcp://127.0.0.1:{free_port()}"
    assert mine_with_scheduler(nobody) == [
        f"facemine: error: cannot reach the Dask scheduler at {nobody} (execution.dask_address): "
        f"Timed out trying to connect to {nobody} after {SCHEDULER_CONNECT_SECONDS} s"
    ]
    assert mine_with_scheduler("127.0.0.1") == [
        "facemine: error: cannot reach the Dask scheduler at 127.0.0.1 (execution.dask_address): "
        "missing port number in address '127.0.0.1'"
    ]


def committed_shards(database_url: str) -> int:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return connection.scalar(select(func.count()).select_from(EmbeddingShard))
    except Exception:  # noqa: BLE001 - tables not created yet
        return 0
    finally:
        engine.dispose()


@dataclass
class ClusterRun:
    """The `mine` flow on the cluster, one worker killed after the first shard was stored."""

    state: object  # the flow run's final prefect State
    environment: dict[str, str]  # every machine's settings: database and data root
    execution: dict[str, str]  # the run's settings: tasks on the cluster
    settings: Settings
    tasks_held_by_killed_worker: list[set[str]]


@pytest.fixture(scope="module")
def cluster_run(photo_folder, dask_cluster, postgres_server, s3_server, tmp_path_factory, prefect_harness) -> ClusterRun:
    bucket = "facemine-cluster"
    s3_server.filesystem().mkdir(bucket)
    database_url = create_database(postgres_server)
    data_dir = tmp_path_factory.mktemp("flow-machine")
    # Every machine's settings: the same PostgreSQL database and the data root on object storage.
    shared = {"FACEMINE_DATABASE_URL": database_url} | s3_server.environment(bucket)
    execution = {"FACEMINE_EXECUTION__TASK_RUNNER": "dask", "FACEMINE_EXECUTION__DASK_ADDRESS": dask_cluster.address}
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["state"] = mine_folder(photo_folder, data_dir, shared | execution)
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = error

    flow_run = threading.Thread(target=run)
    flow_run.start()
    deadline = time.monotonic() + START_SECONDS
    while committed_shards(database_url) == 0:
        assert flow_run.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.05)
    victim = dask_cluster.busy_worker()
    _stop(dask_cluster.workers[victim])
    flow_run.join(timeout=600)
    assert "error" not in outcome, outcome
    settings = Settings(data_dir=data_dir, database_url=database_url, **s3_server.settings_fields(bucket))
    return ClusterRun(outcome["state"], shared, execution, settings, dask_cluster.tasks_held_by_removed_workers())


def test_worker_killed_mid_run_on_dask_leaves_the_rows_of_one_machine(cluster_run, single_machine):
    summary = cluster_run.state.result()
    # The killed worker's shard may have been committed just before the kill: then its rerun finds
    # its photos stored and only records them as unchanged.
    assert (summary.photos_seen, summary.photos_new + summary.photos_unchanged, summary.photos_failed) == (PHOTOS, PHOTOS, 0)
    rows = rows_of(cluster_run.settings.data_dir, cluster_run.environment)
    assert_no_duplicates(rows)
    for table in ("photo_paths", "images", "faces"):
        assert differences(rows[table], single_machine.rows[table]) == ([], []), table
    assert_same_rows(rows, single_machine.rows)
    on_s3 = Store(cluster_run.settings)
    assert len(single_machine.chips) == len(rows["faces"]) and chip_objects(on_s3) == single_machine.chips
    # One task run per shard, each completed; the killed worker held shards (the one it ran, and
    # maybe the next one Dask had queued on it), and the other worker ran them again, under the same
    # task runs.
    shard_runs = task_runs_of(cluster_run.state.state_details.flow_run_id)
    assert sorted(run.state_type.value for run in shard_runs) == ["COMPLETED"] * (PHOTOS // SHARD_SIZE)
    assert [bool(held) for held in cluster_run.tasks_held_by_killed_worker] == [True]


def test_embed_flow_on_dask_gives_every_face_its_vector_from_a_new_model(cluster_run, tmp_path, monkeypatch):
    """Re-embedding after a promotion runs on the cluster too (on the worker left), chips read from
    S3: a new model with SFace's weights (saved as a checkpoint of their own) gives each face the
    vector mining gave it, bit for bit (same chips, batches of one, one thread per worker)."""
    from flows.embed import embed
    from pipeline.embed import create_embedder, save_checkpoint
    from usecases.runtime import load_embedder, register

    store = Store(cluster_run.settings)
    mined = store.current_model()
    sface = load_embedder(mined.kind, mined.weights_path, "cpu")
    model = register(store, create_embedder("checkpoint", save_checkpoint(sface, tmp_path / "sface.pt"), device="cpu"),
                     name="sface-checkpoint")
    for name, value in (RUN_ENV | cluster_run.environment | {"FACEMINE_DATA_DIR": str(cluster_run.settings.data_dir)}
                        | cluster_run.execution).items():
        monkeypatch.setenv(name, value)
    expected = dict(zip(store.load_embeddings(mined.id)[0].tolist(), store.load_embeddings(mined.id)[1]))
    assert sorted(store.faces_without_embedding(model.id)) == sorted(expected)
    assert embed(model_id=model.id) == len(expected) and store.faces_without_embedding(model.id) == []
    ids, vectors = store.load_embeddings(model.id)
    assert sorted(ids.tolist()) == sorted(expected)
    for face_id, vector in zip(ids.tolist(), vectors):
        np.testing.assert_array_equal(vector, expected[face_id], err_msg=str(face_id))
