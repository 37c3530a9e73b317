"""Where a flow's tasks run: the task runner is chosen here, so flows only submit tasks."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from pipeline.device import available_cores, limit_cpu_threads


@contextmanager
def task_runner(workers: int) -> Iterator[TaskRunner]:
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
