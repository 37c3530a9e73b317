"""The review queue: what a reviewer should look at first in the current labelling, and why.

Items, each with a reason a person can read and a priority, roughly the number of faces a
review of it may set right:
- ``mixed``: an identity that may hold more than one person (low cohesion: faces far from its
  centre; two modes: 2-means finds two well-separated halves; two faces from one photo);
- ``merge?``: two identities that may be one person (close centres, or close and clustered in
  different subsets);
- ``low-confidence``: faces that joined an identity with low confidence;
- ``unnamed-large``: a large identity nobody has named yet.
Identity items of one identity are combined into one item. Identities a person has settled
(accepted, locked or named, with no face added by clustering since) are left out.
All statistics are vectorised over faces, so identities of thousands of faces cost little.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.sparse import csr_matrix
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from labeling.actions import current_run
from labeling.text import plural
from pipeline.config import QueueConfig
from pipeline.graph import build_knn, knn_between, normalize
from storage.identities import assignments, face_table, identity_rows, run_info
from storage.store import Store

MIXED, MERGE, LOW_CONFIDENCE, UNNAMED_LARGE = "mixed", "merge?", "low-confidence", "unnamed-large"
_IDENTITY_KIND_ORDER = (MIXED, LOW_CONFIDENCE, UNNAMED_LARGE)
_CHUNK = 65_536


@dataclass(frozen=True)
class QueueItem:
    kind: str
    identity_id: int
    reason: str
    priority: float
    # Faces to look at first (suspects), pre-selected by the review app.
    faces: tuple[int, ...] = ()
    # merge?: the identity it may be one person with, and their centres' similarity.
    other_id: int | None = None
    similarity: float | None = None


@dataclass
class _Identities:
    """Per-identity statistics of the current labelling (row i of each array: `ids[i]`)."""

    ids: np.ndarray
    sizes: np.ndarray
    centroids: np.ndarray
    cohesion: np.ndarray
    named: np.ndarray
    settled: np.ndarray
    subsets: list[frozenset]


@dataclass
class ReviewQueue:
    run_id: int
    items: list[QueueItem]
    # Per face of the run: similarity to the rest of its identity, chip path, embedding row.
    similarity: pd.Series
    chip_paths: pd.Series
    vectors: np.ndarray
    row_of_face: pd.Series
    identity_ids: np.ndarray
    centroids: np.ndarray
    store: Store = field(repr=False)
    config: QueueConfig = field(default_factory=QueueConfig)

    def face_order(self, faces: list[int], first: tuple[int, ...] = ()) -> list[int]:
        """`first` (present ones), then the least typical faces (farthest from the centre) first."""
        present = set(faces)
        head = [face for face in first if face in present]
        rest = sorted(set(faces) - set(head), key=lambda face: (self.similarity.get(face, np.inf), face))
        return head + rest

    def suggestions(self, identity_id: int, faces: list[int], k: int | None = None) -> list[tuple[int, float]]:
        """Nearest active identities to the centre of `faces` (identity id, centre similarity)."""
        rows = self.row_of_face.reindex(faces).dropna().astype(int).to_numpy()
        if len(rows) == 0 or len(self.identity_ids) == 0:
            return []
        k = k or self.config.suggestions
        centre = normalize(self.vectors[rows].sum(axis=0, keepdims=True))
        graph = knn_between(centre, self.centroids, min(k + 1, len(self.identity_ids)))
        candidates = [
            (int(self.identity_ids[j]), float(s))
            for j, s in zip(graph.indices[0], graph.similarities[0])
            if j >= 0 and int(self.identity_ids[j]) != identity_id
        ]
        active = identity_rows(self.store, [c for c, _ in candidates]).query("status == 'active'").identity_id
        return [(c, s) for c, s in candidates if c in set(active.tolist())][:k]


def _leave_one_out_similarity(vectors: np.ndarray, sums: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Cosine similarity of each unit vector to the centre of the *other* faces of its identity
    (NaN for an identity of one face): a face cannot vouch for itself, which matters for small identities."""
    similarity = np.empty(len(vectors))
    for start in range(0, len(vectors), _CHUNK):  # bounded memory however many faces
        rows = slice(start, start + _CHUNK)
        dot = np.einsum("ij,ij->i", vectors[rows], sums[codes[rows]]).astype(np.float64)
        rest_norm_sq = np.einsum("ij,ij->i", sums[codes[rows]], sums[codes[rows]]) - 2 * dot + 1
        with np.errstate(divide="ignore", invalid="ignore"):
            similarity[rows] = np.where(rest_norm_sq > 1e-6, (dot - 1) / np.sqrt(np.maximum(rest_norm_sq, 1e-12)), np.nan)
    return similarity


