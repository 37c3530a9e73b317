"""Review actions on the current labelling, shared by `facemine label` and `facemine review`.

The newest finished clustering run is the current labelling. Each action checks its input,
works out which faces go where and which constraints that implies (a `LabelEdit`), and hands it
to `storage.decisions.apply_decision`, which logs and applies it in one transaction.

Merge keeps the identity with a name (two different names: refused), else the one with more
faces, else the first given. A merge is one person's faces pinned to one identity: that is what
binds later runs. A split sets the two groups apart (cannot-links): no run joins them and a merge
of the two is refused. Every action takes `force`: a decision that contradicts an earlier one
(see `storage.decisions`), or a merge of two locked identities, is refused with
`DecisionConflict` unless forced, and a forced one records what it overrode.
"""
from __future__ import annotations

import getpass
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pandas as pd

from labeling.text import plural
from pipeline.errors import FacemineError, check_name
from storage import decisions
from storage.decisions import (
    CANNOT_LINK,
    MEMBER,
    NOT_A_FACE,
    REJECT,
    DecisionConflict,
    DecisionRecord,
    LabelEdit,
    NewConstraint,
)
from storage.identities import identity_rows, latest_run_id
from storage.store import Store


def current_run(store: Store) -> int:
    """The current labelling: the newest finished clustering run."""
    run_id = latest_run_id(store)
    if run_id is None:
        raise FacemineError("no clustering run yet: cluster the mined faces first (facemine cluster)")
    return run_id


def default_who() -> str:
    return os.environ.get("USER") or getpass.getuser()


@dataclass(frozen=True)
class IdentityInfo:
    id: int
    name: str | None
    locked: bool
    accepted: bool
    faces: tuple[int, ...]

    def label(self) -> str:
        return f"identity {self.id}" + (f" '{self.name}'" if self.name else "")


def _pin(faces: Iterable[int], identity: int) -> tuple[dict[int, int | None], list[NewConstraint]]:
    faces = list(faces)
    return {face: identity for face in faces}, [NewConstraint(MEMBER, face, identity=identity) for face in faces]


def _survivor(a: IdentityInfo, b: IdentityInfo) -> tuple[IdentityInfo, IdentityInfo]:
    """(kept, merged away): the named one, else the larger, else the first."""
    if bool(a.name) != bool(b.name):
        return (a, b) if a.name else (b, a)
    return (b, a) if len(b.faces) > len(a.faces) else (a, b)


