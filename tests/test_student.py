"""The student recipe on real LFW chips: a small network distilled from SFace (pipeline.student)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import DATA, SFACE_WEIGHTS
from PIL import Image

from pipeline.align import align_face
from pipeline.config import DetectConfig, IngestConfig, TrainConfig
from pipeline.detect import FaceDetector
from pipeline.embed import FACENET_PREPROCESSING, Embedder, create_embedder
from pipeline.errors import FacemineError
from pipeline.ingest import load_image
from pipeline.losses import student_distillation_loss
from pipeline.student import STUDENT_MOBILENET
from pipeline.train import STATE_FILE, forward_embeddings, train_embedder

LFW = DATA / "lfw"
NO_AUGMENTATION = {"flip_probability": 0.0, "low_resolution_probability": 0.0, "occlusion_probability": 0.0}


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, str]]:
    """16 arcface_112 chips (4 LFW people x 4 photos), detected and aligned by the pipeline."""
    root = tmp_path_factory.mktemp("chips")
    labels = pd.read_csv(LFW / "labels.csv")
    counts = labels.identity.value_counts()
    detector = FaceDetector(DetectConfig(), device="cpu")
    result = []
    for person in sorted(counts[counts >= 6].index)[:4]:
        paths = sorted(labels[labels.identity == person].path)[:4]
        photos = [load_image(LFW / path, IngestConfig()).rgb for path in paths]
        for path, photo, faces in zip(paths, photos, detector.detect(photos)):
            centre = np.array(photo.shape[1::-1]) / 2  # LFW centres the labelled person
            face = min(faces, key=lambda found: np.linalg.norm((found.box[:2] + found.box[2:]) / 2 - centre))
            chip_path = root / f"{Path(path).stem}.png"
            Image.fromarray(align_face(photo, face.landmarks, "arcface_112")).save(chip_path)
            result.append((chip_path, person))
    return result


@pytest.fixture(scope="module")
def sface() -> Embedder:
    return create_embedder("sface", SFACE_WEIGHTS, device="cpu")


def load_chips(samples: list[tuple[Path, str]]) -> np.ndarray:
    return np.stack([np.array(Image.open(path)) for path, _ in samples])


def test_student_is_fed_exactly_what_its_teacher_is(sface: Embedder, samples: list) -> None:
    student = create_embedder(STUDENT_MOBILENET, device="cpu")
    assert student.preprocessing == sface.preprocessing
    chips = load_chips(samples[:4])
    assert torch.equal(student.to_tensor(chips), sface.to_tensor(chips))
    # Mirrored chips (the recipe's flip augmentation, flip_tta) are what the teacher sees mirrored.
    mirrored = np.ascontiguousarray(chips[:, :, ::-1])
    assert torch.equal(student.to_tensor(mirrored), sface.to_tensor(chips).flip(3))
    # A fresh student is one fixed network: the same weights hash in every process.
    assert create_embedder(STUDENT_MOBILENET, device="cpu").weights_hash == student.weights_hash
    with pytest.raises(FacemineError, match="takes no weights file"):
        create_embedder(STUDENT_MOBILENET, SFACE_WEIGHTS, device="cpu")


def test_a_teacher_fed_other_chips_cannot_teach_the_student(sface: Embedder, samples: list, tmp_path: Path) -> None:
    facenet_like = dataclasses.replace(sface, preprocessing=FACENET_PREPROCESSING)
    with pytest.raises(FacemineError, match="cannot teach it"):
        train_embedder(facenet_like, samples, None, TrainConfig(recipe="student", num_workers=0), tmp_path)


def test_distillation_loss_falls_to_near_zero_on_one_batch(sface: Embedder, samples: list) -> None:
    torch.manual_seed(0)
    student = create_embedder(STUDENT_MOBILENET, device="cpu")
    chips = torch.from_numpy(load_chips(samples))
    with torch.inference_mode():
        target = forward_embeddings(sface.module, sface, chips, None).clone()
    optimizer = torch.optim.AdamW(student.module.parameters(), lr=3e-3)
    student.module.train()
    for module in student.module.modules():  # overfitting one batch: no regularising noise
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    losses = []
    for _ in range(60):
        loss = student_distillation_loss(forward_embeddings(student.module, student, chips, None), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 0.5  # a fresh student points nowhere near its teacher
    assert losses[-1] < 0.1 * losses[0]
    # And in eval(), as it embeds: its BatchNorm statistics followed the training (with
    # torchvision's momentum of 0.01 they had not: 1.23 here, worse than a fresh student).
    student.module.eval()
    with torch.inference_mode():
        evaluated = student_distillation_loss(forward_embeddings(student.module, student, chips, None), target)
    assert evaluated.item() < 0.5 * losses[0]


def test_trained_student_reloads_bit_identically(sface: Embedder, samples: list, tmp_path: Path) -> None:
    train, val = samples[:8], samples[8:]
    config = TrainConfig(recipe="student", epochs=1, batch_size=4, num_workers=0, val_max_pairs=50, **NO_AUGMENTATION)
    result = train_embedder(sface, train, val, config, tmp_path)
    loaded = create_embedder("checkpoint", result.checkpoint_path, device="cpu")
    assert (loaded.name, loaded.kind, loaded.base_weights_path) == ("checkpoint", STUDENT_MOBILENET, None)
    assert loaded.preprocessing == sface.preprocessing
    trained = create_embedder(STUDENT_MOBILENET, device="cpu")
    trained.module.load_state_dict(torch.load(tmp_path / STATE_FILE, weights_only=True)["module"])
    chips = load_chips(samples)
    assert np.array_equal(loaded.embed(chips), trained.embed(chips))
    # The starting model of a student run is its teacher: the baseline is SFace's, which tells
    # these two people apart perfectly; one epoch of a fresh student does not.
    assert result.baseline_metrics["val_auc"] == 1.0
    assert result.history[0]["val_auc"] < 1.0
