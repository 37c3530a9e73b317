"""The review queue: what a reviewer should look at first in the current labelling, and why.

Items, each with a reason a person can read and a priority, roughly the number of faces a
review of it may set right:
- ``conflict``: decisions that contradict each other (faces a split set apart, pinned to one
  identity by a later decision that older versions did not refuse);
- ``mixed``: an identity that may hold more than one person (faces unlike the rest of it; two
  groups: its sampled faces fall into two groups unlike each other; two faces from one photo);
- ``merge?``: two identities that may be one person: several sampled faces of each are compared
  (each face's best match on the other side, the median of each sample, the lower of the two),
  not one centre per identity, so one person photographed two ways is found while look-alike
  strangers, or an identity with one intruder, are not;
- ``low-confidence``: faces that joined an identity with low confidence;
- ``unnamed-large``: a large identity nobody has named yet.
Identity items of one identity are combined into one item. Identities a person has settled
(accepted, locked or named, with no face added by clustering since) are left out, and so is
every merge a person's decisions rule out (two identities a split set apart, or one holding a
face rejected from the other). `ReviewQueue.refresh` rebuilds the items after decisions, so a
merge removes the suggestions it settled.

`rank_items` is the whole ranking on arrays (no store); `build_queue` feeds it the current
labelling. All statistics are vectorised over faces, so identities of thousands of faces cost little.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.sparse import csr_matrix

from labeling.actions import current_run
from labeling.text import plural
from pipeline.config import QueueConfig
from pipeline.graph import MISSING, build_knn, knn_between, normalize
from pipeline.identities import ReviewState
from storage.decisions import load_review_state
from storage.identities import assignments, face_table, identity_rows, run_info
from storage.store import Store

CONFLICT, MIXED, MERGE, LOW_CONFIDENCE, UNNAMED_LARGE = "conflict", "mixed", "merge?", "low-confidence", "unnamed-large"
_IDENTITY_KIND_ORDER = (CONFLICT, MIXED, LOW_CONFIDENCE, UNNAMED_LARGE)
_CHUNK = 65_536
# Contradicting decisions come before every guess about the clustering.
_CONFLICT_PRIORITY = 1e6


@dataclass(frozen=True)
class QueueItem:
    kind: str
    identity_id: int
    reason: str
    priority: float
    # Faces to look at first (suspects), pre-selected by the review app.
    faces: tuple[int, ...] = ()
    # merge?: the identity it may be one person with, and how alike their sampled faces are.
    other_id: int | None = None
    similarity: float | None = None

    @property
    def key(self) -> tuple[str, int, int | None]:
        """What the item is about; the same key after a refresh means the same question."""
        return self.kind, self.identity_id, self.other_id


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
    # (identities, config.sample_faces) face rows spread over each identity, -1 padded.
    samples: np.ndarray


@dataclass
class Ranking:
    """`rank_items`'s result: the items, highest priority first, and what the queue keeps per face."""

    items: list[QueueItem]
    # Per labelled face (row order of the input): similarity to the rest of its identity.
    similarity: np.ndarray
    identity_ids: np.ndarray
    centroids: np.ndarray


@dataclass
class ReviewQueue:
    run_id: int
    items: list[QueueItem]
    # Per face of the run: similarity to the rest of its identity, chip path, embedding row, identity.
    similarity: pd.Series
    chip_paths: pd.Series
    vectors: np.ndarray
    row_of_face: pd.Series
    identity_ids: np.ndarray
    centroids: np.ndarray
    store: Store = field(repr=False)
    config: QueueConfig = field(default_factory=QueueConfig)
    identity_of_face: pd.Series = field(default_factory=lambda: pd.Series(dtype=float))
    review: ReviewState = field(default_factory=ReviewState)

    def face_order(self, faces: list[int], first: tuple[int, ...] = ()) -> list[int]:
        """`first` (present ones), then the least typical faces (farthest from the centre) first."""
        present = set(faces)
        head = [face for face in first if face in present]
        rest = sorted(set(faces) - set(head), key=lambda face: (self.similarity.get(face, np.inf), face))
        return head + rest

    def ruled_out(self, faces: Iterable[int]) -> set[int]:
        """Identities `faces` may not join by a person's decisions: those they were rejected from,
        and those holding a face set apart from one of them (a decision would be refused)."""
        faces = set(faces)
        ruled = {identity for face, identity in self.review.rejected if face in faces}
        for a, b in self.review.cannot_link:
            for mine, other in ((a, b), (b, a)):
                if mine in faces and other in self.identity_of_face.index:
                    ruled.add(int(self.identity_of_face[other]))
        return ruled

    def suggestions(self, identity_id: int, faces: list[int], k: int | None = None) -> list[tuple[int, float]]:
        """Nearest active identities to the centre of `faces` (identity id, centre similarity), leaving
        out the ones a person's decisions rule out for these faces."""
        rows = self.row_of_face.reindex(faces).dropna().astype(int).to_numpy()
        if len(rows) == 0 or len(self.identity_ids) == 0:
            return []
        k = k or self.config.suggestions
        ruled = self.ruled_out(faces) | {identity_id}
        centre = normalize(self.vectors[rows].sum(axis=0, keepdims=True))
        graph = knn_between(centre, self.centroids, min(k + len(ruled), len(self.identity_ids)))
        candidates = [
            (int(self.identity_ids[j]), float(s))
            for j, s in zip(graph.indices[0], graph.similarities[0])
            if j >= 0 and int(self.identity_ids[j]) not in ruled
        ]
        active = identity_rows(self.store, [c for c, _ in candidates]).query("status == 'active'").identity_id
        return [(c, s) for c, s in candidates if c in set(active.tolist())][:k]

    def refresh(self, passed: Iterable[QueueItem] = ()) -> None:
        """Rebuild the items from the store after decisions (on the current labelling), leaving out
        items about the same question as `passed` (those the reviewer has already seen)."""
        seen = {item.key for item in passed}
        fresh = build_queue(self.store, self.config)
        self.__dict__.update(fresh.__dict__)
        self.items = [item for item in fresh.items if item.key not in seen]


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


