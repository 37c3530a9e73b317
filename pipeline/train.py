"""Retrain a face embedder on mined faces, by one of the recipes `TrainConfig.recipe` names.

Recipes (`step_loss`):
- margin: margin softmax (ArcFace/CosFace) over the pseudo-labels. Teaches the current model's
  own clustering mistakes back to it: a person split over two clusters is pushed further apart.
- distill: self-distillation. A trainable copy sees `wild_degradation`s of each chip and must
  match the frozen starting model's embedding of the clean chip (labels unused), plus a
  clean-chip anchor: on clean chips it must keep the frozen model's embeddings and its
  face-to-face similarities, so the similarity scale does not drift (pipeline.losses).
- distill_pairs: distill, plus pulling together pairs of the batch from one confident cluster.
- student: a fresh small network (`pipeline.student`) learns to match the starting model's
  embeddings and face-to-face similarities on the same augmented chips
  (`student_distillation_loss`), for faster embedding. Same data, loop, validation and
  checkpoint as the other recipes; only the trained model differs in architecture from the
  starting one, and its validation baseline is the starting model (the teacher).
Pseudo-labels can be filtered by cluster confidence and identity size before any recipe
(`filter_pseudo_labels`).

`train_embedder` composes small parts, each testable alone:
- data: `read_samples` (ImageFolder root or (chip path, label) list), `ChipDataset`,
  `face_augmentation`, `wild_degradation`, `TwoViews` (torchvision transforms v2);
- model: `freeze_early_parameters`, `train_unfrozen`, `forward_embeddings` (the one forward
  path of training and evaluation, guarded by `check_input_range`), `embed_dataset`;
- loss: `pipeline.losses.MarginSoftmaxHead` (ArcFace/CosFace, sub-centres, Partial FC), the
  distillation, anchor and pair losses;
- optimisation: `scaled_learning_rate` (linear scaling rule), `warmup_cosine_schedule`;
- evaluation: `pipeline.verification` on pairs sampled from the validation faces.

Resuming: after every epoch `out_dir/training_state.pt` holds model, head, optimizer,
scheduler, grad scaler, epoch and history. Every epoch reseeds torch from (seed, epoch,
rank), so a run killed between epochs and resumed gives the same weights as an unbroken run
(bit-identical on CPU). A run killed inside an epoch repeats that epoch.

Multi-GPU: start with `torchrun --nproc-per-node N ...`; with WORLD_SIZE > 1 the process group
is initialised from torchrun's environment, each rank trains on its DistributedSampler shard
with the model wrapped in DistributedDataParallel, and only rank 0 validates and writes files.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from pipeline.config import TrainConfig
from pipeline.embed import Embedder, Preprocessing, create_embedder, save_checkpoint
from pipeline.errors import FacemineError
from pipeline.hashing import open_input
from pipeline.losses import (
    MarginSoftmaxHead,
    cosine_distillation_loss,
    same_label_pair_loss,
    similarity_preservation_loss,
    student_distillation_loss,
)
from pipeline.student import STUDENT_MOBILENET
from pipeline.verification import evaluate_pairs, sample_verification_pairs

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
CHECKPOINT_FILE = "embedder.pt"

Samples = Sequence[tuple[str | Path, Hashable]]
ProgressCallback = Callable[[dict[str, float]], None]


@dataclass
class TrainResult:
    checkpoint_path: Path  # facemine checkpoint: create_embedder("checkpoint", checkpoint_path)
    history: list[dict[str, float]]  # one entry per epoch: loss, train_accuracy, lr, val_* ...
    baseline_metrics: dict[str, float]  # val_* metrics of the starting model, same pairs
    best_epoch: dict[str, float]  # the history entry with the best val_accuracy (else lowest loss)


# --- data -------------------------------------------------------------------------------


def read_samples(source: str | Path | Samples) -> list[tuple[Path, Hashable]]:
    """(chip path, label) pairs from an ImageFolder root (one folder per identity) or a given list."""
    if not isinstance(source, (str, Path)):
        return [(Path(path), label) for path, label in source]
    try:
        folder = ImageFolder(str(source))
    except (FileNotFoundError, OSError) as error:
        raise FacemineError(f"cannot read training chips from {source}: {error}") from error
    return [(Path(path), folder.classes[index]) for path, index in folder.samples]


class ChipDataset(Dataset):
    """Aligned chips from disk as uint8 (H, W, 3) RGB tensors with integer labels."""

    def __init__(
        self, paths: Sequence[Path], labels: Sequence[int], size: int, transform: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        self.paths = list(paths)
        self.labels = list(labels)
        self.size = size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path = self.paths[index]
        try:
            with open_input(path) as file, Image.open(file) as image:  # a file, or an object of an s3:// export
                chip = torch.from_numpy(np.array(image.convert("RGB")))
        except OSError as error:
            raise FacemineError(f"cannot read chip {path}: {error}") from error
        if chip.shape[:2] != (self.size, self.size):
            raise FacemineError(
                f"chip {path} is {chip.shape[1]}x{chip.shape[0]}, the model needs {self.size}x{self.size}: "
                "export the dataset aligned for this model"
            )
        if self.transform is not None:
            # Transforms work on (C, H, W); `TwoViews` returns (2, C, H, W).
            chip = self.transform(chip.permute(2, 0, 1)).movedim(-3, -1)
        return chip, self.labels[index]


def face_augmentation(config: TrainConfig, size: int) -> v2.Transform:
    """Label-preserving changes for aligned uint8 (3, H, W) chips: mirror, low resolution, occlusion.

    No vertical flips or large rotations: aligned faces are always upright, so those would only
    teach the model poses it never sees. The alignment templates are left-right symmetric, so a
    mirrored chip is still aligned.
    """
    down_then_up = v2.Compose([v2.RandomResize(size // 4, size), v2.Resize(size)])
    return v2.Compose([
        v2.RandomHorizontalFlip(config.flip_probability),
        v2.RandomApply([down_then_up], p=config.low_resolution_probability),
        v2.RandomErasing(p=config.occlusion_probability, scale=(0.02, 0.2), value=0),
    ])


def wild_degradation(size: int) -> v2.Transform:
    """What faces in the wild suffer, for aligned uint8 (3, H, W) chips: downscaled to 20-48 px and
    back, blur, colour and exposure changes, small shifts, JPEG artefacts. No flips: the student's
    target is the teacher's embedding of the very same, unflipped chip."""
    tiny_then_back = v2.Compose([v2.RandomResize(20, 49), v2.Resize(size)])
    return v2.Compose([
        v2.RandomApply([tiny_then_back], p=0.6),
        v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 2.0))], p=0.3),
        v2.RandomApply([v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03)], p=0.5),
        v2.RandomApply([v2.RandomAffine(degrees=0, translate=(0.04, 0.04))], p=0.5),
        v2.RandomApply([v2.JPEG((30, 90))], p=0.5),
    ])


