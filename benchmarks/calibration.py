"""Per-model calibrated clustering floor vs the fixed default floor, on LFW and CelebA.

For each set (largest face per labelled photo, SFace; the people sample and embedding cache of
benchmarks/review_queue.py, mined into the store benchmarks/cluster_quality.py fills):
the calibrated floor (pipeline.calibration: the lowest similarity above which at most a quarter
of the k-NN links are expected impostors, from the random-pair impostor median / MAD; no labels
read) and the default clustering at it, beside the fixed default floor (ClusterConfig's
min_similarity) and the best floor of a grid (an oracle that reads the labels), BCubed F/P/R.
On sets of more than 2,000 faces also the floor calibrated on a uniform 2,000-face sample for
the whole set (`collection_faces`).

    .venv/bin/python benchmarks/calibration.py [--sets lfw celeba] [--photos N]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.review_queue import PHOTOS, cached_embeddings  # noqa: E402
from pipeline.calibration import calibrate  # noqa: E402
from pipeline.cluster import cluster  # noqa: E402
from pipeline.config import ClusterConfig  # noqa: E402
from pipeline.evaluate import clustering_metrics  # noqa: E402

GRID = [round(0.27 + 0.01 * step, 2) for step in range(23)]  # 0.27 .. 0.49
SAMPLE_FACES = 2_000


def bcubed(vectors: np.ndarray, truth: np.ndarray, floor: float) -> dict:
    metrics = clustering_metrics(truth, cluster(vectors, ClusterConfig(min_similarity=floor)))
    return {"floor": floor, **{name: metrics[f"bcubed_{name}"] for name in ("f", "precision", "recall")}}


def evaluate_set(name: str, photos: int) -> list[dict]:
    vectors, truth = cached_embeddings(name, photos)
    calibration = calibrate(vectors)
    label = f"{name} ({len(truth)} faces, {len(np.unique(truth))} ids)"
    rows = [
        {"set": label, "floor from": "fixed default", **bcubed(vectors, truth, ClusterConfig().min_similarity)},
        {"set": label, "floor from": "calibrated (no labels)", **bcubed(vectors, truth, calibration["cluster_min_similarity"])},
    ]
    if len(vectors) > SAMPLE_FACES:
        # As the gate calibrates: on a uniform sample of the collection, scaled to its size.
        sample = vectors[np.random.default_rng(0).choice(len(vectors), SAMPLE_FACES, replace=False)]
        floor = calibrate(sample, collection_faces=len(vectors))["cluster_min_similarity"]
        rows.append({"set": label, "floor from": f"calibrated on {SAMPLE_FACES:,} faces", **bcubed(vectors, truth, floor)})
    best = max((bcubed(vectors, truth, floor) for floor in GRID), key=lambda row: row["f"])
    rows.append({"set": label, "floor from": "best of grid (reads labels)", **best})
    print(f"{name}: impostor centre {calibration['impostor_centre']:.4f}, spread {calibration['impostor_spread']:.4f}",
          flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["lfw", "celeba"])
    parser.add_argument("--photos", type=int, default=None,
                        help="photos per set, whole people drawn at random (0: all; default: review_queue.py's sample)")
    args = parser.parse_args()
    table = pd.DataFrame([
        row for name in args.sets for row in evaluate_set(name, PHOTOS[name] if args.photos is None else args.photos)
    ])
    with pd.option_context("display.width", 200):
        print(table.round(4).to_string(index=False))


if __name__ == "__main__":
    main()
