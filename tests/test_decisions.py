"""Review actions, their constraints, undo and history, on a store of real LFW faces."""
from __future__ import annotations

import pandas as pd
import pytest
from review_helpers import Scenario, make_run, mined_store_copy, scenario_run
from sqlalchemy import select

from labeling.actions import Labeler
from pipeline.errors import FacemineError
from storage import decisions
from storage.identities import assignments, identity_rows
from storage.schema import AUDIT_ACTIONS, Constraint, Decision
from storage.store import Store


@pytest.fixture
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return Store(mined_store_copy(tmp_path_factory, "decisions"))


@pytest.fixture
def scenario(store: Store) -> Scenario:
    return scenario_run(store)


@pytest.fixture
def labeler(store: Store) -> Labeler:
    return Labeler(store, who="tester")


def members(store: Store, identity: int) -> list[int]:
    return decisions.identity_faces(store, decisions_run(store), identity)


def decisions_run(store: Store) -> int:
    from storage.identities import latest_run_id

    return latest_run_id(store)


def row_of(store: Store, face: int) -> pd.Series:
    table = assignments(store, decisions_run(store)).set_index("face_id")
    return table.loc[face]


def active_constraints(store: Store) -> list[tuple]:
    with store.session() as session:
        return session.execute(
            select(Constraint.kind, Constraint.face_a, Constraint.face_b, Constraint.identity_id)
            .where(Constraint.active.is_(True))
            .order_by(Constraint.id)
        ).all()


def identity(store: Store, identity_id: int) -> pd.Series:
    return identity_rows(store, [identity_id]).iloc[0]


def test_accept_pins_every_face_in_one_logged_decision(store, scenario, labeler):
    faces = members(store, scenario.pure)
    record = labeler.accept(scenario.pure, why="checked")
    assert record.action == "accept" and record.who == "tester" and record.why == "checked"
    assert bool(identity(store, scenario.pure).accepted)
    assert {(kind, face, ident) for kind, face, _, ident in active_constraints(store)} == {
        ("member", face, scenario.pure) for face in faces
    }
    rows = assignments(store, scenario.run_id).set_index("face_id").loc[faces]
    assert (rows.source == "decision").all() and (rows.confidence == 1.0).all()
    state = decisions.load_review_state(store)
    assert state.pinned == {face: scenario.pure for face in faces}


def test_reject_removes_faces_for_good_and_ends_their_membership(store, scenario, labeler):
    labeler.accept(scenario.intruded)
    labeler.reject(scenario.intruded, [scenario.intruder], why="someone else")
    assert scenario.intruder not in members(store, scenario.intruded)
    assert pd.isna(row_of(store, scenario.intruder).identity_id)
    state = decisions.load_review_state(store)
    assert (scenario.intruder, scenario.intruded) in state.rejected
    assert scenario.intruder not in state.pinned  # the accept's membership of that face ended
    assert all(state.pinned[f] == scenario.intruded for f in members(store, scenario.intruded))


def test_move_pins_to_target_and_rejects_from_source(store, scenario, labeler):
    labeler.move([scenario.intruder], scenario.rest_of_intruder)
    assert scenario.intruder in members(store, scenario.rest_of_intruder)
    state = decisions.load_review_state(store)
    assert state.pinned[scenario.intruder] == scenario.rest_of_intruder
    assert (scenario.intruder, scenario.intruded) in state.rejected


def test_moving_a_face_back_is_refused_unless_forced_and_then_lifts_its_rejection(store, scenario, labeler):
    rejection = labeler.reject(scenario.intruded, [scenario.intruder])
    with pytest.raises(decisions.DecisionConflict, match="was rejected from identity"):
        labeler.move([scenario.intruder], scenario.intruded)
    moved = labeler.move([scenario.intruder], scenario.intruded, force=True)
    assert moved.summary.endswith(f"(overriding decision {rejection.id})")
    state = decisions.load_review_state(store)
    assert state.pinned[scenario.intruder] == scenario.intruded
    assert (scenario.intruder, scenario.intruded) not in state.rejected