class TwoViews:
    """(clean, degraded) of one chip stacked: (2, C, H, W), for the distillation recipes."""

    def __init__(self, degrade: Callable[[Tensor], Tensor]) -> None:
        self.degrade = degrade

    def __call__(self, chip: Tensor) -> Tensor:
        return torch.stack([chip, self.degrade(chip)])


def filter_pseudo_labels(
    samples: Sequence[tuple[str | Path, Hashable, float]], min_confidence: float, min_faces: int
) -> list[tuple[Path, Hashable]]:
    """(path, label) of the faces assigned with confidence >= `min_confidence`, of the labels that
    keep at least `min_faces` such faces: unsure assignments and tiny clusters teach noise."""
    confident = [(Path(path), label) for path, label, confidence in samples if confidence >= min_confidence]
    counts: dict[Hashable, int] = {}
    for _, label in confident:
        counts[label] = counts.get(label, 0) + 1
    return [(path, label) for path, label in confident if counts[label] >= min_faces]


# --- model ------------------------------------------------------------------------------


def freeze_early_parameters(module: nn.Module, fraction: float) -> int:
    """Freeze the first `fraction` of parameter tensors in module order; returns how many."""
    parameters = list(module.parameters())
    frozen = int(fraction * len(parameters))
    for index, parameter in enumerate(parameters):
        parameter.requires_grad_(index >= frozen)
    return frozen


