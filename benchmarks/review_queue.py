"""Review queue on real faces: does it put planted clustering mistakes among its first items?

For ../shared/data/lfw and ../shared/data/celeba, the largest face of each labelled photo is
embedded with SFace (photos mined as benchmarks/cluster_quality.py does; the embeddings are cached
under benchmarks/results/) and clustered with the default settings. Into that labelling errors are
planted, each in identities the clustering got right (one person, and most of that person):
- mixed: an identity merged with the nearest other one (look-alikes are what a clusterer mixes);
- should-merge: an identity cut in two by 2-means (a clusterer splits a person by pose or age);
- moved: one face moved into the identity nearest to it that is not its own.
The queue (`labeling.queue.rank_items`, default settings) is scored by recall of the planted
errors in its first 20 and 50 items (a mix counts when its identity is flagged as mixed, a split
when the two halves are proposed for merging, a moved face when it is among the suspects of its
new identity), its precision (items in the first 50 that point at a real error, planted or left
by the clustering), and the reviewer time this implies at an assumed SECONDS_PER_ITEM per item.
Baselines show every identity once, largest first, or least cohesive first (mean similarity of
each face to the rest of its identity); they have no merge proposals, so a split counts when both
halves are shown and a moved face when its new identity is.

    .venv/bin/python benchmarks/review_queue.py [--sets celeba lfw] [--plant 10]
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.cluster_quality import DATA, RESULTS  # noqa: E402
from usecases.mining import mine_paths, shard_paths  # noqa: E402
from labeling.queue import MERGE, MIXED, rank_items  # noqa: E402
from pipeline.cluster import cluster_faces, identity_centroids  # noqa: E402
from pipeline.config import ClusterConfig, QueueConfig  # noqa: E402
from pipeline.graph import normalize  # noqa: E402
from pipeline.identities import ReviewState  # noqa: E402
from storage import identities as identity_store  # noqa: E402
from storage.settings import Settings  # noqa: E402
from storage.store import Store  # noqa: E402

# Assumed reviewer time per queue item: look at one identity's grid (or two side by side), pick the
# odd faces out if any, press one key. Timed by hand on the terminal app at 6-12 s; 10 s is used.
SECONDS_PER_ITEM = 10
FIRST = (20, 50)
# Photos mined per set by default (whole people drawn at random); `--photos 0` takes every photo.
PHOTOS = {"celeba": 1000, "lfw": 800}
MINE_SHARD = 100


def people_sample(name: str, photos: int, seed: int = 0) -> list[str]:
    """Every photo of people drawn at random until `photos` photos (all of them when 0): a smaller
    set keeps each person whole, so it has the same mix of people seen once and seen often."""
    labels = pd.read_csv(DATA / name / "labels.csv")
    people = labels.identity.drop_duplicates().sample(frac=1.0, random_state=seed)
    counts = labels.identity.value_counts().loc[people]
    chosen = counts.index[: int(np.searchsorted(counts.cumsum().to_numpy(), photos)) + 1] if photos else counts.index
    return [str((DATA / name / path).resolve()) for path in labels[labels.identity.isin(chosen)].path]


def cached_embeddings(name: str, photos: int) -> tuple[np.ndarray, np.ndarray]:
    """(unit SFace embeddings, person index) of the largest face of each sampled labelled photo."""
    path = RESULTS / f"review_queue-{name}-{photos or 'all'}.npz"
    if not path.exists():
        store = Store(Settings(data_dir=RESULTS / f"store-{name}"))  # the store cluster_quality.py fills
        paths = people_sample(name, photos)
        for shard in shard_paths(paths, MINE_SHARD):
            mine_paths(name, shard, store.settings)  # photos already stored are skipped
        labels = pd.read_csv(DATA / name / "labels.csv")
        labels["source_path"] = [str((DATA / name / p).resolve()) for p in labels.path]
        faces = identity_store.face_table(store)
        faces = faces[faces.source_path.isin(paths)]
        largest = faces.sort_values(["face_area", "face_id"], ascending=[False, True]).drop_duplicates("source_path")
        largest = largest.merge(labels, on="source_path")
        ids, vectors = store.load_embeddings(store.current_model().id, largest.face_id)
        truth = pd.factorize(largest.set_index("face_id").loc[ids].identity)[0]
        np.savez(path, vectors=vectors, truth=truth)
    cached = np.load(path)
    return normalize(cached["vectors"]), cached["truth"]


@dataclass
class Planted:
    labels: np.ndarray
    mixed: list[int] = field(default_factory=list)  # identity labels holding two people
    splits: list[tuple[int, int]] = field(default_factory=list)  # label pairs of one person
    moved: list[tuple[int, int]] = field(default_factory=list)  # (face, label it was moved into)


def _clean_identities(labels: np.ndarray, truth: np.ndarray, min_size: int) -> list[int]:
    """Labels the clustering got right: one person, holding most of that person's faces."""
    frame = pd.DataFrame({"label": labels, "truth": truth})[labels >= 0]
    clean = []
    for label, group in frame.groupby("label"):
        person = group.truth.iloc[0]
        if len(group) >= min_size and (group.truth == person).all() and len(group) * 2 > np.sum(truth == person):
            clean.append(int(label))
    return clean


