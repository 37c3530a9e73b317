"""Held-out validation of embedders (the promotion gate's evidence).

The faces of the validation photos are detected once (largest face per photo) and cached with
their chips per alignment template (`storage.holdout`); each model then only embeds the cached
chips. Metrics of a model are stored with it (`Model.metrics`, keyed by `evaluation_key`), so
the current model is not re-embedded at every retraining.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import get_run_logger

from flows.evaluate import read_truth
from flows.gpu import gpu_slot
from flows.runtime import inference_embedder, settings_from, store_for
from pipeline.detect import FaceDetector
from pipeline.errors import FacemineError
from pipeline.holdout import clustering_holdout_metrics, largest_face, verification_metrics
from pipeline.ingest import ImageRejected, load_image
from pipeline.mining import realign_faces
from storage import registry
from storage.holdout import HoldoutCache, holdout_key, read_pairs
from storage.settings import Settings


@dataclass(frozen=True)
class Holdout:
    """Validation photos (sorted absolute paths) with the landmarks of their largest face."""

    key: str
    paths: list[str]
    landmarks: np.ndarray  # (N, 5, 2); NaN where no face was found
    pairs: pd.DataFrame | None  # index_a, index_b (photo indices), same
    truth: pd.DataFrame | None  # index (photo index), identity (int code)

    @property
    def found(self) -> np.ndarray:
        return ~np.isnan(self.landmarks[:, 0, 0])


def _detection_settings(settings: Settings) -> str:
    return json.dumps({"ingest": settings.ingest.model_dump(), "detect": settings.detect.model_dump()}, sort_keys=True)


def evaluation_key(holdout: Holdout, settings: Settings) -> str:
    """What a model's held-out metrics depend on besides the model: the faces and how they are scored."""
    scoring = {"cluster": settings.cluster.model_dump(), "flip_tta": settings.embed.flip_tta}
    return hashlib.sha256(f"{holdout.key}{json.dumps(scoring, sort_keys=True)}".encode()).hexdigest()[:24]


def load_holdout(settings: Settings, pairs_csv: str | None, truth_csv: str | None) -> Holdout | None:
    """The validation photos of a pairs CSV and/or a labels CSV, faces detected on first use."""
    if not pairs_csv and not truth_csv:
        return None
    pairs = read_pairs(Path(pairs_csv)) if pairs_csv else None
    truth = read_truth(Path(truth_csv)) if truth_csv else None
    photos = set()
    if pairs is not None:
        photos |= set(pairs.path_a) | set(pairs.path_b)
    if truth is not None:
        photos |= set(truth.source_path)
    paths = sorted(photos)
    key = holdout_key(paths, _detection_settings(settings))
    cache = HoldoutCache(settings.data_dir)
    landmarks = cache.landmarks(key, paths)
    if landmarks is None:
        landmarks = detect_largest_faces(paths, settings)
        cache.save_landmarks(key, paths, landmarks)
    if np.isnan(landmarks[:, 0, 0]).all():
        raise FacemineError(f"no face found in any of the {len(paths)} validation photos")
    index = pd.Series(np.arange(len(paths)), index=paths)
    return Holdout(
        key=key,
        paths=paths,
        landmarks=landmarks,
        pairs=None if pairs is None else pd.DataFrame(
            {"index_a": index[pairs.path_a].to_numpy(), "index_b": index[pairs.path_b].to_numpy(), "same": pairs.same.to_numpy()}
        ),
        truth=None if truth is None else pd.DataFrame(
            {"index": index[truth.source_path].to_numpy(), "identity": pd.factorize(truth.identity)[0]}
        ),
    )


def detect_largest_faces(paths: list[str], settings: Settings) -> np.ndarray:
    """(N, 5, 2) landmarks of each photo's largest face, NaN for unreadable or faceless photos."""
    detector = FaceDetector(settings.detect, device=settings.embed.device, max_side=settings.ingest.detect_max_side)
    landmarks = np.full((len(paths), 5, 2), np.nan)
    batch = settings.detect.batch_size
    with gpu_slot():
        for start in range(0, len(paths), batch):
            readable: dict[int, np.ndarray] = {}
            for index in range(start, min(start + batch, len(paths))):
                try:
                    readable[index] = load_image(paths[index], settings.ingest).rgb
                except ImageRejected:
                    continue
            for index, faces in zip(readable, detector.detect(list(readable.values()))):
                face = largest_face(faces)
                if face is not None:
                    landmarks[index] = face.landmarks
    return landmarks


def holdout_chips(holdout: Holdout, template: str, settings: Settings) -> np.ndarray:
    """uint8 chips of the photos with a face (in photo order), aligned for `template`; cached."""
    cache = HoldoutCache(settings.data_dir)
    chips = cache.chips(holdout.key, template)
    if chips is None:
        chips = np.stack([
            realign_faces(holdout.paths[index], [holdout.landmarks[index]], template, settings.ingest)[0]
            for index in np.flatnonzero(holdout.found)
        ])
        cache.save_chips(holdout.key, template, chips)
    return chips


def holdout_metrics(payload: str, model_id: int, holdout: Holdout | None) -> dict:
    """Held-out metrics of a stored model: verification_* on the pairs, clustering_* on the labels.

    Stored with the model and reused while the held-out data and scoring settings stay the same.
    """
    if holdout is None:
        return {}
    settings, store = settings_from(payload), store_for(payload)
    key = evaluation_key(holdout, settings)
    stored = registry.model_record(store, model_id)["metrics"]
    if stored.get("holdout") == key:
        return {name: value for name, value in stored.items() if name.startswith(("verification_", "clustering_"))}
    model = store.model(model_id)
    embedder = inference_embedder(model.kind, model.weights_path, settings.embed.device)
    chips = holdout_chips(holdout, embedder.preprocessing.template, settings)
    vectors = np.zeros((len(holdout.paths), embedder.preprocessing.embedding_dim), np.float32)
    with gpu_slot():
        vectors[holdout.found] = embedder.embed(chips, batch_size=settings.embed.batch_size, flip_tta=settings.embed.flip_tta)
    metrics: dict = {}
    if holdout.pairs is not None:
        pairs = holdout.pairs
        metrics |= verification_metrics(
            vectors, holdout.found, pairs.index_a.to_numpy(), pairs.index_b.to_numpy(), pairs.same.to_numpy()
        )
    if holdout.truth is not None:
        index = holdout.truth["index"].to_numpy()
        metrics |= clustering_holdout_metrics(
            vectors[index], holdout.found[index], holdout.truth.identity.to_numpy(), settings.cluster
        )
    registry.update_model_metrics(store, model_id, {**metrics, "holdout": key})
    get_run_logger().info("held-out metrics of model %s: %s", model.name, metrics)
    return metrics