def _spread_samples(codes: np.ndarray, similarity: np.ndarray, n_identities: int, count: int) -> np.ndarray:
    """(identities, count) face rows per identity, evenly spaced in order of typicality (all of a
    small identity), -1 padded: the sample spans the identity's typical and unusual faces alike."""
    order = np.lexsort((np.nan_to_num(similarity, nan=1.0), codes))
    starts = np.searchsorted(codes[order], np.arange(n_identities + 1))
    sizes = np.diff(starts)
    taken = np.minimum(sizes, count)
    slot = np.arange(count)
    # Position in the identity's sorted faces of sample slot j: spaced evenly from first to last.
    position = np.floor(slot[None, :] * (sizes[:, None] - 1) / np.maximum(taken[:, None] - 1, 1) + 0.5).astype(np.int64)
    position = np.where(taken[:, None] >= sizes[:, None], slot[None, :], position)
    valid = slot[None, :] < taken[:, None]
    rows = order[np.minimum(starts[:-1, None] + position, len(order) - 1)]
    return np.where(valid, rows, MISSING)


def _identity_stats(labelled: pd.DataFrame, vectors: np.ndarray, meta: pd.DataFrame,
                    config: QueueConfig) -> tuple[_Identities, np.ndarray, np.ndarray]:
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
    samples = _spread_samples(codes, similarity, len(ids), config.sample_faces)
    stats = _Identities(ids, sizes, normalize(sums), cohesion, named, reviewed & ~has_automatic, subsets, samples)
    return stats, codes, similarity


def _two_groups(vectors: np.ndarray) -> tuple[np.ndarray, float]:
    """Split faces (unit rows) into the two groups least alike: (mask of the smaller group, mean
    similarity between the groups). Average linkage on the faces' pairwise similarities, whose top
    split separates two people where 2-means on the vectors may cut one person's poses apart."""
    distances = 1.0 - np.clip(vectors @ vectors.T, -1.0, 1.0)
    condensed = distances[np.triu_indices(len(vectors), 1)]
    labels = fcluster(linkage(condensed, method="average"), 2, criterion="maxclust")
    minority = labels == np.bincount(labels)[1:].argmin() + 1
    between = float(np.mean(vectors[minority] @ vectors[~minority].T))
    return minority, between


def _probability(similarity: float | np.ndarray, threshold: float, width: float) -> float | np.ndarray:
    """How likely two groups this similar are one person: 1/2 at `threshold`, logistic in `width`."""
    return 1.0 / (1.0 + np.exp(-(np.asarray(similarity, np.float64) - threshold) / width))


@dataclass(frozen=True)
class _Finding:
    row: int  # identity row
    kind: str
    reason: str
    priority: float
    suspects: tuple[int, ...] = ()


