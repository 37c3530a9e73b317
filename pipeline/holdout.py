"""Held-out evaluation of an embedder: which people judge it, verification pairs, clustering.

Two kinds of held-out data:
- photos the user configured (validation pairs / labelled photos): never mined; each one
  contributes its largest detected face (the convention for photos labelled with one person,
  see `usecases.evaluation`);
- identities of the store itself, chosen by `choose_holdout_identities` and kept out of
  training: those a person reviewed, else a share of the pseudo-identities.

Metric names carry the prefix of their family so they can sit in one dictionary:
`verification_*` (pipeline.verification) and `clustering_*` (pipeline.evaluate). Clustering is
scored at the model's own calibrated floor (pipeline.calibration), never at one fixed floor.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.cluster import UNASSIGNED, cluster, knn_graph
from pipeline.config import ClusterConfig
from pipeline.detect import Detection
from pipeline.evaluate import clustering_metrics
from pipeline.gate import BEST_BCUBED_F
from pipeline.graph import KnnGraph
from pipeline.verification import evaluate_pairs, sample_verification_pairs

# What judged a gate, best first (GateConfig's docs and the gate's record use these words).
CONFIGURED, REVIEWED, PSEUDO = "configured", "reviewed", "pseudo"
JUDGED_BY = {
    CONFIGURED: "validation pairs / labelled photos the user configured",
    REVIEWED: "identities a person reviewed (accepted, named or locked), held out from training",
    PSEUDO: "pseudo-identities held out from training (labels made by the current model: this favours it)",
}


@dataclass(frozen=True)
class HoldoutChoice:
    source: str  # REVIEWED or PSEUDO; "" when no identity can be held out
    identities: list[int]  # held out from training, judged on
    reason: str  # why nothing could be held out, else ""


def _stable_order(identities: Sequence[int], seed: int) -> list[int]:
    """Identities in a seeded hash order: the same identity stays held out across iterations
    (identity ids continue across clustering runs), and the choice does not favour old or big ones."""
    key = lambda identity: hashlib.sha256(f"{seed}:{identity}".encode()).hexdigest()  # noqa: E731
    return sorted(identities, key=key)


def choose_holdout_identities(
    identities: pd.DataFrame, share: float, min_identities: int, seed: int = 0
) -> HoldoutChoice:
    """Which exported identities judge the gate instead of being trained on.

    `identities`: one row per exported identity with columns identity, faces, reviewed (bool).
    Only identities with at least 2 faces can judge (a same-person pair needs two). Reviewed ones
    first: when at least `min_identities` of them qualify, they are held out (at most half of all
    identities, so training keeps data). Otherwise `share` of the qualifying pseudo-identities
    (at least `min_identities`), when at least as many remain to train on.
    """
    usable = identities[identities.faces >= 2]
    reviewed = _stable_order(usable[usable.reviewed.astype(bool)].identity.tolist(), seed)
    if len(reviewed) >= min_identities:
        return HoldoutChoice(REVIEWED, sorted(reviewed[: max(min_identities, len(identities) // 2)]), "")
    candidates = _stable_order(usable.identity.tolist(), seed)
    wanted = max(min_identities, int(round(share * len(candidates))))
    if len(identities) - wanted < wanted:
        return HoldoutChoice("", [], (
            f"the export has {len(identities)} identities ({len(candidates)} with 2+ faces): too few to hold "
            f"{wanted} out for the gate and train on as many"
        ))
    return HoldoutChoice(PSEUDO, sorted(candidates[:wanted]), "")


# Floors tried around a model's calibrated one for its best held-out BCubed F (`best_floor_metrics`).
FLOOR_OFFSETS = np.round(np.arange(-0.15, 0.1501, 0.01), 2)


def _graph(vectors: np.ndarray, config: ClusterConfig) -> KnnGraph | None:
    """The k-NN graph that clustering at every floor shares (the floor only filters its links)."""
    return knn_graph(vectors, config) if len(vectors) >= 2 else None


def _labels_at(vectors: np.ndarray, config: ClusterConfig, floor: float, graph: KnnGraph | None) -> np.ndarray:
    return cluster(vectors, config.model_copy(update={"min_similarity": floor}), graph=graph)


def best_floor_metrics(
    vectors: np.ndarray, identities: np.ndarray, config: ClusterConfig, floor: float, graph: KnnGraph | None
) -> dict[str, float]:
    """The best held-out BCubed F over floors within 0.15 of the calibrated `floor`, and that floor.

    It reads the labels, so it is no operating point; it tells a better model (better at its best
    floor too) from one whose gain at its calibrated floor only comes from where that floor fell.
    `graph`: the vectors' k-NN graph (`_graph`), built once for every floor."""
    scores = [
        (clustering_metrics(identities, _labels_at(vectors, config, floor + offset, graph))["bcubed_f"], floor + offset)
        for offset in FLOOR_OFFSETS
    ]
    best, at = max(scores, key=lambda score: score[0])
    return {BEST_BCUBED_F: best, "clustering_best_floor": round(float(at), 4)}


def identity_holdout_metrics(
    vectors: np.ndarray, identities: np.ndarray, floor: float, config: ClusterConfig, max_pairs: int, seed: int = 0
) -> dict[str, float]:
    """verification_* on pairs built from the held-out identities and clustering_* at `floor`.

    `vectors` (N, D) one row per held-out face, `identities` (N,) their identity. Pair
    measures are threshold-free (ROC AUC, TAR at FAR) or use a threshold chosen on other folds
    (accuracy), so each model is judged at its own operating point.
    """
    index_a, index_b, same = sample_verification_pairs(identities, max_pairs, seed)
    report = evaluate_pairs(vectors[index_a], vectors[index_b], same, seed=seed)
    graph = _graph(vectors, config)
    labels = _labels_at(vectors, config, floor, graph)
    return {
        **{f"verification_{name}": value for name, value in report.as_dict().items()},
        "verification_pairs": int(len(same)),
        **{f"clustering_{name}": value for name, value in clustering_metrics(identities, labels).items()},
        "clustering_floor": float(floor),
        **best_floor_metrics(vectors, identities, config, floor, graph),
        "holdout_faces": int(len(identities)),
        "holdout_identities": int(len(np.unique(identities))),
    }


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
    vectors: np.ndarray, found: np.ndarray, identities: np.ndarray, config: ClusterConfig, floor: float
) -> dict[str, float]:
    """Clustering metrics of `config`'s method at the model's `floor` over labelled photos; a
    faceless photo is a singleton."""
    labels = np.full(len(found), UNASSIGNED, np.int64)
    graph = _graph(vectors[found], config)
    labels[found] = _labels_at(vectors[found], config, floor, graph)
    # Faceless photos are singletons at every floor: the best floor is judged on the found faces.
    return {
        **{f"clustering_{name}": value for name, value in clustering_metrics(identities, labels).items()},
        "clustering_floor": float(floor),
        **best_floor_metrics(vectors[found], identities[found], config, floor, graph),
    }
