"""Human review decisions, in the shape clustering needs.

`ReviewState` (database ids) is what storage reads from the active constraints.
`review_constraints` turns it into `pipeline.cluster.Constraints` (array indices) plus the
face -> identity map that keeps identity ids stable; `pin_reviewed_faces` then guarantees that
every face a person placed stays exactly where it was placed, whatever the clustering did.
Cannot-links (faces a split set apart) keep the two groups in different clusters; a cannot-link
between faces pinned to one identity (decisions that contradict each other, left by older
versions that did not refuse them) is not enforced, the pins win, and `contradictions` lists it
for the review queue.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from pipeline.cluster import Constraints


@dataclass
class ReviewState:
    """What human decisions imply for the next clustering run (all ids are database ids)."""

    pinned: dict[int, int] = field(default_factory=dict)  # face id -> identity id
    rejected: set[tuple[int, int]] = field(default_factory=set)  # (face id, identity id)
    locked: set[int] = field(default_factory=set)  # identity ids
    excluded: set[int] = field(default_factory=set)  # face ids marked not-a-face
    retired: set[int] = field(default_factory=set)  # identity ids merged away: never reused
    cannot_link: set[tuple[int, int]] = field(default_factory=set)  # (face id, face id): different people

    def contradictions(self) -> list[tuple[int, int, int]]:
        """(face, face, identity): cannot-linked faces that are both pinned to `identity`."""
        return sorted(
            (a, b, self.pinned[a])
            for a, b in self.cannot_link
            if a in self.pinned and self.pinned[a] == self.pinned.get(b) and not {a, b} & self.excluded
        )


def review_constraints(
    face_ids: np.ndarray, review: ReviewState, previous: Mapping[int, int]
) -> tuple[Constraints, dict[int, int]]:
    """(constraints, previous identity per face index) for `cluster_faces`.

    Locked identities keep exactly their pinned faces; faces pinned to other identities are
    must-linked together and seed the identity key their cluster inherits, so a named
    identity can still grow with new photos of the same person.
    """
    index = {int(face): i for i, face in enumerate(np.asarray(face_ids).tolist())}
    pinned_by_identity: dict[int, list[int]] = defaultdict(list)
    for face, identity in review.pinned.items():
        if face in index and face not in review.excluded:
            pinned_by_identity[identity].append(index[face])
    fixed = {identity: faces for identity, faces in pinned_by_identity.items() if identity in review.locked}
    must_link = [
        (faces[0], other)
        for identity, faces in pinned_by_identity.items()
        if identity not in review.locked
        for other in faces[1:]
    ]
    seeds = {
        index[face]: identity
        for face, identity in previous.items()
        if face in index and identity not in review.retired
    }
    for identity, faces in pinned_by_identity.items():
        seeds.update((i, identity) for i in faces)
    contradicted = {(a, b) for a, b, _ in review.contradictions()}
    constraints = Constraints(
        must_link=must_link,
        cannot_link=[
            (index[a], index[b])
            for a, b in sorted(review.cannot_link - contradicted)
            if a in index and b in index and not {a, b} & review.excluded
        ],
        fixed_members=fixed,
        rejected=[(index[face], identity) for face, identity in review.rejected if face in index],
        excluded=[index[face] for face in review.excluded if face in index],
    )
    return constraints, seeds


def pin_reviewed_faces(
    face_ids: np.ndarray, identity: np.ndarray, source: np.ndarray, confidence: np.ndarray, review: ReviewState
) -> None:
    """Force pinned faces onto their identity (in place): a person's placement always wins."""
    for i, face in enumerate(np.asarray(face_ids).tolist()):
        if face in review.pinned and face not in review.excluded:
            identity[i], source[i], confidence[i] = review.pinned[face], "decision", 1.0