def _identity_stats(labelled: pd.DataFrame, vectors: np.ndarray, meta: pd.DataFrame) -> tuple[_Identities, np.ndarray, np.ndarray]:
    """Identity statistics, plus per face its identity row and similarity to the rest of its identity."""
    codes, ids = pd.factorize(labelled.identity_id.astype(np.int64), sort=True)
    ids = np.asarray(ids, np.int64)
    n = len(labelled)
    membership = csr_matrix((np.ones(n, np.float32), (codes, np.arange(n))), shape=(len(ids), n))
    sums = np.asarray(membership @ vectors)
    sizes = np.bincount(codes, minlength=len(ids))
    similarity = _leave_one_out_similarity(vectors, sums, codes)
    known = ~np.isnan(similarity)
    cohesion = np.bincount(codes[known], weights=similarity[known], minlength=len(ids)) / np.maximum(
        np.bincount(codes[known], minlength=len(ids)), 1
    )
    meta = meta.set_index("identity_id").reindex(ids)
    named = meta.name.notna().to_numpy()
    reviewed = named | meta.locked.fillna(False).to_numpy(bool) | meta.accepted.fillna(False).to_numpy(bool)
    automatic = labelled.source.isin(["cluster", "attached"]).to_numpy()
    has_automatic = np.bincount(codes, weights=automatic, minlength=len(ids)) > 0
    subsets = labelled.groupby(codes).subset.agg(frozenset).reindex(range(len(ids))).tolist()
    stats = _Identities(ids, sizes, normalize(sums), cohesion, named, reviewed & ~has_automatic, subsets)
    return stats, codes, similarity


def _two_modes(vectors: np.ndarray, config: QueueConfig) -> tuple[np.ndarray, float] | None:
    """The smaller half (row indices) and the halves' centre similarity when 2-means finds two people."""
    halves = KMeans(n_clusters=2, n_init=1, random_state=0).fit(vectors)
    labels = halves.labels_
    minority = int(np.bincount(labels, minlength=2).argmin())
    share = float(np.mean(labels == minority))
    centres = normalize(halves.cluster_centers_)
    similarity = float(centres[0] @ centres[1])
    if similarity < config.two_modes_max_similarity and share >= config.two_modes_min_share:
        return np.flatnonzero(labels == minority), similarity
    return None


@dataclass(frozen=True)
class _Finding:
    row: int  # identity row
    kind: str
    reason: str
    priority: float
    suspects: tuple[int, ...] = ()


def _spread_findings(row: int, members: np.ndarray, faces: np.ndarray, vectors: np.ndarray, stats: _Identities,
                     similarity: np.ndarray, config: QueueConfig) -> list[_Finding]:
    """Outlier faces, low cohesion and two modes of one identity (`members`: its face rows)."""
    found = []
    by_similarity = members[np.argsort(similarity[members])]
    outliers = by_similarity[similarity[by_similarity] < config.outlier_similarity]
    if len(outliers):
        found.append(_Finding(row, MIXED, f"{plural(len(outliers))} unlike the rest (similarity below "
                              f"{config.outlier_similarity:.2f}, lowest {similarity[outliers[0]]:.2f})",
                              float(len(outliers)), tuple(faces[outliers].tolist())))
    if len(members) > 1 and stats.cohesion[row] < config.min_cohesion:
        loose = by_similarity[similarity[by_similarity] < config.min_cohesion]
        found.append(_Finding(row, MIXED, f"low cohesion {stats.cohesion[row]:.2f} (below {config.min_cohesion:.2f})",
                              0.5 * len(loose), tuple(faces[loose].tolist())))
    if len(members) >= config.two_modes_min_faces:
        split = _two_modes(vectors[members], config)
        if split is not None:
            minority, between = split
            found.append(_Finding(row, MIXED, f"two modes: {len(minority)} of {len(members)} faces form a separate "
                                  f"group (centre similarity {between:.2f})", len(minority) * (1 - between),
                                  tuple(faces[members[minority]].tolist())))
    return found


def _same_photo_findings(labelled: pd.DataFrame, codes: np.ndarray, similarity: np.ndarray, open_rows: np.ndarray) -> list[_Finding]:
    """Two faces of one photo are two people: the less typical ones are the suspects."""
    faces = labelled.assign(row=codes, similarity=similarity)
    faces = faces[faces.duplicated(["row", "image_id"], keep=False) & open_rows[codes]]
    found = []
    for (row, _image), group in faces.groupby(["row", "image_id"]):
        group = group.sort_values("similarity", ascending=False)
        listed = ", ".join(str(face) for face in group.face_id)
        found.append(_Finding(int(row), MIXED, f"faces {listed} come from one photo", len(group) - 1.0,
                              tuple(group.face_id.iloc[1:].tolist())))
    return found


def _low_confidence_findings(labelled: pd.DataFrame, codes: np.ndarray, config: QueueConfig) -> list[_Finding]:
    faces = labelled.assign(row=codes)
    faces = faces[faces.source.isin(["cluster", "attached"]) & (faces.confidence < config.low_confidence)]
    found = []
    for row, group in faces.groupby("row"):
        group = group.sort_values("confidence")
        found.append(_Finding(int(row), LOW_CONFIDENCE, f"{plural(len(group))} joined with confidence below "
                              f"{config.low_confidence:.2f} (lowest {group.confidence.iloc[0]:.2f})",
                              float((1 - group.confidence).sum()), tuple(group.face_id.tolist())))
    return found


