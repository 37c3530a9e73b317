"""k-nearest-neighbour graphs over face embeddings (faiss, cosine similarity).

Embeddings are compared by inner product after L2 normalisation, i.e. by cosine similarity.

Public API
----------
``KnnGraph``
    ``indices`` (N, k) int64 and ``similarities`` (N, k) float32, each row sorted by decreasing
    similarity. A row lists fewer than k real neighbours only when the base set is smaller than k
    or an approximate index returned fewer; missing slots hold index -1 and similarity -inf.
``build_knn(embeddings, k, config) -> KnnGraph``
    Each face's k nearest *other* faces (self excluded).
``knn_between(queries, base, k, config) -> KnnGraph``
    Each query's k nearest rows of ``base`` (indices into ``base``); used for cross-set questions
    such as attaching a face to identity centroids.

Index settings come from ``ClusterConfig``: an exact ``IndexFlatIP`` up to
``exact_index_max_gpu`` / ``exact_index_max_cpu`` base vectors, an IVF index (about 4*sqrt(N)
lists, ``ivf_nprobe`` of them searched) beyond. On the CPU its lists hold 4-bit PQ codes scanned
by faiss's fast-scan kernels, and an ``IndexRefineFlat`` re-scores the best ``ivf_rerank_factor``
x k candidates with exact inner products (``ivf_codes="pq4"``), or full vectors
(``IndexIVFFlat``, ``ivf_codes="flat"``, always on the GPU). With ``device="auto"`` the index runs
on every visible GPU when faiss was built with GPU support and CUDA is available, else on the
CPU. Queries go through in batches of ``query_batch`` rows so the result buffers of one search
stay bounded however large N is.
"""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from pipeline.config import ClusterConfig
from pipeline.device import resolve_device
from pipeline.errors import FacemineError

MISSING = -1
# faiss wants 39-256 training points per IVF list: fewer give poor centroids, more only slow training.
_MIN_POINTS_PER_LIST = 39
_TRAIN_POINTS_PER_LIST = 64


@dataclass(frozen=True)
class KnnGraph:
    indices: np.ndarray
    similarities: np.ndarray

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def links(self, min_similarity: float = -np.inf) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Directed links (source, target, similarity): each face to the neighbours its own row lists.

        Keeps links with similarity >= ``min_similarity``; a pair listed from both ends gives two links.
        """
        n, k = self.indices.shape
        source = np.repeat(np.arange(n, dtype=np.int64), k)
        target = self.indices.ravel()
        similarity = self.similarities.ravel()
        keep = (target != MISSING) & (similarity >= min_similarity) & (source != target)
        return source[keep], target[keep], similarity[keep]

    def edges(self, min_similarity: float = -np.inf) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Undirected edge list (source, target, similarity) with source < target, each pair once.

        Keeps edges with similarity >= ``min_similarity``; a pair found from both ends counts once.
        """
        source, target, similarity = self.links(min_similarity)
        low, high = np.minimum(source, target), np.maximum(source, target)
        n = len(self.indices)
        # One int64 key per unordered pair: a 1-D unique is far faster than a row-wise one.
        pairs, first = np.unique(low * n + high, return_index=True)
        return pairs // n, pairs % n, similarity[first]


