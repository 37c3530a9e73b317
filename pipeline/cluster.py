"""Cluster faces into identities.

Public API
----------
``CLUSTERERS``: registry ``name -> function(embeddings, graph, config) -> labels``, where
``embeddings`` is (N, D), ``graph`` the ``pipeline.graph.KnnGraph`` over those rows, ``config``
a ``ClusterConfig`` and ``labels`` an (N,) int64 array, -1 for noise. Methods:

- ``infomap`` (default): Infomap (map equation) on the directed k-NN graph (each face links to
  the neighbours its own list holds), links below ``min_similarity`` dropped and the rest weighted
  by ``similarity - min_similarity``; each face also links to itself (``infomap_self_weight``) so
  that a few weak links to strangers do not pull it into their cluster, and a Markov time above 1
  (``infomap_markov_time``) keeps a person with hundreds of photos in one cluster. The defaults
  are one setting for every collection: the one whose worse score on LFW and CelebA is best
  (benchmarks/cluster_quality.py), not the best for either.
- ``components``: connected components of the graph above ``components_min_similarity``.
- ``hac``: exact agglomerative clustering (``hac_linkage``, cut at ``hac_distance_threshold``);
  memory grows with N^2, so it refuses more than ``HAC_MAX_FACES`` faces.
- ``dbscan``: DBSCAN over the k-NN graph's cosine distances (``dbscan_eps``, ``dbscan_min_samples``).
- ``hdbscan``: HDBSCAN on the unit embeddings (``hdbscan_min_cluster_size``, ``hdbscan_min_samples``).

``cluster(embeddings, config) -> labels``: one method over one set of faces (builds the graph).

``cluster_faces(embeddings, photos, subsets, passed, constraints, config, previous, per_subset)
-> ClusterResult``: the whole identity step. In order:

1. faces of locked identities (``Constraints.fixed_members``) and excluded faces are set aside;
2. the remaining quality-passed faces are clustered subset by subset (``cluster_subset``; the
   results may come precomputed, e.g. from parallel tasks, as ``per_subset``);
3. clusters of different subsets (single faces included) merge when their representatives agree
   (``merge_clusters``, which reads only each cluster's centroid and representative vectors):
   the median, over the representatives of both, of each one's best match on the other side
   reaches ``merge_min_similarity``; the two are each other's best match in the other's subset
   by ``merge_margin``; and no cannot-link lies between them;
4. must-link pairs unite their clusters;
5. cannot-links (two faces of one photo, human cannot-links) are enforced: of two conflicting
   faces (or must-linked groups) the one less similar to the cluster centroid leaves; clusters
   smaller than ``min_cluster_size`` then dissolve;
6. clusters take over earlier identity keys by face overlap (``match_identities``), locked
   identities keep theirs; faces rejected from the identity their cluster now carries leave it;
7. every face still unassigned (low quality, dissolved, displaced) may attach to an unlocked
   identity whose centroid it is confidently close to (``attach_*``), never against a
   cannot-link or a rejection.

Confidence in [0, 1] per face: human decisions 1; clustered faces the share of their
above-floor k-NN edge weight (``similarity - min_similarity``) that stays inside their identity;
attached faces the same share computed over the best and second-best identity centroids;
unassigned faces 0.

``identity_centroids(labels, vectors) -> (max label + 1, D)``: unit mean vector per label.

Scaling out (per-subset tasks, then the merge on representatives; identical results):

- ``subset_members(subsets, passed, constraints) -> [face indices]``: the faces ``cluster_faces``
  clusters in each subset, in the order it expects ``per_subset`` results;
- ``cluster_subset(vectors, config) -> SubsetClustering``: one subset's step 2 (picklable result:
  local labels, the k-NN graph as above-floor weights, its clusters' centroids and representatives);
- ``combine_summaries([SubsetClustering]) -> ClusterSummary`` and
  ``merge_clusters(summary, config, conflicts) -> group per cluster``: step 3 on representatives.

``match_identities(previous, current, min_overlap) -> {label: identity key | None}``: keeps
identity ids stable across runs (and embedding models) by Hungarian matching on face overlap.
"""
from __future__ import annotations

import gc
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

# faiss must be loaded before infomap: both are SWIG modules, and when infomap comes first its
# result iterators segfault inside faiss's SwigPyIterator (swig/swig#2913).
import faiss  # noqa: F401
import infomap
import numpy as np
from scipy.cluster.hierarchy import DisjointSet
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.cluster import DBSCAN, HDBSCAN, AgglomerativeClustering

from pipeline.config import ClusterConfig
from pipeline.errors import FacemineError
from pipeline.graph import MISSING, KnnGraph, build_knn, knn_between, normalize

UNASSIGNED = -1
# Pairwise distances in float64 for 40,000 faces take 6.4 GB.
HAC_MAX_FACES = 40_000

Clusterer = Callable[[np.ndarray, KnnGraph, ClusterConfig], np.ndarray]


# ---------------------------------------------------------------------------------------------
# Clusterers: (embeddings, graph, config) -> labels
# ---------------------------------------------------------------------------------------------


