"""Mining, plain Python: one shard of photo paths → faces, chips and embeddings in the store;
how a run's photos are cut into shards, and over how many workers. The `mine` flow (flows/mine.py)
submits one task per shard; the tests and benchmarks call these directly."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

from pipeline.hashing import file_sha256
from pipeline.ingest import FoundFile, path_key
from pipeline.mining import PhotoRecord
from storage.settings import Settings
from storage.store import ShardWriteSummary
from usecases.runtime import miner_for, store_for

T = TypeVar("T")
# Progress of a shard: (its first path, photos done so far), an absolute count.
ShardProgress = Callable[[str, int], None]


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


def mine_paths(
    subset: str,
    paths: list[str],
    settings: Settings,
    rejected: Sequence[FoundFile] = (),
    on_progress: ShardProgress | None = None,
) -> dict:
    """One shard: mine only photos whose content the store lacks (a content already stored,
    under any path or subset, is only recorded as seen here), store all in one transaction.

    `paths` open the files; the store names them by `path_key` (printable whatever bytes a name
    holds). `rejected` are files the walk could not offer (FIFOs, broken links, unlistable
    folders): stored with their reason, so every offered file ends as a record."""
    report = on_progress or (lambda part, done: None)
    store = store_for(settings)
    hashes = _content_hashes(paths)
    known = store.known_contents(hashes)
    todo = [path for path in paths if path_key(path) not in known]
    miner, model = miner_for(settings)
    part, stored_already = paths[0] if paths else "", len(paths) - len(todo)
    report(part, stored_already)
    mined = miner.process(todo, on_detected=lambda detected: report(part, stored_already + detected))
    records = mined + [PhotoRecord(found.path, found.status, found.reason) for found in rejected]
    for record in records:
        record.path = path_key(record.path)
        record.content_hash = record.content_hash or hashes.get(record.path)
    summary = store.write_mine_shard(subset, model, records, known).model_dump()
    # Each new face's failed quality rules, for the run's quality report.
    return summary | {"quality_reasons": [list(face.quality.reasons) for record in mined for face in record.faces]}


# With several workers, shards shrink (down to this size) so that each worker gets about
# SHARDS_PER_WORKER of them and all finish together instead of one mining the last big shard alone.
MIN_BALANCED_SHARD = 100
SHARDS_PER_WORKER = 4


def shard_paths(paths: list[T], shard_size: int, workers: int = 1) -> list[list[T]]:
    """Consecutive shards of `paths` (or of any items: the embed flow shards face ids)."""
    if workers > 1:
        shard_size = min(shard_size, max(MIN_BALANCED_SHARD, math.ceil(len(paths) / (workers * SHARDS_PER_WORKER))))
    return [paths[i : i + shard_size] for i in range(0, len(paths), shard_size)]


def mine_workers(settings: Settings) -> int:
    """Workers mining shards side by side: settings' count; on Dask, the cluster's workers
    (`execution.dask_workers`); else automatic (see `MineConfig.workers`)."""
    if settings.mine.workers:
        return settings.mine.workers
    if settings.execution.task_runner == "dask":
        return settings.execution.dask_workers
    # One process: its miner runs a thread per core, or the GPU, with the models loaded once.
    return 1