def normalize(embeddings: np.ndarray) -> np.ndarray:
    """Float32, C-contiguous, unit-length rows (a copy only when needed)."""
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    if vectors.ndim != 2:
        raise FacemineError(f"embeddings must be a 2-D array, got shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise FacemineError("embeddings contain zero or non-finite vectors")
    if np.allclose(norms, 1.0, atol=1e-4):
        return vectors
    return vectors / norms[:, None]


def build_knn(embeddings: np.ndarray, k: int, config: ClusterConfig = ClusterConfig()) -> KnnGraph:
    """The k nearest other faces of every face (self excluded), by cosine similarity."""
    vectors = normalize(embeddings)
    return _drop_self(_search(vectors, vectors, k + 1, config))


def knn_between(queries: np.ndarray, base: np.ndarray, k: int, config: ClusterConfig = ClusterConfig()) -> KnnGraph:
    """The k nearest rows of ``base`` for every row of ``queries`` (indices into ``base``)."""
    return _search(normalize(queries), normalize(base), k, config)


def _search(queries: np.ndarray, base: np.ndarray, k: int, config: ClusterConfig) -> KnnGraph:
    if k < 1:
        raise FacemineError(f"k must be at least 1, got {k}")
    if queries.shape[1] != base.shape[1]:
        raise FacemineError(f"query dimension {queries.shape[1]} differs from base dimension {base.shape[1]}")
    index = _build_index(base, config)
    searched = min(k, len(base))
    batch = config.query_batch
    parts = [index.search(queries[start:start + batch], searched) for start in range(0, len(queries), batch)]
    similarities = np.concatenate([part[0] for part in parts]) if parts else np.empty((0, searched), np.float32)
    indices = np.concatenate([part[1] for part in parts]) if parts else np.empty((0, searched), np.int64)
    similarities[indices == MISSING] = -np.inf
    return _pad(KnnGraph(indices.astype(np.int64), similarities.astype(np.float32)), k)


def _build_index(base: np.ndarray, config: ClusterConfig) -> faiss.Index:
    dim = base.shape[1]
    use_gpu = _use_gpu(config.device)
    if len(base) <= (config.exact_index_max_gpu if use_gpu else config.exact_index_max_cpu):
        index = faiss.IndexFlatIP(dim)
        if use_gpu:
            index = faiss.index_cpu_to_all_gpus(index)
        index.add(base)
        return index
    lists = max(1, min(int(4 * np.sqrt(len(base))), len(base) // _MIN_POINTS_PER_LIST))
    # faiss's GPU build has no fast-scan codes (nor needs them: it scans full vectors fast), and
    # a 4-bit code book (16 centroids per sub-quantizer) needs enough vectors to train on.
    quantized = config.ivf_codes == "pq4" and not use_gpu and len(base) >= 16 * _MIN_POINTS_PER_LIST
    # Two dimensions per 4-bit sub-quantizer: at 128-d a code is 32 bytes, a 16th of the vector.
    codes = f"PQ{dim // 2 if dim % 2 == 0 else dim}x4fs,RFlat" if quantized else "Flat"
    index = faiss.index_factory(dim, f"IVF{lists},{codes}", faiss.METRIC_INNER_PRODUCT)
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.train(_training_sample(base, lists))
    space = faiss.GpuParameterSpace() if use_gpu else faiss.ParameterSpace()
    space.set_index_parameter(index, "nprobe", config.ivf_nprobe)
    if quantized:
        space.set_index_parameter(index, "k_factor_rf", config.ivf_rerank_factor)
    index.add(base)
    return index


def _training_sample(base: np.ndarray, lists: int) -> np.ndarray:
    size = min(len(base), lists * _TRAIN_POINTS_PER_LIST)
    chosen = np.random.default_rng(0).choice(len(base), size=size, replace=False)
    return base[np.sort(chosen)]


def _use_gpu(device: str) -> bool:
    wants_cuda = resolve_device(device).type == "cuda"
    gpu_faiss = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if wants_cuda and not gpu_faiss and device != "auto":
        raise FacemineError("faiss has no GPU support here: install faiss-gpu (extra 'gpu') or use device 'cpu'")
    return wants_cuda and gpu_faiss


def _drop_self(graph: KnnGraph) -> KnnGraph:
    """Remove each row's own index.

    Rows that did not find themselves (exact duplicates listed first, IVF misses) lose their last slot.
    """
    n, searched = graph.indices.shape
    is_self = graph.indices == np.arange(n)[:, None]
    drop = is_self.copy()
    drop[~is_self.any(axis=1), -1] = True
    keep = ~drop
    return KnnGraph(
        graph.indices[keep].reshape(n, searched - 1),
        graph.similarities[keep].reshape(n, searched - 1),
    )


def _pad(graph: KnnGraph, k: int) -> KnnGraph:
    """Widen to k columns with missing slots when the base set held fewer than k vectors."""
    missing = k - graph.k
    if missing <= 0:
        return graph
    n = len(graph.indices)
    return KnnGraph(
        np.hstack([graph.indices, np.full((n, missing), MISSING, np.int64)]),
        np.hstack([graph.similarities, np.full((n, missing), -np.inf, np.float32)]),
    )
