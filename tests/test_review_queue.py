"""The review queue finds the mistakes planted in a labelling of real LFW faces, and says why."""
from __future__ import annotations

import pytest
from review_helpers import Scenario, make_run, mined_store_copy, people_faces, scenario_run
from sqlalchemy import update

from labeling.actions import Labeler
from labeling.queue import LOW_CONFIDENCE, MERGE, MIXED, UNNAMED_LARGE, QueueConfig, build_queue
from pipeline.errors import FacemineError
from storage.identities import face_table
from storage.schema import PhotoPath, Subset
from storage.store import Store


@pytest.fixture
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return Store(mined_store_copy(tmp_path_factory, "queue"))


@pytest.fixture
def scenario(store: Store) -> Scenario:
    return scenario_run(store)


def items_of(queue, identity: int) -> list:
    return [item for item in queue.items if item.identity_id == identity and item.kind != MERGE]


def test_two_people_in_one_identity_are_flagged_with_one_of_them_preselected(store, scenario):
    queue = build_queue(store)
    (item,) = items_of(queue, scenario.mixed)
    people = list(scenario.people.values())
    assert item.kind == MIXED and "two groups: 8 of 16 sampled faces unlike the others" in item.reason
    assert set(item.faces) in (set(people[0]), set(people[1]))
    assert queue.items[0] == item  # the biggest mistake comes first


def test_an_intruder_is_the_suspect(store, scenario):
    queue = build_queue(store)
    (item,) = items_of(queue, scenario.intruded)
    assert item.kind == MIXED and "1 face unlike the rest" in item.reason
    assert item.faces == (scenario.intruder,)
    members = [f for f in queue.similarity.index if f in scenario.people[list(scenario.people)[3]]]
    assert queue.similarity[scenario.intruder] < queue.similarity[members].min()


def test_one_person_cut_in_two_is_a_merge_candidate_and_others_are_not(store, scenario):
    queue = build_queue(store)
    merges = [item for item in queue.items if item.kind == MERGE]
    assert [{item.identity_id, item.other_id} for item in merges] == [set(scenario.halves)]
    assert "may be the same person" in merges[0].reason and merges[0].similarity > 0.55
    faces = list(Labeler(store).identity(scenario.halves[0]).faces)
    assert queue.suggestions(scenario.halves[0], faces)[0][0] == scenario.halves[1]


def test_a_split_pair_is_never_suggested(store, scenario):
    faces = Labeler(store).identity(scenario.pure).faces
    new = Labeler(store, "queue-test").split(scenario.pure, faces[:4]).created_identities[0]
    queue = build_queue(store)
    pairs = [{item.identity_id, item.other_id} for item in queue.items if item.kind == MERGE]
    assert {scenario.pure, new} not in pairs and set(scenario.halves) in pairs
    assert scenario.pure not in [identity for identity, _ in queue.suggestions(new, list(faces[:4]))]
    assert new not in [identity for identity, _ in queue.suggestions(scenario.pure, list(faces[4:]))]


def test_the_queue_adapts_after_each_decision(store, scenario):
    queue = build_queue(store)
    seen = queue.items[0]
    assert seen.identity_id == scenario.mixed
    Labeler(store, "queue-test").merge(*scenario.halves)
    queue.refresh(passed=[seen])
    assert not [item for item in queue.items if item.kind == MERGE]  # the merge settled the only proposal
    assert scenario.mixed not in {item.identity_id for item in queue.items}  # seen, not shown again
    assert not {scenario.halves[1]} & {item.identity_id for item in queue.items}  # merged away
    assert queue.run_id == scenario.run_id and scenario.halves[1] not in queue.identity_ids


def test_low_confidence_faces_and_large_unnamed_identities(store, scenario):
    queue = build_queue(store, QueueConfig(unnamed_min_faces=8))
    (item,) = items_of(queue, scenario.low_confidence)
    assert item.kind == LOW_CONFIDENCE and item.faces == (scenario.doubtful,)
    assert "confidence below 0.50 (lowest 0.20)" in item.reason
    (pure,) = items_of(queue, scenario.pure)
    assert pure.kind == UNNAMED_LARGE and pure.reason == "8 faces and no name yet"
    assert not items_of(build_queue(store), scenario.pure)  # below the default size, and clean


def test_settled_identities_leave_the_queue(store, scenario):
    labeler = Labeler(store, "queue-test")
    labeler.accept(scenario.mixed)
    labeler.name(scenario.pure, "Tom Ridge")
    queue = build_queue(store, QueueConfig(unnamed_min_faces=8))
    assert not items_of(queue, scenario.mixed) and not items_of(queue, scenario.pure)
    labeler.accept(scenario.halves[0])
    labeler.accept(scenario.halves[1])
    assert not [item for item in build_queue(store).items if item.kind == MERGE]


def test_faces_from_one_photo_in_one_identity(store):
    faces = face_table(store)
    shared = faces[faces.duplicated("image_id", keep=False)]
    image = shared.image_id.iloc[0]
    pair = shared[shared.image_id == image].face_id.tolist()[:2]
    person = next(group for group in people_faces(store).values() if set(pair) & set(group))
    make_run(store, [sorted(set(person) | set(pair))])
    (stranger,) = set(pair) - set(person)
    (item,) = build_queue(store).items
    assert item.kind == MIXED and "come from one photo" in item.reason
    assert item.faces == (stranger,)


def test_identities_split_across_subsets_say_so(store, scenario):
    second_half = scenario.people[list(scenario.people)[2]][4:]  # the faces of identity halves[1]
    images = face_table(store).set_index("face_id").image_id.loc[second_half].tolist()
    with store.session() as session:
        other = Subset(name="lfw-b")
        session.add(other)
        session.flush()
        session.execute(update(PhotoPath).where(PhotoPath.image_id.in_(images)).values(subset_id=other.id))
    (merge,) = [item for item in build_queue(store).items if item.kind == MERGE]
    assert "clustered apart in subsets lfw / lfw-b" in merge.reason


def test_no_run_yet(store):
    with pytest.raises(FacemineError, match="no clustering run yet"):
        build_queue(store)