def train_unfrozen(module: nn.Module) -> None:
    """train() mode, except submodules whose own parameters are all frozen stay in eval():
    a frozen BatchNorm must keep its running statistics as well as its weights."""
    module.train()
    for submodule in module.modules():
        own = list(submodule.parameters(recurse=False))
        if own and not any(parameter.requires_grad for parameter in own):
            submodule.eval()


def check_input_range(inputs: Tensor, preprocessing: Preprocessing) -> None:
    """Fail fast when the module is not fed what its preprocessing produces from 0..255 pixels.

    Catches NaN, values outside [(0 - mean) / std, (255 - mean) / std], and batches spanning
    under a twentieth of that range (pixels scaled to 0..1 for a model that expects 0..255).
    """
    mean = torch.tensor(preprocessing.mean)
    std = torch.tensor(preprocessing.std)
    low, high = float(((0.0 - mean) / std).min()), float(((255.0 - mean) / std).max())
    if not torch.isfinite(inputs).all():
        raise ValueError("model input contains NaN or infinity")
    smallest, largest = (float(value) for value in torch.aminmax(inputs.detach()))
    tolerance = 1e-3 * (high - low)
    if smallest < low - tolerance or largest > high + tolerance or largest - smallest < 0.05 * (high - low):
        raise ValueError(
            f"model input spans [{smallest:.4g}, {largest:.4g}] but its preprocessing "
            f"(mean {preprocessing.mean}, std {preprocessing.std}) maps pixels to [{low:.4g}, {high:.4g}]: "
            "chips are normalised wrongly"
        )


