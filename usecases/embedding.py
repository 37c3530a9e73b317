"""Embedding use case: give stored faces vectors from one model (after a model change).

Chips aligned to another template are re-cut from the original photos with the stored
landmarks; detection is not repeated."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from pipeline.embed import Embedder
from pipeline.ingest import ImageRejected
from pipeline.mining import realign_faces
from storage.identities import face_table
from storage.settings import Settings
from storage.store import ModelInfo, Store
from usecases.runtime import inference_embedder, store_for


def _chips_for(store: Store, settings: Settings, rows, template: str) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """(face ids, chips) for face rows; faces whose photo can no longer be read are left out."""
    stored = rows[rows.chip_template == template]
    ids = stored.face_id.to_numpy().tolist()
    chips = [store.chips.get(path) for path in stored.chip_path]
    by_photo: dict[str, list] = defaultdict(list)
    for row in rows[rows.chip_template != template].itertuples(index=False):
        by_photo[row.source_path].append(row)
    for path, faces in by_photo.items():
        try:
            cut = realign_faces(path, [face.landmarks for face in faces], template, settings.ingest)
        except ImageRejected:
            continue
        ids.extend(face.face_id for face in faces)
        chips.extend(cut)
    return np.asarray(ids, np.int64), (np.stack(chips) if chips else np.zeros((0, 1, 1, 3), np.uint8))


def embed_faces(store: Store, settings: Settings, model: ModelInfo, embedder: Embedder, face_ids: list[int]) -> int:
    """Embed `face_ids` with `embedder` and store them under `model`; returns how many were added."""
    rows = face_table(store)
    rows = rows[rows.face_id.isin(face_ids)]
    ids, chips = _chips_for(store, settings, rows, embedder.preprocessing.template)
    if len(ids) == 0:
        return 0
    vectors = embedder.embed(chips, batch_size=settings.embed.batch_size, flip_tta=settings.embed.flip_tta)
    return store.write_embeddings(model, ids, vectors)


def embed_stored_faces(settings: Settings, model_id: int, face_ids: list[int]) -> int:
    """One shard's work: embed `face_ids` with the registered model `model_id` (loaded once per process)."""
    store = store_for(settings)
    model = store.model(model_id)
    embedder = inference_embedder(model.kind, model.weights_path, settings.embed.device)
    return embed_faces(store, settings, model, embedder, face_ids)