def test_merge_keeps_the_named_identity_and_retires_the_other(store, scenario, labeler):
    small, large = scenario.halves  # 4 faces each: the named one must survive whatever the order
    labeler.name(large, "Person C")
    all_faces = members(store, small) + members(store, large)
    record = labeler.merge(small, large)
    assert f"into identity {large}" in record.summary
    assert sorted(members(store, large)) == sorted(all_faces)
    gone = identity(store, small)
    assert gone.status == "merged" and gone.merged_into == large
    state = decisions.load_review_state(store)
    assert small in state.retired
    assert all(state.pinned[f] == large for f in all_faces)


def test_merge_without_names_keeps_the_larger(store, scenario, labeler):
    record = labeler.merge(scenario.intruded, scenario.pure)  # 9 faces vs 8
    assert f"into identity {scenario.intruded}" in record.summary
    assert identity(store, scenario.pure).status == "merged"


def test_merge_of_two_different_names_is_refused(store, scenario, labeler):
    labeler.name(scenario.halves[0], "A")
    labeler.name(scenario.halves[1], "B")
    with pytest.raises(FacemineError, match="different names"):
        labeler.merge(*scenario.halves)


def test_rejection_follows_a_merge(store, scenario, labeler):
    labeler.reject(scenario.intruded, [scenario.intruder])
    labeler.merge(scenario.intruded, scenario.pure)
    survivor = scenario.intruded
    assert (scenario.intruder, survivor) in decisions.load_review_state(store).rejected


def test_split_makes_a_new_identity_and_pins_both_parts(store, scenario, labeler):
    names = list(scenario.people)
    first, second = scenario.people[names[0]], scenario.people[names[1]]
    record = labeler.split(scenario.mixed, second)
    (new,) = record.created_identities
    assert sorted(members(store, new)) == second
    assert sorted(members(store, scenario.mixed)) == first
    state = decisions.load_review_state(store)
    assert all(state.pinned[f] == new for f in second) and all(state.pinned[f] == scenario.mixed for f in first)
    apart = {(a, b) for kind, a, b, _ in active_constraints(store) if kind == "cannot_link"}
    assert apart == {(face, first[0]) for face in second} | {(face, second[0]) for face in first[1:]}
    assert state.cannot_link == apart


def test_name_pins_faces_and_refuses_a_name_in_use(store, scenario, labeler):
    labeler.name(scenario.pure, "Jack Straw")
    labeler.name(scenario.pure, "J. Straw")
    assert identity(store, scenario.pure)["name"] == "J. Straw"
    with pytest.raises(FacemineError, match="already named"):
        labeler.name(scenario.mixed, "J. Straw")
    with pytest.raises(FacemineError, match="empty"):
        labeler.name(scenario.mixed, "  ")


def test_not_a_face_excludes_until_moved_back(store, scenario, labeler):
    face = members(store, scenario.pure)[0]
    labeler.not_a_face([face])
    assert face in decisions.load_review_state(store).excluded
    assert pd.isna(row_of(store, face).identity_id)
    labeler.move([face], scenario.pure)
    state = decisions.load_review_state(store)
    assert face not in state.excluded and state.pinned[face] == scenario.pure


def test_lock_is_in_the_review_state(store, scenario, labeler):
    labeler.lock(scenario.pure)
    state = decisions.load_review_state(store)
    assert scenario.pure in state.locked
    assert all(state.pinned[f] == scenario.pure for f in members(store, scenario.pure))


def test_undo_restores_assignments_identities_and_constraints(store, scenario, labeler):
    before = assignments(store, scenario.run_id)
    names = list(scenario.people)
    split = labeler.split(scenario.mixed, scenario.people[names[1]])
    undo = labeler.undo(why="wrong")
    assert undo.action == "undo" and undo.undid == split.id
    pd.testing.assert_frame_equal(assignments(store, scenario.run_id), before)
    assert identity(store, split.created_identities[0]).status == "retired"
    assert active_constraints(store) == []
    assert split.created_identities[0] in decisions.load_review_state(store).retired
    history = labeler.history()
    assert [h.action for h in history] == ["undo", "split"]
    assert history[1].undone_by == undo.id


def test_undo_reactivates_what_the_decision_replaced(store, scenario, labeler):
    labeler.accept(scenario.intruded)
    labeler.reject(scenario.intruded, [scenario.intruder])
    labeler.undo()
    state = decisions.load_review_state(store)
    assert state.pinned[scenario.intruder] == scenario.intruded
    assert not state.rejected
    assert row_of(store, scenario.intruder).identity_id == scenario.intruded


