"""Clustering quality on real faces: every method side by side on the same SFace embeddings.

For ../shared/data/lfw and ../shared/data/celeba: photos are mined with facemine's own
pipeline (cached under benchmarks/results/), the largest face of each labelled photo is
clustered, and each method is scored against labels.csv (BCubed, pairwise, NMI), with time and
added peak memory. The default method runs with its default settings (one setting for both
sets); DBSCAN, HDBSCAN and HAC are each tuned per set on a grid and shown at their best, and
then at the one grid setting that does best on the worst set, as a default would have to.

    .venv/bin/python benchmarks/cluster_quality.py [--sets lfw celeba]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.measure import measured  # noqa: E402
from usecases.mining import mine_paths, shard_paths  # noqa: E402
from pipeline.cluster import cluster  # noqa: E402
from pipeline.config import ClusterConfig  # noqa: E402
from pipeline.evaluate import clustering_metrics  # noqa: E402
from storage import identities as identity_store  # noqa: E402
from storage.settings import Settings  # noqa: E402
from storage.store import Store  # noqa: E402

DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
# Cosine distances 0.40, 0.425, ..., 0.75: fine enough that a baseline's best is not missed.
STEPS = [round(0.4 + 0.025 * i, 3) for i in range(15)]
# Baseline grids: each baseline is tuned per set and reported at its best BCubed F.
GRIDS: dict[str, list[dict]] = {
    "dbscan": [{"dbscan_eps": eps, "dbscan_min_samples": m} for eps in STEPS for m in (1, 2, 3)],
    "hdbscan": [{"hdbscan_min_cluster_size": c, "hdbscan_min_samples": s} for c in (2, 3, 5, 8) for s in (1, 2, 5)],
    "hac": [{"hac_distance_threshold": t, "hac_linkage": link} for t in STEPS for link in ("average", "complete")],
}


def mined_store(name: str) -> Store:
    """A store holding every labelled photo of one set, mined once and reused."""
    settings = Settings(data_dir=RESULTS / f"store-{name}")
    store = Store(settings)
    labels = pd.read_csv(DATA / name / "labels.csv")
    paths = [str((DATA / name / p).resolve()) for p in labels.path]
    for shard in shard_paths(paths, settings.mine.shard_size):
        mine_paths(name, shard, settings)  # photos already stored are skipped
    return store


def largest_face_embeddings(store: Store, name: str) -> tuple[np.ndarray, np.ndarray]:
    labels = pd.read_csv(DATA / name / "labels.csv")
    labels["source_path"] = [str((DATA / name / p).resolve()) for p in labels.path]
    faces = identity_store.face_table(store)
    largest = faces.sort_values(["face_area", "face_id"], ascending=[False, True]).drop_duplicates("source_path")
    largest = largest.merge(labels, on="source_path")
    ids, vectors = store.load_embeddings(store.current_model().id, largest.face_id)
    truth = largest.set_index("face_id").loc[ids].identity
    return vectors, pd.factorize(truth)[0]


def score(vectors: np.ndarray, truth: np.ndarray, config: ClusterConfig) -> dict:
    with measured() as cost:
        labels = cluster(vectors, config)
    metrics = clustering_metrics(truth, labels)
    return metrics | {"seconds": cost.seconds, "added_mib": cost.added_rss_mib}


def evaluate_set(name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The side-by-side table of one set, and every baseline trial's BCubed F (method, params, set)."""
    vectors, truth = largest_face_embeddings(mined_store(name), name)
    rows = [{"method": "infomap (default)", "params": "defaults", **score(vectors, truth, ClusterConfig())}]
    components = ClusterConfig(method="components")
    rows.append({"method": "components", "params": "defaults", **score(vectors, truth, components)})
    trial_rows = []
    for method, grid in GRIDS.items():
        trials = [(params, score(vectors, truth, ClusterConfig(method=method, **params))) for params in grid]
        params, best = max(trials, key=lambda trial: trial[1]["bcubed_f"])
        rows.append({"method": f"{method} (tuned)", "params": str(params), **best})
        trial_rows += [{"method": method, "params": str(p), "set": name, "bcubed_f": m["bcubed_f"]} for p, m in trials]
    table = pd.DataFrame(rows)
    table.insert(0, "set", f"{name} ({len(truth)} faces, {len(np.unique(truth))} ids)")
    return table, pd.DataFrame(trial_rows)


def print_shared_settings(tables: list[pd.DataFrame], trials: pd.DataFrame) -> None:
    """Each baseline at the one grid setting whose worst set is best, like the default's one setting."""
    default = {table.set.iloc[0].split()[0]: table.bcubed_f.iloc[0] for table in tables}
    print(f"one setting for all sets (worst set's BCubed F): infomap (default) {min(default.values()):.4f}"
          f" {' '.join(f'{name}={value:.4f}' for name, value in default.items())}")
    per_setting = trials.pivot_table(index=["method", "params"], columns="set", values="bcubed_f")
    worst = per_setting.min(axis=1)
    for method in GRIDS:
        params = worst.loc[method].idxmax()
        scores = per_setting.loc[(method, params)]
        print(f"  {method:8} {worst.loc[(method, params)]:.4f} "
              f"{' '.join(f'{name}={value:.4f}' for name, value in scores.items())} at {params}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["lfw", "celeba"])
    args = parser.parse_args()
    columns = ["set", "method", "bcubed_f", "bcubed_precision", "bcubed_recall", "pairwise_f", "nmi",
               "n_clusters", "n_singletons", "seconds", "added_mib", "params"]
    results = [evaluate_set(name) for name in args.sets]
    tables = [table for table, _ in results]
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 60):
        for table in tables:
            print(table[columns].round(4).to_string(index=False))
            default = table.bcubed_f.iloc[0]
            best_baseline = table[table.method.str.endswith("(tuned)")].bcubed_f.max()
            verdict = "beats" if default > best_baseline else "does NOT beat"
            print(f"-> default {default:.4f} {verdict} the best tuned DBSCAN/HDBSCAN/HAC {best_baseline:.4f}\n")
    print_shared_settings(tables, pd.concat([trials for _, trials in results]))


if __name__ == "__main__":
    main()