def forward_embeddings(module: nn.Module, embedder: Embedder, chips: Tensor, amp_dtype: torch.dtype | None) -> Tensor:
    """uint8 (B, H, W, 3) chips -> float32 (B, D) raw embeddings: the one forward path of
    training and evaluation. `module` is `embedder.module` or its DDP wrapper."""
    inputs = embedder.to_tensor(chips)
    check_input_range(inputs, embedder.preprocessing)
    with torch.autocast(embedder.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return module(inputs).float()


def embed_dataset(embedder: Embedder, loader: DataLoader, amp_dtype: torch.dtype | None) -> np.ndarray:
    """L2-normalised float32 (N, D) embeddings of every chip in `loader`, model in eval mode."""
    embedder.module.eval()
    with torch.inference_mode():
        batches = [
            F.normalize(forward_embeddings(embedder.module, embedder, chips, amp_dtype), dim=1).cpu()
            for chips, _ in loader
        ]
    return torch.cat(batches).numpy()


# --- optimisation -----------------------------------------------------------------------


def scaled_learning_rate(config: TrainConfig, total_batch_size: int) -> float:
    """Linear scaling rule (Goyal et al. 2017): base_lr is meant for reference_batch_size."""
    return config.base_lr * total_batch_size / config.reference_batch_size


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LRScheduler:
    """Per-step LR factor rising linearly (k + 1) / (warmup + 1) to 1, then cosine decay to 0."""
    cosine = CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup_steps, 1), eta_min=0.0)
    if warmup_steps == 0:
        return cosine
    warmup = LinearLR(optimizer, start_factor=1.0 / (warmup_steps + 1), end_factor=1.0, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def autocast_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 on CUDA where supported (no loss scaling needed), else fp16; None (float32) on CPU."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# --- distributed ------------------------------------------------------------------------


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    device: torch.device
    owns_process_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Elementwise sum over all processes."""
        if self.world_size == 1:
            return values
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.tolist()


def init_distributed(device: torch.device) -> DistributedContext:
    """One process per GPU under torchrun (WORLD_SIZE > 1), else the single given device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistributedContext(0, 1, device, owns_process_group=False)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return DistributedContext(dist.get_rank(), world_size, device, owns_process_group=owns)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


# --- the training run -------------------------------------------------------------------


@dataclass
class _TrainingData:
    dataset: ChipDataset  # augmented chips with integer labels
    class_names: list[str]
    batch_size: int  # per process
    steps_per_epoch: int
    digest: str  # sha256 of the (path, label) list: a resumed run must see the same data

    @classmethod
    def build(cls, samples: str | Path | Samples, size: int, config: TrainConfig, context: DistributedContext) -> _TrainingData:
        pairs = [(str(path), str(label)) for path, label in read_samples(samples)]
        class_names, labels = np.unique([label for _, label in pairs], return_inverse=True)
        one_view = config.recipe in ("margin", "student")
        transform = face_augmentation(config, size) if one_view else TwoViews(wild_degradation(size))
        dataset = ChipDataset([Path(path) for path, _ in pairs], labels.tolist(), size, transform)
        batch_size = min(config.batch_size, len(dataset) // context.world_size)
        if batch_size < 2:
            raise FacemineError(f"too few training chips ({len(dataset)}) for a batch of at least 2 per process")
        steps_per_epoch = len(_train_loader(dataset, batch_size, config, context, epoch=0))
        digest = hashlib.sha256("\n".join(f"{path}\t{label}" for path, label in pairs).encode()).hexdigest()
        return cls(dataset, class_names.tolist(), batch_size, steps_per_epoch, digest)


@dataclass
class _Run:
    """Everything one training run updates, and what its state file holds."""

    embedder: Embedder  # working copy; its module is trained in place
    head: MarginSoftmaxHead | None  # the margin recipe's class centres
    teacher: Embedder | None  # the distillation recipes' frozen starting model
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    fingerprint: dict  # settings and data the state belongs to; resuming requires equality
    epoch: int = 0
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    baseline: dict[str, float] = dataclasses.field(default_factory=dict)

    @classmethod
    def start(cls, embedder: Embedder, data: _TrainingData, config: TrainConfig, context: DistributedContext) -> _Run:
        torch.manual_seed(config.seed)  # head initialisation
        if config.recipe == "student":
            work = _fresh_student(embedder, context.device)
        else:
            work = _working_copy(embedder, config, context.device)
        head = teacher = None
        if config.recipe == "margin":
            head = MarginSoftmaxHead(
                embedding_dim=embedder.preprocessing.embedding_dim,
                num_classes=len(data.class_names),
                loss=config.loss,
                margin=config.margin,
                scale=config.scale,
                sub_centers=config.sub_centers,
                partial_fraction=config.partial_fc_fraction,
                label_smoothing=config.label_smoothing,
            ).to(context.device)
        elif config.recipe == "student":
            # The teacher only embeds: its traced inference copy is faster, with equal outputs.
            teacher = _frozen_copy(embedder, context.device).for_inference()
        else:
            teacher = _frozen_copy(embedder, context.device)
        trainable = [parameter for parameter in work.module.parameters() if parameter.requires_grad]
        parameters = trainable + (list(head.parameters()) if head is not None else [])
        learning_rate = scaled_learning_rate(config, data.batch_size * context.world_size)
        if config.recipe == "student":
            # A fresh network: SGD at a fine-tuning learning rate barely moves it, while base_lr's
            # default (2.5e-3 at batch 64) is AdamW's usual range for training from scratch.
            optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=config.weight_decay)
        else:
            optimizer = torch.optim.SGD(
                parameters, lr=learning_rate, momentum=config.momentum, weight_decay=config.weight_decay
            )
        total_steps = config.epochs * data.steps_per_epoch
        warmup_steps = min(round(config.warmup_epochs * data.steps_per_epoch), total_steps - 1)
        amp_dtype = autocast_dtype(context.device, config.mixed_precision)
        return cls(
            embedder=work,
            head=head,
            teacher=teacher,
            optimizer=optimizer,
            scheduler=warmup_cosine_schedule(optimizer, warmup_steps, total_steps),
            # Loss scaling only for fp16: bf16 and float32 have float32's exponent range.
            scaler=torch.amp.GradScaler(context.device.type, enabled=amp_dtype == torch.float16),
            amp_dtype=amp_dtype,
            fingerprint={
                "config": config.model_dump(exclude={"num_workers"}),
                "base_weights_hash": embedder.weights_hash,
                "data": data.digest,
            },
        )

    def state_dict(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "epoch": self.epoch,
            "history": self.history,
            "baseline": self.baseline,
            "module": self.embedder.module.state_dict(),
            "head": self.head.state_dict() if self.head is not None else {},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def save(self, path: Path) -> None:
        temporary = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), temporary)
        os.replace(temporary, path)  # a kill while saving leaves the previous state intact

    def load(self, path: Path) -> None:
        state = torch.load(path, map_location=self.embedder.device, weights_only=True)
        if state["fingerprint"] != self.fingerprint:
            raise FacemineError(
                f"{path} belongs to a training run with other settings or data; "
                "use another output folder or resume=False"
            )
        self.embedder.module.load_state_dict(state["module"])
        if self.head is not None:
            self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.history, self.baseline = state["epoch"], state["history"], state["baseline"]


