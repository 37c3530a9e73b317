"""Clustering quality against ground-truth identities.

``clustering_metrics(true_labels, pred_labels) -> dict[str, float]`` with keys

- ``pairwise_precision``, ``pairwise_recall``, ``pairwise_f``: over all pairs of faces, a pair
  counts as positive when both faces share a cluster (scikit-learn's pair confusion matrix,
  computed from the contingency table, so O(N) memory rather than O(N^2)).
- ``bcubed_precision``, ``bcubed_recall``, ``bcubed_f``: per face, the share of its predicted
  cluster that has its true identity (precision) and the share of its true identity found in its
  predicted cluster (recall), averaged over faces (Bagga & Baldwin 1998; Amigo et al. 2009).
- ``nmi``: normalised mutual information (scikit-learn, arithmetic normalisation).
- ``n_clusters``: predicted clusters with at least two faces; ``n_singletons``: faces alone in
  their predicted cluster (unassigned faces included); ``n_true_identities``; ``n_faces``.

Unassigned faces (predicted label -1) are scored as singletons, one cluster each: a face the
clusterer declined to place is neither credited with nor blamed for any pair. This is the usual
convention of face-clustering papers and keeps the scores comparable across methods that do and
do not mark noise. Ground-truth labels may be any hashable values; -1 has no special meaning there.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix, pair_confusion_matrix

from pipeline.errors import FacemineError

UNASSIGNED = -1


def clustering_metrics(true_labels: np.ndarray, pred_labels: np.ndarray) -> dict[str, float]:
    """Pairwise, BCubed and NMI scores of a predicted clustering; see the module docstring."""
    truth = np.asarray(true_labels)
    predicted = singletons_for_unassigned(np.asarray(pred_labels))
    if truth.shape != predicted.shape or truth.ndim != 1:
        raise FacemineError(f"label arrays must be 1-D of equal length, got {truth.shape} and {predicted.shape}")
    if len(truth) == 0:
        raise FacemineError("cannot score an empty clustering")
    return {
        **_pairwise(truth, predicted),
        **_bcubed(truth, predicted),
        "nmi": float(normalized_mutual_info_score(truth, predicted)),
        **_counts(truth, predicted),
    }


def singletons_for_unassigned(labels: np.ndarray) -> np.ndarray:
    """Give every unassigned (-1) face a fresh label of its own."""
    relabelled = labels.astype(np.int64, copy=True)
    unassigned = relabelled == UNASSIGNED
    relabelled[unassigned] = relabelled.max(initial=UNASSIGNED) + 1 + np.arange(unassigned.sum())
    return relabelled


def _pairwise(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    # Ordered pair counts: C[1, 1] together in both, C[0, 1] together only in the prediction,
    # C[1, 0] together only in the truth (ordering doubles every count, which cancels in the ratios).
    pairs = pair_confusion_matrix(truth, predicted).astype(np.float64)
    together_both, predicted_only, true_only = pairs[1, 1], pairs[0, 1], pairs[1, 0]
    precision = _ratio(together_both, together_both + predicted_only)
    recall = _ratio(together_both, together_both + true_only)
    return {"pairwise_precision": precision, "pairwise_recall": recall, "pairwise_f": _harmonic(precision, recall)}


def _bcubed(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    # With n_ij faces of identity i in cluster j, face-level BCubed precision summed over the
    # cell's faces is n_ij * (n_ij / |cluster j|); recall likewise with |identity i|.
    table = contingency_matrix(truth, predicted, sparse=True).tocoo()
    identity_sizes = np.bincount(table.row, weights=table.data)
    cluster_sizes = np.bincount(table.col, weights=table.data)
    cells = table.data.astype(np.float64)
    precision = float(np.sum(cells**2 / cluster_sizes[table.col]) / len(truth))
    recall = float(np.sum(cells**2 / identity_sizes[table.row]) / len(truth))
    return {"bcubed_precision": precision, "bcubed_recall": recall, "bcubed_f": _harmonic(precision, recall)}


def _counts(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    sizes = np.unique(predicted, return_counts=True)[1]
    return {
        "n_clusters": int(np.sum(sizes >= 2)),
        "n_singletons": int(np.sum(sizes == 1)),
        "n_true_identities": int(len(np.unique(truth))),
        "n_faces": int(len(truth)),
    }


def _ratio(numerator: float, denominator: float) -> float:
    # No predicted (or true) pairs at all: nothing was claimed, so nothing was wrong.
    return float(numerator / denominator) if denominator > 0 else 1.0


def _harmonic(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
