"""Typed parameters of every stage.

Each stage takes its own config object; `storage.settings.Settings` composes them so one
settings object (environment variables + config file) feeds the whole pipeline.
Defaults are general-purpose, not tuned to any one photo set.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field


class IngestConfig(BaseModel):
    extensions: tuple[str, ...] = (
        ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm",
    )
    # Pillow refuses images above this many pixels (decompression-bomb guard).
    max_image_pixels: int = Field(default=120_000_000, gt=0)
    # Photos whose long side exceeds this are downscaled for detection only;
    # boxes and landmarks are mapped back to original pixels.
    detect_max_side: int = Field(default=1600, ge=64)


class DetectConfig(BaseModel):
    # Smallest face side searched for, in pixels of the (possibly downscaled) detection image.
    # Eyes sit about 0.4 face widths apart, so a face under ~30 px cannot reach quality's
    # min_eye_distance (12 px); not searching for them saves a third of MTCNN's time.
    min_face_size: int = Field(default=32, ge=8)
    # MTCNN's P-, R- and O-net thresholds.
    stage_thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    # Detections below this probability are dropped before alignment. Kept low (MTCNN's own
    # last-stage threshold): weak detections are stored and failed by quality (min_det_score),
    # so a hard real face (LFW's Marilyn_Monroe_0001 scores 0.76) is still recorded.
    min_score: float = Field(default=0.7, ge=0.0, le=1.0)
    scale_factor: float = Field(default=0.709, gt=0.1, lt=1.0)
    batch_size: int = Field(default=16, ge=1)
    # Photos in one MTCNN call are zero-padded to a common size; this caps padded pixels per
    # call (memory), so big photos go in smaller batches.
    batch_max_pixels: int = Field(default=16 * 1024 * 1024, ge=1)


class QualityConfig(BaseModel):
    min_det_score: float = Field(default=0.95, ge=0.0, le=1.0)
    # Inter-eye distance in original pixels.
    min_eye_distance: float = Field(default=12.0, ge=0.0)
    # Variance of the Laplacian of the grey face region of the aligned chip.
    min_sharpness: float = Field(default=30.0, ge=0.0)
    # Degrees, from the five landmarks (`pipeline.quality.estimate_pose`).
    max_abs_yaw: float = Field(default=45.0, ge=0.0, le=90.0)
    max_abs_pitch: float = Field(default=40.0, ge=0.0, le=90.0)
    # Mean grey level of that face region (0..255); contrast is its standard deviation.
    min_brightness: float = Field(default=40.0, ge=0.0, le=255.0)
    max_brightness: float = Field(default=225.0, ge=0.0, le=255.0)
    min_contrast: float = Field(default=15.0, ge=0.0)
    # Combined score in [0, 1] must reach this as well. A face sitting exactly at every
    # default threshold above scores 0.58, so 0.6 rejects faces borderline on every count
    # while one borderline metric alone does not sink a face.
    min_score: float = Field(default=0.6, ge=0.0, le=1.0)


class EmbedConfig(BaseModel):
    model: str = "sface"
    # Local weights file; for `sface` defaults to ../shared/models when present.
    weights: str | None = None
    # Chips per forward pass; empty: the device's default (`pipeline.embed.DEFAULT_BATCH_SIZE`).
    batch_size: int | None = Field(default=None, ge=1)
    flip_tta: bool = False
    # "auto" picks CUDA when available.
    device: str = "auto"


class ClusterConfig(BaseModel):
    """Parameters of `pipeline.cluster.cluster_faces`; similarities are cosine similarities."""

    # Registry name in `pipeline.cluster.CLUSTERERS`: infomap, components, hac, dbscan, hdbscan.
    method: str = "infomap"
    # k-NN graph: neighbours per face, and the floor below which edges are dropped. Graph
    # methods weigh an edge by how far its similarity rises above the floor.
    k: int = Field(default=30, ge=2, le=1000)
    min_similarity: float = Field(default=0.39, ge=-1.0, lt=1.0)
    # Largest set searched exactly (brute force costs N^2: a GPU does a million faces in
    # seconds, two CPU cores about 100K in a minute); above it an IVF index searching
    # `ivf_nprobe` of its ~4*sqrt(N) lists is used. On the CPU `ivf_codes="pq4"` scans 4-bit
    # product-quantised codes (faiss fast scan: a list about 4x faster than full vectors, so
    # twice the lists are probed in half the time) and re-scores the best `ivf_rerank_factor`
    # x k candidates exactly, so the similarities returned are exact; "flat" scans full
    # vectors. The GPU always scans full vectors.
    exact_index_max_gpu: int = Field(default=1_000_000, ge=1)
    exact_index_max_cpu: int = Field(default=50_000, ge=1)
    ivf_codes: Literal["pq4", "flat"] = "pq4"
    ivf_nprobe: int = Field(default=64, ge=1)
    ivf_rerank_factor: int = Field(default=2, ge=1)
    query_batch: int = Field(default=65_536, ge=1)
    # "auto" runs faiss on the GPU when faiss-gpu and CUDA are present.
    device: str = "auto"
    # Infomap's random seed (it requires >= 1) and number of trials, best kept.
    seed: int = Field(default=1, ge=1)
    infomap_trials: int = Field(default=1, ge=1)
    # Weight of each face's link to itself, in units of (similarity - min_similarity): a face
    # joins a cluster only when its summed edge weight into it clearly exceeds this.
    infomap_self_weight: float = Field(default=2.5, ge=0.0)
    # Above 1 the map equation prefers fewer, larger modules: keeps a person with hundreds of
    # photos (several poses, ages, events) in one cluster instead of a few.
    infomap_markov_time: float = Field(default=1.75, gt=0.0)
    # Method-specific knobs (baselines); distances are cosine distances (1 - similarity).
    components_min_similarity: float = Field(default=0.5, ge=-1.0, lt=1.0)
    dbscan_eps: float = Field(default=0.5, gt=0.0, le=2.0)
    dbscan_min_samples: int = Field(default=2, ge=1)
    hdbscan_min_cluster_size: int = Field(default=2, ge=2)
    hdbscan_min_samples: int | None = Field(default=None, ge=1)
    hac_linkage: Literal["average", "complete", "single"] = "average"
    hac_distance_threshold: float = Field(default=0.6, gt=0.0, le=2.0)
    # Smaller clusters are dissolved; their faces may still attach (see attach_*).
    min_cluster_size: int = Field(default=2, ge=1)
    # Cross-subset merge: representatives per identity, the median best-match similarity they
    # must reach, and its margin over the runner-up identity of the same subset.
    merge_representatives: int = Field(default=5, ge=1)
    merge_min_similarity: float = Field(default=0.5, ge=-1.0, le=1.0)
    merge_margin: float = Field(default=0.05, ge=0.0)
    # An unassigned face joins the identity whose centroid it is this similar to, with this
    # margin over the second-best identity; otherwise it stays unassigned.
    attach_min_similarity: float = Field(default=0.5, ge=-1.0, le=1.0)
    attach_margin: float = Field(default=0.1, ge=0.0)
    # A new cluster keeps an earlier identity id when at least this share of its previously
    # assigned faces came from that identity.
    match_min_overlap: float = Field(default=0.5, gt=0.0, le=1.0)


class DedupConfig(BaseModel):
    # Near-duplicate photos: Hamming distance on a 64-bit perceptual hash.
    near_duplicate_max_hamming: int = Field(default=6, ge=0, le=64)
    # Near-duplicate faces inside one identity: chip-embedding cosine at or above this. Re-cropped
    # copies of one LFW photo measure 0.967-0.994 (MTCNN's landmarks shift a little with the
    # crop); separate shots of one person score far lower.
    near_duplicate_min_similarity: float = Field(default=0.95, ge=-1.0, le=1.0)
    remove_outliers: bool = False
    # Cosine distance (1 - similarity) to the identity centroid beyond which a face is an outlier.
    outlier_max_distance: float = Field(default=0.75, ge=0.0, le=2.0)


class ExportConfig(BaseModel):
    min_faces_per_identity: int = Field(default=2, ge=1)
    max_faces_per_identity: int | None = Field(default=None, ge=1)
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    seed: int = 0


class TrainConfig(BaseModel):
    """Retraining parameters; the descriptions are the help texts of the Prefect UI's run form."""

    recipe: Literal["distill", "distill_pairs", "margin", "student"] = Field(
        default="distill",
        description="distill: a trainable copy sees in-the-wild degradations of each chip (low resolution, "
        "JPEG, blur, colour, shifts) and must match the frozen model on the clean chip, anchored on clean chips "
        "so the similarity scale does not drift; distill_pairs: the same plus pulling together confident "
        "same-cluster pairs (pair_weight); margin: margin softmax (loss, margin, scale...) on the pseudo-labels; "
        "student: a small fresh network (pipeline.student, several times faster) learns to match the current "
        "model's embeddings and similarities on the augmented chips (AdamW at base_lr; all its layers train)",
    )
    anchor_weight: float = Field(
        default=1.0, ge=0.0,
        description="distill recipes: weight of the clean-chip anchor (match the frozen model's embedding and "
        "its face-to-face similarities)",
    )
    pair_weight: float = Field(
        default=0.1, ge=0.0, description="distill_pairs: weight of the confident same-cluster pair term"
    )
    min_label_confidence: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Pseudo-labels: train only on faces the clustering assigned with at least this confidence",
    )
    min_identity_faces: int = Field(
        default=2, ge=1, description="Pseudo-labels: train only on identities keeping at least this many faces"
    )
    base_model: Literal["current", "fresh"] = Field(
        default="current",
        description="current: fine-tune the current embedder; fresh: its architecture with re-initialised "
        "weights (then freeze_fraction must be 0)",
    )
    loss: Literal["arcface", "cosface"] = Field(
        default="arcface",
        description="Margin softmax: arcface (margin is an angle in radians, 0.5 usual) or cosface "
        "(margin on the cosine, 0.35 usual)",
    )
    margin: float = Field(default=0.5, ge=0.0, le=1.5, description="Margin of the loss")
    scale: float = Field(default=64.0, gt=0.0, description="Scale of the normalised logits")
    sub_centers: int = Field(
        default=1, ge=1, le=10, description="Sub-centres per class (sub-centre ArcFace; 3 tolerates noisy labels)"
    )
    partial_fc_fraction: float = Field(
        default=1.0, gt=0.0, le=1.0,
        description="Partial FC: fraction of class centres scored per step (the batch's own classes always are)",
    )
    epochs: int = Field(default=2, ge=1, description="Passes over the exported training split")
    batch_size: int = Field(default=64, ge=2, description="Chips per step and process (GPU)")
    base_lr: float = Field(
        default=0.01, gt=0.0, description="Learning rate at reference_batch_size, scaled linearly with the total batch"
    )
    reference_batch_size: int = Field(default=256, ge=1, description="Batch size base_lr refers to")
    warmup_epochs: float = Field(default=0.5, ge=0.0, description="Linear warmup before the cosine decay")
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description="SGD momentum")
    weight_decay: float = Field(default=5e-4, ge=0.0, description="SGD weight decay")
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0, description="Label smoothing of the softmax target")
    grad_clip: float = Field(default=5.0, gt=0.0, description="Gradient norm clip")
    freeze_fraction: float = Field(
        default=0.8, ge=0.0, le=1.0,
        description="Fraction of parameter tensors, in module order, kept frozen (early layers); 0.8 is feasible on CPU",
    )
    imprint_centers: bool = Field(
        default=True, description="Start each class centre at the mean embedding of its faces (not for a fresh model)"
    )
    flip_probability: float = Field(default=0.5, ge=0.0, le=1.0, description="Horizontal flip augmentation")
    low_resolution_probability: float = Field(
        default=0.2, ge=0.0, le=1.0, description="Down-and-up-sampling (low-resolution blur) augmentation"
    )
    occlusion_probability: float = Field(
        default=0.2, ge=0.0, le=1.0, description="Random erasing (occlusion) augmentation"
    )
    mixed_precision: bool = Field(
        default=True, description="bf16 (or fp16 with loss scaling) autocast on CUDA; CPU always trains in float32"
    )
    num_workers: int = Field(default=2, ge=0, description="Data-loading worker processes")
    val_max_pairs: int = Field(
        default=20_000, ge=2,
        description="Validation pairs from the export's val split: at most this many same-identity pairs, "
        "and as many different-identity ones",
    )
    seed: int = Field(default=0, description="Random seed of initialisation, sampling and augmentation")


