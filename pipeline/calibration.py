"""Per-model operating points found without ground truth: clustering floor and verification threshold.

Every embedder has its own similarity scale: a fine-tuned or distilled model may pull all faces
together (different people then score higher), so a floor tuned for one model means nothing for
another. The procedure, one for every model:

1. Draw random pairs of the mined faces (seeded). In any collection of more than a handful of
   people almost all of them are two different people, so their cosine similarities sample the
   model's different-person ("impostor") distribution; the few same-person pairs sit in its upper
   tail. Given the faces' pseudo-identities (their clusters), pairs inside one cluster are left
   out: in a store of a few people most random pairs would otherwise be one person.
2. Describe that distribution robustly, so those few same-person pairs do not move it: centre =
   median, spread = 1.4826 * median absolute deviation (the standard deviation of a normal).
3. Operating point = centre + z * spread, with one z per use for all models (`CLUSTER_FLOOR_Z`,
   `VERIFICATION_Z`). A model whose scale shifts or stretches gets a floor that shifts with it.

No labels are read: it runs on any mined collection, and a gate judging models on held-out
people can calibrate each of them on the same unlabelled faces.
"""
from __future__ import annotations

import numpy as np

PROCEDURE = "random-pair impostor median + z * MAD (v1)"
# The clustering floor sits this many impostor spreads above the impostor centre. Tuned on SFace
# over a sample of LFW (800 photos: z 2.7 -> floor 0.342, BCubed F 0.9781 vs 0.9588 at the fixed
# 0.39) and checked on a sample of CelebA (1,000 photos: floor 0.359, 0.9515 vs 0.9430);
# benchmarks/calibration.py, figures in the README.
CLUSTER_FLOOR_Z = 2.7
# A verification threshold accepting about one in a thousand different-person pairs if their
# scores were normal: the one-sided 0.999 quantile of N(0, 1).
VERIFICATION_Z = 3.09
MAX_PAIRS = 200_000
MAD_TO_STD = 1.4826


def impostor_statistics(
    vectors: np.ndarray, groups: np.ndarray | None = None, max_pairs: int = MAX_PAIRS, seed: int = 0
) -> tuple[float, float, int]:
    """(centre, spread, pairs used) of the cosine similarities of random distinct-face pairs.

    `vectors` (N, D), N >= 2; rows need not be normalised. `groups` (N,): pairs within one group
    (pseudo-identity) are left out.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    count = len(vectors)
    if count < 2:
        raise ValueError(f"calibration needs at least 2 faces, got {count}")
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    pairs = min(max_pairs, count * (count - 1) // 2)
    first = rng.integers(0, count, pairs)
    # An offset in 1..N-1 never pairs a face with itself.
    second = (first + rng.integers(1, count, pairs)) % count
    if groups is not None:
        groups = np.asarray(groups)
        apart = groups[first] != groups[second]
        if apart.sum() < 2:
            raise ValueError("calibration needs faces of at least 2 groups")
        first, second = first[apart], second[apart]
    similarities = np.einsum("nd,nd->n", unit[first], unit[second])
    centre = float(np.median(similarities))
    spread = float(MAD_TO_STD * np.median(np.abs(similarities - centre)))
    return centre, spread, len(first)


def calibrate(vectors: np.ndarray, groups: np.ndarray | None = None, seed: int = 0) -> dict:
    """The model's operating points on these faces (no ground truth; `groups`: their pseudo-identities)."""
    centre, spread, pairs = impostor_statistics(vectors, groups, seed=seed)
    return {
        "cluster_min_similarity": round(centre + CLUSTER_FLOOR_Z * spread, 4),
        "verification_threshold": round(centre + VERIFICATION_Z * spread, 4),
        "impostor_centre": round(centre, 4),
        "impostor_spread": round(spread, 4),
        "faces": int(len(vectors)),
        "pairs": int(pairs),
        "procedure": PROCEDURE,
    }