def train_embedder(
    embedder: Embedder,
    samples: str | Path | Samples,
    val_samples: str | Path | Samples | None,
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = True,
    progress: ProgressCallback | None = None,
) -> TrainResult:
    """Fine-tune `embedder` (or its architecture from scratch: base_model "fresh") on labelled chips.

    `samples`/`val_samples`: ImageFolder roots or (chip path, label) lists of chips aligned for
    this embedder. Validation labels need not be training identities. `embedder` is left
    untouched; the trained model is written to `out_dir/embedder.pt` (a facemine checkpoint).
    With `resume`, a run whose state is in `out_dir` continues after its last finished epoch.
    `progress` gets each epoch's history entry after that epoch's state is saved.
    """
    context = init_distributed(embedder.device)
    try:
        return _train(embedder, samples, val_samples, config, Path(out_dir), resume, progress, context)
    finally:
        if context.owns_process_group:
            dist.destroy_process_group()


def _train(
    embedder: Embedder,
    samples: str | Path | Samples,
    val_samples: str | Path | Samples | None,
    config: TrainConfig,
    out_dir: Path,
    resume: bool,
    progress: ProgressCallback | None,
    context: DistributedContext,
) -> TrainResult:
    size = embedder.preprocessing.input_size
    data = _TrainingData.build(samples, size, config, context)
    run = _Run.start(embedder, data, config, context)
    validation = _Validation.build(read_samples(val_samples) if val_samples else [], size, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / STATE_FILE
    if resume and state_path.is_file():
        run.load(state_path)
        logger.info("resuming %s after epoch %d", out_dir, run.epoch)
    else:
        if run.head is not None and config.imprint_centers and config.base_model != "fresh":
            run.head.imprint(_class_means(run, data, config))
        # The baseline is the starting model: the teacher, for a student.
        starting = run.teacher if config.recipe == "student" else run.embedder
        run.baseline = validation.metrics(starting, run.amp_dtype, data.batch_size, config) if context.is_main else {}

    backbone = _parallel(run.embedder.module, context)
    head = _parallel(run.head, context) if run.head is not None else None
    while run.epoch < config.epochs:
        # Augmentation and Partial FC draw from torch's generator: reseeding per epoch makes
        # a resumed run repeat exactly what an unbroken one does.
        torch.manual_seed(epoch_seed(config.seed, run.epoch, context.rank))
        loader = _train_loader(data.dataset, data.batch_size, config, context, run.epoch)
        entry = {"epoch": run.epoch + 1, **_train_epoch(run, backbone, head, loader, config, context)}
        if context.is_main:
            entry |= validation.metrics(run.embedder, run.amp_dtype, data.batch_size, config)
        run.epoch += 1
        run.history.append(entry)
        logger.info("epoch %s", entry)
        if context.is_main:
            run.save(state_path)
            if progress is not None:
                progress(entry)
        context.barrier()

    checkpoint_path = out_dir / CHECKPOINT_FILE
    if context.is_main:
        extra = {"train_config": config.model_dump(), "history": run.history, "baseline": run.baseline,
                 "num_classes": len(data.class_names), "num_train_chips": len(data.dataset)}
        save_checkpoint(run.embedder, checkpoint_path, extra)
    context.barrier()
    return TrainResult(checkpoint_path, run.history, run.baseline, _best_epoch(run.history))


def _working_copy(embedder: Embedder, config: TrainConfig, device: torch.device) -> Embedder:
    """A deep copy to train (the caller's embedder stays as it was), re-initialised for "fresh"."""
    work = dataclasses.replace(copy.deepcopy(embedder), device=device)
    work.module.to(device)
    if config.base_model == "fresh":
        if config.freeze_fraction > 0:
            raise FacemineError("a fresh (randomly initialised) model cannot keep frozen layers: set freeze_fraction 0")
        for submodule in work.module.modules():
            if hasattr(submodule, "reset_parameters"):
                submodule.reset_parameters()
    freeze_early_parameters(work.module, config.freeze_fraction)
    return work


def _fresh_student(teacher: Embedder, device: torch.device) -> Embedder:
    """The student recipe's model: a fresh `pipeline.student` network, every layer trained."""
    student = create_embedder(STUDENT_MOBILENET, device=device)
    if student.preprocessing != teacher.preprocessing:
        raise FacemineError(
            f"{STUDENT_MOBILENET} takes {student.preprocessing.input_size}px {student.preprocessing.template} chips "
            f"and gives {student.preprocessing.embedding_dim}-d embeddings; the current model ({teacher.kind}) "
            "differs, so it cannot teach it"
        )
    return student


def _frozen_copy(embedder: Embedder, device: torch.device) -> Embedder:
    """The distillation teacher: the starting model, frozen, in eval mode."""
    teacher = dataclasses.replace(copy.deepcopy(embedder), device=device)
    teacher.module.to(device).eval()
    teacher.module.requires_grad_(False)
    return teacher


def _parallel(module: nn.Module, context: DistributedContext) -> nn.Module:
    if context.world_size == 1:
        return module
    device_ids = [context.device] if context.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def _train_loader(dataset: Dataset, batch_size: int, config: TrainConfig, context: DistributedContext, epoch: int) -> DataLoader:
    """Shuffled batches of one epoch; the order depends only on (seed, epoch, rank)."""
    generator = torch.Generator().manual_seed(epoch_seed(config.seed, epoch, context.rank))
    if context.world_size > 1:
        sampler = DistributedSampler(dataset, context.world_size, context.rank, shuffle=True, seed=config.seed, drop_last=True)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(dataset, generator=generator)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, generator=generator,
        # Full batches only: a batch of one breaks BatchNorm and skews the margin softmax.
        drop_last=True, pin_memory=context.device.type == "cuda", **_worker_options(config),
    )


