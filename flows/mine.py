"""Prefect flow `mine`: photo folders → faces, chips and embeddings in the store, shard by shard."""
from __future__ import annotations

import time
from typing import Annotated

from prefect import flow, get_run_logger, task
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from flows import progress
from flows.gpu import gpu_slot
from flows.runtime import miner_for, settings_from, settings_payload, store_for
from pipeline.hashing import file_sha256
from pipeline.ingest import iter_image_files
from storage.settings import Settings
from storage.store import ShardWriteSummary


class MineSummary(ShardWriteSummary):
    subset: str
    photos_seen: int = 0
    seconds: float = 0.0
    photos_per_second: float = 0.0


def _content_hashes(paths: list[str]) -> dict[str, str]:
    hashes = {}
    for path in paths:
        try:
            hashes[path] = file_sha256(path)
        except OSError:
            continue  # unreadable: the miner records why
    return hashes


def mine_paths(subset: str, paths: list[str], payload: str) -> dict:
    """One shard, plain Python: skip photos stored unchanged, mine the rest, store them in one transaction."""
    store = store_for(payload)
    hashes = _content_hashes(paths)
    unchanged = store.unchanged_paths(subset, hashes)
    todo = [path for path in paths if path not in unchanged]
    miner, model = miner_for(payload)
    records = miner.process(todo)
    for record in records:
        record.content_hash = record.content_hash or hashes.get(record.path)
    summary = store.write_mine_shard(subset, model, records)
    summary.photos_unchanged += len(unchanged)
    return summary.model_dump()


@task(name="mine-shard")
def mine_shard(subset: str, paths: list[str], payload: str) -> dict:
    with gpu_slot():
        return mine_paths(subset, paths, payload)


def shard_paths(paths: list[str], shard_size: int) -> list[list[str]]:
    return [paths[i : i + shard_size] for i in range(0, len(paths), shard_size)]


@flow(name="mine", task_runner=ThreadPoolTaskRunner(max_workers=1))
def mine(
    folders: list[str],
    subset: Annotated[str, Field(min_length=1, max_length=255)] = "default",
    shard_size: Annotated[int | None, Field(ge=1, description="Photos per task (settings' default when empty)")] = None,
) -> MineSummary:
    """Mine photo folders into the store; only new or changed photos are processed."""
    started = time.perf_counter()
    settings = Settings()
    payload = settings_payload(settings)
    settings_from(payload)  # validate once, up front
    paths = [str(path) for path in iter_image_files(folders, settings.ingest.extensions)]
    shards = shard_paths(paths, shard_size or settings.mine.shard_size)
    logger = get_run_logger()
    logger.info("mining %d photos in %d shards into subset %r", len(paths), len(shards), subset)
    shard_task = mine_shard.with_options(
        retries=settings.mine.task_retries, retry_delay_seconds=settings.mine.retry_delay_seconds
    )
    total = ShardWriteSummary()
    futures = [shard_task.submit(subset, shard, payload) for shard in shards]
    done = 0
    progress.report("mine", 0, len(paths))
    for future, shard in zip(futures, shards):
        total.add(ShardWriteSummary.model_validate(future.result()))
        done += len(shard)
        progress.report("mine", done, len(paths))
    seconds = time.perf_counter() - started
    summary = MineSummary(
        subset=subset,
        photos_seen=len(paths),
        seconds=round(seconds, 3),
        photos_per_second=round(len(paths) / seconds, 3) if seconds > 0 else 0.0,
        **total.model_dump(),
    )
    logger.info("mine summary: %s", summary.model_dump())
    return summary
