"""Scale of k-NN graph + clustering: facemine against a scikit-learn baseline on the same data.

Data: synthetic face embeddings, unit vectors in 128-d scattered around N/20 random identity
centres (cosine about 0.6 between two faces of one identity, about 0 between identities: the
geometry of SFace embeddings), identical for every row of one size.

Rows, each run in its own subprocess so its time and peak memory are its own:
- facemine: `pipeline.cluster.cluster` with default `ClusterConfig` (faiss k-NN graph: exact
  up to `exact_index_max_cpu`, IVF above, GPU when present; then Infomap);
- facemine-vs (with --compare FIELD=VALUE...): the facemine row again with these fields changed
  too, e.g. an earlier default, run right after it so both see the same machine load;
- facemine-exact: the same with an exact (brute-force) faiss index at every size, showing what
  the IVF index saves and whether it costs quality;
- sklearn-dbscan: scikit-learn's exact brute-force k-NN graph (`NearestNeighbors`, cosine) and
  DBSCAN on it, the textbook baseline.
The last two stop above --baseline-max, where they would take hours on a CPU.

Scale-out row (--subsets S): S subsets of --subset-size faces (default 1,000 x 10,000 = 10M),
clustered as one task per subset on a local Dask cluster (`distributed.LocalCluster`, --workers
processes of one thread) by `pipeline.cluster.cluster_subset`, then merged across subsets on the
driver by `merge_clusters`, which reads only each cluster's centroid and representatives. Each
task generates its own subset from the seed (`subset_faces`), so no embeddings leave the driver,
and returns only its labels and cluster summary (its k-NN graph, which `cluster_faces` reads for
confidences, stays on the worker). Identities span subsets: each appears in about
SUBSETS_PER_IDENTITY consecutive subsets, so the merge has real work. Printed: wall time of the
per-subset phase and of the merge, the summed task time, peak memory of each worker process and
of the driver (which also hosts the scheduler), BCubed F before and after the merge, and on paper
the time on N machines (the per-subset phase divides by the workers; the merge does not).

Every row prints CPU seconds beside wall seconds and the load average: on a shared machine the
wall clock measures the other users as much as facemine.

    .venv/bin/python benchmarks/cluster_scale.py [--sizes 100000 1000000] [--baseline-max 100000]
        [--subsets 1000] [--subset-size 10000] [--workers 2] [--set ivf_nprobe=16 ...]
        [--compare ivf_codes='"flat"' ivf_nprobe=32 ...]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
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


SUBSET_SIZE = 10_000
SUBSETS_PER_IDENTITY = 3


def identity_centres(identities: np.ndarray, seed: int = 0) -> np.ndarray:
    """Unit centre of each identity id, the same in every task (seeded by the id alone)."""
    centres = np.stack([np.random.default_rng([seed, 0, int(i)]).standard_normal(DIM) for i in identities])
    return (centres / np.linalg.norm(centres, axis=1, keepdims=True)).astype(np.float32)


def subset_faces(subset: int, n_subsets: int, size: int = SUBSET_SIZE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One subset's (size, DIM) unit embeddings and global identity labels, from the seed alone.

    Identities sit on a ring; subset s draws its faces uniformly from a window of
    size / FACES_PER_IDENTITY of them, starting 1/SUBSETS_PER_IDENTITY of a window after subset
    s-1's, so each identity appears in about SUBSETS_PER_IDENTITY subsets (same geometry as
    `synthetic_faces`).
    """
    per_subset = max(size // FACES_PER_IDENTITY, 1)
    stride = max(per_subset // SUBSETS_PER_IDENTITY, 1)
    window = (subset * stride + np.arange(per_subset)) % max(n_subsets * stride, per_subset)
    rng = np.random.default_rng([seed, 1, subset])
    local = rng.integers(0, per_subset, size)
    vectors = identity_centres(window, seed)[local]
    vectors += NOISE * rng.standard_normal(vectors.shape, dtype=np.float32) / np.sqrt(DIM)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), window[local]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Phases:
    """Wall and CPU seconds (all threads of this process) of consecutive phases."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.restart()

    def restart(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def end(self, name: str) -> None:
        self.wall[name] = time.perf_counter() - self._wall
        self.cpu[name] = time.process_time() - self._cpu
        self.restart()


def cluster_config(overrides: dict, **fixed):
    """Default `ClusterConfig` with --set overrides (and a row's own fixed fields)."""
    from pipeline.config import ClusterConfig

    return ClusterConfig(**{**overrides, **fixed})


def run_facemine(vectors: np.ndarray, overrides: dict, phases: Phases, exact: bool = False) -> np.ndarray:
    from pipeline.cluster import cluster, knn_graph

    everything = len(vectors)
    exact_index = {"exact_index_max_cpu": everything, "exact_index_max_gpu": everything} if exact else {}
    config = cluster_config(overrides, **exact_index)
    phases.restart()
    graph = knn_graph(vectors, config)
    phases.end("knn")
    labels = cluster(vectors, config, graph)
    phases.end("cluster")
    return labels


def run_sklearn_dbscan(vectors: np.ndarray, overrides: dict, phases: Phases) -> np.ndarray:
    from sklearn.cluster import DBSCAN
    from sklearn.neighbors import NearestNeighbors

    config = cluster_config(overrides)
    phases.restart()
    search = NearestNeighbors(n_neighbors=config.k, metric="cosine", algorithm="brute", n_jobs=-1).fit(vectors)
    distances = search.kneighbors_graph(mode="distance")
    phases.end("knn")
    dbscan = DBSCAN(eps=config.dbscan_eps, min_samples=config.dbscan_min_samples, metric="precomputed")
    labels = dbscan.fit_predict(distances)
    phases.end("cluster")
    return labels


METHODS = {
    "facemine": run_facemine,
    "facemine-exact": partial(run_facemine, exact=True),
    "sklearn-dbscan": run_sklearn_dbscan,
}
# Rows that run at every size; the others stop at --baseline-max.
SCALABLE = {"facemine"}


def worker(method: str, size: int, overrides: dict) -> dict:
    from pipeline.evaluate import clustering_metrics

    load_before = os.getloadavg()[0]
    vectors, truth = synthetic_faces(size)
    data_mib = peak_rss_mib()
    phases = Phases()
    labels = METHODS[method](vectors, overrides, phases)
    metrics = clustering_metrics(truth, labels)
    return {
        "method": method,
        "size": size,
        "knn_s": phases.wall["knn"],
        "cluster_s": phases.wall["cluster"],
        "total_s": phases.wall["knn"] + phases.wall["cluster"],
        "knn_cpu_s": phases.cpu["knn"],
        "cluster_cpu_s": phases.cpu["cluster"],
        "peak_mib": peak_rss_mib(),
        "data_mib": data_mib,
        "bcubed_f": metrics["bcubed_f"],
        "pairwise_f": metrics["pairwise_f"],
        "load": (load_before, os.getloadavg()[0]),
    }


def cluster_subset_task(subset: int, n_subsets: int, size: int, overrides: dict) -> dict:
    """One Dask task: generate the subset, cluster it; return its labels and cluster summary."""
    from dataclasses import replace

    from pipeline.cluster import cluster_subset

    phases = Phases()
    vectors, truth = subset_faces(subset, n_subsets, size)
    result = cluster_subset(vectors, cluster_config(overrides))  # collects its own garbage cycles
    phases.end("task")
    # The k-NN graph (what `cluster_faces` reads for confidences) stays here: labels need only the summary.
    no_graph = np.zeros((len(vectors), 0))
    return {
        "subset": subset,
        "truth": truth,
        "result": replace(result, neighbours=no_graph.astype(np.int32), weights=no_graph.astype(np.float32)),
        "seconds": phases.wall["task"],
        "cpu_seconds": phases.cpu["task"],
        "pid": os.getpid(),
        "peak_mib": peak_rss_mib(),
    }


def run_scale_out(n_subsets: int, size: int, workers: int, overrides: dict) -> dict:
    """Per-subset tasks on a local Dask cluster, then the cross-subset merge on the driver."""
    from distributed import Client, LocalCluster, as_completed

    from pipeline.cluster import combine_summaries, merge_clusters
    from pipeline.evaluate import clustering_metrics

    load_before = os.getloadavg()[0]
    # Worker processes are spawned: they find `pipeline` through PYTHONPATH.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    driver_base = peak_rss_mib()
    results: list[dict | None] = [None] * n_subsets
    worker_peak: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="cluster_scale_dask_") as scratch, LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
        local_directory=scratch, memory_limit=0,
    ) as local, Client(local) as client:
        # Imports (faiss, infomap, scikit-learn) happen once per worker, before the clock starts.
        client.run(__import__, "pipeline.cluster")
        worker_base = sorted(client.run(peak_rss_mib).values())
        phases = Phases()
        futures = client.map(
            cluster_subset_task, range(n_subsets), n_subsets=n_subsets, size=size, overrides=overrides, pure=False
        )
        for future, done in as_completed(futures, with_results=True):
            results[done["subset"]] = done
            worker_peak[done["pid"]] = max(worker_peak.get(done["pid"], 0.0), done["peak_mib"])
            future.release()
        phases.end("subsets")
    load_after_subsets = os.getloadavg()[0]
    driver_after_subsets = peak_rss_mib()

    task_seconds = sum(done["seconds"] for done in results)
    task_cpu_seconds = sum(done["cpu_seconds"] for done in results)
    per_subset = [done["result"] for done in results]
    truth = np.concatenate([done["truth"] for done in results])
    del results
    phases.restart()
    summary = combine_summaries(per_subset)
    groups = merge_clusters(summary, cluster_config(overrides))
    phases.end("merge")
    driver_after_merge = peak_rss_mib()

    # Cluster i of the summary is the i-th smallest label >= 0 of its subset, subsets in order.
    offsets = np.cumsum([0] + [len(result.centroids) for result in per_subset])
    local_labels = np.concatenate([
        np.where(labels >= 0, np.searchsorted(np.unique(labels[labels >= 0]), labels) + offset, -1)
        for labels, offset in ((result.labels, offset) for result, offset in zip(per_subset, offsets))
    ])
    merged = np.where(local_labels >= 0, groups[np.maximum(local_labels, 0)], -1)
    before = clustering_metrics(truth, local_labels)
    after = clustering_metrics(truth, merged)
    return {
        "subsets": n_subsets,
        "subset_size": size,
        "workers": workers,
        "faces": len(truth),
        "identities": int(len(np.unique(truth))),
        "clusters": int(len(summary.centroids)),
        "merges": int(len(summary.centroids) - len(np.unique(groups))),
        "subsets_s": phases.wall["subsets"],
        "task_s": task_seconds,
        "task_cpu_s": task_cpu_seconds,
        "merge_s": phases.wall["merge"],
        "merge_cpu_s": phases.cpu["merge"],
        "worker_base_mib": worker_base,
        "worker_peak_mib": sorted(worker_peak.values()),
        "driver_base_mib": driver_base,
        "driver_subsets_mib": driver_after_subsets,
        "driver_merge_mib": driver_after_merge,
        "driver_peak_mib": peak_rss_mib(),
        "bcubed_f_before_merge": before["bcubed_f"],
        "bcubed_f": after["bcubed_f"],
        "bcubed_precision": after["bcubed_precision"],
        "bcubed_recall": after["bcubed_recall"],
        "load": (load_before, load_after_subsets, os.getloadavg()[0]),
    }


