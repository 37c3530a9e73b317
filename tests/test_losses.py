"""Margin softmax, distillation, anchor and pair losses: loss direction, margins, sub-centres, Partial
FC sampling (math on small tensors)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.errors import FacemineError
from pipeline.losses import (
    MARGINS,
    MarginSoftmaxHead,
    arcface_margin,
    cosface_margin,
    cosine_distillation_loss,
    same_label_pair_loss,
    sample_partial_classes,
    similarity_preservation_loss,
    student_distillation_loss,
    subcenter_cosine,
)

DIM = 5
# Unit vectors e0..e4: classes sit on e0, e1, e2; e3 and e4 are free directions.
AXES = torch.eye(DIM)


def head_with_centers(centers: torch.Tensor, loss: str, margin: float, scale: float = 4.0) -> MarginSoftmaxHead:
    head = MarginSoftmaxHead(DIM, num_classes=centers.shape[0], loss=loss, margin=margin, scale=scale,
                             sub_centers=centers.shape[1])
    with torch.no_grad():
        head.centers.copy_(centers)
    return head


def three_classes() -> torch.Tensor:
    return AXES[:3, None, :]  # (3 classes, 1 sub-centre, DIM)


def rotation_toward_class0(angles: np.ndarray) -> torch.Tensor:
    """Embeddings at angle theta from class 0's centre, in the (e0, e3) plane: the cosine to
    classes 1 and 2 stays 0, so only the true-class term changes."""
    theta = torch.tensor(angles, dtype=torch.float32)[:, None]
    return torch.cos(theta) * AXES[0] + torch.sin(theta) * AXES[3]


def losses_along(head: MarginSoftmaxHead, embeddings: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return np.array([head(embedding[None], torch.tensor([0])).loss.item() for embedding in embeddings])


@pytest.mark.parametrize(("loss", "margin"), [("arcface", 0.5), ("cosface", 0.35), ("arcface", 0.0)])
def test_loss_strictly_decreases_as_embedding_rotates_to_its_class(loss: str, margin: float) -> None:
    # From the opposite direction (theta = pi, ArcFace's fallback zone included) to the centre.
    angles = np.linspace(math.pi, 0.0, 60)
    losses = losses_along(head_with_centers(three_classes(), loss, margin), rotation_toward_class0(angles))
    assert np.all(np.diff(losses) < 0), losses
    assert losses[-1] < 0.1 * losses[0]


def test_subcenter_loss_decreases_toward_the_nearest_subcenter() -> None:
    # Class 0 has sub-centres e0 and e4; the path moves from e3 toward e0, away from nothing else.
    centers = torch.stack([torch.stack([AXES[0], AXES[4]]), torch.stack([AXES[1], AXES[1]]),
                           torch.stack([AXES[2], AXES[2]])])
    angles = np.linspace(1.5, 0.0, 40)
    losses = losses_along(head_with_centers(centers, "arcface", 0.5), rotation_toward_class0(angles))
    assert np.all(np.diff(losses) < 0), losses


def test_subcenter_cosine_takes_the_best_subcenter() -> None:
    centers = torch.stack([torch.stack([AXES[0], AXES[4]]), torch.stack([AXES[1], AXES[2]])])
    embeddings = torch.stack([AXES[4] * 3.0, AXES[0] + AXES[2]])  # scale must not matter
    cosine = subcenter_cosine(embeddings, centers)
    expected = torch.tensor([[1.0, 0.0], [1 / math.sqrt(2), 1 / math.sqrt(2)]])
    torch.testing.assert_close(cosine, expected)


@pytest.mark.parametrize(("loss", "margin"), [("arcface", 0.5), ("cosface", 0.35)])
def test_margin_raises_the_true_class_loss(loss: str, margin: float) -> None:
    embeddings = rotation_toward_class0(np.array([0.2, 0.9, 1.5, 2.5]))
    with_margin = losses_along(head_with_centers(three_classes(), loss, margin), embeddings)
    without = losses_along(head_with_centers(three_classes(), loss, 0.0), embeddings)
    assert np.all(with_margin > without)


def test_margin_functions_match_their_definitions() -> None:
    theta = torch.tensor([0.3, 1.2, 2.0])
    torch.testing.assert_close(arcface_margin(torch.cos(theta), 0.5), torch.cos(theta + 0.5))
    torch.testing.assert_close(cosface_margin(torch.cos(theta), 0.35), torch.cos(theta) - 0.35)
    # Past pi - m, ArcFace falls back to a CosFace-like penalty that keeps falling with theta.
    beyond = torch.tensor([2.9, 3.0, 3.1])
    penalised = arcface_margin(torch.cos(beyond), 0.5)
    assert torch.all(penalised[1:] < penalised[:-1])
    assert torch.all(penalised < torch.cos(beyond))


def test_gradient_pulls_the_embedding_toward_its_class() -> None:
    head = head_with_centers(three_classes(), "arcface", 0.5)
    embedding = rotation_toward_class0(np.array([1.0])).requires_grad_(True)
    head(embedding, torch.tensor([0])).loss.backward()
    step = -embedding.grad[0]
    assert step @ AXES[0] > 0  # toward class 0
    assert step @ AXES[1] < 0 and step @ AXES[2] < 0  # away from the others


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_partial_fc_keeps_all_positives_and_the_requested_fraction(fraction: float) -> None:
    torch.manual_seed(0)
    labels = torch.tensor([3, 17, 17, 42, 99, 3])
    classes, targets = sample_partial_classes(labels, num_classes=100, fraction=fraction)
    assert len(classes) == math.ceil(fraction * 100)
    assert len(classes.unique()) == len(classes) and torch.all(classes[1:] > classes[:-1])
    assert set(labels.tolist()) <= set(classes.tolist())
    assert torch.equal(classes[targets], labels)


def test_partial_fc_keeps_positives_beyond_the_fraction_and_varies_negatives() -> None:
    torch.manual_seed(0)
    labels = torch.arange(0, 40, 2)  # 20 positives, more than 10% of 100 classes
    classes, targets = sample_partial_classes(labels, num_classes=100, fraction=0.1)
    assert torch.equal(classes, labels) and torch.equal(classes[targets], labels)
    draws = {tuple(sample_partial_classes(torch.tensor([5]), 100, 0.2)[0].tolist()) for _ in range(5)}
    assert len(draws) > 1


def test_full_fraction_scores_every_class() -> None:
    labels = torch.tensor([1, 4])
    classes, targets = sample_partial_classes(labels, num_classes=6, fraction=1.0)
    assert torch.equal(classes, torch.arange(6)) and torch.equal(targets, labels)


def test_head_with_partial_fc_scores_the_sampled_classes() -> None:
    torch.manual_seed(0)
    head = MarginSoftmaxHead(DIM, num_classes=50, partial_fraction=0.2, sub_centers=3, label_smoothing=0.1)
    labels = torch.tensor([0, 7, 7, 49])
    output = head(torch.randn(4, DIM), labels)
    assert output.cosine.shape == (4, 10)
    assert torch.isfinite(output.loss) and output.loss.item() > 0
    output.loss.backward()
    touched = head.centers.grad.abs().sum(dim=(1, 2)) > 0
    assert touched[labels].all() and touched.sum() <= 10


def test_imprint_points_centers_at_class_means() -> None:
    torch.manual_seed(0)
    head = MarginSoftmaxHead(DIM, num_classes=3, sub_centers=2)
    means = torch.stack([AXES[0] * 4, AXES[1] + AXES[2], -AXES[3]])
    head.imprint(means, noise=0.0)
    cosine = subcenter_cosine(means, head.centers.detach())
    torch.testing.assert_close(cosine.diagonal(), torch.ones(3))


def test_unknown_loss_and_single_class_are_user_errors() -> None:
    assert set(MARGINS) == {"arcface", "cosface"}
    with pytest.raises(FacemineError, match="unknown loss"):
        MarginSoftmaxHead(DIM, num_classes=3, loss="triplet")
    with pytest.raises(FacemineError, match="at least 2"):
        MarginSoftmaxHead(DIM, num_classes=1)


# ---- distillation recipes --------------------------------------------------------------------


def test_distillation_loss_falls_as_the_student_turns_to_its_teacher() -> None:
    angles = np.linspace(math.pi / 2, 0.0, 7)
    teacher = AXES[0][None]
    losses = [cosine_distillation_loss(rotation_toward_class0(np.array([angle])), teacher).item() for angle in angles]
    assert losses == sorted(losses, reverse=True) and len(set(losses)) == len(losses)
    assert losses[0] == pytest.approx(1.0) and losses[-1] == pytest.approx(0.0, abs=1e-6)
    # Length does not matter, only direction.
    assert cosine_distillation_loss(3.0 * teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_similarity_preservation_charges_a_shift_of_the_scale() -> None:
    teacher = AXES[:3]  # three faces, pairwise cosine 0
    assert similarity_preservation_loss(teacher, teacher).item() == 0.0
    # Pulling every face towards one shared direction raises every pairwise cosine: the loss
    # grows with the pull although each face moved the same small way.
    losses = [similarity_preservation_loss(teacher + pull * AXES[4], teacher).item() for pull in (0.0, 0.2, 0.5, 1.0)]
    assert losses == sorted(losses) and losses[0] == 0.0 and losses[1] > 0.0
    # A rotation of all faces together keeps every similarity: no charge.
    rotation = torch.linalg.qr(torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(0)))[0]
    assert similarity_preservation_loss(teacher @ rotation, teacher).item() == pytest.approx(0.0, abs=1e-10)


def test_pair_loss_pulls_same_label_pairs_only() -> None:
    labels = torch.tensor([0, 0, 1])
    apart = torch.stack([AXES[0], AXES[1], AXES[2]])
    closer = torch.stack([AXES[0], AXES[0] + AXES[1], AXES[2]])
    assert same_label_pair_loss(apart, labels).item() == pytest.approx(1.0)
    assert same_label_pair_loss(closer, labels).item() == pytest.approx(1 - math.cos(math.pi / 4))
    # The different-label face does not count: moving it changes nothing.
    moved = torch.stack([AXES[0], AXES[1], AXES[0]])
    assert same_label_pair_loss(moved, labels).item() == pytest.approx(1.0)
    # No pair shares a label: zero, still differentiable.
    embeddings = apart.clone().requires_grad_(True)
    loss = same_label_pair_loss(embeddings, torch.tensor([0, 1, 2]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(embeddings.grad, torch.zeros_like(apart))


def test_student_loss_falls_as_the_student_approaches_its_teacher() -> None:
    teacher = AXES[:3]
    # Each face leans towards the shared free direction e4, less and less: both the direction
    # and the similarity term shrink, to exactly 0 at the teacher.
    losses = [student_distillation_loss(teacher + pull * AXES[4], teacher).item() for pull in (1.0, 0.5, 0.2, 0.0)]
    assert losses == sorted(losses, reverse=True) and len(set(losses)) == len(losses)
    assert losses[-1] == pytest.approx(0.0, abs=1e-6)
    pulled = teacher + 0.5 * AXES[4]
    assert student_distillation_loss(pulled, teacher, relation_weight=2.0).item() == pytest.approx(
        cosine_distillation_loss(pulled, teacher).item() + 2.0 * similarity_preservation_loss(pulled, teacher).item()
    )