def infomap_clusters(embeddings: np.ndarray, graph: KnnGraph, config: ClusterConfig) -> np.ndarray:
    # Directed links: each face passes flow only to the neighbours in its own k-NN list, so flow
    # comes back to a face only from faces that list it too. A face whose nearest faces are
    # strangers who each have closer matches of their own (a person seen once among look-alikes)
    # gets little flow back and stays alone, while a poorly photographed face of a person with
    # many photos is listed by them and stays with them.
    source, target, similarity = graph.links(config.min_similarity)
    faces = np.arange(len(embeddings))
    # A link of every face to itself lets the random walk linger on it: a face then joins a
    # module only when its summed weight into that module outweighs the self-link, so a face
    # with a few weak links to strangers stays alone rather than being swallowed.
    links = np.vstack([
        np.column_stack([source, target, similarity - config.min_similarity]),
        np.column_stack([faces, faces, np.full(len(faces), config.infomap_self_weight)]),
    ])
    engine = infomap.Infomap(
        silent=True,
        two_level=True,
        directed=True,
        seed=config.seed,
        num_trials=config.infomap_trials,
        markov_time=config.infomap_markov_time,
    )
    engine.add_nodes(range(len(faces)))
    engine.add_links(links[links[:, 2] > 0])
    modules = engine.run().modules()
    return np.fromiter((modules[face] for face in faces), np.int64, len(faces))


def component_clusters(embeddings: np.ndarray, graph: KnnGraph, config: ClusterConfig) -> np.ndarray:
    source, target, _ = graph.edges(config.components_min_similarity)
    adjacency = coo_matrix((np.ones(len(source)), (source, target)), shape=(len(embeddings),) * 2)
    return connected_components(adjacency, directed=False)[1].astype(np.int64)


def hac_clusters(embeddings: np.ndarray, graph: KnnGraph, config: ClusterConfig) -> np.ndarray:
    # Exact agglomerative clustering over all pairs: restricting it to k-NN edges changes what
    # "average linkage" means (averages over edges only) and clearly lowers its quality.
    if len(embeddings) > HAC_MAX_FACES:
        raise FacemineError(
            f"hac needs memory quadratic in the number of faces; use infomap above {HAC_MAX_FACES} faces"
        )
    model = AgglomerativeClustering(
        n_clusters=None,
        metric="cosine",
        linkage=config.hac_linkage,
        distance_threshold=config.hac_distance_threshold,
    )
    return model.fit_predict(normalize(embeddings)).astype(np.int64)


def dbscan_clusters(embeddings: np.ndarray, graph: KnnGraph, config: ClusterConfig) -> np.ndarray:
    # DBSCAN over precomputed sparse distances sees only k-NN edges: neighbourhoods are
    # truncated at k, which is what keeps it O(N k) instead of O(N^2).
    distances = _cosine_distances(graph)
    model = DBSCAN(eps=config.dbscan_eps, min_samples=config.dbscan_min_samples, metric="precomputed")
    return model.fit_predict(distances).astype(np.int64)


def hdbscan_clusters(embeddings: np.ndarray, graph: KnnGraph, config: ClusterConfig) -> np.ndarray:
    # Euclidean distance between unit vectors is a monotone function of cosine distance.
    model = HDBSCAN(
        min_cluster_size=config.hdbscan_min_cluster_size,
        min_samples=config.hdbscan_min_samples,
        copy=True,
    )
    return model.fit_predict(normalize(embeddings)).astype(np.int64)


CLUSTERERS: dict[str, Clusterer] = {
    "infomap": infomap_clusters,
    "components": component_clusters,
    "hac": hac_clusters,
    "dbscan": dbscan_clusters,
    "hdbscan": hdbscan_clusters,
}


def get_clusterer(name: str) -> Clusterer:
    if name not in CLUSTERERS:
        raise FacemineError(f"unknown clustering method '{name}'; choose one of {', '.join(CLUSTERERS)}")
    return CLUSTERERS[name]


def knn_graph(embeddings: np.ndarray, config: ClusterConfig) -> KnnGraph:
    """The k-NN graph ``cluster`` builds (k capped below the number of faces)."""
    return build_knn(embeddings, min(config.k, max(len(embeddings) - 1, 1)), config)


def cluster(
    embeddings: np.ndarray, config: ClusterConfig = ClusterConfig(), graph: KnnGraph | None = None
) -> np.ndarray:
    """Labels of one set of faces by ``config.method`` (-1 = noise); builds the k-NN graph unless given.

    A lone face is a cluster of its own.
    """
    clusterer = get_clusterer(config.method)
    if len(embeddings) < 2:
        return np.zeros(len(embeddings), np.int64)
    return clusterer(embeddings, graph if graph is not None else knn_graph(embeddings, config), config)


def _cosine_distances(graph: KnnGraph) -> csr_matrix:
    """Symmetric sparse matrix of the graph's edges holding cosine distances (1 - similarity)."""
    source, target, similarity = graph.edges()
    distance = np.maximum(1.0 - similarity.astype(np.float64), 0.0)
    n = len(graph.indices)
    rows, cols = np.concatenate([source, target]), np.concatenate([target, source])
    return csr_matrix((np.concatenate([distance, distance]), (rows, cols)), shape=(n, n))


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Constraints:
    """Human decisions, as indices into the arrays given to ``cluster_faces``.

    ``fixed_members``: locked identities, identity key -> its faces, kept exactly.
    ``rejected``: (face, identity key) pairs; that face never ends up in that identity.
    ``excluded``: faces that are not faces; never assigned.
    """

    must_link: Sequence[tuple[int, int]] = ()
    cannot_link: Sequence[tuple[int, int]] = ()
    fixed_members: Mapping[Hashable, Sequence[int]] = field(default_factory=dict)
    rejected: Collection[tuple[int, Hashable]] = ()
    excluded: Collection[int] = ()


