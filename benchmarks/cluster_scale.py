"""Scale of k-NN graph + clustering: facemine against a scikit-learn baseline on the same data.

Data: synthetic face embeddings, unit vectors in 128-d scattered around N/20 random identity
centres (cosine about 0.6 between two faces of one identity, about 0 between identities: the
geometry of SFace embeddings), identical for every row of one size.

Rows, each run in its own subprocess so its time and peak memory are its own:
- facemine: `pipeline.cluster.cluster` with default `ClusterConfig` (faiss k-NN graph: exact
  up to `exact_index_max_cpu`, IVF above, GPU when present; then Infomap);
- facemine-exact: the same with an exact (brute-force) faiss index at every size, showing what
  the IVF index saves and whether it costs quality;
- sklearn-dbscan: scikit-learn's exact brute-force k-NN graph (`NearestNeighbors`, cosine) and
  DBSCAN on it, the textbook baseline.
The last two stop above --baseline-max, where they would take hours on a CPU.

    .venv/bin/python benchmarks/cluster_scale.py [--sizes 100000 1000000] [--baseline-max 100000]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DIM = 128
FACES_PER_IDENTITY = 20
NOISE = 0.8
CHUNK = 100_000


def synthetic_faces(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, DIM) float32 unit embeddings and their identity labels, built in chunks to bound memory."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(n // FACES_PER_IDENTITY, 1), DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, len(centres), n)
    vectors = np.empty((n, DIM), np.float32)
    for start in range(0, n, CHUNK):
        part = centres[labels[start:start + CHUNK]]
        part += NOISE * rng.standard_normal(part.shape, dtype=np.float32) / np.sqrt(DIM)
        vectors[start:start + CHUNK] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return vectors, labels


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_facemine(vectors: np.ndarray, exact: bool = False) -> tuple[np.ndarray, float, float]:
    from pipeline.cluster import cluster, knn_graph
    from pipeline.config import ClusterConfig

    everything = len(vectors)
    config = ClusterConfig(exact_index_max_cpu=everything, exact_index_max_gpu=everything) if exact else ClusterConfig()
    started = time.perf_counter()
    graph = knn_graph(vectors, config)
    knn_seconds = time.perf_counter() - started
    labels = cluster(vectors, config, graph)
    return labels, knn_seconds, time.perf_counter() - started - knn_seconds


def run_sklearn_dbscan(vectors: np.ndarray) -> tuple[np.ndarray, float, float]:
    from sklearn.cluster import DBSCAN
    from sklearn.neighbors import NearestNeighbors

    from pipeline.config import ClusterConfig

    config = ClusterConfig()
    started = time.perf_counter()
    search = NearestNeighbors(n_neighbors=config.k, metric="cosine", algorithm="brute", n_jobs=-1).fit(vectors)
    distances = search.kneighbors_graph(mode="distance")
    knn_seconds = time.perf_counter() - started
    dbscan = DBSCAN(eps=config.dbscan_eps, min_samples=config.dbscan_min_samples, metric="precomputed")
    labels = dbscan.fit_predict(distances)
    return labels, knn_seconds, time.perf_counter() - started - knn_seconds


METHODS = {
    "facemine": run_facemine,
    "facemine-exact": partial(run_facemine, exact=True),
    "sklearn-dbscan": run_sklearn_dbscan,
}
# Rows that run at every size; the others stop at --baseline-max.
SCALABLE = {"facemine"}


def worker(method: str, size: int) -> dict:
    from pipeline.evaluate import clustering_metrics

    vectors, truth = synthetic_faces(size)
    data_mib = peak_rss_mib()
    labels, knn_seconds, cluster_seconds = METHODS[method](vectors)
    metrics = clustering_metrics(truth, labels)
    return {
        "method": method,
        "size": size,
        "knn_s": knn_seconds,
        "cluster_s": cluster_seconds,
        "total_s": knn_seconds + cluster_seconds,
        "peak_mib": peak_rss_mib(),
        "data_mib": data_mib,
        "bcubed_f": metrics["bcubed_f"],
        "pairwise_f": metrics["pairwise_f"],
    }


def measure(method: str, size: int) -> dict:
    completed = subprocess.run(
        [sys.executable, __file__, "--worker", method, "--sizes", str(size)],
        capture_output=True, text=True, check=False,
    )
    if completed.returncode != 0:
        return {"method": method, "size": size, "error": completed.stderr.strip().splitlines()[-1:]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'faces':>9} {'method':<15} {'kNN s':>8} {'cluster s':>10} {'total s':>8}"
        f" {'peak MiB':>9} {'above data':>10} {'BCubed F':>9} {'pair F':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        if "error" in row or "skipped" in row:
            print(f"{row['size']:>9} {row['method']:<15} {row.get('skipped') or row['error']}")
            continue
        print(
            f"{row['size']:>9} {row['method']:<15} {row['knn_s']:>8.1f} {row['cluster_s']:>10.1f}"
            f" {row['total_s']:>8.1f} {row['peak_mib']:>9.0f} {row['peak_mib'] - row['data_mib']:>10.0f}"
            f" {row['bcubed_f']:>9.3f} {row['pairwise_f']:>7.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--baseline-max", type=int, default=100_000, help="largest size the baseline runs on")
    parser.add_argument("--worker", choices=sorted(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.sizes[0])))
        return
    rows = []
    for size in args.sizes:
        for method in METHODS:
            if method not in SCALABLE and size > args.baseline_max:
                skipped = f"skipped (> --baseline-max {args.baseline_max})"
                rows.append({"method": method, "size": size, "skipped": skipped})
                continue
            rows.append(measure(method, size))
            print(f"done: {method} on {size} faces", file=sys.stderr, flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
