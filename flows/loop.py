"""Prefect flow `closed_loop`: the loop of usecases.loop with its stages as subflows and tasks.

    cluster (embed with the current model first) ─▶ per iteration:
        export ─▶ retrain ─▶ gate ─▶ promoted? re-embed + re-cluster with the new model ─▶ churn
"""
from __future__ import annotations

from typing import Annotated

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from flows.embed import embed
from flows.export import export
from flows.train import retrain
from pipeline.config import TrainConfig
from storage.settings import Settings
from usecases.clustering import run_cluster
from usecases.loop import LoopSteps, run_loop
from usecases.runtime import store_for


# Never cached: the same settings cluster again after every promotion.
@task(name="cluster-identities", cache_policy=NO_CACHE)
def cluster_current_model(settings: Settings) -> int:
    return run_cluster(store_for(settings), settings)


def embed_and_cluster(settings: Settings) -> int:
    """Embed faces the current model has not seen, then cluster them; the clustering run's id."""
    embed()
    return cluster_current_model(settings)


@flow(name="closed_loop")
def closed_loop(
    iterations: Annotated[int, Field(ge=1, le=100)] = 2,
    loop_name: Annotated[str, Field(min_length=1, max_length=255)] = "default",
    config: TrainConfig = TrainConfig(),
    min_churn: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01,
    export_name: Annotated[str, Field(min_length=1, max_length=255)] = "loop",
) -> dict:
    """Run up to `iterations` rounds of export → retrain → gate → re-cluster on the current store.

    Args:
        iterations: Most rounds to run.
        loop_name: Loop whose iteration history continues.
        config: Training parameters of every round.
        min_churn: Stop once this share of face labels or less changes in a round.
        export_name: Name of each round's dataset export.
    """
    steps = LoopSteps(embed_and_cluster=embed_and_cluster, export=export, retrain=retrain)
    return run_loop(Settings(), steps, iterations, loop_name, config, min_churn, export_name)
