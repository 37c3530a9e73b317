"""Where a flow's tasks run: the task runner is chosen here (`settings.execution`), so flows only
submit tasks: on this machine (one worker in-process, or a process pool) or on a Dask cluster
through prefect-dask's `DaskTaskRunner` (an operator's scheduler, or a local cluster per run)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from prefect import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from pipeline.device import available_cores, limit_cpu_threads, resolve_device
from pipeline.errors import FacemineError
from storage.settings import ExecutionConfig, Settings

# How long a run waits for the Dask scheduler before saying it cannot be reached.
SCHEDULER_CONNECT_SECONDS = 10


@contextmanager
def task_runner(settings: Settings, workers: int, *, gpu: bool = False) -> Iterator[TaskRunner]:
    """A started Prefect task runner for `workers` tasks side by side (`settings.execution`).

    `gpu`: the tasks submitted through it are GPU tasks (mining, embedding, training): on Dask,
    when the run's device is CUDA, each claims one `gpu_resource` of a worker, so they land on
    GPU workers only; other tasks run on any worker."""
    with _api_for_workers(settings, workers):
        if settings.execution.task_runner == "dask":
            with _dask_runner(settings, gpu) as runner:
                yield runner
        elif workers <= 1:
            # One worker mines in this process: its models stay loaded between runs.
            with ThreadPoolTaskRunner(max_workers=1) as runner:
                yield runner
        else:
            # Several get a process each, with the cores shared out among their torch threads.
            threads = max(1, available_cores() // workers)
            with ProcessPoolTaskRunner(
                max_workers=workers, initializer=limit_cpu_threads, initargs=(threads,)
            ) as runner:
                yield runner


@contextmanager
def _api_for_workers(settings: Settings, workers: int) -> Iterator[None]:
    """Tasks in other processes must report to this flow's API. Prefect hands them its settings
    but not the address of an ephemeral (in-process) API, so each would start an API server of
    its own: the address is made explicit. (Workers on other machines need one they can reach:
    the run's PREFECT_API_URL must be a `prefect server` every machine reaches.)"""
    if settings.execution.task_runner != "dask" and workers <= 1:
        yield
        return
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url).rstrip("/")
    with temporary_settings({PREFECT_API_URL: api_url}):
        yield


def runs_on_gpu(settings: Settings) -> bool:
    """Whether this run's models run on CUDA: an explicit `cuda` device (the flow's own machine
    may lack one that the workers have), or `auto` where CUDA is present."""
    device = settings.embed.device
    return device.startswith("cuda") or (device == "auto" and resolve_device(device).type == "cuda")


@contextmanager
def _dask_runner(settings: Settings, gpu: bool) -> Iterator[TaskRunner]:
    # Imported here: distributed is heavy to import and only Dask runs need it.
    import dask
    from prefect_dask import DaskTaskRunner

    execution: ExecutionConfig = settings.execution
    on_gpu = runs_on_gpu(settings)
    resources = {execution.gpu_resource: 1} if gpu and on_gpu else {}
    client_options = {"timeout": SCHEDULER_CONNECT_SECONDS}
    if execution.dask_address:
        runner = DaskTaskRunner(address=execution.dask_address, client_kwargs=client_options)
    else:
        cluster_options = {
            "n_workers": execution.dask_workers,
            # One task at a time per worker process: its models use the threads it has.
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": ":0",  # any free port: several runs may be at once
            "env": {"OMP_NUM_THREADS": str(max(1, available_cores() // execution.dask_workers))},
            # The local GPU is what the workers share (the GPU concurrency slot still applies).
            "resources": {execution.gpu_resource: 1} if on_gpu else {},
        }
        runner = DaskTaskRunner(cluster_kwargs=cluster_options, client_kwargs=client_options)
    with runner:
        try:
            runner.client  # noqa: B018 - connects (or starts the local cluster) now, not at the first task
        except (OSError, TimeoutError, ValueError) as error:  # ValueError: not a scheduler address
            if not execution.dask_address:
                raise
            raise FacemineError(
                f"cannot reach the Dask scheduler at {execution.dask_address} (execution.dask_address): {error}"
            ) from None
        # prefect-dask's documented way to give tasks worker resources: tasks submitted inside.
        with dask.annotate(resources=resources) if resources else nullcontext():
            yield runner
