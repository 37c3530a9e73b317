"""Face embedders: aligned uint8 chips in, L2-normalised float32 embeddings out.

Every embedder carries its own `Preprocessing` (input size, alignment template, colour
order, normalisation, embedding size), as timm's `pretrained_cfg` does, so alignment,
inference and training read these from the model and never from scattered constants.
Embedders are built by name through `create_embedder`; adding one is one builder function
decorated with `@register_embedder("name")`.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx2torch
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from facenet_pytorch import InceptionResnetV1
from facenet_pytorch.models.inception_resnet_v1 import get_torch_home

from pipeline.align import TEMPLATES
from pipeline.device import resolve_device
from pipeline.errors import FacemineError
from pipeline.hashing import file_sha256
from pipeline.inference import optimized_for_inference

CHECKPOINT_FORMAT = "facemine-embedder/1"


@dataclass(frozen=True)
class Preprocessing:
    """How chips must look for a model: the module sees `(pixel - mean) / std`, NCHW float."""

    input_size: int
    template: str  # a name in pipeline.align.TEMPLATES
    color: str = "RGB"  # channel order the module expects: "RGB" or "BGR"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    embedding_dim: int = 128

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            known = ", ".join(TEMPLATES)
            raise FacemineError(f"unknown alignment template '{self.template}' (known: {known})")
        if TEMPLATES[self.template].size != self.input_size:
            raise FacemineError(
                f"template '{self.template}' makes {TEMPLATES[self.template].size}px chips, "
                f"but the model input is {self.input_size}px"
            )
        if self.color not in ("RGB", "BGR"):
            raise FacemineError(f"colour order must be RGB or BGR, got '{self.color}'")
        # Checkpoints round-trip through lists; keep the frozen value hashable.
        object.__setattr__(self, "mean", tuple(float(value) for value in self.mean))
        object.__setattr__(self, "std", tuple(float(value) for value in self.std))


# Chips per forward pass. On a CPU small batches stay in cache: SFace on two cores takes 11 ms a
# face in batches of 8 and 43 ms in batches of 128. A GPU wants large batches.
DEFAULT_BATCH_SIZE = {"cpu": 8, "cuda": 256}


@dataclass
class Embedder:
    """A face-recognition module together with what it needs to be fed and identified.

    `name` and `weights_path` recreate it through `create_embedder`; `kind` is the registry
    name of its architecture and `base_weights_path` the file that architecture is built from
    (both equal `name`/`weights_path` except for trained checkpoints; None for an architecture
    built fresh, without a weights file, e.g. a student). `weights_hash` keys its embeddings in
    storage: embeddings of different hashes never mix.
    """

    name: str
    kind: str
    preprocessing: Preprocessing
    weights_path: Path | None
    weights_hash: str
    device: torch.device
    module: torch.nn.Module
    base_weights_path: Path | None

    def to_tensor(self, chips: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) RGB chips -> normalised float32 (N, 3, H, W) on `device`.

        The one preprocessing path, shared by inference and training.
        """
        if chips.dtype not in (np.uint8, torch.uint8):
            raise TypeError(f"chips must be uint8, got {chips.dtype}")
        if chips.ndim != 4 or chips.shape[3] != 3:
            raise ValueError(f"chips must have shape (N, H, W, 3), got {tuple(chips.shape)}")
        size = self.preprocessing.input_size
        if chips.shape[1:3] != (size, size):
            raise FacemineError(
                f"{self.name} needs {size}x{size} chips aligned with template "
                f"'{self.preprocessing.template}', got {chips.shape[1]}x{chips.shape[2]}: re-align the faces"
            )
        if isinstance(chips, np.ndarray):
            chips = torch.from_numpy(np.ascontiguousarray(chips))
        # Move uint8 (4x smaller than float) to the device before converting.
        batch = chips.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        if self.preprocessing.color == "BGR":
            batch = batch.flip(1)
        return TF.normalize(batch, mean=list(self.preprocessing.mean), std=list(self.preprocessing.std))

    def for_inference(self) -> Embedder:
        """This embedder with its module made fast for embedding (`optimized_for_inference`: about
        1.5x on a CPU, equal outputs). Inference only: the copy's module cannot be trained."""
        size = self.preprocessing.input_size
        example = self.to_tensor(np.zeros((2, size, size, 3), np.uint8))
        return dataclasses.replace(self, module=optimized_for_inference(self.module, example))

    def batch_size(self, requested: int | None = None) -> int:
        """Chips per forward pass: `requested`, else the device's default (`DEFAULT_BATCH_SIZE`)."""
        if requested is None:
            return DEFAULT_BATCH_SIZE.get(self.device.type, DEFAULT_BATCH_SIZE["cpu"])
        if requested < 1:
            raise ValueError(f"batch_size must be >= 1, got {requested}")
        return requested

    def embed(self, chips: np.ndarray, batch_size: int | None = None, flip_tta: bool = False) -> np.ndarray:
        """L2-normalised float32 (N, embedding_dim) embeddings of aligned uint8 RGB chips.

        `batch_size` defaults per device (`DEFAULT_BATCH_SIZE`). `flip_tta` adds the features of
        the mirrored chip before normalising (test-time augmentation).
        """
        batch_size = self.batch_size(batch_size)
        if len(chips) == 0:
            return np.zeros((0, self.preprocessing.embedding_dim), dtype=np.float32)
        was_training = self.module.training
        self.module.eval()
        # fp16 autocast only on CUDA: on CPU it is slower and less exact.
        autocast = torch.autocast(self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda")
        try:
            with torch.inference_mode(), autocast:
                embeddings = [
                    self._embed_batch(chips[start : start + batch_size], flip_tta)
                    for start in range(0, len(chips), batch_size)
                ]
        finally:
            # A training loop that validates through `embed` keeps training afterwards.
            self.module.train(was_training)
        return torch.cat(embeddings).numpy()

    def _embed_batch(self, chips: np.ndarray, flip_tta: bool) -> torch.Tensor:
        batch = self.to_tensor(chips)
        features = self.module(batch).float()
        if flip_tta:
            features = features + self.module(TF.horizontal_flip(batch)).float()
        return F.normalize(features, dim=1).cpu()


EmbedderBuilder = Callable[[Path | None, torch.device], Embedder]
EMBEDDERS: dict[str, EmbedderBuilder] = {}


def register_embedder(name: str) -> Callable[[EmbedderBuilder], EmbedderBuilder]:
    """Decorator adding a builder `(weights, device) -> Embedder` to `EMBEDDERS` under `name`."""

    def register(builder: EmbedderBuilder) -> EmbedderBuilder:
        if name in EMBEDDERS:
            raise ValueError(f"embedder '{name}' is already registered")
        EMBEDDERS[name] = builder
        return builder

    return register


def create_embedder(
    name: str = "sface", weights: str | Path | None = None, device: str | torch.device = "auto"
) -> Embedder:
    """Build the embedder registered as `name`, on `device` ("auto": CUDA when available)."""
    try:
        builder = EMBEDDERS[name]
    except KeyError:
        raise FacemineError(f"unknown embedder '{name}' (known: {', '.join(sorted(EMBEDDERS))})") from None
    return builder(Path(weights) if weights is not None else None, resolve_device(device))


def _existing_file(path: Path | None, name: str, hint: str) -> Path:
    if path is None:
        raise FacemineError(f"embedder '{name}' needs a weights file: {hint}")
    if not path.is_file():
        raise FacemineError(f"weights not found: {path} ({hint})")
    return path.resolve()


def _assemble(
    name: str,
    module: torch.nn.Module,
    preprocessing: Preprocessing,
    weights_path: Path,
    device: torch.device,
    kind: str | None = None,
    base_weights_path: Path | None = None,
) -> Embedder:
    return Embedder(
        name=name,
        kind=kind or name,
        preprocessing=preprocessing,
        weights_path=weights_path,
        weights_hash=file_sha256(weights_path),
        device=device,
        module=module.to(device).eval(),
        base_weights_path=base_weights_path if kind else weights_path,
    )


# SFace (OpenCV Zoo): its ONNX graph starts with (x - 127.5) * 0.0078125, so it takes raw
# 0..255 RGB pixels and the normalisation here is the identity.
SFACE_PREPROCESSING = Preprocessing(input_size=112, template="arcface_112", color="RGB", embedding_dim=128)


@register_embedder("sface")
def build_sface(weights: Path | None, device: torch.device) -> Embedder:
    hint = "pass the SFace ONNX file, e.g. ../shared/models/sface_2021dec_fp32.onnx"
    path = _existing_file(weights, "sface", hint)
    try:
        # onnx2torch yields an ordinary trainable torch module (parameters, BatchNorm, PReLU).
        module = onnx2torch.convert(onnx.load(path))
    except Exception as error:
        raise FacemineError(f"cannot read SFace ONNX weights {path}: {error}") from error
    return _assemble("sface", module, SFACE_PREPROCESSING, path, device)


# FaceNet (facenet-pytorch InceptionResnetV1): 160px chips, (pixel - 127.5) / 128.
FACENET_PREPROCESSING = Preprocessing(
    input_size=160, template="facenet_160", color="RGB",
    mean=(127.5, 127.5, 127.5), std=(128.0, 128.0, 128.0), embedding_dim=512,
)
# File names under which facenet-pytorch caches its downloaded weights (torch home/checkpoints).
FACENET_RELEASE_FILES = {
    "vggface2": "20180402-114759-vggface2.pt",
    "casia-webface": "20180408-102900-casia-webface.pt",
}


def _facenet_cached_weights(dataset: str) -> Path:
    """facenet-pytorch's cached weights for `dataset`, letting it download them when absent."""
    cached = Path(get_torch_home()) / "checkpoints" / FACENET_RELEASE_FILES[dataset]
    if not cached.is_file():
        try:
            InceptionResnetV1(pretrained=dataset)  # downloads into the cache
        except Exception as error:
            raise FacemineError(
                f"cannot download facenet '{dataset}' weights ({error}); "
                "pass a local weights file (state_dict .pt) instead"
            ) from error
    return cached


def _build_facenet(name: str, dataset: str, weights: Path | None, device: torch.device) -> Embedder:
    hint = f"pass facenet-pytorch's {dataset} state_dict .pt file"
    path = _existing_file(weights, name, hint) if weights is not None else _facenet_cached_weights(dataset)
    state_dict = _load_torch_file(path)
    # Released files include the training classifier ("logits.*"), unused for embeddings.
    state_dict = {key: value for key, value in state_dict.items() if not key.startswith("logits.")}
    module = InceptionResnetV1(classify=False)
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as error:
        raise FacemineError(f"{path} is not an InceptionResnetV1 state_dict ({hint}): {error}") from error
    return _assemble(name, module, FACENET_PREPROCESSING, path, device)


@register_embedder("facenet-vggface2")
def build_facenet_vggface2(weights: Path | None, device: torch.device) -> Embedder:
    return _build_facenet("facenet-vggface2", "vggface2", weights, device)


@register_embedder("facenet-casia")
def build_facenet_casia(weights: Path | None, device: torch.device) -> Embedder:
    return _build_facenet("facenet-casia", "casia-webface", weights, device)


def _load_torch_file(path: Path) -> dict[str, Any]:
    try:
        # weights_only: a checkpoint is data, never code to run.
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise FacemineError(f"cannot read torch file {path}: {error}") from error
    if not isinstance(content, dict):
        raise FacemineError(f"{path} holds a {type(content).__name__}, expected a dict")
    return content


@register_embedder("checkpoint")
def build_checkpoint(weights: Path | None, device: torch.device) -> Embedder:
    """A facemine-trained model: the base architecture rebuilt by name, then its trained state_dict."""
    path = _existing_file(weights, "checkpoint", "pass a facemine checkpoint written by training")
    checkpoint = _load_torch_file(path)
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise FacemineError(f"{path} is not a facemine checkpoint (format {checkpoint.get('format')!r})")
    base = create_embedder(checkpoint["base"], checkpoint["base_weights"], device)
    try:
        base.module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise FacemineError(
            f"checkpoint {path} does not fit base model '{checkpoint['base']}': {error}"
        ) from error
    preprocessing = Preprocessing(**checkpoint["preprocessing"])
    if preprocessing.embedding_dim != checkpoint["embedding_dim"]:
        raise FacemineError(f"checkpoint {path} is inconsistent: embedding_dim differs from its preprocessing")
    return _assemble("checkpoint", base.module, preprocessing, path, device, base.kind, base.base_weights_path)


def save_checkpoint(embedder: Embedder, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `embedder` as a facemine checkpoint that `create_embedder("checkpoint", path)` loads.

    `extra` (plain Python values only: the loader refuses pickled objects) is stored under "extra".
    The file appears atomically: readers never see a half-written checkpoint.
    """
    path = Path(path)
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "base": embedder.kind,
        "base_weights": str(embedder.base_weights_path) if embedder.base_weights_path else None,
        "state_dict": {key: value.detach().cpu() for key, value in embedder.module.state_dict().items()},
        "preprocessing": dataclasses.asdict(embedder.preprocessing),
        "embedding_dim": embedder.preprocessing.embedding_dim,
        "extra": extra or {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            torch.save(checkpoint, file)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


# Architectures defined in their own modules register themselves when imported.
import pipeline.student  # noqa: E402,F401
