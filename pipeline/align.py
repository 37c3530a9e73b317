"""Face alignment: warp a photo so the five landmarks land on a fixed template.

Landmark order everywhere: left eye, right eye, nose, mouth-left, mouth-right, where
left/right are as seen in the image (MTCNN order, see `pipeline.detect.Detection`).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.errors import FacemineError


@dataclass(frozen=True)
class AlignTemplate:
    """Where the five landmarks sit in a `size` x `size` chip."""

    name: str
    size: int
    points: np.ndarray  # (5, 2) float64, x/y in chip pixels

    def __post_init__(self) -> None:
        points = np.asarray(self.points, dtype=np.float64)
        if points.shape != (5, 2):
            raise ValueError(f"template points must have shape (5, 2), got {points.shape}")
        points.setflags(write=False)  # frozen means the points too
        object.__setattr__(self, "points", points)


# The standard insightface ArcFace template, which SFace and most ArcFace-family models expect.
_ARCFACE_112_POINTS = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ]
)

# facenet-pytorch's InceptionResnetV1 was trained on loose MTCNN box crops, not on a landmark
# template, so no exact 160 template exists. We keep the ArcFace face geometry and scale it by
# 160/112: the face fills the same fraction of the chip (eyes ~31% of the width apart), which is
# close to a margin-padded MTCNN crop, and one geometry serves both model families.
_FACENET_160_POINTS = _ARCFACE_112_POINTS * (160.0 / 112.0)

TEMPLATES: dict[str, AlignTemplate] = {
    template.name: template
    for template in (
        AlignTemplate("arcface_112", 112, _ARCFACE_112_POINTS),
        AlignTemplate("facenet_160", 160, _FACENET_160_POINTS),
    )
}

# Mirroring a face swaps the eyes and the mouth corners; the nose stays.
_MIRROR_ORDER = np.array([1, 0, 2, 4, 3])


def get_template(template: AlignTemplate | str) -> AlignTemplate:
    """Resolve a template given by name; unknown names are a user error."""
    if isinstance(template, AlignTemplate):
        return template
    try:
        return TEMPLATES[template]
    except KeyError:
        known = ", ".join(sorted(TEMPLATES))
        raise FacemineError(f"unknown alignment template '{template}' (known: {known})") from None


def _as_points(points: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2), got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains non-finite values")
    return array


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src onto dst.

    Returns the (2, 3) float64 matrix for `cv2.warpAffine`.
    """
    # Not cv2.estimateAffinePartial2D: it only offers robust fits (RANSAC / LMedS) that drop
    # "outlier" landmarks and refit on the rest (and its LMedS fit is off by ~2e-6 px even on
    # noise-free points); with five noisy detector landmarks every point should count, as in
    # insightface's Umeyama fit. A similarity x' = a*x - b*y + tx, y' = b*x + a*y + ty is
    # linear in (a, b, tx, ty), so numpy's least-squares solver reaches Umeyama's optimum.
    src = _as_points(src, "src")
    dst = _as_points(dst, "dst")
    if src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"need two matching sets of at least 2 points, got {src.shape} and {dst.shape}")
    x, y = src[:, 0], src[:, 1]
    ones, zeros = np.ones_like(x), np.zeros_like(x)
    design = np.concatenate(
        [np.stack([x, -y, ones, zeros], axis=1), np.stack([y, x, zeros, ones], axis=1)]
    )
    target = np.concatenate([dst[:, 0], dst[:, 1]])
    (a, b, tx, ty), *_ = np.linalg.lstsq(design, target, rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def align_face(
    image_rgb: np.ndarray, landmarks: np.ndarray, template: AlignTemplate | str = "arcface_112"
) -> np.ndarray:
    """Warp the face whose landmarks are given onto the template; returns a uint8 (size, size, 3) chip."""
    template = get_template(template)
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 image, got {image_rgb.dtype} {image_rgb.shape}")
    landmarks = _as_points(landmarks, "landmarks")
    if landmarks.shape != (5, 2):
        raise ValueError(f"landmarks must have shape (5, 2), got {landmarks.shape}")
    matrix = estimate_similarity(landmarks, template.points)
    # Constant black outside the photo, as insightface's and OpenCV's (SFace) reference
    # alignment do: the models were trained on such borders, and replicated edges would
    # smear streaks across the chip.
    return cv2.warpAffine(
        image_rgb,
        matrix,
        (template.size, template.size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0),
    )


def flip_landmarks(landmarks: np.ndarray, width: int) -> np.ndarray:
    """Landmarks of the horizontally mirrored image: x -> width - 1 - x, left/right points swapped."""
    landmarks = _as_points(landmarks, "landmarks")
    if landmarks.shape != (5, 2):
        raise ValueError(f"landmarks must have shape (5, 2), got {landmarks.shape}")
    mirrored = landmarks.copy()
    mirrored[:, 0] = width - 1 - mirrored[:, 0]
    return mirrored[_MIRROR_ORDER]


def flip_image(image: np.ndarray) -> np.ndarray:
    """Horizontal mirror (left-right), same shape and dtype."""
    return cv2.flip(image, 1)
