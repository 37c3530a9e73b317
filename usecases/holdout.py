"""Held-out validation of embedders (the promotion gate's evidence) and their calibration.

`choose_judge` picks what judges a retrained model (pipeline.holdout's order): configured
validation photos, else identities of the export held out from training (reviewed ones first,
else a share of pseudo-identities). `judge_metrics` calibrates a model on unlabelled mined faces
(pipeline.calibration, stored on the model row as `metrics["calibration"]`, with the embedding
speed timed on those very chips, `embedding_speed`) and scores it on the held-out people at that
operating point.

GPU work runs inside `gpu` (a context-manager factory; none by default): the flows pass their
Prefect concurrency slot (`flows.gpu.gpu_slot`), plain callers run without one.

The faces of configured validation photos are detected once (largest face per photo) and cached
with their chips per alignment template (`storage.holdout`); each model then only embeds the
cached chips. Their metrics are stored with the model (`Model.metrics`, keyed by
`evaluation_key`), so the current model is not re-embedded for them at every retraining.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.calibration import calibrate
from pipeline.config import GateConfig
from pipeline.detect import FaceDetector
from pipeline.embed import Embedder
from pipeline.errors import FacemineError
from pipeline.gate import ARCHITECTURE, EMBEDDING_SPEED
from pipeline.hashing import open_input
from pipeline.holdout import (
    CONFIGURED,
    JUDGED_BY,
    choose_holdout_identities,
    clustering_holdout_metrics,
    identity_holdout_metrics,
    largest_face,
    verification_metrics,
)
from pipeline.ingest import ImageRejected, load_image
from pipeline.mining import realign_faces
from storage import identities as identity_store
from storage import registry
from storage.holdout import HoldoutCache, holdout_key, read_pairs
from storage.settings import Settings
from storage.store import Store
from usecases.evaluation import read_truth
from usecases.runtime import inference_embedder, store_for

logger = logging.getLogger(__name__)

# Where GPU-heavy work runs: a factory of context managers (the flows' Prefect concurrency slot).
GpuSlot = Callable[[], AbstractContextManager]


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


def load_holdout(
    settings: Settings, pairs_csv: str | None, truth_csv: str | None, gpu: GpuSlot = nullcontext
) -> Holdout | None:
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
        landmarks = detect_largest_faces(paths, settings, gpu)
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


def detect_largest_faces(paths: list[str], settings: Settings, gpu: GpuSlot = nullcontext) -> np.ndarray:
    """(N, 5, 2) landmarks of each photo's largest face, NaN for unreadable or faceless photos."""
    detector = FaceDetector(settings.detect, device=settings.embed.device, max_side=settings.ingest.detect_max_side)
    landmarks = np.full((len(paths), 5, 2), np.nan)
    batch = settings.detect.batch_size
    with gpu():
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


def holdout_metrics(
    settings: Settings, model_id: int, holdout: Holdout, floor: float, gpu: GpuSlot = nullcontext
) -> dict:
    """Held-out metrics of a stored model on configured photos: verification_* on the pairs,
    clustering_* on the labels at the model's calibrated `floor`.

    Stored with the model and reused while the held-out data, scoring settings and floor stay the same.
    """
    store = store_for(settings)
    key = hashlib.sha256(f"{evaluation_key(holdout, settings)}:{floor:.4f}".encode()).hexdigest()[:24]
    stored = registry.model_record(store, model_id)["metrics"]
    if stored.get("holdout") == key:
        return {name: value for name, value in stored.items() if name.startswith(("verification_", "clustering_"))}
    model = store.model(model_id)
    embedder = inference_embedder(model.kind, model.weights_path, settings.embed.device)
    chips = holdout_chips(holdout, embedder.preprocessing.template, settings)
    vectors = np.zeros((len(holdout.paths), embedder.preprocessing.embedding_dim), np.float32)
    with gpu():
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
            vectors[index], holdout.found[index], holdout.truth.identity.to_numpy(), settings.cluster, floor
        )
    registry.update_model_metrics(store, model_id, {**metrics, "holdout": key})
    logger.info("held-out metrics of model %s: %s", model.name, metrics)
    return metrics