def _eval_loader(dataset: Dataset, batch_size: int, config: TrainConfig) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **_worker_options(config))


def _worker_options(config: TrainConfig) -> dict:
    """Loader workers start by forkserver: forked children of a Prefect task die in Prefect's
    exit hook (prefect 3.8), and forkserver is also safe with CUDA initialised."""
    if config.num_workers == 0:
        return {"num_workers": 0}
    return {"num_workers": config.num_workers, "multiprocessing_context": "forkserver"}


def step_loss(
    run: _Run, backbone: nn.Module, head: nn.Module | None, chips: Tensor, labels: Tensor, config: TrainConfig
) -> tuple[Tensor, int]:
    """(loss, correctly classified chips; 0 for the distillation recipes) of one batch.

    `chips`: (B, H, W, 3) for the margin and student recipes, (B, 2, H, W, 3) clean and degraded
    views for the distillation recipes.
    """
    if config.recipe == "margin":
        output = head(forward_embeddings(backbone, run.embedder, chips, run.amp_dtype), labels)
        return output.loss, int((output.cosine.argmax(dim=1) == output.targets).sum())
    if config.recipe == "student":
        with torch.no_grad():
            target = forward_embeddings(run.teacher.module, run.teacher, chips, run.amp_dtype)
        return student_distillation_loss(forward_embeddings(backbone, run.embedder, chips, run.amp_dtype), target), 0
    clean, degraded = chips[:, 0], chips[:, 1]
    with torch.no_grad():
        target = forward_embeddings(run.teacher.module, run.teacher, clean, run.amp_dtype)
    # One pass over both views: trainable BatchNorms see one batch, as in evaluation.
    student_clean, student_degraded = forward_embeddings(
        backbone, run.embedder, torch.cat([clean, degraded]), run.amp_dtype
    ).chunk(2)
    loss = cosine_distillation_loss(student_degraded, target) + config.anchor_weight * (
        cosine_distillation_loss(student_clean, target) + similarity_preservation_loss(student_clean, target)
    )
    if config.recipe == "distill_pairs":
        loss = loss + config.pair_weight * same_label_pair_loss(student_degraded, labels)
    return loss, 0


