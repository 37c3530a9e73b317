"""Face detection on real photos from ../shared/data."""
from __future__ import annotations

import csv
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from facenet_pytorch import MTCNN
from facenet_pytorch.models.utils.detect_face import imresample
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_iou

from pipeline.config import DetectConfig, IngestConfig
from pipeline.detect import Detection, FaceDetector, _resized
from pipeline.ingest import load_image

SHARED = Path(__file__).resolve().parents[2] / "shared"
ANNOTATED = SHARED / "data" / "scenes" / "annotated"
LFW = SHARED / "data" / "lfw"

# iBUG 68-point indices giving MTCNN's five points (left/right as seen in the image).
IBUG_LEFT_EYE = range(36, 42)
IBUG_RIGHT_EYE = range(42, 48)
IBUG_NOSE_TIP, IBUG_MOUTH_LEFT, IBUG_MOUTH_RIGHT = 30, 48, 54


def read_rgb(path: Path) -> np.ndarray:
    return load_image(path, IngestConfig()).rgb


def annotated_faces(xml_name: str) -> list[tuple[Path, list[ElementTree.Element]]]:
    """(photo, box elements) for every photo of a dlib/VOC XML file that exists on disk."""
    root = ElementTree.parse(ANNOTATED / xml_name).getroot()
    listed = [(ANNOTATED / image.get("file"), image.findall("box")) for image in root.iter("image")]
    return [(path, boxes) for path, boxes in listed if path.exists()]


def xyxy(box: ElementTree.Element) -> list[float]:
    left, top = float(box.get("left")), float(box.get("top"))
    return [left, top, left + float(box.get("width")), top + float(box.get("height"))]


def five_points(box: ElementTree.Element) -> np.ndarray:
    parts = {int(part.get("name")): (float(part.get("x")), float(part.get("y"))) for part in box.iter("part")}
    points = np.array([parts[i] for i in range(68)])
    return np.stack([
        points[list(IBUG_LEFT_EYE)].mean(axis=0),
        points[list(IBUG_RIGHT_EYE)].mean(axis=0),
        points[IBUG_NOSE_TIP],
        points[IBUG_MOUTH_LEFT],
        points[IBUG_MOUTH_RIGHT],
    ])


def iou_of(box_a: np.ndarray, box_b: np.ndarray) -> float:
    return box_iou(torch.as_tensor(box_a[None]), torch.as_tensor(box_b[None])).item()


def match(truth: np.ndarray, found: np.ndarray, min_iou: float) -> list[tuple[int, int]]:
    """One-to-one (truth index, found index) pairs maximising IoU, kept when IoU >= min_iou."""
    if len(truth) == 0 or len(found) == 0:
        return []
    iou = box_iou(torch.as_tensor(truth), torch.as_tensor(found)).numpy()
    rows, cols = linear_sum_assignment(-iou)
    return [(r, c) for r, c in zip(rows, cols) if iou[r, c] >= min_iou]


def boxes_of(detections: list[Detection]) -> np.ndarray:
    return np.array([d.box for d in detections]).reshape(-1, 4)


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector(DetectConfig())


@pytest.fixture(scope="module")
def annotated() -> list[tuple[Path, list[ElementTree.Element]]]:
    photos = annotated_faces("training.xml") + annotated_faces("testing.xml")
    assert photos, f"no annotated photos found under {ANNOTATED}"
    return photos


@pytest.fixture(scope="module")
def annotated_detections(detector, annotated) -> dict[Path, list[Detection]]:
    paths = [path for path, _ in annotated]
    return dict(zip(paths, detector.detect([read_rgb(path) for path in paths])))


def test_recall_on_hand_drawn_boxes(annotated, annotated_detections):
    truths = found = matched = 0
    for path, boxes in annotated:
        detections = annotated_detections[path]
        truth = np.array([xyxy(box) for box in boxes])
        matched += len(match(truth, boxes_of(detections), min_iou=0.5))
        truths += len(truth)
        found += len(detections)
    recall = matched / truths
    assert recall >= 0.8, (
        f"recall {recall:.2f} ({matched}/{truths} boxes at IoU>=0.5); "
        f"{found} detections, {found - matched} unmatched (unlabelled faces or false positives)"
    )


