"""Shared measuring helpers for the benchmarks: wall time and peak resident memory of a block."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_rss_mib: float = 0.0  # highest resident set size seen during the block
    added_rss_mib: float = 0.0  # that peak minus the resident size at the start


@contextmanager
def measured(interval: float = 0.01) -> Iterator[Measurement]:
    """Sample RSS from /proc in a thread: C++ allocations (faiss, infomap) count too,
    which tracemalloc would miss."""
    result = Measurement()
    start_rss = peak = rss_bytes()
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(interval):
            peak = max(peak, rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        yield result
    finally:
        result.seconds = time.perf_counter() - started
        stop.set()
        sampler.join()
        peak = max(peak, rss_bytes())
        result.peak_rss_mib = peak / 2**20
        result.added_rss_mib = (peak - start_rss) / 2**20
