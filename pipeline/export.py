"""Plan a labeled dataset export: which faces, which folder, which split (no file I/O here)."""
from __future__ import annotations

import re
import unicodedata

import numpy as np
import pandas as pd

from pipeline.config import ExportConfig

MANIFEST_COLUMNS = [
    "face_id", "identity", "identity_name", "folder", "subset", "source_path", "x1", "y1", "x2", "y2",
    "det_score", "quality", "confidence", "duplicate_of", "chip_path", "split",
]
HISTOGRAM_EDGES = [1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000]


def safe_folder_name(identity_id: int, name: str | None) -> str:
    """Folder of an identity: its id, plus a slug of its name that cannot leave the export folder."""
    if not name:
        return f"{identity_id:06d}"
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", ascii_name).strip("_-")[:80]
    return f"{identity_id:06d}_{slug}" if slug else f"{identity_id:06d}"


def plan_export(faces: pd.DataFrame, config: ExportConfig) -> tuple[pd.DataFrame, dict]:
    """Manifest rows and summary for the faces of one clustering run.

    `faces` needs: face_id, identity_id, identity_name, subset, source_path, box, det_score,
    quality, confidence, duplicate_of, outlier. Duplicates are listed (split "duplicate", no
    chip) but not exported; outliers and unassigned faces are left out. Identities with fewer
    than `min_faces_per_identity` kept faces are dropped; above `max_faces_per_identity` the
    best-quality faces are kept. The split is drawn per identity with a fixed seed.
    """
    assigned = faces[faces.identity_id.notna() & ~faces.outlier.astype(bool)].copy()
    assigned["identity"] = assigned.identity_id.astype(np.int64)
    kept = assigned[assigned.duplicate_of.isna()].sort_values(["identity", "quality", "face_id"], ascending=[True, False, True])
    if config.max_faces_per_identity:
        kept = kept.groupby("identity", sort=True).head(config.max_faces_per_identity)
    sizes = kept.groupby("identity").face_id.transform("size")
    kept = kept[sizes >= config.min_faces_per_identity].copy()
    kept["split"] = _split(kept, config)
    duplicates = assigned[assigned.duplicate_of.notna() & assigned.identity.isin(kept.identity)].copy()
    duplicates["split"] = "duplicate"
    manifest = pd.concat([kept, duplicates]).sort_values(["identity", "face_id"]).reset_index(drop=True)
    # Unnamed identities come out of the name join as NaN, not None.
    names = [name if isinstance(name, str) else None for name in manifest.identity_name]
    # Strings even when no identity qualifies (an empty list would make a float column).
    folders = [safe_folder_name(i, n) for i, n in zip(manifest.identity, names)]
    manifest["folder"] = pd.Series(folders, index=manifest.index, dtype=object)
    manifest["chip_path"] = np.where(
        manifest.split == "duplicate", "", manifest.folder + "/" + manifest.face_id.astype(str) + ".png"
    )
    manifest = manifest[MANIFEST_COLUMNS]
    return manifest, _summary(manifest, config)


def _split(kept: pd.DataFrame, config: ExportConfig) -> np.ndarray:
    """Per identity, round(n * val_fraction) faces go to val (at least one left in train)."""
    rng = np.random.default_rng(config.seed)
    split = np.full(len(kept), "train", dtype=object)
    for positions in kept.groupby("identity", sort=True).indices.values():
        n_val = min(int(round(len(positions) * config.val_fraction)), len(positions) - 1)
        if n_val > 0:
            split[rng.permutation(positions)[:n_val]] = "val"
    return split


def _summary(manifest: pd.DataFrame, config: ExportConfig) -> dict:
    exported = manifest[manifest.split != "duplicate"]
    per_identity = exported.groupby("identity").size()
    counts, _ = np.histogram(per_identity.to_numpy(), bins=HISTOGRAM_EDGES + [np.inf])
    histogram = {
        f"{low}-{high - 1}" if np.isfinite(high) else f"{low}+": int(count)
        for low, high, count in zip(HISTOGRAM_EDGES, HISTOGRAM_EDGES[1:] + [np.inf], counts)
    }
    return {
        "identities": int(per_identity.size),
        "faces": int(len(exported)),
        "train_faces": int((exported.split == "train").sum()),
        "val_faces": int((exported.split == "val").sum()),
        "duplicates_not_exported": int((manifest.split == "duplicate").sum()),
        "faces_per_identity_histogram": histogram,
        "parameters": config.model_dump(),
    }
