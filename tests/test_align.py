"""Alignment: similarity fit, warping, mirroring.

Geometry on synthetic points, behaviour on real LFW faces.
"""
from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.optimize import least_squares

from pipeline.align import (
    TEMPLATES,
    AlignTemplate,
    align_face,
    estimate_similarity,
    flip_image,
    flip_landmarks,
)
from pipeline.config import DetectConfig, IngestConfig
from pipeline.detect import Detection, FaceDetector
from pipeline.errors import FacemineError
from pipeline.ingest import load_image

SHARED = Path(__file__).resolve().parents[2] / "shared"
LFW = SHARED / "data" / "lfw"
ARCFACE = TEMPLATES["arcface_112"]


def similarity(angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    angle = np.radians(angle_deg)
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.hstack([rotation, np.array(shift)[:, None]])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def lfw_sample(count: int) -> list[Path]:
    """Photos spread over the identity list, deterministically."""
    with open(LFW / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [LFW / row["path"] for row in rows[:: len(rows) // count][:count]]


def central_face(faces: list[Detection], image: np.ndarray) -> Detection:
    centre = np.array([image.shape[1], image.shape[0]]) / 2
    return min(faces, key=lambda face: np.linalg.norm((face.box[:2] + face.box[2:]) / 2 - centre))


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector(DetectConfig(), device="cpu")


@pytest.fixture(scope="module")
def lfw_faces(detector: FaceDetector) -> list[tuple[np.ndarray, Detection]]:
    images = [load_image(path, IngestConfig()).rgb for path in lfw_sample(20)]
    return [(image, central_face(faces, image)) for image, faces in zip(images, detector.detect(images))]


# --- similarity fit -------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("angle", "scale", "shift"),
    [
        (0.0, 1.0, (0.0, 0.0)),
        (17.0, 2.3, (140.0, -35.0)),
        (-63.0, 0.4, (-12.5, 300.0)),
        (179.0, 5.0, (1e3, 2e3)),
    ],
)
def test_estimate_similarity_recovers_known_transform(angle, scale, shift):
    truth = similarity(angle, scale, shift)
    photo_points = apply(truth, ARCFACE.points)
    np.testing.assert_allclose(estimate_similarity(ARCFACE.points, photo_points), truth, atol=1e-6)
    back = estimate_similarity(photo_points, ARCFACE.points)
    np.testing.assert_allclose(apply(back, photo_points), ARCFACE.points, atol=1e-6)


def test_estimate_similarity_is_least_squares_over_all_points():
    rng = np.random.default_rng(0)
    noisy = apply(similarity(10.0, 1.5, (20.0, 30.0)), ARCFACE.points) + rng.normal(0, 2.0, (5, 2))

    def residuals(params: np.ndarray) -> np.ndarray:
        a, b, tx, ty = params
        return (apply(np.array([[a, -b, tx], [b, a, ty]]), noisy) - ARCFACE.points).ravel()

    reference = least_squares(residuals, x0=[1.0, 0.0, 0.0, 0.0]).x
    fitted = estimate_similarity(noisy, ARCFACE.points)
    np.testing.assert_allclose(np.r_[fitted[:, 0], fitted[:, 2]], reference, atol=1e-6)  # (a, b, tx, ty)


def test_templates():
    assert ARCFACE.size == 112
    assert ARCFACE.points[0] == pytest.approx([38.2946, 51.6963])
    facenet = TEMPLATES["facenet_160"]
    assert facenet.size == 160
    np.testing.assert_allclose(facenet.points, ARCFACE.points * 160 / 112)
    for template in TEMPLATES.values():
        # Left eye left of the right eye, eyes above nose above mouth, all inside the chip.
        points = template.points
        assert points[0, 0] < points[1, 0] and points[3, 0] < points[4, 0]
        assert points[:2, 1].max() < points[2, 1] < points[3:, 1].min()
        assert ((points > 0) & (points < template.size)).all()
        with pytest.raises(ValueError):
            points[0, 0] = 0.0  # frozen templates cannot be edited in place


# --- warping --------------------------------------------------------------------------------

def test_align_face_undoes_a_known_warp():
    rng = np.random.default_rng(1)
    # A smooth random chip, so interpolation error stays small.
    chip = cv2.GaussianBlur(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), (0, 0), 2.0)
    chip_to_photo = similarity(-25.0, 2.5, (100.0, 170.0))  # whole chip inside the photo
    photo = cv2.warpAffine(chip, chip_to_photo, (500, 450), flags=cv2.INTER_CUBIC)
    aligned = align_face(photo, apply(chip_to_photo, ARCFACE.points), ARCFACE)
    assert aligned.dtype == np.uint8 and aligned.shape == (112, 112, 3)
    inner = (slice(4, -4), slice(4, -4))  # edge pixels mix in the photo's border
    difference = np.abs(aligned[inner].astype(int) - chip[inner].astype(int))
    assert difference.mean() < 0.5
    assert difference.max() <= 3
    # Sanity: a different template really produces a different picture.
    shifted = AlignTemplate("shifted", 112, ARCFACE.points + [6.0, 0.0])
    misaligned = align_face(photo, apply(chip_to_photo, ARCFACE.points), shifted)
    assert np.abs(misaligned[inner].astype(int) - chip[inner]).mean() > 5


def test_align_face_takes_template_names_and_rejects_unknown_ones():
    photo = np.full((200, 200, 3), 128, np.uint8)
    landmarks = apply(similarity(0.0, 1.5, (10.0, 10.0)), ARCFACE.points)
    assert align_face(photo, landmarks, "facenet_160").shape == (160, 160, 3)
    with pytest.raises(FacemineError, match="unknown alignment template 'nope'"):
        align_face(photo, landmarks, "nope")
    with pytest.raises(ValueError):
        align_face(photo.astype(np.float32), landmarks, "arcface_112")
    with pytest.raises(ValueError):
        align_face(photo, landmarks[:4], "arcface_112")


def test_align_face_fills_outside_the_photo_with_black():
    photo = np.full((120, 120, 3), 200, np.uint8)
    # Landmarks near the photo's corner: most of the chip lies outside the photo.
    landmarks = apply(similarity(0.0, 1.0, (-60.0, -60.0)), ARCFACE.points)
    chip = align_face(photo, landmarks, ARCFACE)
    assert (chip[:5, :5] == 0).all()
    assert (chip[-5:, -5:] == 200).all()


def test_real_face_eyes_land_on_template_eyes(detector, lfw_faces):
    # A chip with context around the ArcFace geometry, so the detector can re-find the face.
    context = AlignTemplate("context_224", 224, ARCFACE.points + 56.0)
    chips = [align_face(image, face.landmarks, context) for image, face in lfw_faces]
    found_eyes = []
    for chip, faces in zip(chips, detector.detect(chips)):
        eyes = central_face(faces, chip).landmarks[:2]
        found_eyes.append(eyes)
        # Each face: eyes near the template's (landmark noise and face shape allow a few px).
        assert np.abs(eyes - context.points[:2]).max() < 10
    # On average over faces the eyes sit on the template eye positions.
    np.testing.assert_allclose(np.mean(found_eyes, axis=0), context.points[:2], atol=2.0)


# --- mirroring ------------------------------------------------------------------------------

def test_flip_landmarks_mirrors_x_and_swaps_sides():
    landmarks = np.array([[30.0, 40.0], [70.0, 41.0], [52.0, 60.0], [35.0, 80.0], [66.0, 81.0]])
    flipped = flip_landmarks(landmarks, width=100)
    expected = np.array([[29.0, 41.0], [69.0, 40.0], [47.0, 60.0], [33.0, 81.0], [64.0, 80.0]])
    np.testing.assert_array_equal(flipped, expected)
    assert flipped[0, 0] < flipped[1, 0] and flipped[3, 0] < flipped[4, 0]


def test_flip_twice_is_identity():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    landmarks = rng.uniform(0, 52, (5, 2))
    np.testing.assert_array_equal(flip_image(flip_image(image)), image)
    np.testing.assert_allclose(flip_landmarks(flip_landmarks(landmarks, 53), 53), landmarks)
    # The mirrored pixel really moved: column x goes to column w - 1 - x.
    np.testing.assert_array_equal(flip_image(image)[:, 53 - 1 - 5], image[:, 5])


def test_flipped_landmarks_match_detection_on_flipped_photo(detector, lfw_faces):
    images = [image for image, _ in lfw_faces]
    mirrored_faces = detector.detect([flip_image(image) for image in images])
    relative_errors = []
    for (image, face), faces in zip(lfw_faces, mirrored_faces):
        width = image.shape[1]
        on_mirror = central_face(faces, image).landmarks
        error = np.linalg.norm(flip_landmarks(face.landmarks, width) - on_mirror, axis=1)
        # MTCNN itself is not exactly mirror-symmetric: typically 4 % of the face width apart.
        relative_errors.append(error.mean() / (face.box[2] - face.box[0]))
        assert relative_errors[-1] < 0.1, (error, face.box)
        # Mirroring x without swapping the sides would be far off.
        unswapped = face.landmarks.copy()
        unswapped[:, 0] = width - 1 - unswapped[:, 0]
        assert np.linalg.norm(unswapped - on_mirror, axis=1).mean() > 3 * error.mean()
    assert np.median(relative_errors) < 0.05
