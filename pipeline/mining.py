"""One shard of photos through ingest → detect → align → quality → embed, in memory.

Plain Python: the Prefect flow calls `Miner.process` per shard and hands the records to storage.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from pipeline.align import align_face
from pipeline.config import DetectConfig, IngestConfig, QualityConfig
from pipeline.detect import Detection, FaceDetector
from pipeline.embed import Embedder
from pipeline.ingest import ImageRejected, LoadedImage, load_image
from pipeline.quality import QualityResult, assess, measure


@dataclass
class FaceRecord:
    detection: Detection
    quality: QualityResult
    chip: np.ndarray
    embedding: np.ndarray


@dataclass
class PhotoRecord:
    path: str
    status: str  # ok | skipped | failed
    reason: str | None = None
    content_hash: str | None = None
    perceptual_hash: str | None = None
    size_bytes: int | None = None
    width: int | None = None
    height: int | None = None
    faces: list[FaceRecord] = field(default_factory=list)


class Miner:
    """Holds the loaded models; reuse one per process (model loading costs seconds)."""

    def __init__(
        self,
        detector: FaceDetector,
        embedder: Embedder,
        ingest: IngestConfig,
        quality: QualityConfig,
        embed_batch_size: int | None = None,
        flip_tta: bool = False,
        decode_workers: int = 2,
    ) -> None:
        self.detector = detector
        self.embedder = embedder
        self.ingest = ingest
        self.quality = quality
        self.embed_batch_size = embed_batch_size
        self.flip_tta = flip_tta
        self.decode_workers = decode_workers

    def _load(self, path: str) -> LoadedImage | PhotoRecord:
        try:
            return load_image(path, self.ingest)
        except ImageRejected as rejected:
            return PhotoRecord(path=path, status=rejected.status, reason=rejected.reason)

    def process(self, paths: Sequence[str], on_detected: Callable[[int], None] | None = None) -> list[PhotoRecord]:
        """Records in the order of `paths`; a bad file becomes a skipped/failed record, never an exception.

        Photos go through detection a chunk at a time (full-size images are dropped once their
        chips are cut), while the next chunk decodes in threads (Pillow releases the GIL).
        `on_detected(n)` hears after each chunk how many photos are through detection, the bulk
        of the work, so progress shows from the first photos.
        """
        chunk = self.detector.config.batch_size
        chunks = [list(paths[i : i + chunk]) for i in range(0, len(paths), chunk)]
        records: list[PhotoRecord] = []
        pending: list[tuple[PhotoRecord, Detection, np.ndarray]] = []
        with ThreadPoolExecutor(max_workers=self.decode_workers) as pool:
            upcoming = pool.map(self._load, chunks[0]) if chunks else iter(())
            for index, chunk_paths in enumerate(chunks):
                loaded = list(upcoming)
                if index + 1 < len(chunks):
                    upcoming = pool.map(self._load, chunks[index + 1])
                records_chunk, decoded = self._records(chunk_paths, loaded)
                records.extend(records_chunk)
                pending.extend(self._detect_and_align(decoded))
                if on_detected is not None:
                    on_detected(len(records))
        self._embed_and_assess(pending)
        return records

    @staticmethod
    def _records(
        paths: list[str], loaded: list[LoadedImage | PhotoRecord]
    ) -> tuple[list[PhotoRecord], list[tuple[PhotoRecord, LoadedImage]]]:
        records: list[PhotoRecord] = []
        decoded: list[tuple[PhotoRecord, LoadedImage]] = []
        for path, item in zip(paths, loaded):
            if isinstance(item, PhotoRecord):
                records.append(item)
                continue
            record = PhotoRecord(
                path=path,
                status="ok",
                content_hash=item.content_hash,
                perceptual_hash=item.perceptual_hash,
                size_bytes=item.size_bytes,
                width=item.width,
                height=item.height,
            )
            records.append(record)
            decoded.append((record, item))
        return records, decoded

    def _detect_and_align(
        self, decoded: list[tuple[PhotoRecord, LoadedImage]]
    ) -> list[tuple[PhotoRecord, Detection, np.ndarray]]:
        if not decoded:
            return []
        detections = self.detector.detect([image.rgb for _, image in decoded])
        template = self.embedder.preprocessing.template
        return [
            (record, detection, align_face(image.rgb, detection.landmarks, template))
            for (record, image), faces in zip(decoded, detections)
            for detection in faces
        ]

    def _embed_and_assess(self, pending: list[tuple[PhotoRecord, Detection, np.ndarray]]) -> None:
        if not pending:
            return
        chips = np.stack([chip for _, _, chip in pending])
        embeddings = self.embedder.embed(chips, batch_size=self.embed_batch_size, flip_tta=self.flip_tta)
        for (record, detection, chip), embedding in zip(pending, embeddings):
            metrics = measure(detection.score, detection.landmarks, chip)
            record.faces.append(FaceRecord(detection, assess(metrics, self.quality), chip, embedding))


def build_miner(
    ingest: IngestConfig,
    detect: DetectConfig,
    quality: QualityConfig,
    embedder: Embedder,
    embed_batch_size: int | None,
    flip_tta: bool,
    decode_workers: int,
) -> Miner:
    detector = FaceDetector(detect, device=embedder.device, max_side=ingest.detect_max_side)
    return Miner(detector, embedder, ingest, quality, embed_batch_size, flip_tta, decode_workers)


def realign_faces(
    path: str, landmarks: Sequence[np.ndarray], template: str, ingest: IngestConfig
) -> list[np.ndarray]:
    """Cut chips for another model's template from the original photo (detection is not repeated)."""
    image = load_image(path, ingest)
    return [align_face(image.rgb, np.asarray(points, np.float64).reshape(5, 2), template) for points in landmarks]
