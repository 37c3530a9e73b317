"""Prefect flow `mine`: photo folders → faces, chips and embeddings in the store, shard by shard
(the use case is `usecases.mining`; here its shards become tasks on the configured task runner)."""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated

from prefect import flow, get_run_logger, task
from pydantic import Field

from flows import progress
from flows.artifacts import mine_artifacts
from flows.gpu import gpu_slot
from flows.runners import task_runner
from flows.runtime import retry_unless_user_error
from pipeline.ingest import FoundFile, walk_photos
from pipeline.quality import report_from_reasons
from storage.dataroot import register_object_store
from storage.settings import Settings, SubsetName
from storage.store import ShardWriteSummary
from usecases.mining import MineSummary, mine_paths, mine_workers, shard_paths


@task(name="mine-shard", retry_condition_fn=retry_unless_user_error)
def mine_shard(subset: str, paths: list[str], settings: Settings, rejected: Sequence[FoundFile] = ()) -> dict:
    with gpu_slot():
        return mine_paths(subset, paths, settings, rejected, lambda part, done: progress.update("mine", part, done))


@flow(name="mine")
def mine(
    folders: list[str],
    subset: SubsetName = "default",
    shard_size: Annotated[int | None, Field(ge=1, description="Photos per task (settings' default when empty)")] = None,
) -> MineSummary:
    """Mine photo folders into the store; only new or changed photos are processed."""
    started = time.perf_counter()
    settings = Settings()
    register_object_store(settings)  # photo folders may be s3:// URLs, listed with these settings
    # The store's own folder (chips, exports) is never mined, wherever the folders are.
    found = list(walk_photos(folders, settings.ingest.extensions, excluded=[settings.data_dir]))
    paths = [file.path for file in found if file.status is None]
    rejected = [file for file in found if file.status is not None]
    workers = mine_workers(settings)
    # The files the walk rejected are recorded with the first shard (one of their own if none).
    shards = shard_paths(paths, shard_size or settings.mine.shard_size, workers) or ([[]] if rejected else [])
    workers = min(workers, len(shards))
    logger = get_run_logger()
    logger.info("mining %d photos (%d more rejected by the walk) in %d shards into subset %r (%d workers)",
                len(paths), len(rejected), len(shards), subset, workers)
    shard_task = mine_shard.with_options(
        retries=settings.mine.task_retries, retry_delay_seconds=settings.mine.retry_delay_seconds
    )
    total = ShardWriteSummary()
    quality_reasons: list[list[str]] = []
    progress.start("mine", len(found))
    with task_runner(settings, workers, gpu=True) as runner:
        shard_rejected = [rejected] + [[]] * (len(shards) - 1)
        futures = [
            runner.submit(
                shard_task, {"subset": subset, "paths": shard, "settings": settings, "rejected": shard_rejections}
            )
            for shard, shard_rejections in zip(shards, shard_rejected)
        ]
        for future, shard, shard_rejections in zip(futures, shards, shard_rejected):
            result = future.result()
            quality_reasons += result.pop("quality_reasons")
            total.add(ShardWriteSummary.model_validate(result))
            progress.update("mine", shard[0] if shard else "", len(shard) + len(shard_rejections))
    seconds = time.perf_counter() - started
    summary = MineSummary(
        subset=subset,
        photos_seen=len(found),
        seconds=round(seconds, 3),
        photos_per_second=round(len(found) / seconds, 3) if seconds > 0 else 0.0,
        **total.model_dump(),
    )
    progress.finish("mine")
    logger.info("mine summary: %s", summary.model_dump())
    mine_artifacts(summary.model_dump(), report_from_reasons(quality_reasons))
    return summary
