"""Per-process resources shared by the tasks of any run: store and loaded models.

Functions take the typed `Settings` (picklable, so a task can run on another worker, e.g. a
Dask worker through prefect-dask) and build what they need once per process; the caches are
keyed by the settings' JSON because pydantic settings are not hashable.
"""
from __future__ import annotations

import dataclasses
from functools import lru_cache

from pipeline.embed import Embedder, create_embedder
from pipeline.mining import Miner, build_miner
from storage.dataroot import local_file
from storage.settings import Settings
from storage.store import ModelInfo, Store


def store_for(settings: Settings) -> Store:
    return _store(settings.model_dump_json())


@lru_cache(maxsize=4)
def _store(settings_json: str) -> Store:
    return Store(Settings.model_validate_json(settings_json))


def _build_embedder(kind: str, weights: str | None, device: str) -> Embedder:
    """`weights`: a path, or the URL of trained weights on an object-storage data root."""
    return create_embedder(kind, weights=weights and local_file(weights), device=device)


load_embedder = lru_cache(maxsize=4)(_build_embedder)


@lru_cache(maxsize=4)
def inference_embedder(kind: str, weights: str | None, device: str) -> Embedder:
    """The model sped up for embedding only (`Embedder.for_inference`); train `load_embedder`'s.
    Built apart from that cache, so a process that only embeds (mining) does not keep the
    trainable module's weights beside the fast copy's (about 40-130 MB for SFace)."""
    return _build_embedder(kind, weights, device).for_inference()


def register(
    store: Store,
    embedder: Embedder,
    name: str | None = None,
    parent_id: int | None = None,
    training_run_id: int | None = None,
) -> ModelInfo:
    """Register (get-or-create by weights hash) an embedder; `kind` is its registry name, so
    `load_embedder(model.kind, model.weights_path)` rebuilds it (a checkpoint included)."""
    weights_path = None
    if embedder.weights_path:
        # Trained checkpoints must reach every machine; base weights ship with each installation.
        weights_path = str(embedder.weights_path)
        if embedder.name == "checkpoint":
            weights_path = store.shared_weights(weights_path, embedder.weights_hash)
    return store.register_model(
        name=name or embedder.name,
        kind=embedder.name,
        weights_path=weights_path,
        weights_hash=embedder.weights_hash,
        embedding_dim=embedder.preprocessing.embedding_dim,
        preprocessing=dataclasses.asdict(embedder.preprocessing),
        parent_id=parent_id,
        training_run_id=training_run_id,
    )


def current_model(settings: Settings) -> ModelInfo:
    """The store's current model, or the configured default registered as the first model."""
    store = store_for(settings)
    current = store.current_model()
    if current is not None:
        return current
    weights = settings.default_weights(settings.embed.model)
    # Registering reads only the weights' hash and the preprocessing: the fast copy mining embeds
    # with serves, so no trainable copy is loaded for it.
    return register(store, inference_embedder(settings.embed.model, str(weights) if weights else None, settings.embed.device))


def miner_for(settings: Settings) -> tuple[Miner, ModelInfo]:
    """A miner around the current model (re-read each call: a promotion switches models)."""
    model = current_model(settings)
    return _miner(settings.model_dump_json(), model.kind, model.weights_path), model


@lru_cache(maxsize=2)
def _miner(settings_json: str, kind: str, weights: str | None) -> Miner:
    settings = Settings.model_validate_json(settings_json)
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