class Labeler:
    """Performs review actions as `who`; every method returns the logged decision."""

    def __init__(self, store: Store, who: str | None = None) -> None:
        self.store = store
        self.who = who or default_who()

    # ---- reading -------------------------------------------------------------------------

    @property
    def run_id(self) -> int:
        return current_run(self.store)

    def identity(self, identity_id: int, run_id: int | None = None) -> IdentityInfo:
        """An active identity with its faces in the current labelling."""
        rows = identity_rows(self.store, [identity_id])
        if rows.empty:
            raise FacemineError(f"identity {identity_id} does not exist")
        row = rows.iloc[0]
        if row.status == "merged":
            raise FacemineError(f"identity {identity_id} was merged into identity {int(row.merged_into)}")
        if row.status != "active":
            raise FacemineError(f"identity {identity_id} is {row.status}")
        faces = decisions.identity_faces(self.store, run_id or self.run_id, identity_id)
        name = None if pd.isna(row["name"]) else str(row["name"])
        return IdentityInfo(identity_id, name, bool(row.locked), bool(row.accepted), tuple(faces))

    def _with_faces(self, identity_id: int, run_id: int) -> IdentityInfo:
        info = self.identity(identity_id, run_id)
        if not info.faces:
            raise FacemineError(f"identity {identity_id} has no faces in the current labelling (run {run_id})")
        return info

    @staticmethod
    def _faces_of(info: IdentityInfo, faces: Sequence[int]) -> list[int]:
        if not faces:
            raise FacemineError("no faces given")
        members = set(info.faces)
        outside = [face for face in faces if face not in members]
        if outside:
            raise FacemineError(f"face {outside[0]} is not in {info.label()}")
        return sorted(set(faces))

    def _faces_in_run(self, faces: Sequence[int], run_id: int) -> dict[int, int | None]:
        if not faces:
            raise FacemineError("no faces given")
        found = decisions.face_identities(self.store, run_id, faces)
        missing = [face for face in faces if face not in found]
        if missing:
            raise FacemineError(f"face {missing[0]} is not in the current labelling (run {run_id})")
        return found

    def _apply(self, run_id: int, action: str, why: str | None, summary: str, edit: LabelEdit, force: bool,
               **details) -> DecisionRecord:  # noqa: ANN003
        return decisions.apply_decision(self.store, run_id, self.who, action, why, summary, edit, details, force)

    # ---- identity-wide actions -------------------------------------------------------------

    def accept(self, identity_id: int, why: str | None = None, force: bool = False) -> DecisionRecord:
        """The identity is pure: pin all its faces to it."""
        run_id = self.run_id
        info = self._with_faces(identity_id, run_id)
        assign, constraints = _pin(info.faces, identity_id)
        edit = LabelEdit(assign, {identity_id: {"accepted": True}}, constraints)
        return self._apply(run_id, "accept", why, f"accepted {info.label()} ({plural(len(info.faces))})", edit, force, identity=identity_id)

    def name(self, identity_id: int, name: str, why: str | None = None, force: bool = False) -> DecisionRecord:
        """Name or rename; the faces it holds now are pinned to it."""
        name = check_name(name.strip(), "a name")  # one line that fits its column
        run_id = self.run_id
        info = self._with_faces(identity_id, run_id)
        holders = identity_rows(self.store).query("name == @name and status == 'active' and identity_id != @identity_id")
        if not holders.empty:
            other = int(holders.identity_id.iloc[0])
            raise FacemineError(f"identity {other} is already named '{name}': merge {identity_id} into it instead")
        assign, constraints = _pin(info.faces, identity_id)
        edit = LabelEdit(assign, {identity_id: {"name": name}}, constraints)
        summary = f"named identity {identity_id} '{name}'" + (f" (was '{info.name}')" if info.name else "")
        return self._apply(run_id, "name", why, summary, edit, force, identity=identity_id, name=name)

    def lock(self, identity_id: int, why: str | None = None, force: bool = False) -> DecisionRecord:
        """Keep exactly the current members: no face joins automatically any more."""
        run_id = self.run_id
        info = self._with_faces(identity_id, run_id)
        assign, constraints = _pin(info.faces, identity_id)
        edit = LabelEdit(assign, {identity_id: {"locked": True}}, constraints)
        return self._apply(run_id, "lock", why, f"locked {info.label()} ({plural(len(info.faces))})", edit, force, identity=identity_id)

    def merge(self, first: int, second: int, why: str | None = None, force: bool = False) -> DecisionRecord:
        """One person: all faces of both go to the survivor (see module docstring), the other is retired."""
        if first == second:
            raise FacemineError("cannot merge an identity with itself")
        run_id = self.run_id
        a, b = self._with_faces(first, run_id), self._with_faces(second, run_id)
        if a.name and b.name and a.name != b.name:
            raise FacemineError(f"identities {first} '{a.name}' and {second} '{b.name}' have different names: rename one first")
        both_locked = a.locked and b.locked
        if both_locked and not force:
            raise DecisionConflict(f"refused: identities {first} and {second} are both locked; --force overrides")
        keep, gone = _survivor(a, b)
        assign, constraints = _pin(keep.faces + gone.faces, keep.id)
        fields = {
            keep.id: {"name": keep.name or gone.name, "locked": keep.locked or gone.locked, "accepted": keep.accepted and gone.accepted},
            gone.id: {"status": "merged", "merged_into": keep.id},
        }
        summary = f"merged {gone.label()} ({plural(len(gone.faces))}) into {keep.label()} ({plural(len(keep.faces))})"
        if both_locked:
            summary += " (overriding both locks)"
        return self._apply(run_id, "merge", why, summary, LabelEdit(assign, fields, constraints), force,
                           kept=keep.id, merged=gone.id, overrides_locks=both_locked)

    # ---- face actions ----------------------------------------------------------------------

    def reject(self, identity_id: int, faces: Sequence[int], why: str | None = None, force: bool = False) -> DecisionRecord:
        """These faces are not this person: they leave and never return automatically."""
        run_id = self.run_id
        faces = self._faces_of(self._with_faces(identity_id, run_id), faces)
        edit = LabelEdit(
            {face: None for face in faces}, {}, [NewConstraint(REJECT, face, identity=identity_id) for face in faces]
        )
        return self._apply(run_id, "reject", why, f"rejected {plural(len(faces))} from identity {identity_id}", edit, force,
                           identity=identity_id)

    def move(self, faces: Sequence[int], target: int, why: str | None = None, force: bool = False) -> DecisionRecord:
        """These faces belong to `target`: pinned there and rejected from where they were."""
        run_id = self.run_id
        current = self._faces_in_run(faces, run_id)
        info = self.identity(target, run_id)
        already = [face for face in faces if current[face] == target]
        if already:
            raise FacemineError(f"face {already[0]} is already in {info.label()}")
        faces = sorted(set(faces))
        assign, constraints = _pin(faces, target)
        constraints += [NewConstraint(REJECT, face, identity=current[face]) for face in faces if current[face] is not None]
        sources = sorted({current[face] for face in faces if current[face] is not None})
        summary = f"moved {plural(len(faces))} to {info.label()}" + (f" from {', '.join(map(str, sources))}" if sources else "")
        return self._apply(run_id, "move", why, summary, LabelEdit(assign, {}, constraints), force, target=target)

    def split(self, identity_id: int, faces: Sequence[int], why: str | None = None, force: bool = False) -> DecisionRecord:
        """These faces are another person: a new identity for them, the rest stay (both pinned), and
        the two groups are set apart: each face of one cannot-linked to the first face of the other,
        so the separation holds while either group keeps its first face."""
        run_id = self.run_id
        info = self._with_faces(identity_id, run_id)
        faces = self._faces_of(info, faces)
        rest = [face for face in info.faces if face not in set(faces)]
        if not rest:
            raise FacemineError(f"splitting off every face of identity {identity_id} changes nothing")
        new_assign, new_constraints = _pin(faces, -1)
        old_assign, old_constraints = _pin(rest, identity_id)
        apart = [NewConstraint(CANNOT_LINK, face, rest[0]) for face in faces]
        apart += [NewConstraint(CANNOT_LINK, face, faces[0]) for face in rest[1:]]
        edit = LabelEdit(new_assign | old_assign, {}, new_constraints + old_constraints + apart, create_identities=1)
        summary = f"split {plural(len(faces))} off identity {identity_id} into a new identity"
        return self._apply(run_id, "split", why, summary, edit, force, identity=identity_id)

    def not_a_face(self, faces: Sequence[int], why: str | None = None, force: bool = False) -> DecisionRecord:
        """Detector false positives: out of every identity, for good."""
        run_id = self.run_id
        self._faces_in_run(faces, run_id)
        faces = sorted(set(faces))
        edit = LabelEdit({face: None for face in faces}, {}, [NewConstraint(NOT_A_FACE, face) for face in faces])
        return self._apply(run_id, "not_a_face", why, f"marked {plural(len(faces))} as not a face", edit, force)

    # ---- log -------------------------------------------------------------------------------

    def undo(self, decision_id: int | None = None, why: str | None = None) -> DecisionRecord:
        return decisions.undo_decision(self.store, latest_run_id(self.store), self.who, why, decision_id)

    def history(self, limit: int | None = None) -> list[DecisionRecord]:
        return decisions.history(self.store, limit)
