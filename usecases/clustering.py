"""Cluster a store's faces into identities, honouring review (plain Python; no Prefect).

`run_cluster` is the whole use case: the CLI, the `cluster` flow and the tests call it. Step 2 of
`pipeline.cluster.cluster_faces` (clustering each subset on its own) may run elsewhere: the
caller passes `cluster_subsets`, which gets one list of face ids per subset and returns their
`SubsetClustering`s, e.g. from one task per subset each calling `cluster_stored_subset`. The
identities are the same as when `run_cluster` clusters every subset itself.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pandas as pd

from pipeline.cluster import (
    CLUSTERERS,
    SubsetClustering,
    cluster_faces,
    cluster_subset,
    subset_members,
)
from pipeline.config import ClusterConfig
from pipeline.dedup import find_duplicates, find_outliers
from pipeline.errors import FacemineError
from pipeline.identities import pin_reviewed_faces, review_constraints
from storage import identities as identity_store
from storage import registry
from storage.decisions import load_review_state
from storage.settings import Settings
from storage.store import Store

# (config, model id, face ids of each subset) -> one SubsetClustering per subset, in that order.
SubsetClusterer = Callable[[ClusterConfig, int, list[list[int]]], list[SubsetClustering]]


def run_cluster(
    store: Store,
    settings: Settings,
    subsets: list[str] | None = None,
    method: str | None = None,
    cluster_subsets: SubsetClusterer | None = None,
) -> int:
    """Cluster the current model's embeddings into identities; returns the stored run's id.

    `cluster_subsets`: where each subset is clustered (see the module docstring); in this
    process when None."""
    config = settings.cluster.model_copy(update={"method": method}) if method else settings.cluster
    if config.method not in CLUSTERERS:
        raise FacemineError(f"unknown clustering method {config.method!r}; choose from {', '.join(CLUSTERERS)}")
    model = store.current_model()
    if model is None:
        raise FacemineError("no faces mined yet: run `facemine mine PATH --subset NAME` first")
    config = registry.calibrated_cluster_config(store, model.id, config)
    started = time.perf_counter()
    faces = identity_store.face_table(store, subsets)
    face_ids, vectors = store.load_embeddings(model.id, faces.face_id)
    faces = faces.set_index("face_id").loc[face_ids].reset_index()
    review = load_review_state(store)
    constraints, seeds = review_constraints(face_ids, review, _previous_assignment(store))
    subset_codes, passed = pd.factorize(faces.subset)[0], faces.passed.to_numpy(bool)
    run_id = identity_store.create_run(store, model.id, config.method, config.model_dump(), list(subsets or []))
    try:
        per_subset = None
        if cluster_subsets is not None:
            jobs = [face_ids[members].tolist() for members in subset_members(subset_codes, passed, constraints)]
            per_subset = cluster_subsets(config, model.id, jobs)
        result = cluster_faces(
            vectors,
            photos=faces.image_id.to_numpy(),
            subsets=subset_codes,
            passed=passed,
            constraints=constraints,
            config=config,
            previous=seeds,
            per_subset=per_subset,
        )
        identity = _identity_ids(store, result.labels, result.identities)
        source, confidence = result.source.astype(object), result.confidence.astype(np.float64)
        pin_reviewed_faces(face_ids, identity, source, confidence, review)
        table = pd.DataFrame(
            {
                "face_id": face_ids,
                "identity_id": np.where(identity > 0, identity, np.nan),
                "confidence": confidence,
                "source": source,
            }
        )
        table["duplicate_of"], table["outlier"] = _dedup(faces, vectors, identity, settings)
        stats = result.stats | {
            "faces_without_embedding": int(len(identity_store.face_table(store, subsets)) - len(face_ids)),
            "duplicates": int(table.duplicate_of.notna().sum()),
            "outliers": int(table.outlier.sum()),
            "seconds": round(time.perf_counter() - started, 3),
        }
        identity_store.finish_run(store, run_id, table, stats)
    except BaseException as error:
        identity_store.fail_run(store, run_id, repr(error))
        raise
    return run_id


def cluster_stored_subset(store: Store, model_id: int, face_ids: list[int], config: ClusterConfig) -> SubsetClustering:
    """One subset's clustering (`pipeline.cluster.cluster_subset`) from `model_id`'s stored
    embeddings of `face_ids` (sorted, as `run_cluster` hands them out): one task's work."""
    loaded, vectors = store.load_embeddings(model_id, face_ids)
    if not np.array_equal(loaded, face_ids):
        raise FacemineError(
            f"{len(face_ids) - len(loaded)} faces lost their embeddings while clustering: run `facemine cluster` again"
        )
    return cluster_subset(vectors, config)


def _previous_assignment(store: Store) -> dict[int, int]:
    run_id = identity_store.latest_run_id(store)
    if run_id is None:
        return {}
    table = identity_store.assignments(store, run_id).dropna(subset=["identity_id"])
    return dict(zip(table.face_id.astype(int), table.identity_id.astype(int)))


def _identity_ids(store: Store, labels: np.ndarray, keys: list) -> np.ndarray:
    """Database identity id per face: continued identities keep theirs, new ones get fresh ids."""
    fresh = iter(identity_store.new_identities(store, sum(key is None for key in keys)))
    ids_by_label = np.array([key if key is not None else next(fresh) for key in keys] + [0], dtype=np.int64)
    # labels == -1 picks the trailing 0: no identity.
    return ids_by_label[labels]


def _dedup(faces: pd.DataFrame, vectors: np.ndarray, identity: np.ndarray, settings: Settings) -> tuple[pd.Series, np.ndarray]:
    """duplicate_of (face id or NaN) and outlier flags, compared within each identity only."""
    groups = np.where(identity > 0, identity, -1)
    duplicate_index = find_duplicates(
        groups,
        faces.quality.to_numpy(float),
        faces.content_hash.tolist(),
        perceptual_hashes=faces.perceptual_hash.tolist(),
        embeddings=vectors,
        config=settings.dedup,
    )
    face_ids = faces.face_id.to_numpy()
    duplicate_of = pd.Series(np.where(duplicate_index >= 0, face_ids[np.maximum(duplicate_index, 0)], np.nan))
    outliers = (
        find_outliers(vectors, groups, settings.dedup.outlier_max_distance)
        if settings.dedup.remove_outliers
        else np.zeros(len(identity), bool)
    )
    return duplicate_of, outliers