def test_landmarks_follow_mtcnn_order(annotated_detections):
    """MTCNN's five points sit on dlib's 68-point eyes, nose and mouth corners, in that order."""
    errors = []
    for path, boxes in (annotated_faces("training_with_face_landmarks.xml")
                        + annotated_faces("testing_with_face_landmarks.xml")):
        detections = annotated_detections[path]
        pairs = match(np.array([xyxy(box) for box in boxes]), boxes_of(detections), min_iou=0.5)
        for truth_index, found_index in pairs:
            reference = five_points(boxes[truth_index])
            face_size = float(boxes[truth_index].get("width"))
            landmarks = detections[found_index].landmarks
            errors.append(np.linalg.norm(landmarks - reference, axis=1).mean() / face_size)
    assert len(errors) >= 20, f"only {len(errors)} faces matched"
    assert np.median(errors) < 0.1, f"median landmark error {np.median(errors):.3f} of face size"


def test_landmark_order_on_frontal_face(detector):
    detections = detector.detect_one(read_rgb(LFW / "images" / "AJ_Cook" / "AJ_Cook_0001.jpg"))
    assert len(detections) == 1
    (left_eye, right_eye, nose, mouth_left, mouth_right) = detections[0].landmarks
    assert left_eye[0] < nose[0] < right_eye[0]
    assert mouth_left[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
    x1, y1, x2, y2 = detections[0].box
    assert np.all((detections[0].landmarks >= [x1, y1]) & (detections[0].landmarks <= [x2, y2]))


def test_detections_are_sorted_and_typed(annotated_detections):
    for detections in annotated_detections.values():
        scores = [d.score for d in detections]
        assert scores == sorted(scores, reverse=True)
        for detection in detections:
            assert detection.box.shape == (4,) and detection.box.dtype == np.float64
            assert detection.landmarks.shape == (5, 2) and detection.landmarks.dtype == np.float64
            assert detection.score >= DetectConfig().min_score


def test_lfw_photos_each_have_a_face(detector):
    with open(LFW / "labels.csv", newline="") as handle:
        paths = [LFW / row["path"] for row in csv.DictReader(handle)][::400][:20]
    assert len(paths) == 20
    detections = detector.detect([read_rgb(path) for path in paths])
    faceless = [path.name for path, found in zip(paths, detections) if not found]
    assert not faceless, f"no face found in {faceless}"


def test_no_face_photo_gives_empty_list(detector):
    photos = [read_rgb(SHARED / "data" / "scenes" / "no_face" / name)
              for name in ("skimage_coins.png", "skimage_brick.png")]
    assert detector.detect(photos) == [[], []]


def test_photo_smaller_than_min_face_gives_empty_list(detector):
    tiny = cv2.resize(read_rgb(LFW / "images" / "AJ_Cook" / "AJ_Cook_0001.jpg"), (12, 12))
    assert detector.detect([tiny]) == [[]]


def test_batches_mixing_photos_with_and_without_faces(detector):
    """MTCNN returns None or object arrays depending on what the batch found; all shapes work."""
    with_face = [read_rgb(LFW / "images" / name / f"{name}_0001.jpg")
                 for name in ("AJ_Cook", "Aaron_Eckhart")]
    without = cv2.resize(read_rgb(SHARED / "data" / "scenes" / "no_face" / "skimage_coffee.png"), (150, 150))
    for photos in ([with_face[0], with_face[1]], [with_face[0], without], [without, without],
                   [without, with_face[0], with_face[1], without]):
        assert [len(found) for found in detector.detect(photos)] == [0 if p is without else 1 for p in photos]


def inside(detection: Detection, image: np.ndarray) -> bool:
    x1, y1, x2, y2 = detection.box
    return x1 >= 0 and y1 >= 0 and x2 <= image.shape[1] and y2 <= image.shape[0]


def test_batched_matches_one_at_a_time(detector):
    names = ["2008_002470.jpg", "2008_007676.jpg", "2007_007763.jpg"]
    photos = [read_rgb(ANNOTATED / name) for name in names]
    photos += [read_rgb(LFW / "images" / "AJ_Cook" / "AJ_Cook_0001.jpg"),
               read_rgb(SHARED / "data" / "scenes" / "no_face" / "skimage_coins.png")]
    batches = detector._plan_batches([photo.shape[:2] for photo in photos])
    assert any(len({photos[i].shape for i in batch}) > 1 for batch in batches), "nothing was padded"

    batched = detector.detect(photos)
    alone = [detector.detect_one(photo) for photo in photos]
    assert sum(map(len, alone)) >= 15
    ious, landmark_offsets = [], []
    for photo, from_batch, from_single in zip(photos, batched, alone):
        # Faces cut by the border may differ (see pipeline.detect); compare faces inside.
        from_batch = [d for d in from_batch if inside(d, photo)]
        from_single = [d for d in from_single if inside(d, photo)]
        pairs = match(boxes_of(from_single), boxes_of(from_batch), min_iou=0.5)
        assert len(pairs) == len(from_single) == len(from_batch), "padding lost or invented a face"
        for single_index, batch_index in pairs:
            single, batch = from_single[single_index], from_batch[batch_index]
            assert abs(single.score - batch.score) < 0.02
            ious.append(iou_of(single.box, batch.box))
            face_size = single.box[2] - single.box[0]
            landmark_offsets.append(np.abs(single.landmarks - batch.landmarks).max() / face_size)
    # The padded pyramid resamples slightly differently: small jitter, the same faces.
    assert np.median(ious) > 0.85 and np.median(landmark_offsets) < 0.05
    assert max(landmark_offsets) < 0.2


def test_same_detections_as_facenet_pytorch_mtcnn(detector):
    """The three stages are written out to run faster nets; on real photos, alone and in a padded
    batch, they must find exactly what facenet-pytorch's own MTCNN finds."""
    config = detector.config
    reference = MTCNN(
        keep_all=True, min_face_size=config.min_face_size, thresholds=list(config.stage_thresholds),
        factor=config.scale_factor, device="cpu",
    )
    photos = [read_rgb(ANNOTATED / name) for name in ("2008_002470.jpg", "2008_007676.jpg", "2007_007763.jpg")]
    photos += [read_rgb(LFW / "images" / "AJ_Cook" / "AJ_Cook_0001.jpg")]
    padded = np.zeros((len(photos), max(p.shape[0] for p in photos), max(p.shape[1] for p in photos), 3), np.uint8)
    for slot, photo in zip(padded, photos):
        slot[: photo.shape[0], : photo.shape[1]] = photo
    for batch in [[photo] for photo in photos] + [list(padded)]:
        ours = detector._run_mtcnn(batch)
        theirs = reference.detect(np.stack(batch), landmarks=True)
        for (boxes, scores, landmarks), their_boxes, their_scores, their_landmarks in zip(ours, *theirs):
            assert their_boxes is not None and len(boxes) == len(their_boxes) > 0
            # Compared in one order: by left edge (scores tie near 1.0).
            ours_order, their_order = np.argsort(boxes[:, 0]), np.argsort(np.asarray(their_boxes, np.float64)[:, 0])
            np.testing.assert_allclose(boxes[ours_order], np.asarray(their_boxes, np.float64)[their_order], atol=1e-3)
            np.testing.assert_allclose(scores[ours_order], np.asarray(their_scores, np.float64)[their_order], atol=1e-4)
            np.testing.assert_allclose(
                landmarks[ours_order], np.asarray(their_landmarks, np.float64)[their_order], atol=1e-3
            )
    assert sum(len(boxes) for boxes, _, _ in detector._run_mtcnn(list(padded))) >= 15


def test_uint8_photos_resized_one_at_a_time_equal_the_float_batch():
    """Detection keeps a batch as uint8 and makes each photo float only to resize it: every
    pyramid level must equal resizing the whole float batch, bit for bit."""
    photos = [read_rgb(ANNOTATED / name) for name in ("2008_002470.jpg", "2008_007676.jpg")]
    padded = np.zeros((len(photos), max(p.shape[0] for p in photos), max(p.shape[1] for p in photos), 3), np.uint8)
    for slot, photo in zip(padded, photos):
        slot[: photo.shape[0], : photo.shape[1]] = photo
    batch = torch.from_numpy(padded).permute(0, 3, 1, 2).contiguous()
    height, width = batch.shape[2:]
    for scale in (0.375, 0.1885, 0.05):
        size = (int(height * scale + 1), int(width * scale + 1))
        assert torch.equal(_resized(batch, size), imresample(batch.float(), size))


def test_downscaled_detection_reports_original_pixels():
    photo = read_rgb(ANNOTATED / "2008_001009.jpg")  # 360 x 480, two faces
    factor = 3000 / max(photo.shape[:2])
    large = cv2.resize(photo, None, fx=factor, fy=factor, interpolation=cv2.INTER_CUBIC)
    detector = FaceDetector(DetectConfig(), max_side=1600)
    on_large, on_original = detector.detect([large, photo])
    assert len(on_original) == 2
    expected = boxes_of(on_original) * factor
    pairs = match(expected, boxes_of(on_large), min_iou=0.8)
    assert len(pairs) == len(on_original) == len(on_large)
    for original_index, large_index in pairs:
        offset = on_large[large_index].landmarks - on_original[original_index].landmarks * factor
        face_size = expected[original_index][2] - expected[original_index][0]
        assert np.abs(offset).max() < 0.1 * face_size


def test_rejects_non_rgb_input(detector):
    with pytest.raises(ValueError):
        detector.detect([np.zeros((64, 64), dtype=np.uint8)])
