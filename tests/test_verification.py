"""Verification metrics, hand-checked on tiny examples (pure math on numpy arrays)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.verification import (
    best_threshold,
    cross_validated_accuracy,
    evaluate_pairs,
    pair_scores,
    sample_verification_pairs,
    tar_at_far,
)

# Four same-person pairs and three different-person pairs.
SCORES = np.array([0.9, 0.8, 0.7, 0.4, 0.5, 0.45, 0.1])
SAME = np.array([1, 1, 1, 1, 0, 0, 0], dtype=bool)


def test_best_threshold_by_hand() -> None:
    # Accepting >= 0.7 gets 3 same + 3 different right (6/7); >= 0.4 only 5/7; >= 0.9 only 4/7.
    # The threshold sits midway between 0.7 and the next lower score, 0.5.
    threshold, accuracy = best_threshold(SCORES, SAME)
    assert accuracy == pytest.approx(6 / 7)
    assert threshold == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("far", "tar", "threshold"),
    [
        (0.0, 3 / 4, 0.7),  # no different pair accepted: stop above 0.5
        (0.2, 3 / 4, 0.7),  # one false accept would be FAR 1/3 > 0.2
        (1 / 3, 3 / 4, 0.5),  # accepting 0.5 costs one false accept, gains no true one
        (2 / 3, 1.0, 0.4),  # 0.45 costs a false accept, then 0.4 brings the last same pair free
        (1.0, 1.0, 0.1),
    ],
)
def test_tar_at_far_by_hand(far: float, tar: float, threshold: float) -> None:
    assert tar_at_far(SCORES, SAME, far) == pytest.approx((tar, threshold))


def test_cross_validation_judges_each_fold_with_the_other_folds_threshold() -> None:
    # 20 same pairs at 0.9, 29 different at 0.1 and one different pair scoring 0.95 (a label
    # error). Every fold holds 2 same + 3 different pairs; whatever the folds, exactly one of the
    # 50 pairs is misjudged, so the mean fold accuracy is 1 - (1/5) / 10.
    scores = np.r_[np.full(20, 0.9), np.full(29, 0.1), 0.95]
    same = np.r_[np.ones(20, bool), np.zeros(30, bool)]
    accuracies, thresholds = cross_validated_accuracy(scores, same, n_folds=10, seed=3)
    assert len(accuracies) == 10
    assert accuracies.mean() == pytest.approx(0.98)
    assert np.all((thresholds > 0.1) & (thresholds <= 0.9))


def test_evaluate_pairs_on_embeddings() -> None:
    # Same pairs at 0-30 degrees, different pairs at 60-180 degrees: perfectly separable.
    rng = np.random.default_rng(0)
    angles = np.r_[rng.uniform(0, np.pi / 6, 40), rng.uniform(np.pi / 3, np.pi, 40)]
    a = np.tile([[1.0, 0.0]], (80, 1)) * 2.0  # unnormalised on purpose
    b = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    same = np.r_[np.ones(40, bool), np.zeros(40, bool)]
    np.testing.assert_allclose(pair_scores(a, b), np.cos(angles))
    report = evaluate_pairs(a, b, same, far_targets=(0.01, 0.1))
    assert report.accuracy == 1.0 and report.auc == 1.0
    assert report.tar_at_far == {0.01: 1.0, 0.1: 1.0}
    assert np.cos(np.pi / 3) < report.threshold < np.cos(np.pi / 6)
    assert (report.num_same, report.num_different) == (40, 40)
    assert set(report.as_dict()) == {"accuracy", "accuracy_std", "threshold", "auc", "tar@far=0.01", "tar@far=0.1"}


def test_evaluate_pairs_on_chance_scores_is_near_half() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 2000, 16))
    same = rng.random(2000) < 0.5
    report = evaluate_pairs(a, b, same)
    assert 0.4 < report.accuracy < 0.6 and 0.4 < report.auc < 0.6


def test_too_few_pairs_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        cross_validated_accuracy(np.array([0.9, 0.1, 0.2]), np.array([True, False, False]))


def test_sample_pairs_enumerates_all_same_pairs_and_balances() -> None:
    labels = ["a", "a", "a", "b", "b", "c", "d"]
    index_a, index_b, same = sample_verification_pairs(labels, max_pairs=100, seed=0)
    pairs = {(int(x), int(y)) for x, y in zip(index_a, index_b)}
    assert len(pairs) == len(same)  # no duplicates
    assert np.all(index_a < index_b)
    expected_same = {(i, j) for i, j in itertools.combinations(range(7), 2) if labels[i] == labels[j]}
    assert {(int(x), int(y)) for x, y, flag in zip(index_a, index_b, same) if flag} == expected_same
    different = [(int(x), int(y)) for x, y, flag in zip(index_a, index_b, same) if not flag]
    assert len(different) == len(expected_same) == 4
    assert all(labels[x] != labels[y] for x, y in different)


def test_sample_pairs_caps_same_pairs() -> None:
    labels = np.repeat(np.arange(30), 10)  # 30 * 45 = 1350 same pairs available
    index_a, index_b, same = sample_verification_pairs(labels, max_pairs=200, seed=0)
    assert same.sum() == 200
    assert (~same).sum() == same.sum()
    assert np.array_equal(labels[index_a] == labels[index_b], same)
    again = sample_verification_pairs(labels, max_pairs=200, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip((index_a, index_b, same), again))


def test_sample_pairs_without_enough_identities_is_empty() -> None:
    for labels in ([], ["a", "b"]):
        index_a, index_b, same = sample_verification_pairs(labels)
        assert len(index_a) == len(index_b) == len(same) == 0
    index_a, index_b, same = sample_verification_pairs(["a", "a", "a"])
    assert same.all() and sorted(zip(index_a.tolist(), index_b.tolist())) == [(0, 1), (0, 2), (1, 2)]
