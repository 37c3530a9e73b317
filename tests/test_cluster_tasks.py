"""Clustering scaled out: each subset clustered on its own (a task), then the merge across
subsets on representatives, gives exactly the identities of clustering in one process.

Real faces: the session's mined LFW store (tests/review_helpers.py) regrouped into three
subsets: six people's first four photos, the same people's next four (so their clusters must
merge across subsets), and two other people.
"""
from __future__ import annotations

import pickle
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from review_helpers import PEOPLE, SUBSET, lfw_paths, mined_store_copy, person_of_face
from test_graph import sphere_clusters

from pipeline.cluster import (
    ClusterSummary,
    Constraints,
    cluster_faces,
    cluster_subset,
    combine_summaries,
    merge_clusters,
    subset_members,
)
from pipeline.config import ClusterConfig
from pipeline.errors import FacemineError
from storage.identities import assignments, face_table, run_info
from storage.settings import Settings
from storage.store import Store
from usecases.clustering import cluster_stored_subset, run_cluster
from usecases.mining import mine_paths

pytestmark = pytest.mark.slow

LFW_PEOPLE = PEOPLE[:6]
PHOTOS = 4  # per person and LFW subset


@pytest.fixture(scope="module")
def mined(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with three subsets of real faces (copy it before changing it). The photos
    are already mined, so recording them under new subsets only adds paths."""
    settings = mined_store_copy(tmp_path_factory, "cluster-tasks")
    both = lfw_paths(LFW_PEOPLE, 2 * PHOTOS)
    early = [path for start in range(0, len(both), 2 * PHOTOS) for path in both[start:start + PHOTOS]]
    subsets = {"lfw-early": early, "lfw-late": sorted(set(both) - set(early)), "others": lfw_paths(PEOPLE[6:8], 2 * PHOTOS)}
    for subset, paths in subsets.items():
        mine_paths(subset, paths, settings)
    store = Store(settings)
    store.remove_subset(SUBSET)
    assert {row["subset"]: row["photos"] for row in store.subsets()} == {"lfw-early": 24, "lfw-late": 24, "others": 16}
    return settings.data_dir


def store_copy(mined: Path, target: Path) -> Store:
    shutil.copytree(mined, target)
    return Store(Settings(data_dir=target))


def identity_inputs(store: Store) -> dict:
    """The arrays run_cluster hands cluster_faces, for the store's current model."""
    model = store.current_model()
    faces = face_table(store)
    face_ids, vectors = store.load_embeddings(model.id, faces.face_id)
    faces = faces.set_index("face_id").loc[face_ids].reset_index()
    return {
        "model_id": model.id,
        "face_ids": face_ids,
        "vectors": vectors,
        "photos": faces.image_id.to_numpy(),
        "subsets": pd.factorize(faces.subset)[0],
        "names": faces.subset.to_numpy(),
        "passed": faces.passed.to_numpy(bool),
    }


def assert_same_result(expected, actual) -> None:
    np.testing.assert_array_equal(actual.labels, expected.labels)
    assert actual.confidence.tobytes() == expected.confidence.tobytes()
    np.testing.assert_array_equal(actual.source, expected.source)
    assert actual.identities == expected.identities
    assert actual.stats == expected.stats


# ---- pure mechanics (synthetic vectors) -----------------------------------------------------


def test_merge_on_representatives_joins_one_person_across_subsets_unless_cannot_linked() -> None:
    config = ClusterConfig()
    vectors = sphere_clusters(3, 6, noise=0.5, seed=3)  # persons 0, 1, 2: rows 0-5, 6-11, 12-17
    # Subset 0 holds person 0 and person 1, subset 1 person 0 again, subset 2 person 2.
    parts = [vectors[0:3], vectors[6:12], vectors[3:6], vectors[12:18]]
    per_subset = [cluster_subset(np.vstack(parts[:2]), config), cluster_subset(parts[2], config),
                  cluster_subset(parts[3], config)]
    assert [len(np.unique(result.labels)) for result in per_subset] == [2, 1, 1]
    summary = combine_summaries(per_subset)
    assert summary.subsets.tolist() == [0, 0, 1, 2]
    # Clusters are numbered subset by subset, each in increasing local label: person 0's first
    # cluster is the rank of its label in subset 0; its second (subset 1) is cluster 2.
    person0_first = int(np.searchsorted(np.unique(per_subset[0].labels), per_subset[0].labels[0]))

    groups = merge_clusters(summary, config)
    assert groups[person0_first] == groups[2]
    assert len(np.unique(groups)) == 3

    blocked = merge_clusters(summary, config, conflicts=np.array([[person0_first, 2]]))
    np.testing.assert_array_equal(np.sort(blocked), np.arange(4))


def test_subset_result_survives_pickling_and_is_checked_against_the_subsets() -> None:
    vectors = sphere_clusters(4, 5, noise=0.6, seed=1)
    subsets = np.repeat([0, 1], 10)
    passed = np.ones(20, bool)
    members = subset_members(subsets, passed)
    per_subset = [pickle.loads(pickle.dumps(cluster_subset(vectors[m]))) for m in members]
    arguments = {"photos": np.arange(20), "subsets": subsets, "passed": passed}

    assert_same_result(cluster_faces(vectors, **arguments), cluster_faces(vectors, **arguments, per_subset=per_subset))
    with pytest.raises(FacemineError, match="per-subset results hold"):
        cluster_faces(vectors, **arguments, per_subset=per_subset[:1])


def test_empty_summary_merges_nothing() -> None:
    empty = combine_summaries([])
    assert isinstance(empty, ClusterSummary)
    assert merge_clusters(empty).tolist() == []


# ---- real faces -------------------------------------------------------------------------------


def test_precomputed_subsets_give_the_in_process_identities_on_real_faces(mined: Path, tmp_path: Path) -> None:
    store = store_copy(mined, tmp_path / "data")
    inputs = identity_inputs(store)
    face_ids, vectors = inputs["face_ids"], inputs["vectors"]
    person = person_of_face(store)
    faces_of = {name: np.flatnonzero(np.isin(face_ids, person[person == name].index)) for name in LFW_PEOPLE}
    early, late = (np.flatnonzero(inputs["names"] == name) for name in ("lfw-early", "lfw-late"))
    blix, putin, laura = (faces_of[name] for name in (LFW_PEOPLE[0], LFW_PEOPLE[2], LFW_PEOPLE[3]))
    # Human decisions: Hans Blix's subsets may not merge (a cannot-link across them), two of
    # Putin's faces are a locked identity, one of Laura Bush's is not a face.
    constraints = Constraints(
        cannot_link=[(int(np.intersect1d(blix, early)[0]), int(np.intersect1d(blix, late)[0]))],
        fixed_members={"locked": putin[:2].tolist()},
        excluded=[int(laura[0])],
    )
    config = ClusterConfig()
    arguments = {key: inputs[key] for key in ("photos", "subsets", "passed")} | {"constraints": constraints, "config": config}

    members = subset_members(inputs["subsets"], inputs["passed"], constraints)
    assert len(members) == 3
    # Each subset's vectors loaded on their own, as a task loads them.
    per_subset = [cluster_stored_subset(store, inputs["model_id"], face_ids[m].tolist(), config) for m in members]
    in_process = cluster_faces(vectors, **arguments)
    assert_same_result(in_process, cluster_faces(vectors, **arguments, per_subset=per_subset))

    labels = in_process.labels
    # The merge worked on real faces: every LFW person but Hans Blix is one identity over both subsets ...
    for name in LFW_PEOPLE[1:]:
        own = np.setdiff1d(faces_of[name], np.r_[putin[:2], laura[:1]])
        assert np.intersect1d(own, early).size and np.intersect1d(own, late).size
        assert len(np.unique(labels[own])) == 1 and labels[own[0]] >= 0, name
    # ... Hans Blix stays two, one per subset; the locked and the excluded faces are as decided.
    assert len(np.unique(labels[blix])) == 2
    assert len(np.unique(labels[np.intersect1d(blix, early)])) == 1
    assert in_process.identities[labels[putin[0]]] == "locked" and labels[putin[0]] == labels[putin[1]]
    assert labels[laura[0]] == -1 and in_process.source[laura[0]] == "unassigned"


def clustered_run(store: Store, run_id: int) -> tuple[pd.DataFrame, dict]:
    stats = dict(run_info(store, run_id)["stats"])
    stats.pop("seconds")
    return assignments(store, run_id), stats


def run_flow_in(data: Path, monkeypatch: pytest.MonkeyPatch, **environment: str) -> tuple[int, list[str], list[str]]:
    """The `cluster` flow with two workers on `data`: its run id, its cluster-subset tasks' states
    and the classes of the task runner they were submitted to."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    import flows.cluster
    from flows.cluster import cluster

    runner_classes: list[str] = []
    chosen = flows.cluster.task_runner

    @contextmanager
    def recording_runner(*args, **kwargs):
        with chosen(*args, **kwargs) as runner:
            runner_classes.extend(kind.__name__ for kind in type(runner).__mro__)
            yield runner

    monkeypatch.setattr(flows.cluster, "task_runner", recording_runner)
    monkeypatch.setenv("FACEMINE_DATA_DIR", str(data))
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    state = cluster(workers=2, return_state=True)
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    tasks = sorted(run.state.type.value for run in runs if run.name.startswith("cluster-subset"))
    return state.result()["run_id"], tasks, runner_classes


def _compare(mined: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **environment: str) -> list[str]:
    """Assignments of the `cluster` flow (a task per subset) against run_cluster in one process;
    returns the flow's task runner classes."""
    expected_store = store_copy(mined, tmp_path / "one-process")
    expected, expected_stats = clustered_run(expected_store, run_cluster(expected_store, expected_store.settings))
    flow_store = store_copy(mined, tmp_path / "tasks")
    run_id, tasks, runner_classes = run_flow_in(flow_store.settings.data_dir, monkeypatch, **environment)
    actual, actual_stats = clustered_run(flow_store, run_id)

    assert tasks == ["COMPLETED"] * 3
    pd.testing.assert_frame_equal(actual, expected, check_exact=True)
    assert actual_stats == expected_stats
    # Every person of the two LFW subsets is found in both and merged once.
    assert expected_stats["merged_across_subsets"] == len(LFW_PEOPLE)
    return runner_classes


def test_cluster_flow_with_subset_tasks_on_a_process_pool_gives_the_one_process_identities(
    mined: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_harness
) -> None:
    assert "ProcessPoolTaskRunner" in _compare(mined, tmp_path, monkeypatch)


def test_cluster_flow_with_subset_tasks_on_a_local_dask_cluster_gives_the_one_process_identities(
    mined: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_harness
) -> None:
    environment = {"FACEMINE_EXECUTION__TASK_RUNNER": "dask", "FACEMINE_EXECUTION__DASK_WORKERS": "2"}
    assert "DaskTaskRunner" in _compare(mined, tmp_path, monkeypatch, **environment)
