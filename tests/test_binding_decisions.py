"""Decisions bind every later run and never fight each other (real LFW faces).

A split keeps its two groups apart and a rejected face out of its identity through re-clustering
and a change of embedding model; a merge keeps its faces together; decisions that contradict an
earlier one (a merge of split halves, a face put back where it was rejected, a face another
reviewer pinned elsewhere, a merge of two locked identities) are refused with one line unless
forced, and a forced one is logged as overriding.
"""
from __future__ import annotations

import numpy as np
import pytest
from review_helpers import Scenario, cli_store, mined_store_copy, people_faces, scenario_run
from sqlalchemy import select, update
from test_decisions_survive import identity_of_person, perturbed_sface, run_members

from facemine_cli import main
from usecases.embedding import embed_faces
from labeling.actions import Labeler
from labeling.queue import CONFLICT, MERGE, build_queue
from pipeline.identities import ReviewState, review_constraints
from storage import decisions
from storage.decisions import DecisionConflict
from storage.identities import face_table, latest_run_id
from storage.schema import Constraint, Decision
from storage.settings import Settings
from storage.store import Store
from usecases.clustering import run_cluster
from usecases.runtime import register


def members(store: Store) -> dict[int, set[int]]:
    return run_members(store, latest_run_id(store))


def identity_of(store: Store, face: int) -> int | None:
    return next((identity for identity, faces in members(store).items() if face in faces), None)


def merge_pairs(store: Store) -> set[frozenset]:
    return {frozenset((item.identity_id, item.other_id)) for item in build_queue(store).items if item.kind == MERGE}


# ---- through re-clustering and a new embedding model ------------------------------------------


