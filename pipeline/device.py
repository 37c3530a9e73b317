"""Device choice shared by every torch-using stage."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from pipeline.errors import FacemineError

if TYPE_CHECKING:
    import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` means CUDA when present, else CPU; an explicit CUDA request without CUDA is an error."""
    # Imported here: clustering and review reach this module but should not pay torch's import.
    import torch

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FacemineError(f"device '{device}' requested but CUDA is not available")
    return resolved


def available_cores() -> int:
    """CPU cores this process may run on (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def limit_cpu_threads(count: int) -> None:
    """Cap torch's intra-op threads, e.g. in each of several worker processes sharing the cores."""
    import torch

    torch.set_num_threads(max(1, count))


@contextmanager
def torch_threads_restored() -> Iterator[None]:
    """torch's intra-op thread count as before the block, whatever threads started in it set
    (`torch.set_num_threads` in any thread sets the count that new threads start with)."""
    import torch

    count = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(count)