def run_worker(arguments: list[str]) -> dict:
    """Run one row in a fresh interpreter, so that its time and peak memory are its own."""
    completed = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        return {"error": completed.stderr.strip().splitlines()[-1:]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'faces':>9} {'method':<15} {'kNN s':>8} {'cluster s':>10} {'total s':>8} {'CPU s':>7}"
        f" {'peak MiB':>9} {'above data':>10} {'BCubed F':>9} {'pair F':>7} {'load':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        if "error" in row or "skipped" in row:
            print(f"{row['size']:>9} {row['method']:<15} {row.get('skipped') or row['error']}")
            continue
        print(
            f"{row['size']:>9} {row['method']:<15} {row['knn_s']:>8.1f} {row['cluster_s']:>10.1f}"
            f" {row['total_s']:>8.1f} {row['knn_cpu_s'] + row['cluster_cpu_s']:>7.0f}"
            f" {row['peak_mib']:>9.0f} {row['peak_mib'] - row['data_mib']:>10.0f}"
            f" {row['bcubed_f']:>9.3f} {row['pairwise_f']:>7.3f} {row['load'][0]:>4.1f}-{row['load'][1]:<4.1f}"
        )


def print_scale_out(row: dict, machines: tuple[int, ...] = (1, 10, 100)) -> None:
    if "error" in row:
        print(f"{row['subsets']} subsets: {row['error']}")
        return
    workers = row["workers"]
    print(
        f"\n{row['faces']:,} faces in {row['subsets']} subsets of {row['subset_size']:,}"
        f" ({row['identities']:,} identities, each in about {SUBSETS_PER_IDENTITY} subsets),"
        f" {workers} Dask worker processes of 1 thread (load average {row['load'][0]:.1f} at the start,"
        f" {row['load'][1]:.1f} after the tasks, {row['load'][2]:.1f} at the end):"
    )
    print(
        f"  per-subset phase {row['subsets_s']:.1f} s wall; tasks summed {row['task_s']:.1f} s"
        f" ({row['task_cpu_s']:.1f} s CPU), {row['task_s'] / row['subsets']:.2f} s per subset"
    )
    print(
        f"  merge of {row['clusters']:,} clusters on the driver {row['merge_s']:.1f} s"
        f" ({row['merge_cpu_s']:.1f} s CPU, {row['merges']:,} merges)"
    )
    print(f"  total {row['subsets_s'] + row['merge_s']:.1f} s")
    print(
        f"  peak memory (MiB): workers {', '.join(f'{mib:.0f}' for mib in row['worker_peak_mib'])}"
        f" ({', '.join(f'{mib:.0f}' for mib in row['worker_base_mib'])} after imports);"
        f" driver with scheduler {row['driver_base_mib']:.0f} after imports,"
        f" {row['driver_subsets_mib']:.0f} after the tasks, {row['driver_merge_mib']:.0f} after the merge,"
        f" {row['driver_peak_mib']:.0f} after scoring"
    )
    print(
        f"  BCubed F {row['bcubed_f']:.4f} (P {row['bcubed_precision']:.4f}, R {row['bcubed_recall']:.4f});"
        f" before the merge {row['bcubed_f_before_merge']:.4f}"
    )
    # On paper: the tasks spread over every worker of every machine; the merge runs once, on one.
    # A task is single-threaded, so on an idle core its wall time is its CPU time: the CPU
    # column holds for an idle machine, whatever the load during this run.
    print(f"  on paper, N machines of {workers} workers: summed task time / (N x {workers}) + merge,"
          f" from this run's wall times | from CPU times (idle machine)")
    for count in machines:
        print(
            f"    N={count:<4} {row['task_s'] / (count * workers) + row['merge_s']:8.1f} s"
            f" | {row['task_cpu_s'] / (count * workers) + row['merge_cpu_s']:8.1f} s"
        )


