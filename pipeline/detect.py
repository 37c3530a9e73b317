"""Detect: faces with five landmarks, batched MTCNN (facenet-pytorch's nets and weights).

facenet-pytorch's three-stage procedure is followed step by step (`FaceDetector._three_stages`,
tested equal to its own `MTCNN.detect`) so that the nets can run as optimised inference graphs.

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
from facenet_pytorch.models.utils.detect_face import batched_nms_numpy, bbreg, generateBoundingBox, imresample, rerec
from torchvision.ops import batched_nms

from pipeline.config import DetectConfig, IngestConfig
from pipeline.device import resolve_device
from pipeline.inference import optimized_for_inference
from pipeline.ingest import downscale_for_detection

# Zero padding costs as much compute as photo pixels; beyond this ratio a photo starts a new
# batch instead, since batching mainly saves per-call overhead.
_MAX_PADDED_TO_REAL_PIXELS = 1.5
# P-net sees 12x12 windows: a face of min_face_size pixels is shrunk to this size first.
_PNET_CELL = 12.0


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
        # Only MTCNN's three nets (with the weights shipped in facenet-pytorch) are used; the
        # detection steps are `_three_stages`.
        nets = MTCNN(device=self.device)
        self.pnet = optimized_for_inference(nets.pnet, torch.zeros(1, 3, 64, 64, device=self.device))
        self.rnet = optimized_for_inference(nets.rnet, torch.zeros(2, 3, 24, 24, device=self.device))
        self.onet = optimized_for_inference(nets.onet, torch.zeros(2, 3, 48, 48, device=self.device))

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
            # Contiguous NCHW: area resizing of channels-last pixels is slower. Kept as uint8 (a
            # quarter of float's size): pixels become float a photo or a crop at a time.
            batch = torch.from_numpy(canvas).to(self.device).permute(0, 3, 1, 2).contiguous()
            boxes, owners, landmarks = self._three_stages(batch)
        boxes, owners, landmarks = boxes.cpu().double().numpy(), owners.cpu().numpy(), landmarks.cpu().double().numpy()
        return [(boxes[owners == i, :4], boxes[owners == i, 4], landmarks[owners == i]) for i in range(len(images))]

    def _three_stages(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """MTCNN over (N, 3, H, W) uint8 pixels: boxes with scores (M, 5), photo index (M,), landmarks (M, 5, 2).

        The steps and constants are facenet-pytorch's `detect_face`, reusing its helpers, and the
        results are the same. It is written out here only so that the three nets can run through
        `optimized_for_inference` (its driver needs eager modules): detection takes about 40 %
        less time on a CPU.
        """
        min_face, factor = self.config.min_face_size, self.config.scale_factor
        thresholds = self.config.stage_thresholds
        height, width = images.shape[2:]
        scale, side = _PNET_CELL / min_face, min(height, width) * _PNET_CELL / min_face
        candidates, owners = [], []
        while side >= _PNET_CELL:
            resized = _resized(images, (int(height * scale + 1), int(width * scale + 1)))
            regression, probabilities = self.pnet(_normalize(resized))
            found, owner = generateBoundingBox(regression, probabilities[:, 1], scale, thresholds[0])
            keep = batched_nms(found[:, :4], found[:, 4], owner, 0.5)
            candidates.append(found[keep])
            owners.append(owner[keep])
            scale, side = scale * factor, side * factor
        found = torch.cat(candidates) if candidates else torch.zeros(0, 9, device=images.device)
        owner = torch.cat(owners) if owners else torch.zeros(0, dtype=torch.int64, device=images.device)
        keep = batched_nms(found[:, :4], found[:, 4], owner, 0.7)
        found, owner = found[keep], owner[keep]
        # P-net's regression scales by width without MTCNN's +1 (unlike `bbreg` in later stages).
        size = (found[:, 2:4] - found[:, 0:2]).repeat(1, 2)
        boxes = rerec(torch.cat([found[:, :4] + found[:, 5:9] * size, found[:, 4:5]], dim=1))

        crops, boxes, owner = _crops(images, boxes, owner, 24)
        if len(boxes):
            regression, probabilities = self.rnet(crops)
            passed = probabilities[:, 1] > thresholds[1]
            boxes = torch.cat([boxes[passed, :4], probabilities[passed, 1:2]], dim=1)
            owner, regression = owner[passed], regression[passed]
            keep = batched_nms(boxes[:, :4], boxes[:, 4], owner, 0.7)
            boxes = rerec(bbreg(boxes[keep], regression[keep]))
            owner = owner[keep]

        crops, boxes, owner = _crops(images, boxes, owner, 48)
        if not len(boxes):
            return boxes, owner, torch.zeros(0, 5, 2, device=images.device)
        regression, points, probabilities = self.onet(crops)
        passed = probabilities[:, 1] > thresholds[2]
        boxes = torch.cat([boxes[passed, :4], probabilities[passed, 1:2]], dim=1)
        owner, regression, points = owner[passed], regression[passed], points[passed]
        # Landmarks are relative to the box before the final regression (MTCNN's +1 pixel convention).
        box_width = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        box_height = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        landmarks = torch.stack(
            [box_width * points[:, :5] + boxes[:, 0:1] - 1, box_height * points[:, 5:] + boxes[:, 1:2] - 1], dim=2
        )
        boxes = bbreg(boxes, regression)
        keep = batched_nms_numpy(boxes[:, :4], boxes[:, 4], owner, 0.7, "Min")
        return boxes[keep], owner[keep], landmarks[keep]

    def _to_detections(
        self, boxes: np.ndarray, scores: np.ndarray, landmarks: np.ndarray, scale: float
    ) -> list[Detection]:
        keep = scores >= self.config.min_score
        boxes, scores, landmarks = boxes[keep] / scale, scores[keep], landmarks[keep] / scale
        # Score descending; position breaks ties so the order is reproducible.
        order = np.lexsort((boxes[:, 1], boxes[:, 0], -scores))
        return [Detection(box=boxes[i], score=float(scores[i]), landmarks=landmarks[i]) for i in order]


def _normalize(pixels: torch.Tensor) -> torch.Tensor:
    """MTCNN's input scaling of 0..255 pixels."""
    return (pixels - 127.5) * 0.0078125


def _resized(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 photos area-resized to float, one photo at a time: the same values as resizing the
    whole batch in float (each photo is resized on its own either way), without a float copy of
    the whole batch at full size (four times the uint8 batch, held through all three stages)."""
    return torch.cat([imresample(image[None].float(), size) for image in images])


def _crops(
    images: torch.Tensor, boxes: torch.Tensor, owners: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each box's part inside its photo, area-resized to size x size and normalised, as
    facenet-pytorch cuts them (box clipped to the photo's 1-based pixel bounds); boxes that do
    not reach into the photo are dropped. Crop sizes differ, so this stays a loop: a batched
    `roi_align` was slower here and averages pixels differently."""
    height, width = images.shape[2:]
    bounds = boxes[:, :4].trunc().long().tolist()
    crops, kept = [], []
    for index, ((left, top, right, bottom), owner) in enumerate(zip(bounds, owners.tolist())):
        left, top, right, bottom = max(left, 1) - 1, max(top, 1) - 1, min(right, width), min(bottom, height)
        if right > left and bottom > top:
            crops.append(imresample(images[owner : owner + 1, :, top:bottom, left:right].float(), (size, size)))
            kept.append(index)
    if not crops:
        return images.new_zeros((0, 3, size, size)), boxes[:0], owners[:0]
    kept_index = torch.tensor(kept, device=boxes.device)
    return _normalize(torch.cat(crops)), boxes[kept_index], owners[kept_index]
