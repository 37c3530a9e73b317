"""Margin-based softmax losses for training face embeddings.

Small orthogonal parts, composed by `MarginSoftmaxHead` (pytorch-metric-learning style):
- `subcenter_cosine`: cosine between normalised embeddings and normalised class centres,
  each class scored by the closest of its K sub-centres (sub-centre ArcFace, Deng et al. 2020:
  a noisy or mislabelled face can settle on a secondary sub-centre instead of pulling the
  dominant one towards it, which makes mined labels less harmful);
- `MARGINS`: how the margin penalises the true-class cosine, ArcFace cos(theta + m) or
  CosFace cos(theta) - m;
- `sample_partial_classes`: Partial FC (An et al. 2022), the class centres scored in one step,
  a random fraction of all classes that always includes the batch's positives, so the
  per-step logit and softmax cost stays bounded as identities grow.

Why hand-written: torch has no margin softmax; pytorch-metric-learning (not a dependency) has
ArcFace, CosFace and sub-centre ArcFace losses but no Partial FC class sampling, which must
index the class centres inside the loss; insightface's versions are tied to its own
distributed training code and are not a package.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import FacemineError

MarginFunction = Callable[[Tensor, float], Tensor]


def arcface_margin(true_cosine: Tensor, margin: float) -> Tensor:
    """Additive angular margin: cos(theta + m) for the true-class cosine cos(theta).

    Past theta = pi - m, cos(theta + m) would rise again and reward moving away from the class;
    there insightface's fallback cos(theta) - m * sin(m) keeps the logit decreasing in theta.
    """
    cosine = true_cosine.clamp(-1.0, 1.0)
    # clamp_min keeps the gradient of sqrt finite at cos = +-1.
    sine = (1.0 - cosine * cosine).clamp_min(1e-7).sqrt()
    with_margin = cosine * math.cos(margin) - sine * math.sin(margin)
    beyond_half_turn = cosine <= math.cos(math.pi - margin)
    return torch.where(beyond_half_turn, cosine - margin * math.sin(margin), with_margin)


def cosface_margin(true_cosine: Tensor, margin: float) -> Tensor:
    """Additive cosine margin: cos(theta) - m."""
    return true_cosine - margin


MARGINS: dict[str, MarginFunction] = {"arcface": arcface_margin, "cosface": cosface_margin}


def subcenter_cosine(embeddings: Tensor, centers: Tensor) -> Tensor:
    """Cosine of each embedding (B, D) to each class (C, K, D): its best of K sub-centres -> (B, C)."""
    num_classes, sub_centers, dim = centers.shape
    cosine = F.normalize(embeddings, dim=1) @ F.normalize(centers.reshape(-1, dim), dim=1).T
    return cosine.view(len(embeddings), num_classes, sub_centers).amax(dim=2)


def sample_partial_classes(labels: Tensor, num_classes: int, fraction: float) -> tuple[Tensor, Tensor]:
    """Partial FC: sorted class ids to score this step, and `labels` re-indexed into them.

    Keeps ceil(fraction * num_classes) classes (at least every class in `labels`): all positives
    plus negatives drawn uniformly with torch's global generator, so seeding torch fixes them.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    positives = labels.unique()
    keep = max(math.ceil(fraction * num_classes), len(positives))
    if keep >= num_classes:
        return torch.arange(num_classes, device=labels.device), labels
    # Random priorities in [0, 1), positives lifted above all of them, then the top `keep`.
    priority = torch.rand(num_classes, device=labels.device)
    priority[positives] = 2.0
    classes = priority.topk(keep).indices.sort().values
    return classes, torch.searchsorted(classes, labels)


@dataclass
class HeadOutput:
    loss: Tensor  # scalar cross-entropy over the margin logits
    cosine: Tensor  # (B, scored classes) without margin, e.g. for training accuracy
    targets: Tensor  # (B,) true classes as indices into the scored classes