@pytest.fixture(scope="module")
def clustered(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return mined_store_copy(tmp_path_factory, "binding")


@pytest.mark.slow
def test_split_reject_and_merge_bind_every_later_run(clustered: Settings, tmp_path):
    store = Store(clustered)
    people = people_faces(store)
    names = list(people)
    run_cluster(store, clustered)
    first = latest_run_id(store)
    identity = {name: identity_of_person(store, first, faces) for name, faces in people.items()}
    labeler = Labeler(store, who="binding-test")

    # Split one person in two: both halves look alike, only the decision keeps them apart.
    kept = identity[names[0]]
    split_off = set(labeler.identity(kept).faces[:4])
    new = labeler.split(kept, sorted(split_off)).created_identities[0]
    rest = set(labeler.identity(kept).faces)
    assert frozenset((kept, new)) not in merge_pairs(store)  # the queue never proposes undoing it
    # Reject a face that does belong: it must never come back.
    rejected_face = labeler.identity(identity[names[1]]).faces[0]
    labeler.reject(identity[names[1]], [rejected_face])
    # Merge two different people: they must stay together.
    survivor, gone = identity[names[2]], identity[names[3]]
    labeler.merge(survivor, gone)
    together = set(labeler.identity(survivor).faces)
    assert together >= set(people[names[2]] + people[names[3]])

    state = decisions.load_review_state(store)
    assert len(state.cannot_link) == len(split_off) + len(rest) - 1
    face_ids = face_table(store).face_id.to_numpy()
    constraints, _ = review_constraints(face_ids, state, {})
    index = {int(face): i for i, face in enumerate(face_ids)}
    assert sorted(constraints.cannot_link) == sorted((index[a], index[b]) for a, b in state.cannot_link)

    def assert_bound(stage: str) -> None:
        by_identity = members(store)
        assert split_off <= by_identity[new] and not split_off & by_identity[kept], stage
        assert rest <= by_identity[kept], stage
        assert rejected_face not in by_identity.get(identity[names[1]], set()), stage
        assert together <= by_identity[survivor] and gone not in by_identity, stage
        assert frozenset((kept, new)) not in merge_pairs(store), stage

    run_cluster(store, clustered)
    assert latest_run_id(store) != first
    assert_bound("re-clustered")

    embedder = perturbed_sface(store, tmp_path / "perturbed.pt")
    model = register(store, embedder, name="sface-perturbed")
    assert embed_faces(store, clustered, model, embedder, face_table(store).face_id.tolist()) > 0
    store.set_current_model(model.id, "binding test: another embedding model")
    run_cluster(store, clustered)
    assert_bound("new model")


# ---- refusals (no clustering needed: a planted labelling of real faces) -------------------------


@pytest.fixture
def store(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Store:
    return cli_store(tmp_path_factory, monkeypatch, "refusals")


@pytest.fixture
def scenario(store: Store) -> Scenario:
    return scenario_run(store)


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(["label", *argv])
    out, err = capsys.readouterr()
    return code, out.strip(), err.strip()


def test_merging_split_halves_is_refused_unless_forced(store, scenario, capsys):
    people = list(scenario.people.values())
    code, out, _ = cli(capsys, "split", str(scenario.mixed), "--faces", ",".join(map(str, people[1])))
    assert code == 0
    split_id, new = int(out.split()[1].rstrip(":")), int(out.rsplit(" ", 1)[1].rstrip(")"))
    assert frozenset((scenario.mixed, new)) not in merge_pairs(store)

    code, out, err = cli(capsys, "merge", str(scenario.mixed), str(new))
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert err == (f"facemine: error: refused: faces {people[1][0]} and {people[0][0]} were set apart as different "
                   f"people by cli-user (decision {split_id}) (and {len(people[0]) + len(people[1]) - 2} more); "
                   "--force overrides")
    assert len(decisions.history(store)) == 1  # nothing written

    code, out, _ = cli(capsys, "merge", str(scenario.mixed), str(new), "--force", "--why", "same person after all")
    assert code == 0 and out.endswith(f"(overriding decision {split_id})")
    with store.session() as session:
        forced = session.scalars(select(Decision).order_by(Decision.id.desc())).first()
        assert forced.payload["details"]["overrides"] == [split_id]
        assert not session.scalars(select(Constraint).where(Constraint.kind == "cannot_link", Constraint.active)).all()
    assert not decisions.load_review_state(store).cannot_link
    # Undoing the forced merge sets the halves apart again.
    Labeler(store, "cli-user").undo()
    assert len(decisions.load_review_state(store).cannot_link) == len(people[0]) + len(people[1]) - 1


def test_a_rejected_face_is_not_put_back_unless_forced(store, scenario):
    labeler = Labeler(store, "reviewer")
    reject = labeler.reject(scenario.intruded, [scenario.intruder])
    with pytest.raises(DecisionConflict, match=(f"^refused: face {scenario.intruder} was rejected from identity "
                                               f"{scenario.intruded} by reviewer \\(decision {reject.id}\\); --force overrides$")):
        labeler.move([scenario.intruder], scenario.intruded)
    # Elsewhere it may go; then a merge that would bring it back is refused too.
    labeler.move([scenario.intruder], scenario.pure)
    with pytest.raises(DecisionConflict, match=f"face {scenario.intruder} was rejected from identity {scenario.intruded}"):
        labeler.merge(scenario.pure, scenario.intruded)
    assert frozenset((scenario.pure, scenario.intruded)) not in merge_pairs(store)
    assert scenario.intruded not in {i for i, _ in build_queue(store).suggestions(scenario.pure, [scenario.intruder])}
    forced = labeler.merge(scenario.pure, scenario.intruded, force=True)
    assert forced.summary.endswith(f"(overriding decision {reject.id})")
    state = decisions.load_review_state(store)
    assert not state.rejected and state.pinned[scenario.intruder] == scenario.pure  # the larger survives


def test_a_face_pinned_by_another_reviewer_is_not_moved_unless_forced(store, scenario):
    accept = Labeler(store, "alice").accept(scenario.pure)
    face = decisions.identity_faces(store, scenario.run_id, scenario.pure)[0]
    bob = Labeler(store, "bob")
    message = f"^refused: face {face} is pinned to identity {scenario.pure} by alice \\(decision {accept.id}\\); --force overrides$"
    with pytest.raises(DecisionConflict, match=message):
        bob.move([face], scenario.mixed)
    with pytest.raises(DecisionConflict, match=message):
        bob.reject(scenario.pure, [face])
    Labeler(store, "alice").move([face], scenario.mixed)  # alice may change her own mind
    Labeler(store, "alice").undo()
    forced = bob.move([face], scenario.mixed, force=True)
    assert forced.summary.endswith(f"(overriding decision {accept.id})")
    assert decisions.load_review_state(store).pinned[face] == scenario.mixed


def test_merging_two_locked_identities_is_refused_unless_forced(store, scenario, capsys):
    labeler = Labeler(store, "cli-user")
    labeler.lock(scenario.halves[0])
    labeler.lock(scenario.halves[1])
    code, out, err = cli(capsys, "merge", str(scenario.halves[0]), str(scenario.halves[1]))
    assert code == 2 and err == (f"facemine: error: refused: identities {scenario.halves[0]} and {scenario.halves[1]} "
                                 "are both locked; --force overrides")
    code, out, _ = cli(capsys, "merge", str(scenario.halves[0]), str(scenario.halves[1]), "--force")
    assert code == 0 and "(overriding both locks)" in out


def test_contradicting_decisions_left_by_older_versions_are_surfaced_not_enforced(store, scenario):
    """Older versions merged split halves back silently; such a store must still cluster, and the
    queue must show the contradiction first."""
    labeler = Labeler(store, "reviewer")
    people = list(scenario.people.values())
    new = labeler.split(scenario.mixed, people[1]).created_identities[0]
    labeler.merge(scenario.mixed, new, force=True)
    with store.session() as session:  # what an older version left: the split's links still active
        session.execute(update(Constraint).where(Constraint.kind == "cannot_link").values(active=True))
    state = decisions.load_review_state(store)
    assert len(state.contradictions()) == len(people[0]) + len(people[1]) - 1
    face_ids = np.array(sorted(state.pinned))
    constraints, _ = review_constraints(face_ids, state, {})
    assert list(constraints.cannot_link) == []  # the pins win; nothing is silently dropped from view:
    first = build_queue(store).items[0]
    assert first.kind == CONFLICT and first.identity_id == scenario.mixed
    assert first.reason.startswith(f"{len(people[0]) + len(people[1]) - 1} pairs of faces set apart as different people")


def test_cannot_links_reach_clustering_by_index():
    review = ReviewState(pinned={10: 1, 11: 2}, cannot_link={(10, 11), (12, 99)}, excluded={12})
    constraints, _ = review_constraints(np.array([10, 11, 12, 13]), review, {})
    assert list(constraints.cannot_link) == [(0, 1)]  # faces not in the run or not faces drop out


def test_the_review_surfaces_force_a_refused_decision_only_when_asked(store, scenario):
    from labeling.session import ReviewSession

    labeler = Labeler(store, "reviewer")
    reject = labeler.reject(scenario.intruded, [scenario.intruder])
    session = ReviewSession(store, labeler)
    assert session.view is not None
    assert session.force() is None and session.message == "nothing to force: no decision was just refused"
    put_back = lambda force: labeler.move([scenario.intruder], scenario.intruded, force=force)  # noqa: E731
    assert session.decide(put_back, advance=False) is None
    assert session.error and session.message.endswith("--force overrides (F: force it)")
    forced = session.force()
    assert forced.summary.endswith(f"(overriding decision {reject.id})")
    assert decisions.load_review_state(store).pinned[scenario.intruder] == scenario.intruded
    assert session.force() is None  # forcing is for the decision just refused, once