GATE_METRIC_PATTERN = r"(verification|export_val)_(accuracy|auc|tar@far=[0-9.e-]+)|clustering_(nmi|(bcubed|pairwise)_(f|precision|recall))"


class GateConfig(BaseModel):
    """Held-out validation of retrained models, the promotion gate and the closed loop's patience.

    What judges the gate, best first: the validation pairs / labelled photos below when set;
    else identities a person reviewed (accepted, named or locked), held out from training; else
    `holdout_share` of the pseudo-identities, held out from training (their labels come from the
    current model, so this favours it). Each model is scored at its own operating point:
    threshold-free pair measures and clustering at its calibrated floor (pipeline.calibration).
    """

    # Verification pairs CSV (path_a, path_b, same) and labelled photos CSV (path, identity) for
    # clustering metrics; relative paths inside a CSV are relative to its folder. Their faces are
    # detected once and cached, and never join the mined data.
    validation_pairs: str | None = None
    validation_truth: str | None = None
    # Held-out metric a candidate must beat the current model on (higher is better); export_val_*
    # are measured on the exported dataset's own validation split. "auto": clustering_bcubed_f
    # where the held-out data has identities, else verification_auc.
    metric: str = Field(default="auto", pattern=rf"^(auto|{GATE_METRIC_PATTERN})$")
    # The candidate must beat the current model by more than this (ties never promote).
    min_improvement: float = Field(default=0.0, ge=0.0)
    # ... and may not fall below it by more than `guard_tolerance` on any of these (where measured).
    guard_metrics: tuple[Annotated[str, Field(pattern=rf"^({GATE_METRIC_PATTERN})$")], ...] = (
        "verification_auc", "verification_tar@far=0.001",
    )
    guard_tolerance: float = Field(default=0.0, ge=0.0)
    # A clustering_bcubed_f gain must also hold with each model at its best held-out floor (within
    # 0.15 of its calibrated one): otherwise it is where the calibrated floors fell, a scale shift.
    floor_free_check: bool = True
    # Speed trade (pipeline.gate.judge): a candidate of another architecture (e.g. the student
    # recipe's) that is no better still passes when it embeds at least `speed_trade_min_speedup`
    # times faster than the current model (both timed in the same evaluation on the same machine)
    # and falls by at most `speed_trade_max_loss` on the gate metric and on every guard metric.
    # Only across architectures: one architecture's speed differs only by machine noise. 0: no trades.
    speed_trade_max_loss: float = Field(default=0.005, ge=0.0)
    speed_trade_min_speedup: float = Field(default=2.0, gt=1.0)
    # Without configured validation data: share of the exported pseudo-identities held out (by
    # identity, never by face), and the fewest identities that can judge.
    holdout_share: float = Field(default=0.2, gt=0.0, le=0.5)
    holdout_min_identities: int = Field(default=2, ge=2)
    holdout_max_pairs: int = Field(default=20_000, ge=2)
    # Unlabelled mined faces each model's operating points are calibrated on (a seeded sample).
    calibration_faces: int = Field(default=5_000, ge=2)
    # Closed loop: stop after this many iterations in a row without a promotion.
    patience: int = Field(default=1, ge=1)