# ---- what judges a retrained model ----------------------------------------------------------------


@dataclass(frozen=True)
class Judge:
    """The held-out data of one gate. Identity hold-outs name export identities kept out of training."""

    source: str  # pipeline.holdout: CONFIGURED, REVIEWED or PSEUDO
    pairs_csv: str | None = None
    truth_csv: str | None = None
    identities: tuple[str, ...] = ()  # export identity labels held out of training

    @property
    def description(self) -> str:
        if self.source == CONFIGURED:
            return f"{JUDGED_BY[CONFIGURED]}: {', '.join(path for path in (self.pairs_csv, self.truth_csv) if path)}"
        return f"{len(self.identities)} {JUDGED_BY[self.source]}"


def _reviewed_identities(store: Store) -> set[int]:
    """Identities a person accepted, named or locked (all rows read: an IN list of every exported
    identity would exceed SQLite's bound-parameter limit on a large store)."""
    rows = identity_store.identity_rows(store)
    reviewed = rows.accepted.astype(bool) | rows.locked.astype(bool) | rows.name.notna()
    return set(rows.identity_id[reviewed].astype(int))


def choose_judge(
    store: Store, export_samples: dict[str, list[tuple[Path, str]]], gate: GateConfig, pairs_csv: str | None, seed: int = 0
) -> Judge:
    """Configured validation data when there is some, else identities of the export held out from
    training (reviewed first, else pseudo-identities). Raises when nothing can judge."""
    if pairs_csv or gate.validation_truth:
        return Judge(CONFIGURED, pairs_csv=pairs_csv, truth_csv=gate.validation_truth)
    labels = [label for split in export_samples.values() for _, label in split]
    faces = pd.Series(labels, dtype=str).value_counts()
    ids = [int(label) for label in faces.index]
    reviewed = _reviewed_identities(store)
    table = pd.DataFrame({"identity": ids, "faces": faces.to_numpy(), "reviewed": [i in reviewed for i in ids]})
    choice = choose_holdout_identities(table, gate.holdout_share, gate.holdout_min_identities, seed)
    if not choice.identities:
        raise FacemineError(
            f"the gate cannot judge a retrained model: {choice.reason}; mine more photos, or give held-out data "
            "(gate.validation_pairs / gate.validation_truth)"
        )
    return Judge(choice.source, identities=tuple(str(identity) for identity in choice.identities))


def training_samples(
    export_samples: dict[str, list[tuple[Path, str]]], held_out_identities: list[str]
) -> dict[str, list[tuple[Path, str]]]:
    """The export's splits without the held-out identities."""
    held_out = set(held_out_identities)
    return {split: [(path, label) for path, label in rows if label not in held_out] for split, rows in export_samples.items()}


def _read_chips(paths: list[Path]) -> np.ndarray:
    chips = []
    for path in paths:
        with open_input(path) as file, Image.open(file) as image:  # a file, or an object of an s3:// export
            chips.append(np.asarray(image.convert("RGB")))
    return np.stack(chips)


def _model_embedder(settings: Settings, model_id: int) -> Embedder:
    model = store_for(settings).model(model_id)
    return inference_embedder(model.kind, model.weights_path, settings.embed.device)


def _embed_chip_files(settings: Settings, model_id: int, paths: list[Path], gpu: GpuSlot) -> np.ndarray:
    embedder = _model_embedder(settings, model_id)
    with gpu():
        return embedder.embed(_read_chips(paths), batch_size=settings.embed.batch_size, flip_tta=settings.embed.flip_tta)


# Chips per forward pass when embedding speed is measured: one figure comparable across models and devices.
SPEED_BATCH = 64