def plant_errors(labels: np.ndarray, truth: np.ndarray, vectors: np.ndarray, count: int, seed: int = 0) -> Planted:
    """`count` mixes, splits and moved faces (fewer where the set has too few clean identities: each
    error takes two, one and two of them, no identity touched twice)."""
    rng = np.random.default_rng(seed)
    labels = labels.copy()
    planted = Planted(labels)
    clean = _clean_identities(labels, truth, min_size=3)
    count = min(count, len(clean) // 6)
    rng.shuffle(clean)
    centroids = identity_centroids(labels, vectors)
    used: set[int] = set()
    free = [label for label in clean]

    def take() -> int:
        label = free.pop()
        used.add(label)
        return label

    while len(planted.mixed) < count and len(free) >= 2:
        first = take()
        others = [label for label in free if label not in used]
        partner = others[int(np.argmax(centroids[others] @ centroids[first]))]
        free.remove(partner)
        used.add(partner)
        labels[labels == partner] = first
        planted.mixed.append(first)
    next_label = labels.max() + 1
    while len(planted.splits) < count and free:
        label = take()
        members = np.flatnonzero(labels == label)
        if len(members) < 4:
            continue
        halves = KMeans(n_clusters=2, n_init=4, random_state=seed).fit_predict(vectors[members])
        if min(np.bincount(halves, minlength=2)) < 2:
            continue
        labels[members[halves == 1]] = next_label
        planted.splits.append((label, next_label))
        next_label += 1
    while len(planted.moved) < count and len(free) >= 2:
        source = take()
        face = int(rng.choice(np.flatnonzero(labels == source)))
        others = [label for label in free if label not in used]
        target = others[int(np.argmax(centroids[others] @ vectors[face]))]
        free.remove(target)
        used.add(target)
        labels[face] = target
        planted.moved.append((face, target))
    return planted


def labelling_frame(labels: np.ndarray, confidence: np.ndarray, source: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The queue's inputs for a labelling of photos with one face each (face id = row index)."""
    assigned = np.flatnonzero(labels >= 0)
    labelled = pd.DataFrame({
        "face_id": assigned, "identity_id": labels[assigned] + 1, "confidence": confidence[assigned],
        "source": source[assigned], "image_id": assigned, "subset": "photos",
    })
    ids = np.unique(labelled.identity_id)
    meta = pd.DataFrame({"identity_id": ids, "name": None, "locked": False, "accepted": False})
    return labelled, meta


def _impure(labels: np.ndarray, truth: np.ndarray) -> set[int]:
    frame = pd.DataFrame({"label": labels, "truth": truth})[labels >= 0]
    return {int(label) for label, group in frame.groupby("label") if group.truth.nunique() > 1}


def _majority(labels: np.ndarray, truth: np.ndarray) -> dict[int, int]:
    frame = pd.DataFrame({"label": labels, "truth": truth})[labels >= 0]
    return {int(label): int(group.truth.mode().iloc[0]) for label, group in frame.groupby("label")}


def score_queue(items: list, planted: Planted, truth: np.ndarray) -> dict:
    """Recall of planted errors and precision in the first items; `items` use identity = label + 1."""
    impure, majority = _impure(planted.labels, truth), _majority(planted.labels, truth)
    found_at: dict[tuple, int] = {}
    for position, item in enumerate(items):
        label = item.identity_id - 1
        if item.kind == MERGE:
            pair = frozenset((label, item.other_id - 1))
            found_at.setdefault(("split", pair), position)
        elif item.kind == MIXED:
            found_at.setdefault(("mixed", label), position)
            for face in item.faces:
                found_at.setdefault(("moved", face, label), position)
    keys = {
        "mixed": [("mixed", label) for label in planted.mixed],
        "splits": [("split", frozenset(pair)) for pair in planted.splits],
        "moved": [("moved", face, label) for face, label in planted.moved],
    }
    return _summary(keys, found_at, [_is_right(item, impure, majority) for item in items])


def _is_right(item, impure: set[int], majority: dict[int, int]) -> bool:  # noqa: ANN001 - QueueItem
    if item.kind == MERGE:
        return majority[item.identity_id - 1] == majority[item.other_id - 1]
    return item.identity_id - 1 in impure


def _summary(keys: dict[str, list], found_at: dict[tuple, int], right: list[bool]) -> dict:
    row = {}
    for first in FIRST:
        for kind, wanted in keys.items():
            row[f"{kind}@{first}"] = np.mean([found_at.get(key, np.inf) < first for key in wanted])
        row[f"precision@{first}"] = np.mean(right[:first]) if right else np.nan
    # Items a reviewer works through until 90 % of the planted mixes and splits are found.
    positions = sorted(found_at.get(key, np.inf) for key in keys["mixed"] + keys["splits"])
    needed = positions[int(np.ceil(0.9 * len(positions))) - 1] + 1
    row["items_for_90%"] = needed
    row["minutes_for_90%"] = needed * SECONDS_PER_ITEM / 60
    return row


def score_baseline(order: list[int], planted: Planted, truth: np.ndarray) -> dict:
    """An ordering of identity labels shown one at a time: what would a reviewer find in it?"""
    impure = _impure(planted.labels, truth)
    shown_at = {label: position for position, label in enumerate(order)}
    found_at: dict[tuple, int] = {}
    for label in planted.mixed:
        found_at[("mixed", label)] = shown_at.get(label, np.inf)
    for pair in planted.splits:
        found_at[("split", frozenset(pair))] = max(shown_at.get(label, np.inf) for label in pair)
    for face, label in planted.moved:
        found_at[("moved", face, label)] = shown_at.get(label, np.inf)
    keys = {
        "mixed": [("mixed", label) for label in planted.mixed],
        "splits": [("split", frozenset(pair)) for pair in planted.splits],
        "moved": [("moved", face, label) for face, label in planted.moved],
    }
    return _summary(keys, found_at, [label in impure for label in order])


def baselines(planted: Planted, vectors: np.ndarray) -> dict[str, list[int]]:
    labels = planted.labels
    assigned = labels >= 0
    sizes = np.bincount(labels[assigned])
    by_size = [int(label) for label in np.argsort(-sizes, kind="stable") if sizes[label] > 0]
    # Cohesion: each face's similarity to the mean of the other faces of its identity, averaged.
    sums = np.zeros((len(sizes), vectors.shape[1]))
    np.add.at(sums, labels[assigned], vectors[assigned])
    rows = np.flatnonzero(assigned)
    rest = sums[labels[rows]] - vectors[rows]
    similarity = np.einsum("ij,ij->i", vectors[rows], rest) / np.maximum(np.linalg.norm(rest, axis=1), 1e-9)
    several = sizes[labels[rows]] > 1
    cohesion = np.bincount(labels[rows][several], weights=similarity[several], minlength=len(sizes))
    cohesion /= np.maximum(np.bincount(labels[rows][several], minlength=len(sizes)), 1)
    by_cohesion = [int(label) for label in np.argsort(cohesion, kind="stable") if sizes[label] > 1]
    return {"identities by size": by_size, "identities by cohesion": by_cohesion}


def evaluate(name: str, vectors: np.ndarray, truth: np.ndarray, count: int, config: QueueConfig) -> pd.DataFrame:
    """The queue and the baselines side by side on one set's default clustering with planted errors."""
    n = len(vectors)
    result = cluster_faces(vectors, photos=np.arange(n), subsets=np.zeros(n, np.int64), passed=np.ones(n, bool),
                           config=ClusterConfig())
    planted = plant_errors(result.labels, truth, vectors, count)
    labelled, meta = labelling_frame(planted.labels, result.confidence, result.source)
    started = time.perf_counter()
    ranking = rank_items(labelled, vectors[labelled.face_id.to_numpy()], meta, ReviewState(), config)
    seconds = time.perf_counter() - started
    rows = [{"queue": "facemine queue (defaults)", **score_queue(ranking.items, planted, truth),
             "items": len(ranking.items), "seconds": seconds}]
    for baseline, order in baselines(planted, vectors).items():
        rows.append({"queue": baseline, **score_baseline(order, planted, truth), "items": len(order)})
    table = pd.DataFrame(rows)
    n_ids = len(np.unique(result.labels[result.labels >= 0]))
    table.insert(0, "set", f"{name} ({n} faces, {len(np.unique(truth))} people, {n_ids} identities; planted "
                           f"{len(planted.mixed)} mixed, {len(planted.splits)} split, {len(planted.moved)} moved)")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["celeba", "lfw"])
    parser.add_argument("--plant", type=int, default=10, help="errors of each kind planted per set")
    parser.add_argument("--photos", type=int, default=None,
                        help=f"photos per set, whole people drawn at random; 0: all (default: {PHOTOS})")
    args = parser.parse_args()
    print(f"up to {args.plant} mixes, splits and moved faces planted per set; reviewer time at {SECONDS_PER_ITEM} s per item\n")
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 60):
        for name in args.sets:
            vectors, truth = cached_embeddings(name, PHOTOS[name] if args.photos is None else args.photos)
            print(evaluate(name, vectors, truth, args.plant, QueueConfig()).round(3).to_string(index=False), "\n")


if __name__ == "__main__":
    main()