@dataclass(frozen=True)
class ClusterResult:
    """``labels`` (N,) int64, 0..n_identities-1 or -1 unassigned; ``confidence`` (N,) float32 in
    [0, 1]; ``source`` (N,) str: cluster | attached | decision | unassigned; ``identities``: per
    label, the earlier or locked identity key it continues, or None for a new identity;
    ``stats``: counts for the run record."""

    labels: np.ndarray
    confidence: np.ndarray
    source: np.ndarray
    identities: list[Hashable | None]
    stats: dict[str, int]


@dataclass(frozen=True)
class ClusterSummary:
    """What the cross-subset merge reads of C clusters: no member vectors beyond a few per cluster.

    ``centroids`` (C, D) float32: unit mean of each cluster's unit member vectors.
    ``subsets`` (C,) int64: the subset each cluster was found in (only clusters of different
    subsets merge).
    ``representatives`` (C, r) int64: rows of ``vectors`` holding each cluster's members closest
    to its centroid, closest first; -1 pads clusters with fewer than r members.
    ``vectors`` (R, D) float32: the representatives' unit vectors.
    """

    centroids: np.ndarray
    subsets: np.ndarray
    representatives: np.ndarray
    vectors: np.ndarray


@dataclass(frozen=True)
class SubsetClustering:
    """One subset's clustering (``cluster_subset``): all that the later steps of ``cluster_faces``
    need from it, as plain numpy arrays (picklable; a task returns it). For the subset's n faces,
    rows in the order of the vectors it was given:

    ``labels`` (n,) int64: local cluster of each face, -1 for noise.
    ``neighbours`` (n, k) int32: each face's k nearest other faces of the subset (rows), -1 missing.
    ``weights`` (n, k) float32: the weight of those edges above the graph floor,
    ``max(similarity - config.min_similarity, 0)`` (the graph confidence sums them).
    ``centroids`` (C, D), ``representatives`` (C, r), ``representative_vectors`` (R, D): the
    ``ClusterSummary`` fields of its C clusters (local labels >= 0, in increasing order).
    """

    labels: np.ndarray
    neighbours: np.ndarray
    weights: np.ndarray
    centroids: np.ndarray
    representatives: np.ndarray
    representative_vectors: np.ndarray


def subset_members(subsets: np.ndarray, passed: np.ndarray, constraints: Constraints = Constraints()) -> list[np.ndarray]:
    """Indices of the faces ``cluster_faces`` clusters in each subset (quality-passed, not locked,
    not excluded), one sorted array per subset in increasing subset id: the order in which it
    expects ``per_subset`` results, each from ``cluster_subset`` on ``embeddings[indices]``."""
    subsets, passed = np.asarray(subsets), np.asarray(passed)
    if subsets.shape != passed.shape or subsets.ndim != 1:
        raise FacemineError("subsets and passed must each hold one entry per face")
    return _subset_members(subsets, _clusterable(passed, constraints))


def cluster_subset(vectors: np.ndarray, config: ClusterConfig = ClusterConfig()) -> SubsetClustering:
    """Step 2 of ``cluster_faces`` for one subset: its faces' (n, D) vectors, clustered on their
    own k-NN graph by ``config.method``.

    Runs anywhere (a task on another machine): the result depends only on ``vectors`` and
    ``config``, and ``cluster_faces(..., per_subset=...)`` gives bit-identical identities to
    computing it itself, given the same ``config`` and the rows ``subset_members`` names of its
    (unit; stored embeddings are) ``embeddings``.
    """
    get_clusterer(config.method)
    vectors = normalize(vectors)
    graph = knn_graph(vectors, config) if len(vectors) > 1 else None
    labels = cluster(vectors, config, graph)
    if graph is None:
        neighbours, weights = np.full((len(vectors), 0), MISSING, np.int32), np.zeros((len(vectors), 0), np.float32)
    else:
        neighbours = graph.indices.astype(np.int32)
        weights = np.maximum(graph.similarities - config.min_similarity, 0.0)
    clustered = np.flatnonzero(labels >= 0)
    compact = np.unique(labels[clustered], return_inverse=True)[1]
    centroids = identity_centroids(compact, vectors[clustered])
    rows = _representatives(compact, vectors[clustered], centroids, config.merge_representatives)
    # Renumber the chosen rows 0..R-1 so that only their vectors travel.
    chosen = rows != MISSING
    representatives = np.full(rows.shape, MISSING, np.int64)
    representatives[chosen] = np.arange(chosen.sum())
    result = SubsetClustering(labels, neighbours, weights, centroids, representatives, vectors[clustered][rows[chosen]])
    del graph
    # Clustering leaves reference cycles holding its graph arrays (about 23 MB for 10K faces); a
    # long-lived Dask worker rarely runs a full collection, so without this it grows by that much
    # a task (benchmarks/cluster_scale.py: 0.77 GiB flat with it, +23 MiB a task without).
    gc.collect()
    return result


def combine_summaries(per_subset: Sequence[SubsetClustering]) -> ClusterSummary:
    """The ``ClusterSummary`` of all clusters of ``per_subset`` (result i is subset i), in order:
    subset by subset, each in increasing local label."""
    if not per_subset:
        return ClusterSummary(np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros((0, 0), np.int64),
                              np.zeros((0, 0), np.float32))
    offsets = np.cumsum([0] + [len(result.representative_vectors) for result in per_subset])
    representatives = [
        np.where(result.representatives != MISSING, result.representatives + offset, MISSING)
        for result, offset in zip(per_subset, offsets)
    ]
    return ClusterSummary(
        centroids=np.concatenate([result.centroids for result in per_subset]),
        subsets=np.repeat(np.arange(len(per_subset)), [len(result.centroids) for result in per_subset]),
        representatives=np.concatenate(representatives),
        vectors=np.concatenate([result.representative_vectors for result in per_subset]),
    )


