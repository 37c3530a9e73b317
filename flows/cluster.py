"""Prefect flows `cluster` and `mine_and_cluster`: embeddings → identities, honouring review."""
from __future__ import annotations

import time
from typing import Annotated

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger, task
from pydantic import Field

from flows.artifacts import clustering_artifact
from flows.embed import embed
from flows.mine import MineSummary, mine
from pipeline.cluster import CLUSTERERS, cluster_faces
from pipeline.dedup import find_duplicates, find_outliers
from pipeline.errors import FacemineError
from pipeline.identities import pin_reviewed_faces, review_constraints
from storage import identities as identity_store
from storage import registry
from storage.decisions import load_review_state
from storage.settings import Settings, SubsetName
from storage.store import Store
from usecases.runtime import store_for


def _previous_assignment(store: Store) -> dict[int, int]:
    run_id = identity_store.latest_run_id(store)
    if run_id is None:
        return {}
    table = identity_store.assignments(store, run_id).dropna(subset=["identity_id"])
    return dict(zip(table.face_id.astype(int), table.identity_id.astype(int)))


def _identity_ids(store: Store, labels: np.ndarray, keys: list) -> np.ndarray:  # noqa: ANN001
    """Database identity id per face: continued identities keep theirs, new ones get fresh ids."""
    fresh = iter(identity_store.new_identities(store, sum(key is None for key in keys)))
    ids_by_label = np.array([key if key is not None else next(fresh) for key in keys] + [0], dtype=np.int64)
    # labels == -1 picks the trailing 0: no identity.
    return ids_by_label[labels]


def run_cluster(store: Store, settings: Settings, subsets: list[str] | None = None, method: str | None = None) -> int:
    """Cluster the current model's embeddings into identities; returns the stored run's id."""
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
    run_id = identity_store.create_run(store, model.id, config.method, config.model_dump(), list(subsets or []))
    try:
        result = cluster_faces(
            vectors,
            photos=faces.image_id.to_numpy(),
            subsets=pd.factorize(faces.subset)[0],
            passed=faces.passed.to_numpy(bool),
            constraints=constraints,
            config=config,
            previous=seeds,
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


@task(name="cluster-identities")
def cluster_task(settings: Settings, subsets: list[str], method: str | None) -> int:
    return run_cluster(store_for(settings), settings, subsets or None, method)


@flow(name="cluster")
def cluster(
    subsets: list[str] | None = None,
    method: Annotated[str | None, Field(description="clustering method; settings' default when empty")] = None,
) -> dict:
    """Embed faces the current model has not seen, then cluster them into identities."""
    settings = Settings()
    embed()
    run_id = cluster_task(settings, subsets or [], method)
    info = identity_store.run_info(store_for(settings), run_id)
    get_run_logger().info("clustering run %d: %s", run_id, info["stats"])
    clustering_artifact(info)
    return {"run_id": run_id, **info["stats"]}


@flow(name="mine_and_cluster")
def mine_and_cluster(
    folders: list[str],
    subset: SubsetName = "default",
    method: str | None = None,
) -> dict:
    """Mine new photos of `folders` into `subset`, then re-cluster everything."""
    mined: MineSummary = mine(folders=folders, subset=subset)
    return {"mine": mined.model_dump(), "cluster": cluster(method=method)}