def embedding_speed(embedder: Embedder, chips: np.ndarray, flip_tta: bool = False) -> tuple[np.ndarray, float]:
    """(embeddings, faces/s): `chips` embedded in batches of SPEED_BATCH, each timed. The speed is
    the median batch's, over the batches after the first (it pays for warm-up: tracing, allocation,
    caches another model left cold; the median ignores batches a shared machine disturbed); the
    only batch's when there is one. Pass an inference embedder (`Embedder.for_inference`), as the
    pipeline embeds."""
    vectors, seconds_per_face = [], []
    for start in range(0, len(chips), SPEED_BATCH):
        batch = chips[start:start + SPEED_BATCH]
        started = time.perf_counter()
        vectors.append(embedder.embed(batch, batch_size=SPEED_BATCH, flip_tta=flip_tta))  # returns on the host: synchronised
        seconds_per_face.append((time.perf_counter() - started) / len(batch))
    return np.concatenate(vectors), 1.0 / float(np.median(seconds_per_face[1:] or seconds_per_face))


def exported_faces(export_samples: dict[str, list[tuple[Path, str]]]) -> list[tuple[Path, str]]:
    """Every (chip, pseudo-identity) of the export, each once, in order."""
    return sorted({row for split in export_samples.values() for row in split})


def calibration_sample(
    export_samples: dict[str, list[tuple[Path, str]]], faces: int, seed: int = 0
) -> list[tuple[Path, str]]:
    """A seeded sample of the export's (chip, pseudo-identity) that every model of a gate is calibrated on."""
    rows = exported_faces(export_samples)
    if len(rows) > faces:
        chosen = np.random.default_rng(seed).choice(len(rows), faces, replace=False)
        rows = [rows[index] for index in sorted(chosen)]
    return rows


def calibrate_model(
    settings: Settings, model_id: int, sample: list[tuple[Path, str]], gpu: GpuSlot = nullcontext,
    collection_faces: int | None = None,
) -> dict:
    """{"calibration": the model's operating points on these chips (pairs within one pseudo-identity
    left out), EMBEDDING_SPEED: faces/s timed while embedding them (`embedding_speed`: free, and
    every model of a gate is timed on the same chips on the same device), ARCHITECTURE: its
    embedder kind}, also stored on its row."""
    embedder = _model_embedder(settings, model_id)
    chips = _read_chips([path for path, _ in sample])
    with gpu():
        vectors, faces_per_second = embedding_speed(embedder, chips, settings.embed.flip_tta)
    recorded = {
        "calibration": calibrate(vectors, np.array([label for _, label in sample]), settings.cluster.k,
                                 collection_faces=collection_faces),
        EMBEDDING_SPEED: faces_per_second,
        ARCHITECTURE: embedder.kind,
    }
    registry.update_model_metrics(store_for(settings), model_id, recorded)
    return recorded


def judge_metrics(
    settings: Settings,
    model_id: int,
    judge: Judge,
    export_samples: dict[str, list[tuple[Path, str]]],
    gpu: GpuSlot = nullcontext,
) -> dict:
    """Calibrate the model on the export's (unlabelled) chips, then score it on the held-out people
    at its own floor. Returns verification_*, clustering_*, and what `calibrate_model` recorded: the
    calibration under `calibration`, the embedding speed and the architecture (the gate's speed trade
    compares them)."""
    gate = settings.gate
    # The floor depends on the collection's size: the sample's is scaled to the whole export's.
    exported = len(exported_faces(export_samples))
    sample = calibration_sample(export_samples, gate.calibration_faces)
    recorded = calibrate_model(settings, model_id, sample, gpu, collection_faces=exported)
    floor = recorded["calibration"]["cluster_min_similarity"]
    if judge.source == CONFIGURED:
        holdout = load_holdout(settings, judge.pairs_csv, judge.truth_csv, gpu)
        metrics = holdout_metrics(settings, model_id, holdout, floor, gpu)
    else:
        held_out = set(judge.identities)
        rows = [(path, label) for split in export_samples.values() for path, label in split if label in held_out]
        vectors = _embed_chip_files(settings, model_id, [path for path, _ in rows], gpu)
        metrics = identity_holdout_metrics(
            vectors, np.array([label for _, label in rows]), floor, settings.cluster, gate.holdout_max_pairs
        )
    logger.info("model %d judged on %s at floor %.4f: %s", model_id, judge.description, floor, metrics)
    return {**metrics, **recorded}