def merge_clusters(
    summary: ClusterSummary, config: ClusterConfig = ClusterConfig(), conflicts: np.ndarray | None = None
) -> np.ndarray:
    """Step 3 of ``cluster_faces``: which clusters of different subsets show the same person.

    Reads only ``summary`` (centroids and representatives). Candidates are each centroid's
    ``config.k`` nearest centroids; a pair of different subsets merges when the median, over the
    representatives of both, of each one's best match on the other side reaches
    ``merge_min_similarity`` and each is the other's best match in the other's subset by
    ``merge_margin``; accepted pairs unite strongest first, except where a pair of clusters in
    ``conflicts`` ((M, 2) cluster indices, a cannot-link between their faces) would join.

    Returns (C,) int64: a group per cluster, the index of one cluster of it (equal values = one
    person). Merges made = C - number of distinct groups.
    """
    n_clusters = len(summary.centroids)
    if len(np.unique(summary.subsets)) < 2:
        return np.arange(n_clusters, dtype=np.int64)
    candidates = knn_between(summary.centroids, summary.centroids, min(config.k, n_clusters), config)
    pairs = _cross_subset_pairs(candidates, summary.subsets)
    score = _representative_agreement(pairs, summary.representatives, summary.vectors)
    accepted = _mutual_best(pairs, score, summary.subsets, config.merge_min_similarity, config.merge_margin)
    conflicts = np.zeros((0, 2), np.int64) if conflicts is None else np.asarray(conflicts, np.int64).reshape(-1, 2)
    return _union_without_conflicts(pairs[accepted], score[accepted], conflicts, n_clusters)


def cluster_faces(
    embeddings: np.ndarray,
    photos: np.ndarray,
    subsets: np.ndarray,
    passed: np.ndarray,
    constraints: Constraints = Constraints(),
    config: ClusterConfig = ClusterConfig(),
    previous: Mapping[int, Hashable] | None = None,
    per_subset: Sequence[SubsetClustering] | None = None,
) -> ClusterResult:
    """Identities of N faces; see the module docstring for the steps.

    ``photos`` (N,) photo id per face (faces of one photo are never one identity; a photo lies in
    one subset), ``subsets`` (N,) subset id per face, ``passed`` (N,) bool quality verdict,
    ``previous`` face index -> identity key of the run being replaced. ``per_subset``: step 2
    already done, one ``cluster_subset`` result per entry of ``subset_members(subsets, passed,
    constraints)`` with the same ``config`` (e.g. by parallel tasks); computed here when None.
    The result is the same either way.
    """
    get_clusterer(config.method)
    faces = _Faces.build(embeddings, photos, subsets, passed, constraints)
    members = _subset_members(faces.subsets, faces.clusterable)
    if per_subset is None:
        per_subset = [cluster_subset(faces.vectors[subset], config) for subset in members]
    _check_per_subset(per_subset, members)
    labels = _subset_labels(faces.n, members, per_subset)
    # Small clusters take part in the merge: one face per subset can still add up to a person.
    labels, merges = _merge_across_subsets(labels, faces, config, combine_summaries(per_subset))
    labels = _apply_must_links(labels, faces)
    labels, conflicts = _enforce_cannot_links(labels, faces, _centroid_similarity(labels, faces.vectors))
    labels = _dissolve_small(labels, config.min_cluster_size)

    labels, keys = _add_locked_identities(labels, faces)
    keys.update(_inherited_keys(labels, keys, previous or {}, faces, config.match_min_overlap))
    labels, rejections = _drop_rejected(labels, keys, faces)
    confidence = _graph_confidence(labels, members, per_subset)
    source = np.where(labels >= 0, "cluster", "unassigned").astype(object)
    decided = faces.fixed | (faces.must_linked & (labels >= 0))
    source[decided], confidence[decided] = "decision", 1.0

    attached, attached_labels, attached_confidence = _attach(labels, keys, faces, config)
    labels[attached], confidence[attached], source[attached] = attached_labels, attached_confidence, "attached"
    # Attached faces never displace members: their strength stays below any member's.
    strength = np.where(source == "attached", confidence - 2.0, 1.0)
    labels, displaced = _enforce_cannot_links(labels, faces, strength)
    source[labels < 0], confidence[labels < 0] = "unassigned", 0.0

    final, identities = _consecutive(labels, keys)
    stats = {
        "faces": faces.n,
        "identities": len(identities),
        **{f"source_{name}": int(np.sum(source == name)) for name in ("cluster", "attached", "decision", "unassigned")},
        "merged_across_subsets": merges,
        "removed_for_cannot_link": conflicts + displaced,
        "removed_for_rejection": rejections,
    }
    return ClusterResult(final, confidence.astype(np.float32), source.astype(str), identities, stats)


