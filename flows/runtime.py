"""Per-process resources shared by the tasks of a flow: settings, store, loaded models.

Tasks receive settings as plain JSON (picklable, so shards can run on other workers, e.g. a
Dask cluster through prefect-dask) and rebuild what they need here, once per process.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from functools import lru_cache
from typing import Any

from pipeline.embed import Embedder, create_embedder
from pipeline.errors import FacemineError
from pipeline.mining import Miner, build_miner
from storage.settings import Settings
from storage.store import ModelInfo, Store


def retry_unless_user_error(_task: Any, _task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn` of tasks with retries: a user error (bad setting, missing
    weights, unknown method) fails the same way on every try, so it is never retried."""
    return not isinstance(state.data, FacemineError)


class _UserErrorWithoutTraceback(logging.Filter):
    """Prefect logs every failure of a flow or task run with its traceback; for a user error the
    message says everything (the CLI prints it as one line), so the traceback is left out."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], FacemineError):
            record.exc_info = None
            record.exc_text = None
        return True


# Run loggers log through Prefect's adapters onto these two loggers; filters there see every record.
for _run_logger in ("prefect.flow_runs", "prefect.task_runs"):
    logging.getLogger(_run_logger).addFilter(_UserErrorWithoutTraceback())


def settings_payload(settings: Settings) -> str:
    return settings.model_dump_json()


@lru_cache(maxsize=4)
def settings_from(payload: str) -> Settings:
    return Settings(**json.loads(payload))


@lru_cache(maxsize=4)
def store_for(payload: str) -> Store:
    return Store(settings_from(payload))


@lru_cache(maxsize=4)
def load_embedder(kind: str, weights: str | None, device: str) -> Embedder:
    return create_embedder(kind, weights=weights, device=device)


@lru_cache(maxsize=4)
def inference_embedder(kind: str, weights: str | None, device: str) -> Embedder:
    """`load_embedder`'s model sped up for embedding only (`Embedder.for_inference`); train the other."""
    return load_embedder(kind, weights, device).for_inference()


def register(
    store: Store,
    embedder: Embedder,
    name: str | None = None,
    parent_id: int | None = None,
    training_run_id: int | None = None,
) -> ModelInfo:
    """Register (get-or-create by weights hash) an embedder; `kind` is its registry name, so
    `load_embedder(model.kind, model.weights_path)` rebuilds it (a checkpoint included)."""
    return store.register_model(
        name=name or embedder.name,
        kind=embedder.name,
        weights_path=str(embedder.weights_path) if embedder.weights_path else None,
        weights_hash=embedder.weights_hash,
        embedding_dim=embedder.preprocessing.embedding_dim,
        preprocessing=dataclasses.asdict(embedder.preprocessing),
        parent_id=parent_id,
        training_run_id=training_run_id,
    )


def current_embedder(payload: str) -> tuple[Embedder, ModelInfo]:
    """The store's current model, or the configured default registered as the first model."""
    settings = settings_from(payload)
    store = store_for(payload)
    current = store.current_model()
    if current is not None:
        return load_embedder(current.kind, current.weights_path, settings.embed.device), current
    weights = settings.default_weights(settings.embed.model)
    embedder = load_embedder(settings.embed.model, str(weights) if weights else None, settings.embed.device)
    return embedder, register(store, embedder)


def miner_for(payload: str) -> tuple[Miner, ModelInfo]:
    """A miner around the current model (re-read each call: a promotion switches models)."""
    _, model = current_embedder(payload)
    return _miner(payload, model.kind, model.weights_path), model


@lru_cache(maxsize=2)
def _miner(payload: str, kind: str, weights: str | None) -> Miner:
    settings = settings_from(payload)
    embedder = inference_embedder(kind, weights, settings.embed.device)
    return build_miner(
        settings.ingest,
        settings.detect,
        settings.quality,
        embedder,
        embed_batch_size=settings.embed.batch_size,
        flip_tta=settings.embed.flip_tta,
        decode_workers=settings.mine.decode_workers,
    )
