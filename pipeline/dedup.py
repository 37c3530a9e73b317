"""Duplicate and outlier faces inside identities.

Public API
----------
``find_duplicates(groups, quality, content_hashes, perceptual_hashes=None, embeddings=None,
config=DedupConfig()) -> duplicate_of``
    Per face, -1 or the index of the copy kept in its place. Faces are compared only within their
    group (an identity label; -1 means ungrouped, never compared). Two faces are copies when their
    photos have the same content hash (same bytes), when the photos' 64-bit perceptual hashes
    (``pipeline.ingest.perceptual_hash``) differ in at most ``near_duplicate_max_hamming`` bits
    (the same shot re-encoded, resized, slightly cropped), or when their chip embeddings reach
    ``near_duplicate_min_similarity``. Copies chain: each connected set keeps its best-quality face
    (the lowest index among equals) and every other member points to it.
``find_outliers(embeddings, labels, max_distance) -> mask``
    True for faces whose cosine distance to their identity's centroid exceeds ``max_distance``.

Hamming and cosine neighbourhoods come from faiss range searches inside each group, so memory
grows with the duplicates found, not with the square of an identity's size.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.cluster import identity_centroids
from pipeline.config import DedupConfig
from pipeline.errors import FacemineError
from pipeline.graph import normalize

NOT_DUPLICATE = -1
_HASH_BITS = 64


def find_duplicates(
    groups: np.ndarray,
    quality: np.ndarray,
    content_hashes: Sequence[str | None],
    perceptual_hashes: Sequence[str | None] | None = None,
    embeddings: np.ndarray | None = None,
    config: DedupConfig = DedupConfig(),
) -> np.ndarray:
    """(N,) int64: -1 for kept or unique faces, else the index of the kept copy."""
    groups = np.asarray(groups, np.int64)
    quality = np.asarray(quality, np.float64)
    n = len(groups)
    if quality.shape != (n,) or len(content_hashes) != n:
        raise FacemineError(f"groups, quality and content_hashes must each hold one entry per face ({n})")
    pairs = [_same_content(groups, content_hashes)]
    if perceptual_hashes is not None:
        pairs.append(_close_hashes(groups, perceptual_hashes, config.near_duplicate_max_hamming))
    if embeddings is not None:
        pairs.append(_close_embeddings(groups, embeddings, config.near_duplicate_min_similarity))
    return _keep_best(np.concatenate(pairs), quality)


def find_outliers(embeddings: np.ndarray, labels: np.ndarray, max_distance: float) -> np.ndarray:
    """(N,) bool: assigned faces farther than ``max_distance`` (1 - cosine) from their identity centroid."""
    labels = np.asarray(labels, np.int64)
    vectors = normalize(embeddings)
    assigned = labels >= 0
    used, compact = np.unique(labels[assigned], return_inverse=True)
    centroids = identity_centroids(compact, vectors[assigned])
    outliers = np.zeros(len(labels), bool)
    outliers[assigned] = 1.0 - np.einsum("ij,ij->i", vectors[assigned], centroids[compact]) > max_distance
    return outliers


def _same_content(groups: np.ndarray, content_hashes: Sequence[str | None]) -> np.ndarray:
    """Pairs (face, first face of the same group with the same content hash)."""
    known = np.array([value is not None for value in content_hashes], bool) & (groups >= 0)
    faces = np.flatnonzero(known)
    keys = np.array([f"{groups[face]}/{content_hashes[face]}" for face in faces], dtype=object)
    _, first, bucket = np.unique(keys.astype(str), return_index=True, return_inverse=True)
    return np.stack([faces, faces[first[bucket]]], axis=1).reshape(-1, 2)


def _close_hashes(groups: np.ndarray, perceptual_hashes: Sequence[str | None], max_hamming: int) -> np.ndarray:
    """Pairs of same-group faces whose perceptual hashes differ in at most ``max_hamming`` bits."""
    known = np.array([value is not None for value in perceptual_hashes], bool)
    if len(perceptual_hashes) != len(groups):
        raise FacemineError("perceptual_hashes must hold one entry per face")
    codes = np.zeros((len(groups), _HASH_BITS // 8), np.uint8)
    for face in np.flatnonzero(known):
        codes[face] = _hash_bytes(perceptual_hashes[face])
    pairs = []
    for members in _group_members(groups, known):
        index = faiss.IndexBinaryFlat(_HASH_BITS)
        index.add(codes[members])
        # faiss returns distances strictly below the radius.
        pairs.append(_range_pairs(members, *index.range_search(codes[members], max_hamming + 1)))
    return np.concatenate([np.zeros((0, 2), np.int64), *pairs])


def _close_embeddings(groups: np.ndarray, embeddings: np.ndarray, min_similarity: float) -> np.ndarray:
    """Pairs of same-group faces whose embeddings reach ``min_similarity`` cosine."""
    vectors = normalize(embeddings)
    if len(vectors) != len(groups):
        raise FacemineError("embeddings must hold one row per face")
    pairs = []
    for members in _group_members(groups, np.ones(len(groups), bool)):
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors[members])
        # faiss keeps similarities strictly above the threshold; step just below it to include it.
        threshold = float(np.nextafter(np.float32(min_similarity), np.float32(-np.inf)))
        pairs.append(_range_pairs(members, *index.range_search(vectors[members], threshold)))
    return np.concatenate([np.zeros((0, 2), np.int64), *pairs])


def _hash_bytes(value: str) -> np.ndarray:
    try:
        code = np.frombuffer(bytes.fromhex(value), np.uint8)
    except ValueError as error:
        raise FacemineError(f"perceptual hash '{value}' is not hexadecimal") from error
    if len(code) != _HASH_BITS // 8:
        raise FacemineError(f"perceptual hash '{value}' is not {_HASH_BITS} bits")
    return code


def _group_members(groups: np.ndarray, usable: np.ndarray) -> Iterator[np.ndarray]:
    """Face indices of each group (label >= 0) with at least two usable faces."""
    faces = np.flatnonzero(usable & (groups >= 0))
    order = faces[np.argsort(groups[faces], kind="stable")]
    boundaries = np.flatnonzero(np.diff(groups[order])) + 1
    yield from (members for members in np.split(order, boundaries) if len(members) > 1)


def _range_pairs(members: np.ndarray, limits: np.ndarray, _: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """(face, neighbour) global index pairs from a faiss range-search result over ``members``."""
    queries = np.repeat(np.arange(len(members)), np.diff(limits.astype(np.int64)))
    return np.stack([members[queries], members[neighbours]], axis=1)


def _keep_best(pairs: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """Within each connected set of copies, point every face at the best-quality one."""
    n = len(quality)
    copies = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    component = connected_components(copies, directed=False)[1]
    # Best quality first, then lowest index: the first face of each component in this order is kept.
    order = np.lexsort((np.arange(n), -quality, component))
    starts = np.r_[True, component[order][1:] != component[order][:-1]]
    kept_of_component = np.empty(component.max() + 1, np.int64)
    kept_of_component[component[order][starts]] = order[starts]
    kept = kept_of_component[component]
    return np.where(kept == np.arange(n), NOT_DUPLICATE, kept)
