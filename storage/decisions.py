"""Review decisions: an append-only log, the constraints each implies, and its edits of the current labelling.

One decision = one transaction that
- appends a `Decision` row (who, when, action, why, and a payload holding the before-state needed to undo),
- inserts the `Constraint` rows it implies, deactivating the earlier ones it contradicts,
- edits the current clustering run's `Assignment` rows in place (source "decision") and `Identity` rows.

A decision that contradicts an earlier one is refused (`DecisionConflict`, one line) unless
forced: putting a face back into an identity it was rejected from, joining faces a split set
apart, or changing the identity of a face another reviewer pinned. A forced decision lifts the
constraints it overrides (undo restores them) and names the overridden decisions in its summary.

What an action means (which faces go where) is decided by `labeling.actions`; this module only
persists a `LabelEdit` and undoes one. `load_review_state` turns the active constraints into the
`pipeline.identities.ReviewState` every clustering run obeys.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import insert, or_, select, update
from sqlalchemy.orm import Session

from pipeline.errors import FacemineError
from pipeline.identities import ReviewState
from storage.db import in_chunks
from storage.schema import AUDIT_ACTIONS, Assignment, Constraint, Decision, Identity
from storage.store import Store

# Merges bind through their pins (member); older stores may hold must_link rows, which no run reads.
MEMBER, REJECT, NOT_A_FACE, CANNOT_LINK = "member", "reject", "not_a_face", "cannot_link"
IDENTITY_FIELDS = ("name", "locked", "accepted", "status", "merged_into")
# Identities that must never be reused by clustering: merged away, or created by an undone split.
RETIRED_STATUSES = ("merged", "retired")
UNDO = "undo"


@dataclass(frozen=True)
class NewConstraint:
    """A constraint to add; a negative `identity` names the k-th identity the decision creates (-1: first)."""

    kind: str
    face_a: int
    face_b: int | None = None
    identity: int | None = None


@dataclass
class LabelEdit:
    """One decision's effect. Negative identity ids in `assign`, `constraints` and `identity_fields`
    name the identities the decision creates (-1 .. -create_identities)."""

    assign: dict[int, int | None] = field(default_factory=dict)  # face -> identity, None: unassigned
    identity_fields: dict[int, dict[str, object]] = field(default_factory=dict)
    constraints: list[NewConstraint] = field(default_factory=list)
    create_identities: int = 0


@dataclass(frozen=True)
class DecisionRecord:
    id: int
    at: datetime
    who: str
    action: str
    why: str | None
    summary: str
    undone_by: int | None
    created_identities: tuple[int, ...] = ()
    # For an undo: the decision it reverted.
    undid: int | None = None


class DecisionConflict(FacemineError):
    """A decision contradicts an earlier one still in effect; forcing it overrides that one."""


def _record(row: Decision) -> DecisionRecord:
    return DecisionRecord(
        id=row.id,
        at=row.at,
        who=row.who,
        action=row.action,
        why=row.why,
        summary=str(row.payload.get("summary", "")),
        undone_by=row.undone_by,
        created_identities=tuple(row.payload.get("before", {}).get("created_identities", [])),
        undid=row.payload.get("undone"),
    )


# ---- reading the current labelling ---------------------------------------------------------


def identity_faces(store: Store, run_id: int, identity_id: int) -> list[int]:
    """Faces of `identity_id` in run `run_id`, by face id."""
    with store.session() as session:
        return list(
            session.scalars(
                select(Assignment.face_id)
                .where(Assignment.run_id == run_id, Assignment.identity_id == identity_id)
                .order_by(Assignment.face_id)
            )
        )


def face_identities(store: Store, run_id: int, face_ids: Iterable[int]) -> dict[int, int | None]:
    """Identity of each face in run `run_id` (None: unassigned); faces not in the run are absent."""
    with store.session() as session:
        return _current_identities(session, run_id, sorted(set(face_ids)))


# ---- writing one decision ------------------------------------------------------------------


def _contradicts(new: NewConstraint, kind: str, identity: int | None) -> bool:
    """Whether an active constraint (`kind`, `identity`) on the same face gives way to `new`:
    a face has one membership at a time; joining an identity lifts its rejection from it and any
    not-a-face mark; a rejection ends the membership it rejects; not-a-face ends every membership."""
    if new.kind == MEMBER:
        return kind in (MEMBER, NOT_A_FACE) or (kind == REJECT and identity == new.identity)
    if new.kind == REJECT:
        return kind == MEMBER and identity == new.identity
    return new.kind == NOT_A_FACE and kind == MEMBER


def _superseded(session: Session, constraints: list[NewConstraint]) -> list[int]:
    """Ids of the active constraints that the new ones contradict."""
    by_face: dict[int, list[NewConstraint]] = {}
    for new in constraints:
        if new.kind in (MEMBER, REJECT, NOT_A_FACE):
            by_face.setdefault(new.face_a, []).append(new)
    ids: list[int] = []
    for chunk in in_chunks(sorted(by_face)):
        rows = session.execute(
            select(Constraint.id, Constraint.kind, Constraint.face_a, Constraint.identity_id).where(
                Constraint.active.is_(True),
                Constraint.face_a.in_(chunk),
                Constraint.kind.in_((MEMBER, REJECT, NOT_A_FACE)),
            )
        ).all()
        ids += [
            constraint_id
            for constraint_id, kind, face, identity in rows
            if any(_contradicts(new, kind, identity) for new in by_face[face])
        ]
    return ids


def _assignment_before(session: Session, run_id: int, faces: list[int]) -> list[list]:
    before = []
    for chunk in in_chunks(faces):
        rows = session.execute(
            select(Assignment.face_id, Assignment.identity_id, Assignment.confidence, Assignment.source).where(
                Assignment.run_id == run_id, Assignment.face_id.in_(chunk)
            )
        ).all()
        before.extend([face, identity, confidence, source] for face, identity, confidence, source in rows)
    missing = set(faces) - {row[0] for row in before}
    if missing:
        raise FacemineError(f"face {min(missing)} is not in clustering run {run_id}")
    return before


def _identity_before(session: Session, fields: dict[int, dict[str, object]]) -> list[list]:
    before = []
    for identity_id, changes in fields.items():
        row = session.get(Identity, identity_id)
        if row is None:
            raise FacemineError(f"identity {identity_id} does not exist")
        before.append([identity_id, {name: getattr(row, name) for name in changes}])
    return before


def _with_created(edit: LabelEdit, created_ids: list[int]) -> LabelEdit:
    """`edit` with its placeholder identities (-1, -2, ...) replaced by the rows just created."""

    def real(identity: int | None) -> int | None:
        return created_ids[-identity - 1] if identity is not None and identity < 0 else identity

    return LabelEdit(
        assign={face: real(identity) for face, identity in edit.assign.items()},
        identity_fields={real(identity): changes for identity, changes in edit.identity_fields.items()},
        constraints=[NewConstraint(c.kind, c.face_a, c.face_b, real(c.identity)) for c in edit.constraints],
    )


def _insert_constraints(session: Session, decision_id: int, constraints: list[NewConstraint]) -> None:
    if constraints:
        session.execute(
            insert(Constraint),
            [
                {"decision_id": decision_id, "kind": c.kind, "face_a": c.face_a, "face_b": c.face_b,
                 "identity_id": c.identity, "active": True}
                for c in constraints
            ],
        )


def _set_active(session: Session, constraint_ids: list[int], active: bool) -> None:
    for chunk in in_chunks(constraint_ids):
        session.execute(update(Constraint).where(Constraint.id.in_(chunk)).values(active=active))


def _merge_targets(session: Session) -> dict[int, int]:
    """Identity merged away -> the identity it was merged into."""
    rows = session.execute(
        select(Identity.id, Identity.merged_into).where(Identity.status == "merged", Identity.merged_into.is_not(None))
    ).all()
    return dict(rows)


def _survivor(merged_into: dict[int, int], identity: int | None) -> int | None:
    """The identity `identity` lives on in after every merge (itself when never merged)."""
    seen = set()
    while identity in merged_into and identity not in seen:
        seen.add(identity)
        identity = merged_into[identity]
    return identity


@dataclass(frozen=True)
class _Conflict:
    constraint_id: int
    decision_id: int
    text: str


def _conflicts(session: Session, run_id: int, who: str, edit: LabelEdit) -> list[_Conflict]:
    """Active constraints of earlier decisions that `edit` contradicts (see the module docstring)."""
    if not edit.assign:
        return []
    merged_into = _merge_targets(session) | {
        gone: int(fields["merged_into"]) for gone, fields in edit.identity_fields.items() if fields.get("status") == "merged"
    }
    rows = []
    for chunk in in_chunks(sorted(edit.assign)):
        rows += session.execute(
            select(Constraint.id, Constraint.kind, Constraint.face_a, Constraint.face_b, Constraint.identity_id,
                   Decision.id.label("decision"), Decision.who)
            .join(Decision, Decision.id == Constraint.decision_id)
            .where(
                Constraint.active.is_(True),
                Constraint.kind.in_((MEMBER, REJECT, CANNOT_LINK)),
                or_(Constraint.face_a.in_(chunk), Constraint.face_b.in_(chunk)),
            )
            .order_by(Constraint.id)
        ).all()
    partners = {row.face_b if row.face_a in edit.assign else row.face_a for row in rows if row.kind == CANNOT_LINK}
    now = _current_identities(session, run_id, sorted(partners - set(edit.assign)))

    def after(face: int) -> int | None:
        return _survivor(merged_into, edit.assign[face] if face in edit.assign else now.get(face))

    found = []
    for row in rows:
        by = f"by {row.who} (decision {row.decision})"
        if row.kind == CANNOT_LINK:
            together = after(row.face_a) is not None and after(row.face_a) == after(row.face_b)
            text = f"faces {row.face_a} and {row.face_b} were set apart as different people {by}" if together else None
        elif row.face_a not in edit.assign:
            text = None
        elif row.kind == REJECT:
            back = edit.assign[row.face_a] is not None and after(row.face_a) == _survivor(merged_into, row.identity_id)
            text = f"face {row.face_a} was rejected from identity {row.identity_id} {by}" if back else None
        else:
            moved = row.who != who and after(row.face_a) != _survivor(merged_into, row.identity_id)
            text = f"face {row.face_a} is pinned to identity {row.identity_id} {by}" if moved else None
        if text:
            found.append(_Conflict(row.id, row.decision, text))
    return found


def _current_identities(session: Session, run_id: int, faces: list[int]) -> dict[int, int | None]:
    """Identity of each face in run `run_id` (None: unassigned); faces not in the run are absent."""
    found: dict[int, int | None] = {}
    for chunk in in_chunks(faces):
        found.update(session.execute(
            select(Assignment.face_id, Assignment.identity_id).where(Assignment.run_id == run_id, Assignment.face_id.in_(chunk))
        ).all())
    return found


def _refusal(conflicts: list[_Conflict]) -> DecisionConflict:
    more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
    return DecisionConflict(f"refused: {conflicts[0].text}{more}; --force overrides")


def apply_decision(
    store: Store,
    run_id: int,
    who: str,
    action: str,
    why: str | None,
    summary: str,
    edit: LabelEdit,
    details: dict | None = None,
    force: bool = False,
) -> DecisionRecord:
    """Persist one decision: log row, constraints, assignment and identity edits, all or nothing.

    Refused with `DecisionConflict` when it contradicts an earlier decision, unless `force`: then
    the contradicted constraints are lifted and the decision records which decisions it overrode.
    """
    with store.session() as session:
        conflicts = _conflicts(session, run_id, who, edit)
        if conflicts and not force:
            raise _refusal(conflicts)
        details = dict(details or {})
        if conflicts:
            overridden = sorted({conflict.decision_id for conflict in conflicts})
            details["overrides"] = overridden
            summary += f" (overriding decision {', '.join(map(str, overridden))})"
        created = [Identity() for _ in range(edit.create_identities)]
        session.add_all(created)
        session.flush()
        created_ids = [row.id for row in created]
        edit = _with_created(edit, created_ids)
        deactivated = sorted(set(_superseded(session, edit.constraints)) | {c.constraint_id for c in conflicts})
        before = {
            "assignments": _assignment_before(session, run_id, sorted(edit.assign)),
            "identities": _identity_before(session, edit.identity_fields),
            "created_identities": created_ids,
            "deactivated_constraints": deactivated,
        }
        touched = {row[1] for row in before["assignments"]} | set(edit.assign.values()) | set(edit.identity_fields)
        decision = Decision(
            who=who,
            action=action,
            why=why,
            payload={
                "run_id": run_id,
                "summary": summary,
                "details": details,
                "faces": sorted(edit.assign),
                "identities": sorted(touched - {None}),
                "before": before,
            },
        )
        session.add(decision)
        session.flush()
        _set_active(session, deactivated, False)
        _insert_constraints(session, decision.id, edit.constraints)
        _write_assignments(session, run_id, [[face, identity, 1.0, "decision"] for face, identity in edit.assign.items()])
        for identity_id, changes in edit.identity_fields.items():
            session.execute(update(Identity).where(Identity.id == identity_id).values(**changes))
        session.flush()
        return _record(decision)


def _write_assignments(session: Session, run_id: int, rows: list[list]) -> None:
    if rows:
        session.execute(
            update(Assignment),
            [
                {"run_id": run_id, "face_id": face, "identity_id": identity, "confidence": confidence, "source": source}
                for face, identity, confidence, source in rows
            ],
        )


# ---- undo and history ----------------------------------------------------------------------


def _undo_target(session: Session, decision_id: int | None) -> Decision:
    if decision_id is None:
        target = session.scalar(
            select(Decision)
            .where(Decision.undone_by.is_(None), Decision.action.not_in((UNDO, *AUDIT_ACTIONS)))
            .order_by(Decision.id.desc())
            .limit(1)
        )
        if target is None:
            raise FacemineError("nothing to undo: no decision is in effect")
        return target
    target = session.get(Decision, decision_id)
    if target is None:
        raise FacemineError(f"decision {decision_id} does not exist")
    if target.action == UNDO:
        raise FacemineError(f"decision {decision_id} is itself an undo; redo the action instead")
    if target.action in AUDIT_ACTIONS:
        raise FacemineError(f"decision {decision_id} is a {target.action} record, not a review decision: nothing to undo")
    if target.undone_by is not None:
        raise FacemineError(f"decision {decision_id} was already undone by decision {target.undone_by}")
    return target


def _check_nothing_builds_on(session: Session, target: Decision) -> None:
    """Refuse to undo a decision whose faces or identities a later decision in effect has touched:
    restoring the earlier state would silently revert that later decision too."""
    faces, identities = set(target.payload["faces"]), set(target.payload["identities"])
    later = session.scalars(
        select(Decision)
        .where(Decision.id > target.id, Decision.undone_by.is_(None), Decision.action.not_in((UNDO, *AUDIT_ACTIONS)))
        .order_by(Decision.id)
    )
    for row in later:
        if faces & set(row.payload["faces"]) or identities & set(row.payload["identities"]):
            raise FacemineError(
                f"decision {row.id} ({row.action}) builds on decision {target.id}: undo {row.id} first"
            )


def undo_decision(store: Store, current_run_id: int | None, who: str, why: str | None, decision_id: int | None = None) -> DecisionRecord:
    """Revert a decision (default: the latest one in effect) with a new `undo` decision.

    Its constraints become inactive, the ones it replaced active again, identity fields and the
    identities it created are restored (created ones are retired). Assignments are restored when
    the decision was made on the current run; on an older run the next clustering run applies the undo.
    """
    with store.session() as session:
        target = _undo_target(session, decision_id)
        _check_nothing_builds_on(session, target)
        before = target.payload["before"]
        same_run = target.payload["run_id"] == current_run_id
        undo = Decision(
            who=who,
            action=UNDO,
            why=why,
            payload={
                "run_id": current_run_id,
                "summary": f"undid decision {target.id} ({target.payload['summary']})",
                "undone": target.id,
                "assignments_restored": same_run,
                "faces": [],
                "identities": [],
            },
        )
        session.add(undo)
        session.flush()
        target.undone_by = undo.id
        session.execute(update(Constraint).where(Constraint.decision_id == target.id).values(active=False))
        _set_active(session, before["deactivated_constraints"], True)
        for identity_id, values in before["identities"]:
            session.execute(update(Identity).where(Identity.id == identity_id).values(**values))
        if before["created_identities"]:
            session.execute(
                update(Identity).where(Identity.id.in_(before["created_identities"])).values(status="retired")
            )
        if same_run:
            _write_assignments(session, current_run_id, before["assignments"])
        session.flush()
        return _record(undo)


def history(store: Store, limit: int | None = None) -> list[DecisionRecord]:
    """Decisions, newest first."""
    query = select(Decision).order_by(Decision.id.desc())
    if limit is not None:
        query = query.limit(limit)
    with store.session() as session:
        return [_record(row) for row in session.scalars(query)]


# ---- what clustering must obey ----------------------------------------------------------


def load_review_state(store: Store) -> ReviewState:
    """The `ReviewState` implied by the active constraints.

    Constraints naming an identity that was merged away apply to the identity it was merged into.
    """
    with store.session() as session:
        identities = session.execute(select(Identity.id, Identity.status, Identity.locked)).all()
        merged_into = _merge_targets(session)
        constraints = session.execute(
            select(Constraint.kind, Constraint.face_a, Constraint.face_b, Constraint.identity_id)
            .where(Constraint.active.is_(True), Constraint.kind.in_((MEMBER, REJECT, NOT_A_FACE, CANNOT_LINK)))
            .order_by(Constraint.id)
        ).all()
    state = ReviewState(
        locked={row.id for row in identities if row.locked and row.status == "active"},
        retired={row.id for row in identities if row.status in RETIRED_STATUSES},
    )
    for kind, face, other_face, identity in constraints:  # in id order: the latest membership of a face wins
        if kind == MEMBER:
            state.pinned[face] = _survivor(merged_into, identity)
        elif kind == REJECT:
            state.rejected.add((face, _survivor(merged_into, identity)))
        elif kind == CANNOT_LINK:
            state.cannot_link.add((face, other_face))
        else:
            state.excluded.add(face)
    return state
