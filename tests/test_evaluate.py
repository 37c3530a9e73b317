"""Clustering metrics against values computed by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.errors import FacemineError
from pipeline.evaluate import clustering_metrics

# Six faces of three people; the prediction puts faces 0,1 in cluster A, faces 2,3,4 in cluster B
# and leaves face 5 unassigned (scored as a singleton).
TRUTH = np.array([0, 0, 0, 1, 1, 2])
PREDICTED = np.array([7, 7, 3, 3, 3, -1])


def test_hand_computed_example() -> None:
    metrics = clustering_metrics(TRUTH, PREDICTED)

    # Contingency n_ij: person 0 -> A:2, B:1; person 1 -> B:2; person 2 -> singleton:1.
    # Pairs together in the prediction: C(2,2) + C(3,2) = 1 + 3 = 4; in the truth: C(3,2) + C(2,2) = 4;
    # in both: sum C(n_ij, 2) = 1 + 0 + 1 + 0 = 2.  Precision = recall = 2/4, F = 0.5.
    assert metrics["pairwise_precision"] == pytest.approx(0.5)
    assert metrics["pairwise_recall"] == pytest.approx(0.5)
    assert metrics["pairwise_f"] == pytest.approx(0.5)

    # BCubed precision per face: 2/2, 2/2, 1/3, 2/3, 2/3, 1/1 -> sum 14/3, mean 7/9.
    # BCubed recall per face:    2/3, 2/3, 1/3, 2/2, 2/2, 1/1 -> sum 14/3, mean 7/9.
    assert metrics["bcubed_precision"] == pytest.approx(7 / 9)
    assert metrics["bcubed_recall"] == pytest.approx(7 / 9)
    assert metrics["bcubed_f"] == pytest.approx(7 / 9)

    # MI = 1/3 ln2 + 1/6 ln(2/3) + 1/3 ln2 + 1/6 ln6 = ln2.  Both labelings have sizes 3, 2, 1,
    # so H = 1/2 ln2 + 1/3 ln3 + 1/6 ln6 for each, and NMI = MI / H.
    entropy = math.log(2) / 2 + math.log(3) / 3 + math.log(6) / 6
    assert metrics["nmi"] == pytest.approx(math.log(2) / entropy)

    assert metrics["n_clusters"] == 2
    assert metrics["n_singletons"] == 1
    assert metrics["n_true_identities"] == 3
    assert metrics["n_faces"] == 6


def test_unassigned_faces_are_separate_singletons() -> None:
    # Two unassigned faces of one person must not count as a correct pair.
    metrics = clustering_metrics(np.array(["x", "x"]), np.array([-1, -1]))

    assert metrics["pairwise_recall"] == 0.0
    assert metrics["bcubed_precision"] == 1.0
    assert metrics["bcubed_recall"] == 0.5
    assert metrics["n_singletons"] == 2
    assert metrics["n_clusters"] == 0


def test_perfect_and_fully_merged_clusterings() -> None:
    truth = np.array([0, 0, 1, 1, 2, 2])

    perfect = clustering_metrics(truth, np.array([5, 5, 9, 9, 1, 1]))
    merged = clustering_metrics(truth, np.zeros(6, int))

    assert perfect["pairwise_f"] == perfect["bcubed_f"] == pytest.approx(1.0)
    assert perfect["nmi"] == pytest.approx(1.0)
    # One cluster for all: every face's cluster is 1/3 its own identity, recall is complete.
    assert merged["bcubed_precision"] == pytest.approx(1 / 3)
    assert merged["bcubed_recall"] == pytest.approx(1.0)
    assert merged["pairwise_precision"] == pytest.approx(3 / 15)


def test_mismatched_lengths_are_an_error() -> None:
    with pytest.raises(FacemineError):
        clustering_metrics(np.array([0, 1]), np.array([0]))
