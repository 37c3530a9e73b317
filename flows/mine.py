"""Prefect flow `mine`: photo folders → faces, chips and embeddings in the store, shard by shard."""
from __future__ import annotations

import math
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
from pipeline.device import available_cores, resolve_device
from pipeline.hashing import file_sha256
from pipeline.ingest import FoundFile, path_key, walk_photos
from pipeline.mining import PhotoRecord
from pipeline.quality import report_from_reasons
from storage.settings import Settings, SubsetName
from storage.store import ShardWriteSummary
from usecases.runtime import miner_for, store_for


class MineSummary(ShardWriteSummary):
    subset: str
    photos_seen: int = 0
    seconds: float = 0.0
    photos_per_second: float = 0.0


def _content_hashes(paths: list[str]) -> dict[str, str]:
    """Content hash of each readable regular file, by the key it is recorded under."""
    hashes = {}
    for path in paths:
        try:
            hashes[path_key(path)] = file_sha256(path)  # never opens a FIFO or device
        except OSError:
            continue  # not a regular file, unreadable, gone: the miner records why
    return hashes


def mine_paths(subset: str, paths: list[str], settings: Settings, rejected: Sequence[FoundFile] = ()) -> dict:
    """One shard, plain Python: mine only photos whose content the store lacks (a content already
    stored, under any path or subset, is only recorded as seen here), store all in one transaction.

    `paths` open the files; the store names them by `path_key` (printable whatever bytes a name
    holds). `rejected` are files the walk could not offer (FIFOs, broken links, unlistable
    folders): stored with their reason, so every offered file ends as a record."""
    store = store_for(settings)
    hashes = _content_hashes(paths)
    known = store.known_contents(hashes)
    todo = [path for path in paths if path_key(path) not in known]
    miner, model = miner_for(settings)
    part, stored_already = paths[0] if paths else "", len(paths) - len(todo)
    progress.update("mine", part, stored_already)
    mined = miner.process(todo, on_detected=lambda detected: progress.update("mine", part, stored_already + detected))
    records = mined + [PhotoRecord(found.path, found.status, found.reason) for found in rejected]
    for record in records:
        record.path = path_key(record.path)
        record.content_hash = record.content_hash or hashes.get(record.path)
    summary = store.write_mine_shard(subset, model, records, known).model_dump()
    # Each new face's failed quality rules, for the run's quality report.
    return summary | {"quality_reasons": [list(face.quality.reasons) for record in mined for face in record.faces]}


@task(name="mine-shard", retry_condition_fn=retry_unless_user_error)
def mine_shard(subset: str, paths: list[str], settings: Settings, rejected: Sequence[FoundFile] = ()) -> dict:
    with gpu_slot():
        return mine_paths(subset, paths, settings, rejected)


# With several workers, shards shrink (down to this size) so that each worker gets about
# SHARDS_PER_WORKER of them and all finish together instead of one mining the last big shard alone.
MIN_BALANCED_SHARD = 100
SHARDS_PER_WORKER = 4


def shard_paths(paths: list[str], shard_size: int, workers: int = 1) -> list[list[str]]:
    if workers > 1:
        shard_size = min(shard_size, max(MIN_BALANCED_SHARD, math.ceil(len(paths) / (workers * SHARDS_PER_WORKER))))
    return [paths[i : i + shard_size] for i in range(0, len(paths), shard_size)]


def mine_workers(settings: Settings) -> int:
    """Worker processes for shards: settings' count, or automatic (see `MineConfig.workers`)."""
    if settings.mine.workers:
        return settings.mine.workers
    return 1 if resolve_device(settings.embed.device).type == "cuda" else available_cores()


@flow(name="mine")
def mine(
    folders: list[str],
    subset: SubsetName = "default",
    shard_size: Annotated[int | None, Field(ge=1, description="Photos per task (settings' default when empty)")] = None,
) -> MineSummary:
    """Mine photo folders into the store; only new or changed photos are processed."""
    started = time.perf_counter()
    settings = Settings()
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
    with task_runner(workers) as runner:
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
