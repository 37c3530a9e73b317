"""Review decisions survive re-clustering and a change of embedding model (real LFW faces).

The decisions deliberately contradict what the embeddings say (two different people merged,
one person split in two), so only the constraints can keep them through a clustering run.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from review_helpers import mined_store_copy, people_faces

from usecases.embedding import embed_faces
from labeling.actions import Labeler
from pipeline.embed import create_embedder, save_checkpoint
from storage import decisions
from storage.identities import assignments, face_table, identity_rows, latest_run_id, run_info
from storage.settings import Settings
from storage.store import Store
from usecases.clustering import run_cluster
from usecases.runtime import register

pytestmark = pytest.mark.slow


@dataclass
class Expected:
    """What every later clustering run must keep."""

    names: dict[int, str] = field(default_factory=dict)  # identity -> name
    members: dict[int, set[int]] = field(default_factory=dict)  # identity -> faces it must hold
    exact: dict[int, set[int]] = field(default_factory=dict)  # locked identity -> its faces, exactly
    kept_out: dict[int, set[int]] = field(default_factory=dict)  # identity -> faces never in it
    merged: dict[int, int] = field(default_factory=dict)  # merged away -> survivor
    unassigned: set[int] = field(default_factory=set)


def identity_of_person(store: Store, run_id: int, faces: list[int]) -> int:
    """The identity holding most of a person's faces in a run."""
    table = assignments(store, run_id).set_index("face_id").loc[faces]
    return int(table.identity_id.mode().iloc[0])


def run_members(store: Store, run_id: int) -> dict[int, set[int]]:
    table = assignments(store, run_id).dropna(subset=["identity_id"])
    return {int(i): set(group.face_id.astype(int)) for i, group in table.groupby("identity_id")}


def assert_decisions_hold(store: Store, expected: Expected) -> None:
    run_id = latest_run_id(store)
    by_identity = run_members(store, run_id)
    rows = identity_rows(store).set_index("identity_id")
    for identity, name in expected.names.items():
        assert rows.loc[identity, "name"] == name and rows.loc[identity, "status"] == "active"
    for identity, faces in expected.members.items():
        missing = faces - by_identity.get(identity, set())
        assert not missing, f"run {run_id}: identity {identity} lost faces {sorted(missing)}"
    for identity, faces in expected.exact.items():
        assert by_identity.get(identity, set()) == faces, f"run {run_id}: locked identity {identity} changed"
    for identity, faces in expected.kept_out.items():
        back = faces & by_identity.get(identity, set())
        assert not back, f"run {run_id}: faces {sorted(back)} went back into identity {identity}"
    for gone, survivor in expected.merged.items():
        assert gone not in by_identity, f"run {run_id}: merged identity {gone} came back"
        assert rows.loc[gone, "status"] == "merged" and rows.loc[gone, "merged_into"] == survivor
    assigned = set().union(*by_identity.values())
    assert not expected.unassigned & assigned, f"run {run_id}: not-a-face faces were assigned"


def perturbed_sface(store: Store, path) -> object:  # noqa: ANN001
    """A different embedding model: SFace with noise on every fourth convolution's weights."""
    base = store.current_model()
    embedder = create_embedder(base.kind, base.weights_path, device="cpu")
    generator = torch.Generator().manual_seed(0)
    convolutions = [m for m in embedder.module.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        for conv in convolutions[::4]:
            conv.weight.add_(torch.randn(conv.weight.shape, generator=generator) * conv.weight.std() * 0.3)
    return create_embedder("checkpoint", save_checkpoint(embedder, path), device="cpu")


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return mined_store_copy(tmp_path_factory, "survive")


def test_decisions_survive_reclustering_and_a_new_model(settings: Settings, tmp_path):
    store = Store(settings)
    people = people_faces(store)
    names = list(people)
    first_run = run_cluster(store, settings)
    identity = {name: identity_of_person(store, first_run, faces) for name, faces in people.items()}
    assert len(set(identity.values())) == len(names), "the first clustering should tell these people apart"
    labeler = Labeler(store, who="survival-test")
    expected = Expected()

    def faces_of(identity_id: int) -> set[int]:
        return set(labeler.identity(identity_id).faces)

    # Name: a named identity keeps its name and members.
    named = identity[names[0]]
    labeler.name(named, "First Person")
    expected.names[named] = "First Person"
    expected.members[named] = faces_of(named)

    # Split one person in two: the split-off faces stay apart although they look alike.
    split_off = people[names[1]][:3]
    new = labeler.split(identity[names[1]], split_off).created_identities[0]
    expected.members[new] = set(split_off)
    expected.members[identity[names[1]]] = faces_of(identity[names[1]])
    expected.kept_out[identity[names[1]]] = set(split_off)

    # Merge two different people: they stay one identity.
    survivor, gone = identity[names[2]], identity[names[3]]
    labeler.name(survivor, "Merged Pair")
    labeler.merge(survivor, gone)
    expected.names[survivor] = "Merged Pair"
    expected.members[survivor] = faces_of(survivor)
    assert expected.members[survivor] >= set(people[names[2]] + people[names[3]])
    expected.merged[gone] = survivor

    # Reject a face that does belong there: it never goes back.
    rejected_face = people[names[4]][0]
    labeler.reject(identity[names[4]], [rejected_face])
    expected.kept_out[identity[names[4]]] = {rejected_face}

    # Move a face to another person, mark one as not a face, lock and accept identities.
    moved = people[names[5]][0]
    labeler.move([moved], identity[names[6]])
    expected.kept_out[identity[names[5]]] = {moved}
    not_a_face = people[names[5]][1]
    labeler.not_a_face([not_a_face])
    expected.unassigned.add(not_a_face)
    labeler.lock(identity[names[6]])
    expected.exact[identity[names[6]]] = faces_of(identity[names[6]])
    assert moved in expected.exact[identity[names[6]]]
    labeler.accept(identity[names[7]])
    expected.members[identity[names[7]]] = faces_of(identity[names[7]])

    # An undone decision leaves no trace in later runs.
    undone_face = people[names[7]][1]
    labeler.reject(identity[names[7]], [undone_face])
    labeler.undo()

    assert_decisions_hold(store, expected)  # the current labelling, edited in place

    second_run = run_cluster(store, settings)
    assert second_run != first_run
    assert_decisions_hold(store, expected)

    new_model = perturbed_sface(store, tmp_path / "perturbed.pt")
    model = register(store, new_model, name="sface-perturbed")
    assert embed_faces(store, settings, model, new_model, face_table(store).face_id.tolist()) > 0
    store.set_current_model(model.id, "survival test: a different embedding model")
    old_ids, old = store.load_embeddings(run_info(store, second_run)["model_id"])
    new_ids, vectors = store.load_embeddings(model.id)
    assert np.array_equal(old_ids, new_ids) and np.mean(np.sum(old * vectors, axis=1)) < 0.95

    third_run = run_cluster(store, settings)
    assert run_info(store, third_run)["model_id"] == model.id
    assert_decisions_hold(store, expected)
    assert decisions.load_review_state(store).pinned  # the decisions are still in force
