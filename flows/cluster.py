"""Prefect flows `cluster` and `mine_and_cluster`: embeddings → identities, honouring review.

Wiring only: `usecases.clustering.run_cluster` does the work in the flow's process, and each
subset is clustered by a `cluster-subset` task on the configured task runner (a process pool or
Dask, `flows.runners`); the cross-subset merge, the review constraints and dedup follow in the
flow's process.
"""
from __future__ import annotations

from functools import partial
from typing import Annotated

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from flows.artifacts import clustering_artifact
from flows.embed import embed
from flows.mine import MineSummary, mine
from flows.runners import task_runner
from flows.runtime import retry_unless_user_error
from pipeline.cluster import SubsetClustering
from pipeline.config import ClusterConfig
from storage import identities as identity_store
from storage.settings import Settings, SubsetName
from usecases.clustering import cluster_stored_subset, run_cluster
from usecases.runtime import store_for


# Never cached: the same face ids may carry new embeddings after a model promotion.
@task(name="cluster-subset", cache_policy=NO_CACHE, retry_condition_fn=retry_unless_user_error)
def cluster_subset_task(settings: Settings, model_id: int, face_ids: list[int], config: ClusterConfig) -> SubsetClustering:
    return cluster_stored_subset(store_for(settings), model_id, face_ids, config)


def _cluster_subsets_as_tasks(
    settings: Settings, workers: int, config: ClusterConfig, model_id: int, jobs: list[list[int]]
) -> list[SubsetClustering]:
    """One `cluster-subset` task per subset on `workers` workers; results in subset order."""
    if not jobs:
        return []
    # A lost worker or a dropped database connection costs a retry, as a mining shard's does.
    subset_task = cluster_subset_task.with_options(
        retries=settings.mine.task_retries, retry_delay_seconds=settings.mine.retry_delay_seconds
    )
    with task_runner(settings, min(workers, len(jobs))) as runner:
        futures = [
            runner.submit(subset_task, {"settings": settings, "model_id": model_id, "face_ids": ids, "config": config})
            for ids in jobs
        ]
        return [future.result() for future in futures]


@flow(name="cluster")
def cluster(
    subsets: list[str] | None = None,
    method: Annotated[str | None, Field(description="clustering method; settings' default when empty")] = None,
    workers: Annotated[int, Field(ge=1, description="subsets clustered side by side (process pool); Dask: its workers")] = 1,
) -> dict:
    """Embed faces the current model has not seen, then cluster them into identities: each
    subset as a task, then the merge across subsets."""
    settings = Settings()
    embed()
    store = store_for(settings)
    run_id = run_cluster(store, settings, subsets or None, method, partial(_cluster_subsets_as_tasks, settings, workers))
    info = identity_store.run_info(store, run_id)
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