def _spread_findings(row: int, members: np.ndarray, faces: np.ndarray, vectors: np.ndarray, stats: _Identities,
                     similarity: np.ndarray, config: QueueConfig) -> list[_Finding]:
    """Outlier faces, low cohesion and two groups of one identity (`members`: its face rows)."""
    found = []
    by_similarity = members[np.argsort(similarity[members])]
    outliers = by_similarity[similarity[by_similarity] < config.outlier_similarity]
    if len(outliers):
        unlikely = 1 - _probability(similarity[outliers], config.same_person_similarity, config.probability_width)
        found.append(_Finding(row, MIXED, f"{plural(len(outliers))} unlike the rest (similarity below "
                              f"{config.outlier_similarity:.2f}, lowest {similarity[outliers[0]]:.2f})",
                              float(unlikely.sum()), tuple(faces[outliers].tolist())))
    if len(members) > 1 and stats.cohesion[row] < config.min_cohesion:
        loose = by_similarity[similarity[by_similarity] < config.min_cohesion]
        found.append(_Finding(row, MIXED, f"low cohesion {stats.cohesion[row]:.2f} (below {config.min_cohesion:.2f})",
                              0.5 * len(loose), tuple(faces[loose].tolist())))
    if len(members) >= config.two_modes_min_faces:
        sample = stats.samples[row][stats.samples[row] != MISSING]
        minority, between = _two_groups(vectors[sample])
        share = float(minority.mean())
        if between < config.two_modes_max_similarity and share >= config.two_modes_min_share:
            # The sampled minority stands for its share of the whole identity.
            estimated = max(int(round(share * len(members))), int(minority.sum()))
            found.append(_Finding(row, MIXED, f"two groups: {minority.sum()} of {len(sample)} sampled faces unlike the "
                                  f"others (mean similarity {between:.2f})",
                                  estimated * (1 - _probability(between, config.same_person_similarity, config.probability_width)),
                                  tuple(faces[sample[minority]].tolist())))
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


def _conflict_findings(review: ReviewState, row_of_identity: dict[int, int]) -> list[_Finding]:
    """One finding per identity holding faces that decisions both set apart and pinned together."""
    pairs: dict[int, list[tuple[int, int]]] = {}
    for a, b, identity in review.contradictions():
        if identity in row_of_identity:
            pairs.setdefault(identity, []).append((a, b))
    return [
        _Finding(row_of_identity[identity], CONFLICT,
                 f"{plural(len(found), 'pair')} of faces set apart as different people (faces {found[0][0]} and "
                 f"{found[0][1]}, ...) but pinned to this one identity: split it again, or merge with --force",
                 _CONFLICT_PRIORITY, tuple(dict.fromkeys(face for pair in found for face in pair)))
        for identity, found in pairs.items()
    ]


