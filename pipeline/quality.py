"""Face quality: measure each detected face, then pass or reject it with named reasons.

`measure` turns a detection (score, landmarks) and its aligned chip into `QualityMetrics`;
`assess` applies a `QualityConfig` and lists every rule the face breaks; `quality_report`
counts what each rule removed.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.align import TEMPLATES
from pipeline.config import QualityConfig

# Rule names, in the order reasons and reports list them.
RULES: tuple[str, ...] = (
    "low_det_score",
    "small_face",
    "blurry",
    "yaw",
    "pitch",
    "too_dark",
    "too_bright",
    "low_contrast",
    "low_score",
)

# Chip measurements are taken on the ArcFace 112 geometry; chips aligned to another size of
# the same geometry (facenet_160 is ArcFace scaled) are resized first, so one sharpness
# threshold holds whichever template the embedder uses.
_REFERENCE = TEMPLATES["arcface_112"]
_REF_EYE_DISTANCE = float(np.linalg.norm(_REFERENCE.points[1] - _REFERENCE.points[0]))
# Sharpness and exposure are measured on the eyes-to-mouth region (landmark box widened by a
# third of the eye distance, more upward for the brows), so background, hair and the black
# border the warp adds outside the photo do not count.
_REGION_X = (
    int(_REFERENCE.points[:, 0].min() - _REF_EYE_DISTANCE / 3),
    int(np.ceil(_REFERENCE.points[:, 0].max() + _REF_EYE_DISTANCE / 3)),
)
_REGION_Y = (
    int(_REFERENCE.points[:, 1].min() - _REF_EYE_DISTANCE / 2),
    int(np.ceil(_REFERENCE.points[:, 1].max() + _REF_EYE_DISTANCE / 3)),
)
# Frontal nose position along the eye-midpoint -> mouth-midpoint axis (0 = eyes, 1 = mouth).
_FRONTAL_NOSE_RATIO = float(
    (_REFERENCE.points[2, 1] - _REFERENCE.points[:2, 1].mean())
    / (_REFERENCE.points[3:, 1].mean() - _REFERENCE.points[:2, 1].mean())
)

# Scales of the combined score's saturating terms 1 - exp(-value / scale): a value equal
# to its scale scores 0.63, three times it 0.95.
_EYE_DISTANCE_SCALE = 15.0  # px in the photo
_SHARPNESS_SCALE = 60.0
_CONTRAST_SCALE = 15.0


@dataclass(frozen=True)
class QualityMetrics:
    det_score: float
    eye_distance: float  # px in the original photo
    sharpness: float  # variance of the Laplacian of the grey face region
    yaw: float  # degrees; positive when the nose points to the image's right (its +x)
    pitch: float  # degrees; positive when the nose points down (face tilted down)
    brightness: float  # mean grey level of the face region, 0..255
    contrast: float  # standard deviation of that grey level


@dataclass(frozen=True)
class QualityResult:
    metrics: QualityMetrics
    score: float  # in [0, 1], higher is better
    passed: bool
    reasons: tuple[str, ...]  # every failed rule, in RULES order


def _face_region_grey(chip: np.ndarray) -> np.ndarray:
    if chip.dtype != np.uint8 or chip.ndim != 3 or chip.shape[2] != 3 or chip.shape[0] != chip.shape[1]:
        raise ValueError(f"expected a square uint8 HxWx3 chip, got {chip.dtype} {chip.shape}")
    if chip.shape[0] != _REFERENCE.size:
        chip = cv2.resize(chip, (_REFERENCE.size, _REFERENCE.size), interpolation=cv2.INTER_AREA)
    grey = cv2.cvtColor(chip, cv2.COLOR_RGB2GRAY)
    return grey[_REGION_Y[0] : _REGION_Y[1], _REGION_X[0] : _REGION_X[1]]


def estimate_pose(landmarks: np.ndarray) -> tuple[float, float]:
    """(yaw, pitch) in degrees from the five landmarks.

    Weak-perspective model: the nose tip stands in front of the eye/mouth plane by about half
    the eye distance r, and its frontal spot lies on the eye-midpoint -> mouth-midpoint axis
    at the template's ratio. Turning the head moves the nose off that spot by r * sin(angle)
    (measured in the face's own axes, so roll does not matter).
    - yaw: the offset across the axis is r * sin(yaw) while the visible half eye distance
      shrinks to r * cos(yaw), so yaw = atan(offset / visible half eye distance);
    - pitch: the eye distance does not shrink with pitch, so pitch = asin(offset / r).
    Crude (faces differ, expressions move the mouth) but monotone, which a threshold needs.
    """
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != (5, 2):
        raise ValueError(f"landmarks must have shape (5, 2), got {points.shape}")
    eye_mid = points[:2].mean(axis=0)
    mouth_mid = points[3:].mean(axis=0)
    tiny = np.finfo(np.float64).eps
    half_eye = max(np.linalg.norm(points[1] - points[0]) / 2, tiny)
    axis = mouth_mid - eye_mid
    down = axis / max(np.linalg.norm(axis), tiny)
    right = np.array([down[1], -down[0]])  # `down` turned a quarter toward image +x
    nose_offset = points[2] - (eye_mid + _FRONTAL_NOSE_RATIO * axis)
    yaw = np.degrees(np.arctan(nose_offset @ right / half_eye))
    pitch = np.degrees(np.arcsin(np.clip(nose_offset @ down / half_eye, -1.0, 1.0)))
    return float(yaw), float(pitch)


def measure(det_score: float, landmarks: np.ndarray, chip: np.ndarray) -> QualityMetrics:
    """Metrics of one face: detector score and landmarks in photo pixels, chip aligned by `align_face`."""
    points = np.asarray(landmarks, dtype=np.float64)
    yaw, pitch = estimate_pose(points)
    grey = _face_region_grey(chip)
    return QualityMetrics(
        det_score=float(det_score),
        eye_distance=float(np.linalg.norm(points[1] - points[0])),
        sharpness=float(cv2.Laplacian(grey, cv2.CV_64F).var()),
        yaw=yaw,
        pitch=pitch,
        brightness=float(grey.mean()),
        contrast=float(grey.std()),
    )


def _saturating(value: float, scale: float) -> float:
    return float(1.0 - np.exp(-max(value, 0.0) / scale))


def combined_score(metrics: QualityMetrics) -> float:
    """Geometric mean of per-metric scores in [0, 1]; rises with every metric's goodness.

    Detector score as is; face size, sharpness and contrast through 1 - exp(-v / scale);
    pose as cos(yaw) * cos(pitch); brightness as 1 - (distance from mid-grey / 127.5)^2.
    A geometric mean lets one very bad metric sink the face, which an average would hide.
    """
    terms = np.array(
        [
            np.clip(metrics.det_score, 0.0, 1.0),
            _saturating(metrics.eye_distance, _EYE_DISTANCE_SCALE),
            _saturating(metrics.sharpness, _SHARPNESS_SCALE),
            np.cos(np.radians(min(abs(metrics.yaw), 90.0)))
            * np.cos(np.radians(min(abs(metrics.pitch), 90.0))),
            1.0 - min(((metrics.brightness - 127.5) / 127.5) ** 2, 1.0),
            _saturating(metrics.contrast, _CONTRAST_SCALE),
        ]
    )
    if not np.isfinite(terms).all() or (terms <= 0).any():
        return 0.0
    return float(np.exp(np.log(terms).mean()))


def assess(metrics: QualityMetrics, config: QualityConfig) -> QualityResult:
    """Apply the thresholds; a face passes only when no rule fails.

    Each check is written as "not good enough" (`not value >= minimum`) so a NaN metric fails.
    """
    score = combined_score(metrics)
    failed = {
        "low_det_score": not metrics.det_score >= config.min_det_score,
        "small_face": not metrics.eye_distance >= config.min_eye_distance,
        "blurry": not metrics.sharpness >= config.min_sharpness,
        "yaw": not abs(metrics.yaw) <= config.max_abs_yaw,
        "pitch": not abs(metrics.pitch) <= config.max_abs_pitch,
        "too_dark": not metrics.brightness >= config.min_brightness,
        "too_bright": not metrics.brightness <= config.max_brightness,
        "low_contrast": not metrics.contrast >= config.min_contrast,
        "low_score": not score >= config.min_score,
    }
    reasons = tuple(rule for rule in RULES if failed[rule])
    return QualityResult(metrics=metrics, score=score, passed=not reasons, reasons=reasons)


def quality_report(results: Iterable[QualityResult]) -> dict:
    """Totals plus, per rule in RULES order, faces it removed and faces it alone removed.

    `{"total", "passed", "failed", "rules": {rule: {"removed": n, "only": n}}}`.
    """
    return report_from_reasons(result.reasons for result in results)


def report_from_reasons(reasons_per_face: Iterable[Sequence[str]]) -> dict:
    """`quality_report` from each face's failed rules (as stored, or sent back by a shard)."""
    total = failed = 0
    removed: Counter[str] = Counter()
    only: Counter[str] = Counter()
    for reasons in reasons_per_face:
        total += 1
        failed += bool(reasons)
        removed.update(reasons)
        if len(reasons) == 1:
            only.update(reasons)
    return {
        "total": total,
        "passed": total - failed,
        "failed": failed,
        "rules": {rule: {"removed": removed[rule], "only": only[rule]} for rule in RULES},
    }
