"""Held-out evaluation of an embedder: verification pairs and clustering of labelled photos.

The held-out photos are never mined: each one contributes its largest detected face (the
convention for photos labelled with one person, see `flows.evaluate`). Metric names carry the
prefix of their family so they can sit in one dictionary: `verification_*` (pipeline.verification)
and `clustering_*` (pipeline.evaluate).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.cluster import UNASSIGNED, cluster
from pipeline.config import ClusterConfig
from pipeline.detect import Detection
from pipeline.evaluate import clustering_metrics
from pipeline.verification import evaluate_pairs


def largest_face(detections: Sequence[Detection]) -> Detection | None:
    """The detection with the largest box, None when there is none."""
    if not detections:
        return None
    return max(detections, key=lambda found: (found.box[2] - found.box[0]) * (found.box[3] - found.box[1]))


def verification_metrics(
    vectors: np.ndarray, found: np.ndarray, index_a: np.ndarray, index_b: np.ndarray, same: np.ndarray
) -> dict[str, float]:
    """Verification metrics over the pairs whose two photos both have a face.

    `vectors` (N, D) one row per photo (rows of photos without a face are ignored), `found` (N,)
    bool, pairs as photo indices. Pairs with a faceless photo are left out and counted.
    """
    usable = found[index_a] & found[index_b]
    report = evaluate_pairs(vectors[index_a[usable]], vectors[index_b[usable]], np.asarray(same, bool)[usable])
    return {
        **{f"verification_{name}": value for name, value in report.as_dict().items()},
        "verification_pairs": int(usable.sum()),
        "verification_pairs_without_face": int((~usable).sum()),
    }


def clustering_holdout_metrics(
    vectors: np.ndarray, found: np.ndarray, identities: np.ndarray, config: ClusterConfig
) -> dict[str, float]:
    """Clustering metrics of `config`'s method over labelled photos; a faceless photo is a singleton."""
    labels = np.full(len(found), UNASSIGNED, np.int64)
    labels[found] = cluster(vectors[found], config)
    return {f"clustering_{name}": value for name, value in clustering_metrics(identities, labels).items()}