def test_undo_of_merge_brings_the_identity_back(store, scenario, labeler):
    labeler.merge(*scenario.halves)
    labeler.undo()
    assert identity(store, scenario.halves[1]).status == "active"
    assert len(members(store, scenario.halves[0])) == len(members(store, scenario.halves[1])) == 4


def test_undo_refuses_to_skip_a_later_decision_on_the_same_faces(store, scenario, labeler):
    first = labeler.accept(scenario.intruded)
    labeler.reject(scenario.intruded, [scenario.intruder])
    with pytest.raises(FacemineError, match="undo .* first"):
        labeler.undo(first.id)
    labeler.undo()
    labeler.undo(first.id)
    with pytest.raises(FacemineError, match="nothing to undo"):
        labeler.undo()


def test_undo_passes_over_audit_records_and_refuses_them(store, scenario, labeler):
    accepted = labeler.accept(scenario.pure)
    with store.session() as session:  # what mining a changed photo, `forget` or `doctor --fix` log
        audits = [Decision(who="facemine", action=action, payload={"summary": action}) for action in AUDIT_ACTIONS]
        session.add_all(audits)
        session.flush()
        audit_ids = [row.id for row in audits]
    assert labeler.undo().undid == accepted.id
    for audit_id, action in zip(audit_ids, AUDIT_ACTIONS):
        with pytest.raises(FacemineError, match=f"decision {audit_id} is a {action} record"):
            labeler.undo(audit_id)


def test_undo_errors(store, scenario, labeler):
    record = labeler.accept(scenario.pure)
    undo = labeler.undo()
    with pytest.raises(FacemineError, match="already undone"):
        labeler.undo(record.id)
    with pytest.raises(FacemineError, match="itself an undo"):
        labeler.undo(undo.id)
    with pytest.raises(FacemineError, match="does not exist"):
        labeler.undo(9999)


def test_undo_after_a_new_run_lifts_constraints_only(store, scenario, labeler):
    labeler.reject(scenario.intruded, [scenario.intruder])
    groups = [members(store, i) for i in (scenario.pure, scenario.intruded)]
    new_run, _ = make_run(store, groups)
    record = labeler.undo()
    assert not decisions.load_review_state(store).rejected
    with store.session() as session:
        assert session.get(Decision, record.id).payload["assignments_restored"] is False
    assert decisions_run(store) == new_run


def test_user_errors_are_one_line_facemine_errors(store, scenario, labeler):
    with pytest.raises(FacemineError, match="identity 9999 does not exist"):
        labeler.accept(9999)
    with pytest.raises(FacemineError, match=f"face {scenario.intruder} is not in identity {scenario.pure}"):
        labeler.reject(scenario.pure, [scenario.intruder])
    with pytest.raises(FacemineError, match="not in the current labelling"):
        labeler.not_a_face([987654])
    with pytest.raises(FacemineError, match="itself"):
        labeler.merge(scenario.pure, scenario.pure)
    with pytest.raises(FacemineError, match="every face"):
        labeler.split(scenario.pure, members(store, scenario.pure))
    with pytest.raises(FacemineError, match="already in"):
        labeler.move([members(store, scenario.pure)[0]], scenario.pure)
    labeler.merge(*scenario.halves)
    with pytest.raises(FacemineError, match=f"merged into identity {scenario.halves[0]}"):
        labeler.accept(scenario.halves[1])
    assert len(labeler.history()) == 1  # failed actions leave no trace


def test_no_clustering_run_yet(store):
    with pytest.raises(FacemineError, match="no clustering run yet"):
        Labeler(store).accept(1)


def test_a_failing_decision_changes_nothing(store, scenario):
    edit = decisions.LabelEdit(
        assign={members(store, scenario.pure)[0]: None, 987654: None},
        constraints=[decisions.NewConstraint("reject", members(store, scenario.pure)[0], identity=scenario.pure)],
        create_identities=1,
    )
    with pytest.raises(FacemineError, match="not in clustering run"):
        decisions.apply_decision(store, scenario.run_id, "tester", "reject", None, "bad", edit)
    assert decisions.history(store) == [] and active_constraints(store) == []
    assert identity_rows(store).identity_id.max() == max(scenario.others)
