"""Prefect flow `mine`: photo folders → faces, chips and embeddings in the store, shard by shard."""
from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from prefect import flow, get_client, get_run_logger, task
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner
from pydantic import Field

from flows import progress
from flows.gpu import gpu_slot
from flows.runtime import miner_for, settings_from, settings_payload, store_for
from pipeline.device import available_cores, limit_cpu_threads, resolve_device
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


@contextmanager
def shard_runner(workers: int) -> Iterator[TaskRunner]:
    """One worker mines in this process (its models stay loaded between runs); several get a
    process each, with the cores shared out among their torch threads."""
    if workers <= 1:
        with ThreadPoolTaskRunner(max_workers=1) as runner:
            yield runner
        return
    threads = max(1, available_cores() // workers)
    # Workers must report to this flow's API. Prefect hands them its settings but not the
    # address of an ephemeral (in-process) API, so each would start an API server of its own.
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url).rstrip("/")
    with temporary_settings({PREFECT_API_URL: api_url}), ProcessPoolTaskRunner(
        max_workers=workers, initializer=limit_cpu_threads, initargs=(threads,)
    ) as runner:
        yield runner


@flow(name="mine")
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
    workers = mine_workers(settings)
    shards = shard_paths(paths, shard_size or settings.mine.shard_size, workers)
    workers = min(workers, len(shards))
    logger = get_run_logger()
    logger.info("mining %d photos in %d shards into subset %r (%d workers)", len(paths), len(shards), subset, workers)
    shard_task = mine_shard.with_options(
        retries=settings.mine.task_retries, retry_delay_seconds=settings.mine.retry_delay_seconds
    )
    total = ShardWriteSummary()
    done = 0
    progress.report("mine", 0, len(paths))
    with shard_runner(workers) as runner:
        futures = [runner.submit(shard_task, {"subset": subset, "paths": shard, "payload": payload}) for shard in shards]
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
