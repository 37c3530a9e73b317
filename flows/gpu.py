"""One named Prefect concurrency slot for GPU-heavy work (mining, embedding, training).

`facemine serve` creates the global limit `facemine-gpu` (settings.serve.gpu_concurrency_limit);
a UI-launched retrain and a scheduled mine then queue for the GPU instead of fighting over it.
Where the limit does not exist (ephemeral runs, tests) there is nothing to take: that is looked
up once per process and API, so a run does not warn about the missing limit on every shard.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from prefect import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound

GPU_SLOT = "facemine-gpu"


@lru_cache(maxsize=8)
def _limit_exists(api_url: str, name: str) -> bool:
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return False
    return True


def gpu_limit_exists() -> bool:
    """Whether the API this process talks to has the `facemine-gpu` limit (asked once per API)."""
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url)
    return _limit_exists(api_url, GPU_SLOT)


@contextmanager
def gpu_slot() -> Iterator[None]:
    if not gpu_limit_exists():
        yield
        return
    with concurrency(GPU_SLOT, occupy=1, strict=False):
        yield