def match_identities(
    previous: Mapping[Hashable, Hashable],
    current: Mapping[Hashable, int],
    min_overlap: float = 0.5,
) -> dict[int, Hashable | None]:
    """Which earlier identity each new cluster continues, by face overlap.

    ``previous``: face key -> identity id of the earlier run; ``current``: face key -> new label.
    New clusters and old identities are paired one-to-one maximising the total number of shared
    faces (Hungarian algorithm, run per connected block of the overlap graph so it scales), among
    pairs where at least ``min_overlap`` of the cluster's previously assigned faces came from that
    identity. Returns every label of ``current``; None means a new identity.
    """
    matches: dict[int, Hashable | None] = {label: None for label in set(current.values())}
    shared = [face for face in current if face in previous]
    if not shared:
        return matches
    new_values, new = np.unique(np.array([current[face] for face in shared]), return_inverse=True)
    old_values = list(dict.fromkeys(previous[face] for face in shared))
    position = {identity: index for index, identity in enumerate(old_values)}
    old = np.array([position[previous[face]] for face in shared])
    overlap = coo_matrix((np.ones(len(shared)), (new, old)), shape=(len(new_values), len(old_values))).tocsr().tocoo()
    labelled = np.bincount(overlap.row, weights=overlap.data, minlength=len(new_values))
    eligible = overlap.data >= min_overlap * labelled[overlap.row]
    rows, cols, counts = overlap.row[eligible], overlap.col[eligible], overlap.data[eligible]
    for row, col in _max_overlap_assignment(rows, cols, counts, len(new_values)):
        matches[int(new_values[row])] = old_values[col]
    return matches


def _max_overlap_assignment(
    rows: np.ndarray, cols: np.ndarray, counts: np.ndarray, n_rows: int
) -> list[tuple[int, int]]:
    """Maximum-weight one-to-one matching, solved block by block of the bipartite overlap graph."""
    if len(rows) == 0:
        return []
    n_nodes = n_rows + int(cols.max()) + 1
    graph = coo_matrix((np.ones(len(rows)), (rows, cols + n_rows)), shape=(n_nodes, n_nodes))
    block = connected_components(graph, directed=False)[1][rows]
    # Most blocks are one cluster facing one identity: they match without an assignment problem.
    alone = np.bincount(block)[block] == 1
    pairs = list(zip(rows[alone].tolist(), cols[alone].tolist()))
    shared = np.flatnonzero(~alone)
    shared = shared[np.argsort(block[shared], kind="stable")]
    for member in np.split(shared, np.flatnonzero(np.diff(block[shared])) + 1) if len(shared) else []:
        block_rows, row_index = np.unique(rows[member], return_inverse=True)
        block_cols, col_index = np.unique(cols[member], return_inverse=True)
        weights = np.zeros((len(block_rows), len(block_cols)))
        weights[row_index, col_index] = counts[member]
        chosen = zip(*linear_sum_assignment(weights, maximize=True))
        pairs += [(int(block_rows[r]), int(block_cols[c])) for r, c in chosen if weights[r, c] > 0]
    return pairs


@dataclass(frozen=True)
class _Faces:
    """Validated inputs of one ``cluster_faces`` call."""

    vectors: np.ndarray
    photos: np.ndarray
    subsets: np.ndarray
    clusterable: np.ndarray
    fixed: np.ndarray
    excluded: np.ndarray
    must_link: np.ndarray
    must_linked: np.ndarray
    cannot_link: np.ndarray
    # Must-link group of each face (faces without must-links are alone in theirs).
    units: np.ndarray
    fixed_members: dict[Hashable, np.ndarray]
    rejected: frozenset[tuple[int, Hashable]]

    @property
    def n(self) -> int:
        return len(self.vectors)

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        photos: np.ndarray,
        subsets: np.ndarray,
        passed: np.ndarray,
        constraints: Constraints,
    ) -> _Faces:
        vectors = normalize(embeddings)
        n = len(vectors)
        photos, subsets, passed = (np.asarray(array) for array in (photos, subsets, passed))
        if not photos.shape == subsets.shape == passed.shape == (n,):
            raise FacemineError(f"photos, subsets and passed must each hold one entry per face ({n})")
        excluded = _mask(n, constraints.excluded)
        fixed_members = {key: np.asarray(list(members), np.int64) for key, members in constraints.fixed_members.items()}
        fixed_faces = np.concatenate([np.zeros(0, np.int64), *fixed_members.values()])
        _check_indices(fixed_faces, n, "fixed member")
        if len(np.unique(fixed_faces)) < len(fixed_faces):
            raise FacemineError("a face is a member of two locked identities")
        fixed = _mask(n, fixed_faces) & ~excluded
        fixed_members = {key: members[~excluded[members]] for key, members in fixed_members.items()}
        must_link = _pairs(constraints.must_link, n, "must-link")
        cannot_link = _pairs(constraints.cannot_link, n, "cannot-link")
        # A locked identity's member list is the decision that counts; must-links touching it or
        # a not-a-face are moot.
        must_link = must_link[~(fixed | excluded)[must_link].any(axis=1)]
        units = connected_components(
            coo_matrix((np.ones(len(must_link)), (must_link[:, 0], must_link[:, 1])), shape=(n, n)), directed=False
        )[1]
        contradictory = units[cannot_link[:, 0]] == units[cannot_link[:, 1]]
        if contradictory.any():
            a, b = cannot_link[contradictory][0]
            raise FacemineError(f"contradictory decisions: faces {a} and {b} are both must-linked and cannot-linked")
        return cls(
            vectors=vectors,
            photos=photos,
            subsets=subsets,
            clusterable=_clusterable(passed, constraints),
            fixed=fixed,
            excluded=excluded,
            must_link=must_link,
            must_linked=_mask(n, must_link.ravel()),
            cannot_link=cannot_link,
            units=units,
            fixed_members=fixed_members,
            rejected=frozenset((int(face), key) for face, key in constraints.rejected),
        )