class MarginSoftmaxHead(nn.Module):
    """Class centres + margin softmax cross-entropy over normalised embeddings.

    loss = CE(scale * [margin(cos_true), cos_other...], label) where cosines come from
    `subcenter_cosine` over the classes `sample_partial_classes` picks for the step.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        loss: str = "arcface",
        margin: float = 0.5,
        scale: float = 64.0,
        sub_centers: int = 1,
        partial_fraction: float = 1.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if loss not in MARGINS:
            raise FacemineError(f"unknown loss '{loss}' (known: {', '.join(sorted(MARGINS))})")
        if num_classes < 2:
            raise FacemineError(f"training needs at least 2 identities, got {num_classes}")
        self.margin_function = MARGINS[loss]
        self.margin = margin
        self.scale = scale
        self.partial_fraction = partial_fraction
        self.label_smoothing = label_smoothing
        self.centers = nn.Parameter(torch.empty(num_classes, sub_centers, embedding_dim))
        nn.init.normal_(self.centers, std=0.01)

    @property
    def num_classes(self) -> int:
        return self.centers.shape[0]

    @torch.no_grad()
    def imprint(self, class_means: Tensor, noise: float = 0.01) -> None:
        """Start every class's sub-centres at its mean embedding (weight imprinting, Qi et al. 2018).

        Fine-tuning from a pretrained embedder then starts with sensible centres instead of
        random ones whose early gradients would scramble the backbone. The small noise lets
        sub-centres of one class drift apart.
        """
        if class_means.shape != (self.num_classes, self.centers.shape[2]):
            raise ValueError(f"class means must have shape {(self.num_classes, self.centers.shape[2])}")
        means = F.normalize(class_means.to(self.centers), dim=1)
        self.centers.copy_(means[:, None, :] + noise * torch.randn_like(self.centers))

    def forward(self, embeddings: Tensor, labels: Tensor) -> HeadOutput:
        # Margins and softmax in float32 even under autocast: cos(theta + m) needs the precision.
        embeddings = embeddings.float()
        classes, targets = sample_partial_classes(labels, self.num_classes, self.partial_fraction)
        centers = self.centers if len(classes) == self.num_classes else self.centers[classes]
        cosine = subcenter_cosine(embeddings, centers.float())
        true_cosine = cosine.gather(1, targets[:, None])
        logits = cosine.scatter(1, targets[:, None], self.margin_function(true_cosine, self.margin))
        loss = F.cross_entropy(self.scale * logits, targets, label_smoothing=self.label_smoothing)
        return HeadOutput(loss=loss, cosine=cosine.detach(), targets=targets)


# --- distillation and pair terms (the "distill" recipes of pipeline.train) ---------------------


def cosine_distillation_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """mean(1 - cos(student_i, teacher_i)): 0 when each student embedding points where its teacher's does."""
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=1)).mean()


def similarity_preservation_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared difference of the two (B, B) cosine-similarity matrices, off the diagonal.

    The scale anchor: a student that pulls every face together (all similarities up) or pushes
    them apart pays for it even where each embedding alone moved little, so a calibrated floor
    keeps its meaning across the fine-tune.
    """
    def similarities(embeddings: Tensor) -> Tensor:
        unit = F.normalize(embeddings.float(), dim=1)
        return unit @ unit.T

    off_diagonal = ~torch.eye(len(student), dtype=torch.bool, device=student.device)
    return (similarities(student) - similarities(teacher))[off_diagonal].pow(2).mean()


def same_label_pair_loss(embeddings: Tensor, labels: Tensor) -> Tensor:
    """mean(1 - cos) over the pairs of the batch that share a label; 0 when no pair does.

    Only same-label pairs of confident pseudo-labels are pulled together: a face split over two
    clusters is never pushed away from itself (what a margin softmax on pseudo-labels does).
    """
    unit = F.normalize(embeddings.float(), dim=1)
    same = (labels[:, None] == labels[None, :]).triu(diagonal=1)
    if not same.any():
        return unit.sum() * 0.0  # keeps the graph (and the device) of a real loss
    return (1.0 - (unit @ unit.T)[same]).mean()


def student_distillation_loss(student: Tensor, teacher: Tensor, relation_weight: float = 1.0) -> Tensor:
    """`cosine_distillation_loss` + relation_weight * `similarity_preservation_loss`: a smaller model
    trained to replace its teacher must point each face where the teacher does and keep the
    teacher's face-to-face similarities (so the teacher's calibrated scale carries over)."""
    return cosine_distillation_loss(student, teacher) + relation_weight * similarity_preservation_loss(student, teacher)
