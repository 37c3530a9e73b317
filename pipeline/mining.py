"""One shard of photos through ingest → detect → align → quality → embed, in memory.

Plain Python: the Prefect flow calls `Miner.process` per shard and hands the records to storage.
"""
from __future__ import annotations

import ctypes
import platform
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.align import align_face
from pipeline.config import DetectConfig, IngestConfig, QualityConfig
from pipeline.detect import Detection, FaceDetector
from pipeline.device import limit_cpu_threads, torch_threads_restored
from pipeline.embed import Embedder
from pipeline.ingest import ImageRejected, LoadedImage, load_image
from pipeline.quality import QualityResult, assess, measure


# glibc's mallopt parameter capping the number of malloc arenas (malloc.h).
_M_ARENA_MAX = -8


def _glibc() -> ctypes.CDLL | None:
    return ctypes.CDLL("libc.so.6") if platform.libc_ver()[0] == "glibc" else None


def limit_malloc_arenas(arenas: int) -> None:
    """Cap glibc's malloc arenas (call before the threads start). Each thread that allocates
    while another does gets an arena of its own (up to 8 per core), and memory freed in one
    arena serves only the threads using it: mining's decoding and compute threads, each freeing
    tens of MB of pixels per batch, kept ~50 MB more resident with glibc's default than with one
    arena per compute thread (400 CelebA photos: peak 1.45 against 1.50 GiB; CPU time equal
    within a loaded machine's noise). Other allocators: nothing to do."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_ARENA_MAX, max(1, arenas))


def release_free_memory() -> None:
    """Hand memory that glibc's malloc holds free back to the system (malloc_trim): what model
    loading (the ONNX graph while converting it) and a shard's photos left behind. Freed memory
    otherwise stays resident, in arenas the next shard's threads may never reuse."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


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

    def compute_threads(self) -> int:
        """Threads detecting and embedding side by side: on a CPU one per core this process may
        use (torch's thread count, so a worker process among several keeps to its share), each
        running its operations on one core: MTCNN's many small operations use a core each better
        than two threads share them, and one process holds the models once. On a GPU one (the
        GPU is what they would share)."""
        return 1 if self.embedder.device.type == "cuda" else torch.get_num_threads()

    def process(self, paths: Sequence[str], on_detected: Callable[[int], None] | None = None) -> list[PhotoRecord]:
        """Records in the order of `paths`; a bad file becomes a skipped/failed record, never an exception.

        Photos are detected a chunk at a time on `compute_threads()` threads, while the next
        chunks decode in threads of their own (Pillow releases the GIL); full-size photos are
        dropped once their chips are cut, so only the chunks in flight hold any. Chips are
        embedded as soon as a batch is full: the same batches in the same order whatever the
        threads do, so results do not depend on them. `on_detected(n)` hears after each chunk,
        in order, how many photos are through detection, the bulk of the work, so progress
        shows from the first photos.
        """
        size = self.detector.config.batch_size
        chunks = deque(list(paths[i : i + size]) for i in range(0, len(paths), size))
        threads = self.compute_threads()
        embed_batch = self.embedder.batch_size(self.embed_batch_size)
        records: list[PhotoRecord] = []
        pending: list[tuple[PhotoRecord, Detection, np.ndarray]] = []
        embedding: list[Future[list[tuple[PhotoRecord, FaceRecord]]]] = []
        decoding: deque[tuple[list[str], list[Future[LoadedImage | PhotoRecord]]]] = deque()
        detecting: deque[tuple[list[PhotoRecord], Future[list[tuple[PhotoRecord, Detection, np.ndarray]]]]] = deque()
        with (
            torch_threads_restored(),
            ThreadPoolExecutor(max_workers=self.decode_workers) as decode_pool,
            ThreadPoolExecutor(max_workers=threads, initializer=limit_cpu_threads, initargs=(1,)) as compute_pool,
        ):
            while chunks or decoding or detecting:
                # At most two chunks of photos in memory per detection thread: one detected, one decoded.
                while chunks and len(decoding) + len(detecting) < 2 * threads:
                    chunk = chunks.popleft()
                    decoding.append((chunk, [decode_pool.submit(self._load, path) for path in chunk]))
                if decoding and len(detecting) < threads:
                    chunk, loading = decoding.popleft()
                    records_chunk, decoded = self._records(chunk, [future.result() for future in loading])
                    detecting.append((records_chunk, compute_pool.submit(self._detect_and_align, decoded)))
                    continue
                records_chunk, detected = detecting.popleft()
                records.extend(records_chunk)
                pending.extend(detected.result())
                while len(pending) >= embed_batch:
                    embedding.append(compute_pool.submit(self._embed_and_assess, pending[:embed_batch]))
                    del pending[:embed_batch]
                if on_detected is not None:
                    on_detected(len(records))
            if pending:
                embedding.append(compute_pool.submit(self._embed_and_assess, pending))
            for batch in embedding:
                for record, face in batch.result():
                    record.faces.append(face)
        release_free_memory()
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

    def _embed_and_assess(
        self, pending: list[tuple[PhotoRecord, Detection, np.ndarray]]
    ) -> list[tuple[PhotoRecord, FaceRecord]]:
        """One embedding batch (all of `pending`) and the quality of its faces."""
        chips = np.stack([chip for _, _, chip in pending])
        embeddings = self.embedder.embed(chips, batch_size=len(chips), flip_tta=self.flip_tta)
        return [
            (record, FaceRecord(detection, assess(measure(detection.score, detection.landmarks, chip), self.quality),
                                chip, embedding))
            for (record, detection, chip), embedding in zip(pending, embeddings)
        ]


def build_miner(
    ingest: IngestConfig,
    detect: DetectConfig,
    quality: QualityConfig,
    embedder: Embedder,
    embed_batch_size: int | None,
    flip_tta: bool,
    decode_workers: int,
) -> Miner:
    """The miner a mining process holds (usecases.runtime caches one per process). Building it also
    caps the process's malloc arenas at its compute threads: a process-wide setting, so it is made
    here, for processes that mine, and not by every `Miner`."""
    detector = FaceDetector(detect, device=embedder.device, max_side=ingest.detect_max_side)
    miner = Miner(detector, embedder, ingest, quality, embed_batch_size, flip_tta, decode_workers)
    limit_malloc_arenas(miner.compute_threads())
    release_free_memory()
    return miner


def realign_faces(
    path: str, landmarks: Sequence[np.ndarray], template: str, ingest: IngestConfig
) -> list[np.ndarray]:
    """Cut chips for another model's template from the original photo (detection is not repeated)."""
    image = load_image(path, ingest)
    return [align_face(image.rgb, np.asarray(points, np.float64).reshape(5, 2), template) for points in landmarks]
