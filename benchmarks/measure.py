"""Shared measuring helpers for the benchmarks: wall time and peak resident memory of a block."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except OSError:  # the process ended meanwhile
        return 0


def _children(pid: int | str) -> list[int]:
    found = []
    try:
        for thread in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{thread}/children") as children:
                found += [int(child) for child in children.read().split()]
    except OSError:
        pass
    return found


def tree_rss_bytes() -> int:
    """Resident memory of this process and all its descendants (worker processes, servers)."""
    total, pending = 0, [os.getpid()]
    while pending:
        pid = pending.pop()
        total += rss_bytes(pid)
        pending += _children(pid)
    return total


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_rss_mib: float = 0.0  # highest resident set size seen during the block
    added_rss_mib: float = 0.0  # that peak minus the resident size at the start


@contextmanager
def measured(interval: float | None = None, process_tree: bool = False) -> Iterator[Measurement]:
    """Sample RSS from /proc in a thread: C++ allocations (faiss, infomap) count too,
    which tracemalloc would miss. `process_tree` sums this process and its descendants, every
    0.25 s by default rather than 0.01 s: walking every thread of every process costs CPU."""
    interval = interval or (0.25 if process_tree else 0.01)
    result = Measurement()
    current_rss = tree_rss_bytes if process_tree else rss_bytes
    start_rss = peak = current_rss()
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(interval):
            peak = max(peak, current_rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        yield result
    finally:
        result.seconds = time.perf_counter() - started
        stop.set()
        sampler.join()
        peak = max(peak, current_rss())
        result.peak_rss_mib = peak / 2**20
        result.added_rss_mib = (peak - start_rss) / 2**20
