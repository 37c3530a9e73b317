"""k-NN graph: exact neighbours, self exclusion, IVF recall, cross-set search (synthetic geometry)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import ClusterConfig
from pipeline.errors import FacemineError
from pipeline.graph import MISSING, KnnGraph, build_knn, knn_between


def sphere_clusters(n_centres: int, per_centre: int, dim: int = 64, noise: float = 1.0, seed: int = 0) -> np.ndarray:
    """Unit vectors scattered around random unit centres (cosine to the centre about 1/sqrt(1+noise^2))."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_centres, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    offsets = noise * rng.normal(size=(n_centres * per_centre, dim)) / np.sqrt(dim)
    points = np.repeat(centres, per_centre, axis=0) + offsets
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def test_exact_graph_matches_brute_force_and_excludes_self() -> None:
    vectors = sphere_clusters(10, 30)
    graph = build_knn(vectors * 3.0, k=8)  # unnormalised input is normalised first

    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    expected = np.sort(similarity, axis=1)[:, ::-1][:, :8]
    assert graph.indices.shape == (300, 8) and graph.indices.dtype == np.int64
    assert not np.any(graph.indices == np.arange(300)[:, None])
    np.testing.assert_allclose(graph.similarities, expected, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(similarity, graph.indices, axis=1), graph.similarities, atol=1e-5)


def test_identical_vectors_find_each_other_not_themselves() -> None:
    vectors = sphere_clusters(4, 1)
    graph = build_knn(np.vstack([vectors, vectors]), k=1)

    np.testing.assert_array_equal(graph.indices[:, 0], [4, 5, 6, 7, 0, 1, 2, 3])
    np.testing.assert_allclose(graph.similarities[:, 0], 1.0, atol=1e-6)


@pytest.mark.parametrize("codes", ["pq4", "flat"])
def test_ivf_recall_close_to_exact_on_clustered_points(codes: str) -> None:
    vectors = sphere_clusters(400, 25, dim=128, noise=1.0)
    exact = build_knn(vectors, k=10)
    ivf = ClusterConfig(
        exact_index_max_cpu=1000, exact_index_max_gpu=1000, ivf_codes=codes, ivf_nprobe=16, query_batch=3000
    )
    approximate = build_knn(vectors, k=10, config=ivf)

    found = [len(np.intersect1d(a, b)) for a, b in zip(exact.indices, approximate.indices)]
    recall = np.sum(found) / exact.indices.size
    assert recall > 0.9
    # The true same-centre neighbours are what matters for clustering: nearly all survive.
    same_centre = approximate.indices // 25 == np.arange(len(vectors))[:, None] // 25
    assert same_centre[:, :5].mean() > 0.95


def test_quantized_ivf_rescores_its_candidates_exactly() -> None:
    # 200 tight identities (cosine about 0.8 inside one) in 51 IVF lists, 8 probed: the 4-bit codes
    # only pick candidates, which are then scored on the full vectors, so the graph is the exact one.
    vectors = sphere_clusters(200, 10, dim=128, noise=0.5)
    exact = build_knn(vectors, k=9)
    quantized = ClusterConfig(exact_index_max_cpu=1000, exact_index_max_gpu=1000, ivf_codes="pq4", ivf_nprobe=8)
    approximate = build_knn(vectors, k=9, config=quantized)

    np.testing.assert_array_equal(np.sort(approximate.indices, axis=1), np.sort(exact.indices, axis=1))
    assert np.all(approximate.indices // 10 == np.arange(2000)[:, None] // 10)  # all nine of its own identity
    similarity = vectors @ vectors.T
    rescored = np.take_along_axis(similarity, approximate.indices, axis=1)
    np.testing.assert_allclose(approximate.similarities, rescored, atol=1e-5)


def test_ivf_over_too_few_vectors_for_a_code_book_scans_them_in_full() -> None:
    vectors = sphere_clusters(4, 3)  # 12 vectors: fewer than the 16 centroids of a 4-bit code book
    forced = ClusterConfig(exact_index_max_cpu=1, exact_index_max_gpu=1, ivf_codes="pq4")
    approximate = build_knn(vectors, k=3, config=forced)

    exact = build_knn(vectors, k=3)
    np.testing.assert_array_equal(approximate.indices, exact.indices)
    np.testing.assert_allclose(approximate.similarities, exact.similarities, atol=1e-6)


def test_small_sets_are_padded_with_missing_neighbours() -> None:
    graph = build_knn(sphere_clusters(1, 3), k=5)

    assert graph.indices.shape == (3, 5)
    assert np.all(graph.indices[:, 2:] == MISSING)
    assert np.all(np.isneginf(graph.similarities[:, 2:]))


def test_knn_between_indexes_the_base_set() -> None:
    base = sphere_clusters(20, 1, seed=1)
    queries = base[[3, 17]] + 0.01
    nearest = knn_between(queries, base, k=2)

    np.testing.assert_array_equal(nearest.indices[:, 0], [3, 17])
    assert np.all(nearest.similarities[:, 0] >= nearest.similarities[:, 1])


def test_edges_are_undirected_unique_and_thresholded() -> None:
    graph = build_knn(sphere_clusters(5, 20), k=6)
    source, target, similarity = graph.edges(min_similarity=0.3)

    assert np.all(source < target)
    assert len(np.unique(np.stack([source, target]), axis=1).T) == len(source)
    assert similarity.min() >= 0.3


def test_links_keep_each_rows_own_neighbours_and_edges_merge_both_directions() -> None:
    graph = KnnGraph(
        indices=np.array([[1, 2], [0, MISSING], [0, 1]]),
        similarities=np.array([[0.9, 0.5], [0.9, -np.inf], [0.5, 0.4]], np.float32),
    )

    source, target, similarity = graph.links(min_similarity=0.45)
    assert sorted(zip(source.tolist(), target.tolist())) == [(0, 1), (0, 2), (1, 0), (2, 0)]
    assert similarity.min() >= 0.45
    source, target, similarity = graph.edges(min_similarity=0.45)
    assert list(zip(source.tolist(), target.tolist())) == [(0, 1), (0, 2)]
    np.testing.assert_allclose(similarity, [0.9, 0.5])


def test_zero_vector_is_rejected() -> None:
    vectors = sphere_clusters(2, 3)
    vectors[1] = 0.0
    with pytest.raises(FacemineError):
        build_knn(vectors, k=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_cuda_request_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(FacemineError):
        build_knn(sphere_clusters(2, 3), k=2, config=ClusterConfig(device="cuda"))
