"""Face verification metrics on held-out pairs: plain functions on numpy arrays.

A pair (a, b) is scored by the cosine of its two embeddings and accepted as "same person"
when the score is >= a threshold.

- Accuracy follows the LFW protocol: the pairs are split into 10 folds, and each fold is
  judged with the threshold that is best on the other 9, so the threshold is never chosen on
  the pairs it is evaluated on. Unlike LFW's fixed folds, folds here are stratified and
  shuffled with a seed, so pair lists sorted by label (LFW's pairs.csv is) still give folds
  holding both kinds.
- TAR at FAR: the share of same-person pairs accepted at the lowest threshold whose share of
  accepted different-person pairs stays <= FAR. It is measured on all pairs (no held-out
  fold) and is only as fine as 1 / number of different-person pairs: with fewer than 1/FAR
  of them it reports the TAR at zero false accepts, a pessimistic estimate.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import StratifiedKFold

DEFAULT_FAR_TARGETS = (1e-2, 1e-3)


@dataclass(frozen=True)
class VerificationReport:
    accuracy: float  # mean over folds, each with the threshold chosen on the other folds
    accuracy_std: float
    threshold: float  # mean of the per-fold thresholds
    auc: float
    tar_at_far: dict[float, float]
    num_same: int
    num_different: int

    def as_dict(self) -> dict[str, float]:
        """Flat metrics, e.g. for a per-epoch history: accuracy, ..., "tar@far=0.001"."""
        return {
            "accuracy": self.accuracy,
            "accuracy_std": self.accuracy_std,
            "threshold": self.threshold,
            "auc": self.auc,
            **{f"tar@far={far:g}": tar for far, tar in self.tar_at_far.items()},
        }


def pair_scores(embeddings_a: np.ndarray, embeddings_b: np.ndarray) -> np.ndarray:
    """Cosine similarity of row i of `embeddings_a` with row i of `embeddings_b`."""
    a = np.asarray(embeddings_a, dtype=np.float64)
    b = np.asarray(embeddings_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"pair sides must be two (N, D) arrays of one shape, got {a.shape} and {b.shape}")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.einsum("nd,nd->n", a, b) / np.maximum(norms, 1e-12)


def best_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy) maximising the accuracy of `score >= threshold` on these pairs.

    Among equally accurate cut points the highest wins; the threshold sits midway between the
    lowest accepted score and the next lower one, so held-out pairs scoring just below the
    lowest accepted one are not rejected by a hair.
    """
    same = np.asarray(same, dtype=bool)
    false_accept, true_accept, thresholds = roc_curve(same, scores, drop_intermediate=False)
    positives = same.sum()
    correct = true_accept * positives + (1.0 - false_accept) * (len(same) - positives)
    best = int(np.argmax(correct))
    # thresholds fall from +inf through every distinct score; no score lies between neighbours.
    threshold = thresholds[best] if best + 1 == len(thresholds) else (thresholds[best] + thresholds[best + 1]) / 2
    return float(threshold), float(correct[best] / len(same))


