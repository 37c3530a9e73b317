"""Prefect flow `embed`: give every stored face an embedding from one model (incremental),
after a model change (the closed loop's promoted model); the work is `usecases.embedding`."""
from __future__ import annotations

from prefect import flow, get_run_logger, task

from flows.gpu import gpu_slot
from flows.runners import task_runner
from flows.runtime import retry_unless_user_error
from storage.settings import Settings
from usecases.embedding import embed_stored_faces
from usecases.mining import mine_workers, shard_paths
from usecases.runtime import store_for


@task(name="embed-shard", retry_condition_fn=retry_unless_user_error)
def embed_shard(settings: Settings, model_id: int, face_ids: list[int]) -> int:
    with gpu_slot():
        return embed_stored_faces(settings, model_id, face_ids)


@flow(name="embed")
def embed(model_id: int | None = None) -> int:
    """Embed every face that lacks an embedding from `model_id` (default: the current model)."""
    settings = Settings()
    store = store_for(settings)
    model = store.model(model_id) if model_id else store.current_model()
    if model is None:
        get_run_logger().info("no model registered yet: nothing to embed")
        return 0
    missing = store.faces_without_embedding(model.id)
    # On this machine one in-process worker (its embedder stays loaded between runs); on Dask,
    # shards spread over the cluster's workers.
    workers = mine_workers(settings) if settings.execution.task_runner == "dask" else 1
    shard_task = embed_shard.with_options(retries=settings.mine.task_retries)
    with task_runner(settings, workers, gpu=True) as runner:
        futures = [
            runner.submit(shard_task, {"settings": settings, "model_id": model.id, "face_ids": shard})
            for shard in shard_paths(missing, settings.mine.shard_size, workers)
        ]
        added = sum(future.result() for future in futures)
    get_run_logger().info("embedded %d faces with model %s", added, model.name)
    return added
