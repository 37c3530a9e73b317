"""Detect: faces with five landmarks, batched MTCNN (facenet-pytorch).

Landmark order is MTCNN's: left eye, right eye, nose, mouth left, mouth right, with left/right
as seen in the image (the left eye has the smaller x on a frontal face). tests/test_detect.py
checks it on a real photo.

Boxes are not clipped to the photo: a face cut by the border gets a box reaching past it,
which keeps its true size.

MTCNN batches only equal-size images, so photos of one call are zero-padded at the bottom and
right (coordinates unchanged). Batched and one-at-a-time results agree within a pixel or two
for faces inside the photo (the padded pyramid resamples slightly differently). A face cut by
the right or bottom border may be found only when padded: facenet-pytorch clips its crops at
the photo border, where padding supplies zeros as the original MTCNN does.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from facenet_pytorch import MTCNN

from pipeline.config import DetectConfig, IngestConfig
from pipeline.device import resolve_device
from pipeline.ingest import downscale_for_detection

# Zero padding costs as much compute as photo pixels; beyond this ratio a photo starts a new
# batch instead, since batching mainly saves per-call overhead.
_MAX_PADDED_TO_REAL_PIXELS = 1.5


@dataclass
class Detection:
    box: np.ndarray  # (4,) float64 x1, y1, x2, y2 in original pixels
    score: float
    landmarks: np.ndarray  # (5, 2) float64 (x, y) in original pixels, MTCNN order


class FaceDetector:
    """MTCNN over batches of RGB uint8 photos of any sizes.

    Photos whose long side exceeds `max_side` are shrunk for detection only; boxes and
    landmarks come back in original pixels.
    """

    def __init__(
        self,
        config: DetectConfig,
        device: str | torch.device = "auto",
        max_side: int = IngestConfig().detect_max_side,
    ) -> None:
        self.config = config
        self.device = resolve_device(device)
        self.max_side = max_side
        self.mtcnn = MTCNN(
            keep_all=True,
            post_process=False,
            select_largest=False,
            min_face_size=config.min_face_size,
            thresholds=list(config.stage_thresholds),
            factor=config.scale_factor,
            device=self.device,
        ).eval()

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """Faces per photo, each list sorted by score descending; [] for a photo without faces."""
        for image in images:
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"expected uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
        shrunk = [downscale_for_detection(image, self.max_side) for image in images]
        detections: list[list[Detection]] = [[] for _ in images]
        sizes = [image.shape[:2] for image, _ in shrunk]
        for batch in self._plan_batches(sizes):
            found = self._run_mtcnn([shrunk[index][0] for index in batch])
            for index, (boxes, scores, landmarks) in zip(batch, found):
                detections[index] = self._to_detections(boxes, scores, landmarks, shrunk[index][1])
        return detections

    def detect_one(self, image: np.ndarray) -> list[Detection]:
        return self.detect([image])[0]

    def _plan_batches(self, sizes: list[tuple[int, int]]) -> list[list[int]]:
        """Indices grouped into MTCNN calls, similar sizes together so padding stays small.

        Photos smaller than the minimum face size cannot hold a face (and MTCNN fails on them
        when alone), so they get no call.
        """
        eligible = [i for i, (h, w) in enumerate(sizes) if min(h, w) >= self.config.min_face_size]
        batches: list[list[int]] = []
        for index in sorted(eligible, key=lambda i: sizes[i]):
            if batches and self._fits([sizes[i] for i in batches[-1] + [index]]):
                batches[-1].append(index)
            else:
                batches.append([index])
        return batches

    def _fits(self, sizes: list[tuple[int, int]]) -> bool:
        padded = len(sizes) * max(h for h, _ in sizes) * max(w for _, w in sizes)
        real = sum(h * w for h, w in sizes)
        return (
            len(sizes) <= self.config.batch_size
            and padded <= self.config.batch_max_pixels
            and padded <= real * _MAX_PADDED_TO_REAL_PIXELS
        )

    def _run_mtcnn(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """One MTCNN call; photos zero-padded at bottom/right, which never shifts coordinates."""
        height = max(image.shape[0] for image in images)
        width = max(image.shape[1] for image in images)
        canvas = np.zeros((len(images), height, width, 3), dtype=np.uint8)
        for slot, image in zip(canvas, images):
            slot[: image.shape[0], : image.shape[1]] = image
        with torch.inference_mode():
            boxes, scores, landmarks = self.mtcnn.detect(torch.from_numpy(canvas), landmarks=True)
        return [_as_arrays(*found) for found in zip(boxes, scores, landmarks)]

    def _to_detections(
        self, boxes: np.ndarray, scores: np.ndarray, landmarks: np.ndarray, scale: float
    ) -> list[Detection]:
        keep = scores >= self.config.min_score
        boxes, scores, landmarks = boxes[keep] / scale, scores[keep], landmarks[keep] / scale
        # Score descending; position breaks ties so the order is reproducible.
        order = np.lexsort((boxes[:, 1], boxes[:, 0], -scores))
        return [Detection(box=boxes[i], score=float(scores[i]), landmarks=landmarks[i]) for i in order]


def _as_arrays(boxes, scores, landmarks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MTCNN's per-photo output (None when no face, object arrays otherwise) as float64 arrays."""
    if boxes is None:
        return np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))
    return (
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        np.asarray(scores, dtype=np.float64).reshape(-1),
        np.asarray(landmarks, dtype=np.float64).reshape(-1, 5, 2),
    )