def _identity_findings(
    labelled: pd.DataFrame, vectors: np.ndarray, stats: _Identities, codes: np.ndarray, similarity: np.ndarray,
    review: ReviewState, config: QueueConfig,
) -> list[_Finding]:
    faces = labelled.face_id.to_numpy()
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(stats.ids) + 1))
    found = _conflict_findings(review, {int(identity): row for row, identity in enumerate(stats.ids)})
    for row in np.flatnonzero(~stats.settled):
        found += _spread_findings(row, order[bounds[row] : bounds[row + 1]], faces, vectors, stats, similarity, config)
    found += _same_photo_findings(labelled, codes, similarity, ~stats.settled)
    found += _low_confidence_findings(labelled, codes, config)
    found += [
        # Naming is no correction: below any likely mistake, larger identities first.
        _Finding(int(row), UNNAMED_LARGE, f"{stats.sizes[row]} faces and no name yet", math.log2(stats.sizes[row]) / 20)
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


def _candidate_pairs(vectors: np.ndarray, codes: np.ndarray, stats: _Identities, config: QueueConfig) -> np.ndarray:
    """(P, 2) identity row pairs a < b worth scoring: identities whose centres are near, or one of
    whose faces lists a face of the other among its nearest."""
    n_ids = len(stats.ids)
    centres = build_knn(stats.centroids, min(config.merge_neighbours, n_ids - 1))
    faces = build_knn(vectors, min(config.merge_neighbours, len(vectors) - 1))
    pairs = []
    for graph, owner in ((centres, np.arange(n_ids)), (faces, codes)):
        source, target, _ = graph.links(config.candidate_min_similarity)
        pairs.append(np.stack([owner[source], owner[target]], axis=1))
    pairs = np.sort(np.concatenate(pairs), axis=1)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    return np.unique(pairs, axis=0)


def _sample_agreement(pairs: np.ndarray, samples: np.ndarray, vectors: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Per identity pair: for each side, the median over its sampled faces of each one's best match
    on the other side; the lower of the two. Both sides must agree, so one intruder (a face of B's
    person inside A, which every face of B matches) does not make A and B look like one person."""
    padded = np.vstack([vectors, np.full((1, vectors.shape[1]), np.nan, vectors.dtype)])
    scores = np.empty(len(pairs), np.float64)
    for start in range(0, len(pairs), chunk):
        a, b = samples[pairs[start:start + chunk, 0]], samples[pairs[start:start + chunk, 1]]
        # Padding (-1) picks the NaN row and drops out of max and median.
        similarity = np.nan_to_num(np.einsum("prd,pqd->prq", padded[a], padded[b]), nan=-np.inf)
        sides = []
        for best in (similarity.max(axis=2), similarity.max(axis=1)):
            best[np.isinf(best)] = np.nan
            sides.append(np.nanmedian(best, axis=1))
        scores[start:start + chunk] = np.minimum(*sides)
    return scores


def _apart_pairs(review: ReviewState, identity_of_face: pd.Series) -> set[frozenset]:
    """Identity pairs a merge of which a person's decisions rule out (it would be refused)."""
    apart = set()
    for a, b in review.cannot_link:
        if a in identity_of_face.index and b in identity_of_face.index:
            apart.add(frozenset((int(identity_of_face[a]), int(identity_of_face[b]))))
    for face, identity in review.rejected:
        if face in identity_of_face.index:
            apart.add(frozenset((int(identity_of_face[face]), int(identity))))
    return {pair for pair in apart if len(pair) == 2}


def _merge_items(vectors: np.ndarray, codes: np.ndarray, stats: _Identities, apart: set[frozenset],
                 config: QueueConfig) -> list[QueueItem]:
    if len(stats.ids) < 2:
        return []
    pairs = _candidate_pairs(vectors, codes, stats, config)
    open_pair = ~(stats.settled[pairs[:, 0]] & stats.settled[pairs[:, 1]])
    allowed = np.array([frozenset((int(stats.ids[i]), int(stats.ids[j]))) not in apart for i, j in pairs], bool)
    pairs = pairs[open_pair & allowed] if len(pairs) else pairs
    score = _sample_agreement(pairs, stats.samples, vectors)
    items = []
    for (i, j), s in zip(pairs.tolist(), score.tolist()):
        apart_subsets = stats.subsets[i].isdisjoint(stats.subsets[j])
        if s < config.merge_min_similarity and not (apart_subsets and s >= config.cross_subset_min_similarity):
            continue
        a, b = (i, j) if stats.sizes[i] >= stats.sizes[j] else (j, i)
        reason = f"may be the same person as identity {stats.ids[b]} (sampled faces' best matches: median similarity {s:.2f})"
        if apart_subsets:
            reason += f"; clustered apart in subsets {', '.join(sorted(stats.subsets[a]))} / {', '.join(sorted(stats.subsets[b]))}"
        likely = float(_probability(s, config.same_person_similarity, config.probability_width))
        items.append(QueueItem(MERGE, int(stats.ids[a]), reason, round(float(stats.sizes[b]) * likely, 3),
                               other_id=int(stats.ids[b]), similarity=round(float(s), 3)))
    return items


def rank_items(labelled: pd.DataFrame, vectors: np.ndarray, meta: pd.DataFrame, review: ReviewState,
               config: QueueConfig) -> Ranking:
    """The queue's items for a labelling, highest priority first.

    `labelled`: one row per assigned face (face_id, identity_id, confidence, source, image_id,
    subset), `vectors` its embeddings in the same row order, `meta` one row per identity
    (identity_id, name, locked, accepted), `review` the decisions in force.
    """
    vectors = normalize(vectors)
    stats, codes, similarity = _identity_stats(labelled, vectors, meta, config)
    findings = _identity_findings(labelled, vectors, stats, codes, similarity, review, config)
    apart = _apart_pairs(review, pd.Series(labelled.identity_id.to_numpy(np.int64), index=labelled.face_id.to_numpy()))
    items = _identity_items(stats, findings) + _merge_items(vectors, codes, stats, apart, config)
    items.sort(key=lambda item: (-item.priority, item.identity_id, item.other_id or 0))
    return Ranking(items, similarity, stats.ids, stats.centroids)


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
    review = load_review_state(store)
    identity_of_face = pd.Series(labelled.identity_id.to_numpy(np.int64), index=labelled.face_id.to_numpy())
    if labelled.empty:
        nothing = np.zeros((0, 1), np.float32)
        return ReviewQueue(run_id, [], pd.Series(dtype=float), chip_paths, nothing, row_of_face, np.zeros(0, np.int64),
                           nothing, store, config, identity_of_face, review)
    vectors = normalize(vectors)
    ranking = rank_items(labelled, vectors, identity_rows(store, labelled.identity_id.unique().tolist()), review, config)
    return ReviewQueue(
        run_id, ranking.items, pd.Series(ranking.similarity, index=embedded), chip_paths, vectors, row_of_face,
        ranking.identity_ids, ranking.centroids, store, config, identity_of_face, review,
    )
