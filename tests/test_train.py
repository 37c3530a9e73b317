"""Training on real LFW face chips (SFace fine-tuning on CPU), plus schedule and augmentation checks."""
from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import DATA, SFACE_WEIGHTS
from PIL import Image

from pipeline.align import align_face
from pipeline.config import DetectConfig, IngestConfig, TrainConfig
from pipeline.detect import FaceDetector
from pipeline.embed import Embedder, create_embedder
from pipeline.errors import FacemineError
from pipeline.ingest import load_image
from pipeline.train import (
    ChipDataset,
    TwoViews,
    check_input_range,
    face_augmentation,
    filter_pseudo_labels,
    freeze_early_parameters,
    read_samples,
    scaled_learning_rate,
    step_loss,
    train_embedder,
    train_unfrozen,
    warmup_cosine_schedule,
    wild_degradation,
)

LFW = DATA / "lfw"
Samples = list[tuple[Path, str]]
NO_AUGMENTATION = {"flip_probability": 0.0, "low_resolution_probability": 0.0, "occlusion_probability": 0.0}


@pytest.fixture(scope="module")
def chip_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageFolder of arcface_112 PNG chips: 8 LFW people x 4 photos, detected and aligned by the pipeline."""
    root = tmp_path_factory.mktemp("chips")
    labels = pd.read_csv(LFW / "labels.csv")
    counts = labels.identity.value_counts()
    people = sorted(counts[counts >= 6].index)[:8]
    detector = FaceDetector(DetectConfig(), device="cpu")
    for person in people:
        paths = sorted(labels[labels.identity == person].path)[:4]
        photos = [load_image(LFW / path, IngestConfig()).rgb for path in paths]
        for path, photo, faces in zip(paths, photos, detector.detect(photos)):
            # LFW centres the labelled person; other faces may appear at the edges.
            centre = np.array(photo.shape[1::-1]) / 2
            face = min(faces, key=lambda found: np.linalg.norm((found.box[:2] + found.box[2:]) / 2 - centre))
            (root / person).mkdir(exist_ok=True)
            Image.fromarray(align_face(photo, face.landmarks, "arcface_112")).save(root / person / (Path(path).stem + ".png"))
    return root


@pytest.fixture(scope="module")
def splits(chip_root: Path) -> tuple[Samples, Samples]:
    """Training chips of the first 4 people, validation chips of 4 others (16 each)."""
    samples = read_samples(chip_root)
    people = sorted({label for _, label in samples})
    train = [sample for sample in samples if sample[1] in people[:4]]
    val = [sample for sample in samples if sample[1] in people[4:]]
    assert len(train) == len(val) == 16
    return train, val


@pytest.fixture(scope="module")
def sface() -> Embedder:
    return create_embedder("sface", SFACE_WEIGHTS, device="cpu")


def load_chips(samples: Samples) -> np.ndarray:
    """uint8 (N, H, W, 3) RGB chips."""
    return np.stack([np.array(Image.open(path)) for path, _ in samples])


def small_config(**changes: object) -> TrainConfig:
    return TrainConfig(num_workers=0, warmup_epochs=0, **changes)


def state_dict_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, weights_only=True)["state_dict"]


def identity_separation(embeddings: np.ndarray, labels: list[str]) -> float:
    """Mean cosine of same-person pairs minus mean cosine of different-person pairs."""
    same = np.equal.outer(labels, labels)
    cosine = embeddings @ embeddings.T
    return float(cosine[same & ~np.eye(len(labels), dtype=bool)].mean() - cosine[~same].mean())


def test_read_samples_from_image_folder_and_list(chip_root: Path, splits: tuple[Samples, Samples]) -> None:
    samples = read_samples(chip_root)
    assert len(samples) == 32 and all(path.parent.name == label for path, label in samples)
    assert read_samples([(str(path), label) for path, label in splits[0]]) == splits[0]
    with pytest.raises(FacemineError, match="cannot read training chips"):
        read_samples(chip_root / "missing")


def test_wrong_size_or_broken_chip_is_a_user_error(tmp_path: Path, splits: tuple[Samples, Samples]) -> None:
    Image.open(splits[0][0][0]).crop((0, 0, 100, 100)).save(tmp_path / "small.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    dataset = ChipDataset([tmp_path / "small.png", tmp_path / "broken.png"], [0, 0], size=112)
    with pytest.raises(FacemineError, match="100x100, the model needs 112x112"):
        dataset[0]
    with pytest.raises(FacemineError, match="cannot read chip"):
        dataset[1]


@pytest.mark.slow
def test_overfits_one_batch_of_real_faces(sface: Embedder, splits: tuple[Samples, Samples], tmp_path: Path) -> None:
    train, _ = splits
    # One full batch per epoch, random class centres: the loss must collapse.
    config = small_config(recipe="margin", epochs=5, batch_size=16, reference_batch_size=16, base_lr=0.02,
                          imprint_centers=False, **NO_AUGMENTATION)
    result = train_embedder(sface, train, None, config, tmp_path)
    losses = [entry["loss"] for entry in result.history]
    assert losses[-1] < 0.1 * losses[0], losses
    assert result.history[-1]["train_accuracy"] == 1.0
    assert result.baseline_metrics == {}

    # The written checkpoint is the trained model: it separates the people it was trained on more.
    trained = create_embedder("checkpoint", result.checkpoint_path, device="cpu")
    chips, labels = load_chips(train), [label for _, label in train]
    before = identity_separation(sface.embed(chips), labels)
    after = identity_separation(trained.embed(chips), labels)
    assert after > before + 0.05, (before, after)


class Killed(Exception):
    pass


def kill_after_first_epoch(entry: dict[str, float]) -> None:
    raise Killed(f"killed after epoch {entry['epoch']}")


@pytest.mark.slow
def test_resume_after_kill_gives_identical_weights(
    sface: Embedder, splits: tuple[Samples, Samples], tmp_path: Path
) -> None:
    train, val = splits
    # Two steps per epoch, augmentation, imprinted centres, sub-centres and Partial FC all on.
    config = small_config(recipe="margin", epochs=2, batch_size=8, sub_centers=2, partial_fc_fraction=0.5)
    unbroken = train_embedder(sface, train, val, config, tmp_path / "unbroken")

    with pytest.raises(Killed):
        train_embedder(sface, train, val, config, tmp_path / "broken", progress=kill_after_first_epoch)
    assert not (tmp_path / "broken" / "embedder.pt").exists()
    resumed = train_embedder(sface, train, val, config, tmp_path / "broken")

    expected, actual = state_dict_of(unbroken.checkpoint_path), state_dict_of(resumed.checkpoint_path)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    assert [entry["loss"] for entry in resumed.history] == [entry["loss"] for entry in unbroken.history]
    # Validation is verification on people never trained on; SFace already separates them.
    assert unbroken.baseline_metrics["val_accuracy"] >= 0.9
    assert resumed.baseline_metrics == unbroken.baseline_metrics
    assert set(unbroken.best_epoch) >= {"loss", "train_accuracy", "val_accuracy", "val_tar@far=0.001"}

    with pytest.raises(FacemineError, match="other settings or data"):
        train_embedder(sface, train, val, config.model_copy(update={"margin": 0.3}), tmp_path / "broken")


def test_freeze_keeps_early_parameters_bit_identical(
    sface: Embedder, splits: tuple[Samples, Samples], tmp_path: Path
) -> None:
    train, _ = splits
    original = {key: value.clone() for key, value in sface.module.state_dict().items()}
    names = [name for name, _ in sface.module.named_parameters()]
    frozen = int(0.5 * len(names))
    config = small_config(epochs=1, batch_size=16, freeze_fraction=0.5)
    trained = state_dict_of(train_embedder(sface, train, None, config, tmp_path).checkpoint_path)

    assert all(torch.equal(trained[name], original[name]) for name in names[:frozen])
    assert all(not torch.equal(trained[name], original[name]) for name in names[frozen:])
    # BatchNorm statistics of frozen layers stay put as well (they run in eval mode).
    frozen_modules = {name.rsplit(".", 1)[0] for name in names[:frozen]}
    frozen_buffers = [key for key in original if key.rsplit(".", 1)[0] in frozen_modules and "running" in key]
    assert frozen_buffers and all(torch.equal(trained[key], original[key]) for key in frozen_buffers)
    # The caller's embedder is not modified by training.
    assert all(torch.equal(value, original[key]) for key, value in sface.module.state_dict().items())


def test_freeze_early_parameters_counts_in_module_order() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    assert freeze_early_parameters(module, 0.5) == 3
    assert [parameter.requires_grad for parameter in module.parameters()] == [False] * 3 + [True] * 3
    assert freeze_early_parameters(module, 0.0) == 0
    assert all(parameter.requires_grad for parameter in module.parameters())


def test_range_check_fires_on_wrongly_normalised_input(
    sface: Embedder, splits: tuple[Samples, Samples], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train, _ = splits
    inputs = sface.to_tensor(load_chips(train[:4]))
    check_input_range(inputs, sface.preprocessing)  # SFace takes raw 0..255 pixels
    for wrong in (inputs / 255.0, (inputs - 127.5) / 128.0, inputs * 2.0):
        with pytest.raises(ValueError, match="normalised wrongly"):
            check_input_range(wrong, sface.preprocessing)
    with pytest.raises(ValueError, match="NaN"):
        check_input_range(torch.where(inputs > 250, torch.nan, inputs), sface.preprocessing)

    # Training refuses a preprocessing path that scales pixels to 0..1.
    to_tensor = Embedder.to_tensor
    monkeypatch.setattr(Embedder, "to_tensor", lambda self, chips: to_tensor(self, chips) / 255.0)
    with pytest.raises(ValueError, match="normalised wrongly"):
        train_embedder(sface, train, None, small_config(batch_size=16, imprint_centers=False), tmp_path)


def test_fresh_model_cannot_freeze_layers(sface: Embedder, splits: tuple[Samples, Samples], tmp_path: Path) -> None:
    with pytest.raises(FacemineError, match="freeze_fraction 0"):
        train_embedder(sface, splits[0], None, small_config(base_model="fresh"), tmp_path)


def test_lr_warms_up_then_decays_to_zero() -> None:
    config = TrainConfig(base_lr=0.1, reference_batch_size=256)
    assert scaled_learning_rate(config, 512) == pytest.approx(0.2)
    assert scaled_learning_rate(config, 64) == pytest.approx(0.025)

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    schedule = warmup_cosine_schedule(optimizer, warmup_steps=10, total_steps=100)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    rates = np.array(rates)
    assert np.all(np.diff(rates[:11]) > 0)  # warmup rises ...
    assert rates[0] == pytest.approx(0.2 / 11) and rates[10] == pytest.approx(0.2)  # ... to the peak
    assert np.all(np.diff(rates[10:]) < 0)  # then decays
    assert rates[55] == pytest.approx(0.1)  # half-way through the cosine: half the peak
    assert rates[-1] < 1e-3 and optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_augmentation_is_face_correct(splits: tuple[Samples, Samples]) -> None:
    chip = torch.from_numpy(load_chips(splits[0][:1])[0]).permute(2, 0, 1)  # uint8 (3, 112, 112)
    mirrored = face_augmentation(TrainConfig(**(NO_AUGMENTATION | {"flip_probability": 1.0})), 112)(chip)
    assert torch.equal(mirrored, chip.flip(-1))  # left-right only, never upside down

    torch.manual_seed(0)
    blurred = torch.stack([face_augmentation(TrainConfig(**(NO_AUGMENTATION | {"low_resolution_probability": 1.0})), 112)(chip)
                           for _ in range(8)])
    assert blurred.shape == (8, 3, 112, 112) and blurred.dtype == torch.uint8
    assert sharpness(blurred.float()) < sharpness(chip[None].float())

    occluded = face_augmentation(TrainConfig(**(NO_AUGMENTATION | {"occlusion_probability": 1.0})), 112)(chip)
    erased = (occluded != chip).any(dim=0)
    assert erased.any() and torch.all(occluded[:, erased] == 0)
    assert erased.float().mean() <= 0.2 + 1e-6  # a patch, not the face


def sharpness(chips: torch.Tensor) -> float:
    """Mean absolute horizontal + vertical pixel difference: falls when detail is lost."""
    return float((chips.diff(dim=-1).abs().mean() + chips.diff(dim=-2).abs().mean()) / 2)


# ---- distillation recipes -----------------------------------------------------------------------


def test_two_views_are_the_clean_chip_and_a_degraded_copy(splits: tuple[Samples, Samples]) -> None:
    train, _ = splits
    torch.manual_seed(0)
    dataset = ChipDataset([path for path, _ in train[:4]], [0] * 4, 112, TwoViews(wild_degradation(112)))
    raw = load_chips(train[:4])
    views = torch.stack([dataset[index][0] for index in range(4)])
    assert views.shape == (4, 2, 112, 112, 3) and views.dtype == torch.uint8
    assert torch.equal(views[:, 0], torch.from_numpy(raw))  # the teacher's target is the untouched chip
    assert all(not torch.equal(views[index, 1], views[index, 0]) for index in range(4))


def test_filter_pseudo_labels_by_confidence_then_size() -> None:
    samples = [("a1", "A", 0.9), ("a2", "A", 0.8), ("a3", "A", 0.2), ("b1", "B", 0.9), ("b2", "B", 0.3), ("c1", "C", 1.0)]
    # B keeps one confident face and C has one: both are too small after the confidence filter.
    assert filter_pseudo_labels(samples, min_confidence=0.5, min_faces=2) == [(Path("a1"), "A"), (Path("a2"), "A")]
    assert len(filter_pseudo_labels(samples, min_confidence=0.0, min_faces=1)) == 6


def different_person_mean_cosine(embeddings: np.ndarray, labels: list[str]) -> float:
    different = ~np.equal.outer(labels, labels)
    return float((embeddings @ embeddings.T)[different].mean())


def distill_one_batch(sface: Embedder, train: Samples, anchor_weight: float, steps: int) -> tuple[list[float], Embedder]:
    """`steps` SGD steps of the distill recipe's loss on one fixed batch of (clean, degraded) chips."""
    torch.manual_seed(0)
    dataset = ChipDataset([path for path, _ in train], [0] * len(train), 112, TwoViews(wild_degradation(112)))
    batch = torch.stack([dataset[index][0] for index in range(len(train))])
    student = copy.deepcopy(sface)
    freeze_early_parameters(student.module, 0.9)
    run = SimpleNamespace(embedder=student, teacher=sface, amp_dtype=None)
    config = TrainConfig(recipe="distill", anchor_weight=anchor_weight)
    optimizer = torch.optim.SGD([p for p in student.module.parameters() if p.requires_grad], lr=0.2, momentum=0.9)
    losses = []
    for _ in range(steps):
        train_unfrozen(student.module)
        loss, correct = step_loss(run, student.module, None, batch, torch.zeros(len(train), dtype=torch.long), config)
        assert correct == 0
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    student.module.eval()
    return losses, student


