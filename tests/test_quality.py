"""Quality: metrics and rules on real LFW faces, no-face photos and hand-made metric sets."""
from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.align import TEMPLATES, align_face, flip_image, flip_landmarks
from pipeline.config import DetectConfig, IngestConfig, QualityConfig
from pipeline.detect import Detection, FaceDetector
from pipeline.ingest import iter_image_files, load_image
from pipeline.quality import (
    RULES,
    QualityMetrics,
    QualityResult,
    assess,
    combined_score,
    estimate_pose,
    measure,
    quality_report,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data"
LFW = DATA / "lfw"
ARCFACE = TEMPLATES["arcface_112"]
DEFAULTS = QualityConfig()
GOOD = QualityMetrics(
    det_score=0.999, eye_distance=40.0, sharpness=200.0, yaw=5.0, pitch=5.0, brightness=120.0, contrast=40.0
)


@dataclasses.dataclass
class Face:
    image: np.ndarray
    detection: Detection
    chip: np.ndarray
    metrics: QualityMetrics


def central_face(faces: list[Detection], image: np.ndarray) -> Detection:
    centre = np.array([image.shape[1], image.shape[0]]) / 2
    return min(faces, key=lambda face: np.linalg.norm((face.box[:2] + face.box[2:]) / 2 - centre))


def face_of(image: np.ndarray, detection: Detection) -> Face:
    chip = align_face(image, detection.landmarks, ARCFACE)
    return Face(image, detection, chip, measure(detection.score, detection.landmarks, chip))


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector(DetectConfig(), device="cpu")


@pytest.fixture(scope="module")
def lfw_faces(detector: FaceDetector) -> list[Face]:
    """The central face of 50 LFW photos spread over the identity list."""
    with open(LFW / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    paths = [LFW / row["path"] for row in rows[:: len(rows) // 50][:50]]
    images = [load_image(path, IngestConfig()).rgb for path in paths]
    return [face_of(image, central_face(faces, image)) for image, faces in zip(images, detector.detect(images))]


@pytest.fixture(scope="module")
def sharp_faces(lfw_faces: list[Face]) -> list[Face]:
    passing = [face for face in lfw_faces if assess(face.metrics, DEFAULTS).passed]
    return sorted(passing, key=lambda face: -face.metrics.sharpness)[:10]


def reassess(face: Face, chip: np.ndarray) -> QualityResult:
    return assess(measure(face.detection.score, face.detection.landmarks, chip), DEFAULTS)


# --- real faces -----------------------------------------------------------------------------

def test_most_real_lfw_faces_pass(lfw_faces):
    results = [assess(face.metrics, DEFAULTS) for face in lfw_faces]
    assert len(results) == 50
    assert sum(result.passed for result in results) >= 45, quality_report(results)
    assert all(0.0 <= result.score <= 1.0 for result in results)


@pytest.mark.slow
def test_no_detection_on_no_face_photos_passes():
    # Every MTCNN detection, even those below the detector's own min_score. One photo at a
    # time: batching pads photos, which changes MTCNN's pyramid enough to lose or add
    # borderline false detections, and we want all that plain MTCNN makes.
    detector = FaceDetector(DetectConfig(min_score=0.0), device="cpu")
    false_faces = []
    for path in iter_image_files([DATA / "scenes" / "no_face"], IngestConfig().extensions):
        image = load_image(path, IngestConfig()).rgb
        false_faces += [(path.name, face_of(image, detection)) for detection in detector.detect_one(image)]
    assert false_faces, "the folder no longer fools the detector; this test would prove nothing"
    passed = [(name, face.metrics) for name, face in false_faces if assess(face.metrics, DEFAULTS).passed]
    assert not passed


def test_blurred_chip_is_much_less_sharp_and_fails_blurry(sharp_faces):
    for face in sharp_faces:
        blurred = reassess(face, cv2.GaussianBlur(face.chip, (0, 0), 3.0))
        assert blurred.metrics.sharpness < 0.2 * face.metrics.sharpness
        assert "blurry" in blurred.reasons


def test_score_falls_as_blur_grows(sharp_faces):
    for face in sharp_faces[:3]:
        results = [reassess(face, face.chip)] + [
            reassess(face, cv2.GaussianBlur(face.chip, (0, 0), sigma)) for sigma in (0.6, 1.0, 1.5, 2.0, 3.0)
        ]
        sharpness = [result.metrics.sharpness for result in results]
        scores = [result.score for result in results]
        assert np.all(np.diff(sharpness) < 0), sharpness
        assert np.all(np.diff(scores) < 0), scores


def test_darkened_chip_fails_too_dark_and_brightened_fails_too_bright(sharp_faces):
    for face in sharp_faces[:5]:
        darker = np.clip(face.chip.astype(np.float32) * 0.2, 0, 255).astype(np.uint8)
        brighter = np.clip(face.chip.astype(np.float32) + 170, 0, 255).astype(np.uint8)
        assert "too_dark" in reassess(face, darker).reasons
        assert "too_bright" in reassess(face, brighter).reasons


def test_mirrored_landmarks_negate_yaw_and_keep_pitch(lfw_faces):
    for face in lfw_faces:
        yaw, pitch = estimate_pose(face.detection.landmarks)
        mirrored = flip_landmarks(face.detection.landmarks, face.image.shape[1])
        mirrored_yaw, mirrored_pitch = estimate_pose(mirrored)
        assert mirrored_yaw == pytest.approx(-yaw, abs=1e-9)
        assert mirrored_pitch == pytest.approx(pitch, abs=1e-9)


def test_yaw_sign_and_size_on_real_faces(detector, lfw_faces):
    # LFW is mostly near-frontal.
    assert np.median([abs(face.metrics.yaw) for face in lfw_faces]) < 15
    # Drew Barrymore 0001 is turned toward the image's right: positive yaw, negative on the mirror.
    image = load_image(LFW / "images" / "Drew_Barrymore" / "Drew_Barrymore_0001.jpg", IngestConfig()).rgb
    turned = central_face(detector.detect_one(image), image)
    mirrored = flip_image(image)
    assert estimate_pose(turned.landmarks)[0] > 20
    assert estimate_pose(central_face(detector.detect_one(mirrored), mirrored).landmarks)[0] < -20


def test_sharpness_is_comparable_across_templates(lfw_faces):
    for face in lfw_faces[:10]:
        chip_160 = align_face(face.image, face.detection.landmarks, "facenet_160")
        sharpness_160 = measure(face.detection.score, face.detection.landmarks, chip_160).sharpness
        ratio = sharpness_160 / face.metrics.sharpness
        assert 0.5 < ratio < 2.0


# --- pose geometry --------------------------------------------------------------------------

@pytest.mark.parametrize("roll", [0.0, 30.0, -70.0])
def test_template_landmarks_are_frontal_at_any_roll_and_scale(roll):
    angle = np.radians(roll)
    rotation = 3.0 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    yaw, pitch = estimate_pose(ARCFACE.points @ rotation.T + [400.0, 250.0])
    assert abs(yaw) < 1.0 and abs(pitch) < 1.0


def test_profile_like_landmarks_fail_yaw():
    profile = ARCFACE.points.copy()
    profile[2, 0] = profile[1, 0] + 10.0  # nose beyond the right eye
    yaw, pitch = estimate_pose(profile)
    assert yaw > DEFAULTS.max_abs_yaw
    assert estimate_pose(flip_landmarks(profile, 112))[0] < -DEFAULTS.max_abs_yaw
    metrics = dataclasses.replace(GOOD, yaw=yaw, pitch=pitch)
    assert "yaw" in assess(metrics, DEFAULTS).reasons


def test_nose_toward_the_mouth_means_looking_down():
    lowered = ARCFACE.points.copy()
    lowered[2, 1] += 12.0
    raised = ARCFACE.points.copy()
    raised[2, 1] -= 12.0
    assert estimate_pose(lowered)[1] > 20 and estimate_pose(raised)[1] < -20


# --- rules ----------------------------------------------------------------------------------

def test_good_metrics_pass():
    result = assess(GOOD, DEFAULTS)
    assert result.passed and result.reasons == () and result.score > 0.8


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        ({"det_score": 0.9}, "low_det_score"),
        ({"eye_distance": 8.0}, "small_face"),
        ({"sharpness": 10.0}, "blurry"),
        ({"yaw": -60.0}, "yaw"),
        ({"pitch": 50.0}, "pitch"),
        ({"brightness": 20.0}, "too_dark"),
        ({"brightness": 240.0}, "too_bright"),
        ({"contrast": 8.0}, "low_contrast"),
    ],
)
def test_each_rule_fires_alone(change, rule):
    result = assess(dataclasses.replace(GOOD, **change), DEFAULTS)
    assert result.reasons == (rule,) and not result.passed


def test_every_failing_rule_is_listed_in_rule_order():
    bad = QualityMetrics(
        det_score=0.5, eye_distance=5.0, sharpness=2.0, yaw=70.0, pitch=-60.0, brightness=10.0, contrast=3.0
    )
    result = assess(bad, DEFAULTS)
    assert result.reasons == (
        "low_det_score", "small_face", "blurry", "yaw", "pitch", "too_dark", "low_contrast", "low_score"
    )
    assert list(result.reasons) == [rule for rule in RULES if rule in result.reasons]


def test_borderline_on_every_count_fails_only_the_combined_score():
    at_thresholds = QualityMetrics(
        det_score=DEFAULTS.min_det_score,
        eye_distance=DEFAULTS.min_eye_distance,
        sharpness=DEFAULTS.min_sharpness,
        yaw=DEFAULTS.max_abs_yaw,
        pitch=DEFAULTS.max_abs_pitch,
        brightness=DEFAULTS.min_brightness,
        contrast=DEFAULTS.min_contrast,
    )
    assert assess(at_thresholds, DEFAULTS).reasons == ("low_score",)
    # One borderline metric alone does not sink an otherwise good face.
    assert assess(dataclasses.replace(GOOD, sharpness=DEFAULTS.min_sharpness), DEFAULTS).passed


def test_nan_metric_fails():
    result = assess(dataclasses.replace(GOOD, sharpness=float("nan")), DEFAULTS)
    assert "blurry" in result.reasons and "low_score" in result.reasons and result.score == 0.0


def test_combined_score_rises_with_each_metric():
    better = {
        "det_score": 1.0, "eye_distance": 80.0, "sharpness": 400.0, "yaw": 0.0, "pitch": 0.0,
        "brightness": 127.5, "contrast": 60.0,
    }
    for name, value in better.items():
        assert combined_score(dataclasses.replace(GOOD, **{name: value})) > combined_score(GOOD), name


def test_quality_report_counts():
    def result(*reasons: str) -> QualityResult:
        return QualityResult(metrics=GOOD, score=0.5, passed=not reasons, reasons=reasons)

    results = [
        result(),
        result(),
        result("blurry"),
        result("blurry", "too_dark"),
        result("yaw"),
        result("small_face", "blurry", "low_score"),
    ]
    report = quality_report(iter(results))
    assert (report["total"], report["passed"], report["failed"]) == (6, 2, 4)
    assert list(report["rules"]) == list(RULES)
    assert report["rules"]["blurry"] == {"removed": 3, "only": 1}
    assert report["rules"]["too_dark"] == {"removed": 1, "only": 0}
    assert report["rules"]["yaw"] == {"removed": 1, "only": 1}
    assert report["rules"]["small_face"] == {"removed": 1, "only": 0}
    assert report["rules"]["pitch"] == {"removed": 0, "only": 0}
    assert quality_report([]) == {
        "total": 0, "passed": 0, "failed": 0, "rules": {rule: {"removed": 0, "only": 0} for rule in RULES}
    }


def test_measure_rejects_a_non_chip():
    with pytest.raises(ValueError):
        measure(0.99, ARCFACE.points, np.zeros((112, 100, 3), np.uint8))
    with pytest.raises(ValueError):
        measure(0.99, ARCFACE.points, np.zeros((112, 112), np.uint8))
    with pytest.raises(ValueError):
        measure(0.99, ARCFACE.points[:4], np.zeros((112, 112, 3), np.uint8))