def _train_epoch(
    run: _Run, backbone: nn.Module, head: nn.Module | None, loader: DataLoader, config: TrainConfig,
    context: DistributedContext,
) -> dict[str, float]:
    train_unfrozen(backbone)
    if head is not None:
        head.train()
    trainable = [parameter for group in run.optimizer.param_groups for parameter in group["params"]]
    loss_sum, correct, seen, started = 0.0, 0, 0, time.perf_counter()
    for chips, labels in loader:
        labels = labels.to(run.embedder.device)
        loss, batch_correct = step_loss(run, backbone, head, chips, labels, config)
        if not torch.isfinite(loss):
            raise FacemineError(f"training diverged (loss {loss.item()}) in epoch {run.epoch + 1}: lower base_lr")
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
        loss_sum += loss.item() * len(labels)
        correct += batch_correct
        seen += len(labels)
    seconds = time.perf_counter() - started
    loss_sum, correct, seen = context.sum([loss_sum, correct, seen])
    accuracy = {} if head is None else {
        # Among the classes scored in each step (all of them unless Partial FC samples).
        "train_accuracy": correct / seen,
    }
    return {"loss": loss_sum / seen, **accuracy, "lr": run.scheduler.get_last_lr()[0], "images_per_second": seen / seconds}


def _class_means(run: _Run, data: _TrainingData, config: TrainConfig) -> Tensor:
    """Per class, the sum of its unaugmented normalised embeddings: the direction of their mean."""
    unaugmented = ChipDataset(data.dataset.paths, data.dataset.labels, data.dataset.size)
    embeddings = embed_dataset(run.embedder, _eval_loader(unaugmented, data.batch_size, config), run.amp_dtype)
    sums = torch.zeros(len(data.class_names), embeddings.shape[1])
    return sums.index_add_(0, torch.tensor(data.dataset.labels), torch.from_numpy(embeddings))


@dataclass
class _Validation:
    """Verification pairs over the validation chips, fixed for the whole run."""

    dataset: ChipDataset | None  # only the chips some pair uses; None when too few pairs
    index_a: np.ndarray
    index_b: np.ndarray
    same: np.ndarray

    @classmethod
    def build(cls, samples: list[tuple[Path, Hashable]], size: int, config: TrainConfig) -> _Validation:
        index_a, index_b, same = sample_verification_pairs([str(label) for _, label in samples], config.val_max_pairs, config.seed)
        if same.sum() < 2 or (~same).sum() < 2:
            if samples:
                logger.warning("validation skipped: %d chips give too few same- and different-identity pairs", len(samples))
            return cls(None, index_a, index_b, same)
        used, inverse = np.unique(np.concatenate([index_a, index_b]), return_inverse=True)
        dataset = ChipDataset([samples[index][0] for index in used], [0] * len(used), size)
        return cls(dataset, inverse[: len(index_a)], inverse[len(index_a) :], same)

    def metrics(self, embedder: Embedder, amp_dtype: torch.dtype | None, batch_size: int, config: TrainConfig) -> dict[str, float]:
        if self.dataset is None:
            return {}
        embeddings = embed_dataset(embedder, _eval_loader(self.dataset, batch_size, config), amp_dtype)
        report = evaluate_pairs(embeddings[self.index_a], embeddings[self.index_b], self.same, seed=config.seed)
        return {f"val_{name}": value for name, value in report.as_dict().items()}


def _best_epoch(history: list[dict[str, float]]) -> dict[str, float]:
    if not history:
        return {}
    if "val_accuracy" in history[0]:
        return max(history, key=lambda entry: entry["val_accuracy"])
    return min(history, key=lambda entry: entry["loss"])