class QueueConfig(BaseModel):
    """Review queue (labeling/queue.py). Thresholds are cosine similarities of L2-normalised embeddings; a face is compared with the
    centre of the other faces of its identity, an identity with another through several sampled faces of each."""

    # Faces less similar than this to the rest of their identity are probably someone else.
    outlier_similarity: float = Field(default=0.4, ge=-1.0, le=1.0)
    # Identities whose faces are on average less similar than this to the rest may be mixed.
    min_cohesion: float = Field(default=0.5, ge=-1.0, le=1.0)
    # Faces sampled per identity (spread from its most to its least typical face) for the two-groups
    # test and for comparing two identities.
    sample_faces: int = Field(default=16, ge=2, le=256)
    # Two groups: the sampled faces of identities this large are split in the two groups least
    # alike; groups less similar than `two_modes_max_similarity` on average, the smaller holding at
    # least `two_modes_min_share`, are two people.
    two_modes_min_faces: int = Field(default=6, ge=3)
    two_modes_max_similarity: float = Field(default=0.4, ge=-1.0, le=1.0)
    two_modes_min_share: float = Field(default=0.15, gt=0.0, le=0.5)
    # Identity pairs whose sampled faces' best matches reach this median similarity may be one
    # person; across subsets (clustered apart, so never compared by the clusterer) a lower bar applies.
    merge_min_similarity: float = Field(default=0.45, ge=-1.0, le=1.0)
    cross_subset_min_similarity: float = Field(default=0.4, ge=-1.0, le=1.0)
    # Pairs compared: identities among each other's nearest centres, or with faces among each
    # other's nearest faces at this similarity or more.
    merge_neighbours: int = Field(default=10, ge=1)
    candidate_min_similarity: float = Field(default=0.3, ge=-1.0, le=1.0)
    # Priorities weigh the faces a review may set right by how likely the finding is: two groups
    # of faces are one person with probability 1/2 at `same_person_similarity`, logistic in `probability_width`.
    same_person_similarity: float = Field(default=0.4, ge=-1.0, le=1.0)
    probability_width: float = Field(default=0.05, gt=0.0, le=1.0)
    # Faces clustered or attached with lower confidence are worth a look.
    low_confidence: float = Field(default=0.5, ge=0.0, le=1.0)
    unnamed_min_faces: int = Field(default=20, ge=1)
    suggestions: int = Field(default=9, ge=1, le=9)