def parse_override(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    return key, json.loads(value)


def set_arguments(overrides: dict) -> list[str]:
    return ["--set", *(f"{key}={json.dumps(value)}" for key, value in overrides.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000],
                        help="single-machine rows: numbers of faces (none: skip)")
    parser.add_argument("--baseline-max", type=int, default=100_000, help="largest size the baseline runs on")
    parser.add_argument("--subsets", type=int, nargs="*", default=[1_000],
                        help="scale-out rows: number of subsets (none: skip)")
    parser.add_argument("--subset-size", type=int, default=SUBSET_SIZE, help="faces per subset")
    parser.add_argument("--workers", type=int, default=2, help="Dask worker processes")
    parser.add_argument("--set", type=parse_override, nargs="*", default=[], metavar="FIELD=VALUE",
                        help="ClusterConfig fields to change from their defaults, e.g. ivf_nprobe=16")
    parser.add_argument("--compare", type=parse_override, nargs="*", default=[], metavar="FIELD=VALUE",
                        help="add a facemine-vs row at every size with these fields changed on top of --set")
    parser.add_argument("--worker", choices=sorted([*METHODS, "scale-out"]), help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = dict(args.set)
    if args.worker == "scale-out":
        print(json.dumps(run_scale_out(args.subsets[0], args.subset_size, args.workers, overrides)))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.sizes[0], overrides)))
        return
    passed = set_arguments(overrides)
    rows = []
    for size in args.sizes:
        for method in METHODS:
            if method not in SCALABLE and size > args.baseline_max:
                skipped = f"skipped (> --baseline-max {args.baseline_max})"
                rows.append({"method": method, "size": size, "skipped": skipped})
                continue
            row = run_worker(["--worker", method, "--sizes", str(size), *passed])
            rows.append({"method": method, "size": size, **row})
            print(f"done: {method} on {size} faces", file=sys.stderr, flush=True)
            if method == "facemine" and args.compare:
                compared = set_arguments({**overrides, **dict(args.compare)})
                row = run_worker(["--worker", method, "--sizes", str(size), *compared])
                rows.append({"size": size, **row, "method": "facemine-vs"})
                print(f"done: facemine-vs on {size} faces", file=sys.stderr, flush=True)
    if rows:
        print_table(rows)
    if args.compare:
        print("facemine-vs: facemine with " + ", ".join(f"{key}={value!r}" for key, value in args.compare))
    for n_subsets in args.subsets:
        arguments = ["--worker", "scale-out", "--subsets", str(n_subsets), "--subset-size", str(args.subset_size),
                     "--workers", str(args.workers), *passed]
        print_scale_out({"subsets": n_subsets, **run_worker(arguments)})


if __name__ == "__main__":
    main()