def _clusterable(passed: np.ndarray, constraints: Constraints) -> np.ndarray:
    """Faces clustered by subset: quality-passed, neither in a locked identity nor excluded."""
    n = len(passed)
    locked = [np.asarray(list(members), np.int64) for members in constraints.fixed_members.values()]
    fixed_faces = np.concatenate([np.zeros(0, np.int64), *locked])
    return np.asarray(passed).astype(bool) & ~_mask(n, fixed_faces) & ~_mask(n, constraints.excluded)


def _mask(n: int, indices: Collection[int] | np.ndarray) -> np.ndarray:
    chosen = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices, np.int64)
    _check_indices(chosen, n, "face")
    mask = np.zeros(n, bool)
    mask[chosen] = True
    return mask


def _pairs(pairs: Sequence[tuple[int, int]], n: int, name: str) -> np.ndarray:
    array = np.asarray(pairs, np.int64).reshape(-1, 2)
    _check_indices(array, n, name)
    return array


def _check_indices(indices: np.ndarray, n: int, name: str) -> None:
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        raise FacemineError(f"{name} index out of range for {n} faces")


def _subset_members(subsets: np.ndarray, clusterable: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(clusterable & (subsets == subset)) for subset in np.unique(subsets[clusterable])]


def _check_per_subset(per_subset: Sequence[SubsetClustering], members: list[np.ndarray]) -> None:
    sizes = [len(result.labels) for result in per_subset]
    if sizes != [len(subset) for subset in members]:
        raise FacemineError(
            f"per-subset results hold {sizes} faces; the subsets cluster {[len(subset) for subset in members]}"
        )


def _subset_labels(n: int, members: list[np.ndarray], per_subset: Sequence[SubsetClustering]) -> np.ndarray:
    """Global labels: each subset's local labels shifted past the labels of the subsets before it."""
    labels = np.full(n, UNASSIGNED, np.int64)
    for subset, result in zip(members, per_subset):
        labels[subset] = np.where(result.labels >= 0, result.labels + labels.max() + 1, UNASSIGNED)
    return labels


def _dissolve_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    sizes = np.bincount(labels[labels >= 0])
    small = (labels >= 0) & (sizes[np.maximum(labels, 0)] < min_size)
    return np.where(small, UNASSIGNED, labels)


