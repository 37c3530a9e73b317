"""Small student embedders, distilled from the current model for faster embedding.

A student takes the very chips its teacher takes (`SFACE_PREPROCESSING`: 112 px arcface_112
chips, raw 0..255 RGB; the network scales pixels itself, as SFace's graph does), so the chips
already in a store serve both and their 128-d unit embeddings are comparable in the loss. The
`student` recipe of `pipeline.train` trains one from scratch to match its teacher.

Architecture: torchvision's MobileNetV3-Small feature extractor (built for CPUs) and an
embedding head over its 4x4 map. Measured on this machine's two shared cores at batch 64
(traced with `optimized_for_inference`, the best of 4 interleaved passes): SFace 11 faces/s,
MobileNetV3-Small 130, MobileNetV2 x0.5 100, ResNet-18 48; ShuffleNetV2 x0.5 was as fast but
its speed swung 3x between passes. The head flattens the map instead of pooling it, as
MobileFaceNet does: in an aligned face the position of a feature (eye, mouth) is information.
"""
from __future__ import annotations

import hashlib
import math
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torchvision.models import mobilenet_v3_small

from pipeline.embed import SFACE_PREPROCESSING, Embedder, register_embedder
from pipeline.errors import FacemineError

STUDENT_MOBILENET = "student-mobilenet_v3_small"
# Fresh students start from one fixed initialisation: their weights hash (which keys stored
# embeddings) is then the same in every process.
INIT_SEED = 0


class MobileNetStudent(nn.Module):
    """Raw 0..255 RGB (N, 3, 112, 112) -> (N, 128) features (normalised by the caller)."""

    def __init__(self, embedding_dim: int = 128, input_size: int = 112) -> None:
        super().__init__()
        # torchvision's BatchNorm momentum (0.01) suits ImageNet's long schedules; over a student's
        # few hundred steps the running statistics kept their random-start values, and in eval()
        # every face came out as one vector (3 epochs: mean cosine of different faces 1.000 in eval,
        # 0.17 in training mode). PyTorch's default 0.1 follows the last steps' weights.
        norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.1)
        self.features = mobilenet_v3_small(norm_layer=norm_layer).features  # stride 32, 576 channels
        cells = math.ceil(input_size / 32) ** 2  # 4 x 4 for 112 px
        self.embedding = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(576 * cells, embedding_dim), nn.BatchNorm1d(embedding_dim)
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.features((pixels - 127.5) / 128.0))


def _state_hash(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@register_embedder(STUDENT_MOBILENET)
def build_mobilenet_student(weights: Path | None, device: torch.device) -> Embedder:
    """A fresh (untrained, fixed initialisation) student: the `student` recipe's starting point.
    A trained one is a facemine checkpoint: `create_embedder("checkpoint", path)`."""
    if weights is not None:
        raise FacemineError(
            f"{STUDENT_MOBILENET} is built fresh and takes no weights file; load a trained student "
            f"as a checkpoint ({weights})"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        module = MobileNetStudent(SFACE_PREPROCESSING.embedding_dim, SFACE_PREPROCESSING.input_size)
    return Embedder(
        name=STUDENT_MOBILENET,
        kind=STUDENT_MOBILENET,
        preprocessing=SFACE_PREPROCESSING,
        weights_path=None,
        weights_hash=_state_hash(module),
        device=device,
        module=module.to(device).eval(),
        base_weights_path=None,
    )
