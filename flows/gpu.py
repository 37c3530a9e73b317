"""One named Prefect concurrency slot for GPU-heavy work (mining, embedding, training).

`facemine serve` creates the global limit `facemine-gpu` (settings.serve.gpu_concurrency_limit);
a UI-launched retrain and a scheduled mine then queue for the GPU instead of fighting over it.
Where the limit does not exist (ephemeral runs, tests) the slot does not block.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect.concurrency.sync import concurrency

GPU_SLOT = "facemine-gpu"


@contextmanager
def gpu_slot() -> Iterator[None]:
    with concurrency(GPU_SLOT, occupy=1, strict=False):
        yield