def identity_centroids(labels: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """(max label + 1, D) unit mean of the unit ``vectors`` of each label >= 0 (zero rows for unused labels)."""
    assigned = labels >= 0
    sums = np.zeros((labels.max(initial=-1) + 1, vectors.shape[1]), np.float64)
    np.add.at(sums, labels[assigned], vectors[assigned])
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return (sums / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _centroid_similarity(labels: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Each assigned face's cosine similarity to its cluster centroid; -1 when unassigned."""
    centroids = identity_centroids(labels, vectors)
    similarity = np.full(len(labels), -1.0, np.float32)
    assigned = labels >= 0
    similarity[assigned] = np.einsum("ij,ij->i", vectors[assigned], centroids[labels[assigned]])
    return similarity


def _merge_across_subsets(
    labels: np.ndarray, faces: _Faces, config: ClusterConfig, summary: ClusterSummary
) -> tuple[np.ndarray, int]:
    """Merge clusters of different subsets that show the same person; returns labels and merge count.

    ``summary`` describes the clusters of ``labels`` in increasing label order."""
    clustered = np.flatnonzero(labels >= 0)
    cluster_ids, compact = np.unique(labels[clustered], return_inverse=True)
    cluster_of_face = np.full(faces.n, MISSING, np.int64)
    cluster_of_face[clustered] = compact
    conflicts = cluster_of_face[faces.cannot_link]
    conflicts = conflicts[(conflicts >= 0).all(axis=1) & (conflicts[:, 0] != conflicts[:, 1])]
    groups = merge_clusters(summary, config, conflicts)
    merged = labels.copy()
    merged[clustered] = cluster_ids[groups[compact]]
    return merged, len(cluster_ids) - len(np.unique(groups))


def _cross_subset_pairs(candidates: KnnGraph, cluster_subsets: np.ndarray) -> np.ndarray:
    """Unique (a, b), a < b, candidate pairs of clusters from different subsets."""
    n, k = candidates.indices.shape
    source = np.repeat(np.arange(n), k)
    target = candidates.indices.ravel()
    valid = (target != MISSING) & (cluster_subsets[source] != cluster_subsets[np.maximum(target, 0)])
    pairs = np.sort(np.stack([source[valid], target[valid]], axis=1), axis=1)
    return np.unique(pairs, axis=0)


def _representatives(compact: np.ndarray, vectors: np.ndarray, centroids: np.ndarray, count: int) -> np.ndarray:
    """(clusters, count) row indices of each cluster's members closest to its centroid, -1 padded."""
    closeness = np.einsum("ij,ij->i", vectors, centroids[compact])
    order = np.lexsort((-closeness, compact))
    starts = np.searchsorted(compact[order], np.arange(len(centroids)))
    rank = np.arange(len(order)) - starts[compact[order]]
    chosen = rank < count
    representatives = np.full((len(centroids), count), MISSING, np.int64)
    representatives[compact[order][chosen], rank[chosen]] = order[chosen]
    return representatives


def _representative_agreement(
    pairs: np.ndarray, representatives: np.ndarray, vectors: np.ndarray, chunk: int = 4096
) -> np.ndarray:
    """Per cluster pair: median, over the representatives of both, of each one's best match on the other side.

    A median over several representatives needs most of them to agree, so one look-alike face
    (or one mislabelled member) neither makes nor breaks a merge the way one centroid could.
    """
    padded = np.vstack([vectors, np.full((1, vectors.shape[1]), np.nan, vectors.dtype)])
    scores = np.empty(len(pairs), np.float32)
    for start in range(0, len(pairs), chunk):
        a, b = representatives[pairs[start:start + chunk, 0]], representatives[pairs[start:start + chunk, 1]]
        # Missing representatives (index -1) pick the NaN row and drop out of max and median.
        similarity = np.nan_to_num(np.einsum("prd,pqd->prq", padded[a], padded[b]), nan=-np.inf)
        best = np.concatenate([similarity.max(axis=2), similarity.max(axis=1)], axis=1)
        best[np.isinf(best)] = np.nan
        scores[start:start + chunk] = np.nanmedian(best, axis=1)
    return scores


def _mutual_best(
    pairs: np.ndarray, score: np.ndarray, cluster_subsets: np.ndarray, min_similarity: float, margin: float
) -> np.ndarray:
    """Pairs that clear ``min_similarity`` and are each other's best match in the other's subset by ``margin``."""
    source = np.concatenate([pairs[:, 0], pairs[:, 1]])
    target_subset = cluster_subsets[np.concatenate([pairs[:, 1], pairs[:, 0]])]
    directed_score = np.concatenate([score, score])
    # Sort the candidates of each (cluster, other subset) group by decreasing score.
    order = np.lexsort((-directed_score, target_subset, source))
    group_source, group_subset, ranked = source[order], target_subset[order], directed_score[order]
    starts_group = np.r_[True, (group_source[1:] != group_source[:-1]) | (group_subset[1:] != group_subset[:-1])]
    next_in_group = np.r_[~starts_group[1:], False]
    runner_up = np.where(next_in_group, np.r_[ranked[1:], -np.inf], -np.inf)
    best_with_margin = np.empty(len(order), bool)
    best_with_margin[order] = starts_group & (ranked - runner_up >= margin)
    return (score >= min_similarity) & best_with_margin[: len(pairs)] & best_with_margin[len(pairs):]


def _union_without_conflicts(pairs: np.ndarray, score: np.ndarray, conflicts: np.ndarray, n_clusters: int) -> np.ndarray:
    """Group id per cluster after uniting accepted pairs, strongest first, skipping groups that
    would join ``conflicts`` (cluster pairs)."""
    partners: dict[int, set[int]] = {}
    for a, b in conflicts:
        partners.setdefault(int(a), set()).add(int(b))
        partners.setdefault(int(b), set()).add(int(a))
    groups = DisjointSet(range(n_clusters))
    for index in np.argsort(-score, kind="stable"):
        a, b = (int(value) for value in pairs[index])
        # Without conflicts there is nothing to check (and a group's members are not walked).
        if not partners or not any(
            groups.connected(other, b) for member in groups.subset(a) for other in partners.get(member, ())
        ):
            groups.merge(a, b)
    return np.array([groups[cluster] for cluster in range(n_clusters)], np.int64)


def _apply_must_links(labels: np.ndarray, faces: _Faces) -> np.ndarray:
    """Unite the clusters of must-linked faces; unassigned must-linked faces join (or form) them."""
    if len(faces.must_link) == 0:
        return labels
    assigned = np.flatnonzero(labels >= 0)
    n_nodes = faces.n + labels.max(initial=-1) + 1
    # Faces are nodes 0..n-1 and each cluster one node after them, so membership is an edge too.
    rows = np.concatenate([faces.must_link[:, 0], assigned])
    cols = np.concatenate([faces.must_link[:, 1], faces.n + labels[assigned]])
    links = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_nodes, n_nodes))
    component = connected_components(links, directed=False)[1]
    face_component = component[: faces.n]
    faces_in_component = np.bincount(face_component)
    return np.where((labels >= 0) | (faces_in_component[face_component] >= 2), face_component, UNASSIGNED)


def _enforce_cannot_links(labels: np.ndarray, faces: _Faces, strength: np.ndarray) -> tuple[np.ndarray, int]:
    """Remove from each cluster the weaker side of every cannot-link inside it; returns labels and faces removed.

    Must-linked groups move as one (their mean strength counts); locked members are never touched.
    Greedy by decreasing strength: a group stays unless it conflicts with a group already kept.
    """
    pairs = _conflicting_pairs(labels, faces)
    units = faces.units[pairs]
    units = units[units[:, 0] != units[:, 1]]
    if len(units) == 0:
        return labels, 0
    unit_strength = np.bincount(faces.units, weights=strength) / np.bincount(faces.units)
    partners: dict[int, set[int]] = {}
    for a, b in units:
        partners.setdefault(int(a), set()).add(int(b))
        partners.setdefault(int(b), set()).add(int(a))
    kept: set[int] = set()
    removed = []
    for unit in sorted(partners, key=lambda unit: -unit_strength[unit]):
        if partners[unit] & kept:
            removed.append(unit)
        else:
            kept.add(unit)
    leaving = np.isin(faces.units, removed) & (labels >= 0)
    return np.where(leaving, UNASSIGNED, labels), int(leaving.sum())


def _conflicting_pairs(labels: np.ndarray, faces: _Faces) -> np.ndarray:
    """(M, 2) cannot-linked face pairs sharing a cluster: same photo, or a human cannot-link."""
    candidates = np.flatnonzero((labels >= 0) & ~faces.fixed)
    order = candidates[np.lexsort((faces.photos[candidates], labels[candidates]))]
    key = np.stack([labels[order], faces.photos[order]], axis=1)
    boundaries = np.flatnonzero(np.any(key[1:] != key[:-1], axis=1)) + 1
    same_photo = [
        (int(a), int(b))
        for group in np.split(order, boundaries)
        if len(group) > 1
        for position, a in enumerate(group)
        for b in group[position + 1:]
    ]
    human = faces.cannot_link[
        (labels[faces.cannot_link[:, 0]] >= 0) & (labels[faces.cannot_link[:, 0]] == labels[faces.cannot_link[:, 1]])
    ]
    return np.concatenate([np.asarray(same_photo, np.int64).reshape(-1, 2), human])


def _add_locked_identities(labels: np.ndarray, faces: _Faces) -> tuple[np.ndarray, dict[int, Hashable | None]]:
    """Give each locked identity a label of its own; returns labels and label -> identity key."""
    labels = labels.copy()
    keys: dict[int, Hashable | None] = {}
    next_label = labels.max(initial=-1) + 1
    for key, members in faces.fixed_members.items():
        labels[members] = next_label
        keys[next_label] = key
        next_label += 1
    return labels, keys


def _inherited_keys(
    labels: np.ndarray,
    keys: Mapping[int, Hashable | None],
    previous: Mapping[int, Hashable],
    faces: _Faces,
    min_overlap: float,
) -> dict[int, Hashable | None]:
    """Earlier identity key (or None) for every unlocked label, by face overlap."""
    locked_keys = set(keys.values())
    earlier = {face: key for face, key in previous.items() if key not in locked_keys}
    current = {int(face): int(labels[face]) for face in np.flatnonzero((labels >= 0) & ~faces.fixed)}
    return match_identities(earlier, current, min_overlap)


def _drop_rejected(labels: np.ndarray, keys: Mapping[int, Hashable | None], faces: _Faces) -> tuple[np.ndarray, int]:
    """Unassign faces that now sit in an identity a human rejected them from."""
    rejected = [
        face for face, key in faces.rejected
        if labels[face] >= 0 and not faces.fixed[face] and keys.get(int(labels[face])) == key
    ]
    labels = labels.copy()
    labels[rejected] = UNASSIGNED
    return labels, len(rejected)


def _graph_confidence(labels: np.ndarray, members: list[np.ndarray], per_subset: Sequence[SubsetClustering]) -> np.ndarray:
    """Share of each face's above-floor k-NN edge weight that stays in its own identity (0 when unassigned)."""
    confidence = np.zeros(len(labels), np.float64)
    for subset, result in zip(members, per_subset):
        neighbours = np.where(result.neighbours == MISSING, MISSING, subset[np.maximum(result.neighbours, 0)])
        own = labels[subset]
        same = (neighbours != MISSING) & (labels[np.maximum(neighbours, 0)] == own[:, None]) & (own[:, None] >= 0)
        total = result.weights.sum(axis=1)
        own_weight = (result.weights * same).sum(axis=1)
        confidence[subset] = np.divide(own_weight, total, out=np.zeros_like(total, np.float64), where=total > 0)
    confidence[labels < 0] = 0.0
    return confidence


def _attach(
    labels: np.ndarray, keys: Mapping[int, Hashable | None], faces: _Faces, config: ClusterConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unassigned faces confidently close to one unlocked identity: (faces, their labels, confidence)."""
    single = np.bincount(faces.units)[faces.units] == 1
    candidates = np.flatnonzero((labels < 0) & ~faces.excluded & ~faces.fixed & single)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))
    if len(candidates) == 0 or labels.max(initial=-1) < 0:
        return empty
    assigned = labels >= 0
    used, compact = np.unique(labels[assigned], return_inverse=True)
    nearest = knn_between(faces.vectors[candidates], identity_centroids(compact, faces.vectors[assigned]), 2, config)
    best, runner_up = nearest.similarities[:, 0], nearest.similarities[:, 1]
    best_label = used[nearest.indices[:, 0]]
    locked = np.isin(best_label, labels[faces.fixed])
    rejected = np.array(
        [(int(face), keys.get(int(label))) in faces.rejected for face, label in zip(candidates, best_label)], bool
    )
    close = (best >= config.attach_min_similarity) & (best - runner_up >= config.attach_margin)
    confident = close & ~locked & ~rejected
    floor = config.min_similarity
    own, other = best[confident] - floor, np.maximum(runner_up[confident] - floor, 0.0)
    return candidates[confident], best_label[confident], own / (own + other)


def _consecutive(labels: np.ndarray, keys: Mapping[int, Hashable | None]) -> tuple[np.ndarray, list[Hashable | None]]:
    """Labels renumbered 0..m-1 in order of first appearance, with each new label's identity key."""
    used, first, inverse = np.unique(labels[labels >= 0], return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))
    final = np.full(len(labels), UNASSIGNED, np.int64)
    final[labels >= 0] = rank[inverse]
    identities: list[Hashable | None] = [None] * len(used)
    for label, position in zip(used, rank):
        identities[position] = keys.get(int(label))
    return final, identities
