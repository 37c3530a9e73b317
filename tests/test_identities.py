"""Review decisions translate into clustering constraints, and pinned faces always win."""
import numpy as np

from pipeline.identities import ReviewState, pin_reviewed_faces, review_constraints

FACES = np.array([10, 11, 12, 13, 20, 21, 22, 30])


def test_locked_identities_are_fixed_and_others_must_link():
    review = ReviewState(pinned={10: 9, 11: 9, 12: 9, 20: 7, 21: 7}, locked={7}, rejected={(13, 9)}, excluded={30})
    constraints, seeds = review_constraints(FACES, review, previous={})
    assert dict(constraints.fixed_members) == {7: [4, 5]}
    assert sorted(constraints.must_link) == [(0, 1), (0, 2)]
    assert list(constraints.rejected) == [(3, 9)]
    assert list(constraints.excluded) == [7]
    assert seeds == {0: 9, 1: 9, 2: 9, 4: 7, 5: 7}


def test_previous_identities_seed_except_retired_and_pins_override():
    previous = {10: 5, 11: 5, 20: 6, 21: 6}
    review = ReviewState(pinned={11: 8}, retired={6})
    _, seeds = review_constraints(FACES, review, previous)
    assert seeds == {0: 5, 1: 8}


def test_pins_override_whatever_clustering_did():
    identity = np.array([3, 3, 3, 4, 4, 4, -1, -1])
    source = np.array(["cluster"] * 6 + ["unassigned"] * 2, dtype=object)
    confidence = np.full(8, 0.4)
    review = ReviewState(pinned={10: 4, 30: 9}, excluded={30})
    pin_reviewed_faces(FACES, identity, source, confidence, review)
    assert identity[0] == 4 and source[0] == "decision" and confidence[0] == 1.0
    assert identity[7] == -1  # not-a-face outranks an old pin