@pytest.mark.slow
def test_distillation_overfits_one_batch(sface: Embedder, splits: tuple[Samples, Samples]) -> None:
    losses, _ = distill_one_batch(sface, splits[0], anchor_weight=1.0, steps=30)
    assert losses[-1] < 0.2 * losses[0], losses


@pytest.mark.slow
def test_distillation_anchor_holds_the_similarity_scale(sface: Embedder, splits: tuple[Samples, Samples]) -> None:
    train, _ = splits
    chips, labels = load_chips(train), [label for _, label in train]
    teacher_scale = different_person_mean_cosine(sface.embed(chips), labels)
    drift = {}
    for anchor in (0.0, 1.0):
        _, student = distill_one_batch(sface, train, anchor_weight=anchor, steps=30)
        drift[anchor] = abs(different_person_mean_cosine(student.embed(chips), labels) - teacher_scale)
    # Matching degraded views alone moves the scale; the clean-chip anchor holds back a good part
    # of it (measured: mean different-person cosine moved 0.085 with the anchor, 0.141 without).
    assert drift[1.0] < 0.7 * drift[0.0], drift


@pytest.mark.slow
def test_distill_recipe_trains_end_to_end(sface: Embedder, splits: tuple[Samples, Samples], tmp_path: Path) -> None:
    train, val = splits
    config = small_config(recipe="distill_pairs", epochs=1, batch_size=16, freeze_fraction=0.9)
    result = train_embedder(sface, train, val, config, tmp_path)
    [entry] = result.history
    assert entry["loss"] > 0 and "train_accuracy" not in entry and "val_auc" in entry
    assert create_embedder("checkpoint", result.checkpoint_path, device="cpu").preprocessing == sface.preprocessing