def cross_validated_accuracy(
    scores: np.ndarray, same: np.ndarray, n_folds: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Per-fold accuracies and thresholds, each fold judged with the best threshold of the others."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    _check_pairs(scores, same)
    folds = StratifiedKFold(n_splits=min(n_folds, same.sum(), (~same).sum()), shuffle=True, random_state=seed)
    accuracies, thresholds = [], []
    for fit, held_out in folds.split(scores, same):
        threshold, _ = best_threshold(scores[fit], same[fit])
        accuracies.append(np.mean((scores[held_out] >= threshold) == same[held_out]))
        thresholds.append(threshold)
    return np.array(accuracies), np.array(thresholds)


def tar_at_far(scores: np.ndarray, same: np.ndarray, far: float) -> tuple[float, float]:
    """(true-accept rate, threshold) at the lowest threshold whose false-accept rate is <= `far`."""
    false_accept, true_accept, thresholds = roc_curve(np.asarray(same, dtype=bool), scores, drop_intermediate=False)
    # false_accept rises along the curve; the last point still within `far` accepts the most.
    last_within = int(np.searchsorted(false_accept, far, side="right")) - 1
    return float(true_accept[last_within]), float(thresholds[last_within])


def evaluate_pairs(
    embeddings_a: np.ndarray,
    embeddings_b: np.ndarray,
    same: np.ndarray,
    far_targets: Sequence[float] = DEFAULT_FAR_TARGETS,
    n_folds: int = 10,
    seed: int = 0,
) -> VerificationReport:
    """Verification accuracy (10-fold CV), ROC AUC and TAR at each FAR for embedded pairs."""
    scores = pair_scores(embeddings_a, embeddings_b)
    same = np.asarray(same, dtype=bool)
    accuracies, thresholds = cross_validated_accuracy(scores, same, n_folds, seed)
    return VerificationReport(
        accuracy=float(accuracies.mean()),
        accuracy_std=float(accuracies.std()),
        threshold=float(thresholds.mean()),
        auc=float(roc_auc_score(same, scores)),
        tar_at_far={far: tar_at_far(scores, same, far)[0] for far in far_targets},
        num_same=int(same.sum()),
        num_different=int((~same).sum()),
    )


def sample_verification_pairs(
    labels: Sequence, max_pairs: int = 20_000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Balanced pairs over labelled samples: (index_a, index_b, same).

    Same-identity pairs: all of them when at most `max_pairs` exist, else `max_pairs` drawn at
    random; then as many distinct different-identity pairs, drawn uniformly.
    """
    codes = np.unique(np.asarray(labels), return_inverse=True)[1].ravel()
    rng = np.random.default_rng(seed)
    same_keys = _same_identity_pairs(codes, max_pairs, rng)
    different_keys = _different_identity_pairs(codes, len(same_keys), rng)
    keys = np.concatenate([same_keys, different_keys])
    same = np.arange(len(keys)) < len(same_keys)
    return keys // len(codes), keys % len(codes), same


def _check_pairs(scores: np.ndarray, same: np.ndarray) -> None:
    if scores.shape != same.shape or scores.ndim != 1:
        raise ValueError(f"scores and same flags must be two (N,) arrays, got {scores.shape} and {same.shape}")
    if same.sum() < 2 or (~same).sum() < 2:
        raise ValueError("verification needs at least 2 same-person and 2 different-person pairs")
    if not np.isfinite(scores).all():
        raise ValueError("pair scores contain NaN or infinity")


# Pairs travel as keys a * n + b with a < b: one integer per unordered pair, easy to deduplicate.


def _same_identity_pairs(codes: np.ndarray, max_pairs: int, rng: np.random.Generator) -> np.ndarray:
    n = len(codes)
    order = np.argsort(codes, kind="stable")  # members of each identity side by side
    sizes = np.bincount(codes)
    starts = np.cumsum(sizes) - sizes
    pair_counts = sizes * (sizes - 1) // 2
    if pair_counts.sum() <= max_pairs:
        keys = [np.empty(0, dtype=np.int64)]
        for start, size in zip(starts, sizes):
            members = order[start : start + size]
            first, second = np.triu_indices(size, 1)
            keys.append(_keys(members[first], members[second], n))
        return np.concatenate(keys)

    def draw(size: int) -> np.ndarray:
        # An identity weighted by its pair count, then two of its members: uniform over pairs.
        identity = rng.choice(len(sizes), size=size, p=pair_counts / pair_counts.sum())
        first = rng.integers(sizes[identity])
        second = rng.integers(sizes[identity] - 1)
        second += second >= first
        return _keys(order[starts[identity] + first], order[starts[identity] + second], n)

    return _distinct_keys(draw, max_pairs, rng)


def _different_identity_pairs(codes: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    n = len(codes)
    available = (n * n - int(np.sum(np.bincount(codes).astype(np.int64) ** 2))) // 2

    def draw(size: int) -> np.ndarray:
        first, second = rng.integers(n, size=(2, size))
        differ = codes[first] != codes[second]
        return _keys(first[differ], second[differ], n)

    return _distinct_keys(draw, min(count, available), rng)


def _keys(first: np.ndarray, second: np.ndarray, n: int) -> np.ndarray:
    return np.minimum(first, second).astype(np.int64) * n + np.maximum(first, second)


def _distinct_keys(draw: Callable[[int], np.ndarray], count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` distinct keys out of repeated uniform draws: a uniform random subset."""
    keys = np.empty(0, dtype=np.int64)
    while len(keys) < count:
        keys = np.union1d(keys, draw(2 * count))
    return rng.permutation(keys)[:count]