def _identity_findings(
    labelled: pd.DataFrame, vectors: np.ndarray, stats: _Identities, codes: np.ndarray, similarity: np.ndarray,
    config: QueueConfig,
) -> list[_Finding]:
    faces = labelled.face_id.to_numpy()
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(stats.ids) + 1))
    found = []
    # One thread per 2-means: on identity-sized problems thread start-up costs more than it saves.
    with threadpool_limits(1):
        for row in np.flatnonzero(~stats.settled):
            found += _spread_findings(row, order[bounds[row] : bounds[row + 1]], faces, vectors, stats, similarity, config)
    found += _same_photo_findings(labelled, codes, similarity, ~stats.settled)
    found += _low_confidence_findings(labelled, codes, config)
    found += [
        _Finding(int(row), UNNAMED_LARGE, f"{stats.sizes[row]} faces and no name yet", math.log2(stats.sizes[row]) / 2)
        for row in np.flatnonzero(~stats.named & ~stats.settled & (stats.sizes >= config.unnamed_min_faces))
    ]
    return found


def _identity_items(stats: _Identities, findings: list[_Finding]) -> list[QueueItem]:
    """One item per identity, combining its findings; its kind is the most pressing one."""
    by_row: dict[int, list[_Finding]] = {}
    for finding in findings:
        by_row.setdefault(finding.row, []).append(finding)
    items = []
    for row, found in by_row.items():
        kinds = {finding.kind for finding in found}
        items.append(
            QueueItem(
                kind=next(kind for kind in _IDENTITY_KIND_ORDER if kind in kinds),
                identity_id=int(stats.ids[row]),
                reason="; ".join(finding.reason for finding in found),
                priority=round(sum(finding.priority for finding in found), 3),
                faces=tuple(dict.fromkeys(face for finding in found for face in finding.suspects)),
            )
        )
    return items


def _merge_items(stats: _Identities, config: QueueConfig) -> list[QueueItem]:
    if len(stats.ids) < 2:
        return []
    graph = build_knn(stats.centroids, min(config.merge_neighbours, len(stats.ids) - 1))
    low_bar = min(config.merge_min_similarity, config.cross_subset_min_similarity)
    first, second, similarity = graph.edges(low_bar)
    items = []
    for i, j, s in zip(first.tolist(), second.tolist(), similarity.tolist()):
        if stats.settled[i] and stats.settled[j]:
            continue
        apart = stats.subsets[i].isdisjoint(stats.subsets[j])
        if s < config.merge_min_similarity and not (apart and s >= config.cross_subset_min_similarity):
            continue
        a, b = (i, j) if stats.sizes[i] >= stats.sizes[j] else (j, i)
        reason = f"may be the same person as identity {stats.ids[b]} (centre similarity {s:.2f})"
        if apart:
            reason += f"; clustered apart in subsets {', '.join(sorted(stats.subsets[a]))} / {', '.join(sorted(stats.subsets[b]))}"
        items.append(
            QueueItem(MERGE, int(stats.ids[a]), reason, round(float(min(stats.sizes[i], stats.sizes[j]) * s), 3),
                      other_id=int(stats.ids[b]), similarity=round(float(s), 3))
        )
    return items


def build_queue(store: Store, config: QueueConfig | None = None, run_id: int | None = None) -> ReviewQueue:
    """The review queue of a run (default: the current labelling), highest priority first."""
    config = config or store.settings.review
    run_id = run_id or current_run(store)
    run = run_info(store, run_id)
    table = assignments(store, run_id)
    faces = face_table(store, run["subsets"] or None)[["face_id", "image_id", "subset", "chip_path"]]
    labelled = table.dropna(subset=["identity_id"]).merge(faces, on="face_id")
    embedded, vectors = store.load_embeddings(run["model_id"], labelled.face_id)
    labelled = labelled.set_index("face_id").loc[embedded].reset_index()
    row_of_face = pd.Series(np.arange(len(embedded)), index=embedded)
    chip_paths = faces.set_index("face_id").chip_path
    if labelled.empty:
        nothing = np.zeros((0, 1), np.float32)
        return ReviewQueue(run_id, [], pd.Series(dtype=float), chip_paths, nothing, row_of_face, np.zeros(0, np.int64),
                           nothing, store, config)
    vectors = normalize(vectors)
    stats, codes, similarity = _identity_stats(labelled, vectors, identity_rows(store, labelled.identity_id.unique().tolist()))
    findings = _identity_findings(labelled, vectors, stats, codes, similarity, config)
    items = _identity_items(stats, findings) + _merge_items(stats, config)
    items.sort(key=lambda item: (-item.priority, item.identity_id, item.other_id or 0))
    return ReviewQueue(
        run_id, items, pd.Series(similarity, index=embedded), chip_paths, vectors, row_of_face,
        stats.ids, stats.centroids, store, config,
    )
