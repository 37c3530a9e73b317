"""Held-out validation photos: the pairs CSV and a cache of their faces in the data folder.

Detection runs once per set of held-out photos: their landmarks (and, per alignment template,
their chips) are cached under `holdout/` as .npz files written atomically. The cache key covers
the photo paths, their sizes and modification times and the detection settings, so a changed
photo or setting detects again. Held-out photos never enter the mined subsets.
"""
from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import FacemineError
from storage.dataroot import atomic_write_bytes


def read_pairs(pairs_csv: Path) -> pd.DataFrame:
    """Verification pairs with absolute paths: path_a, path_b, same (bool).

    Relative paths are relative to the CSV's folder (LFW's pairs.csv layout).
    """
    if not pairs_csv.is_file():
        raise FacemineError(f"validation pairs file not found: {pairs_csv}")
    pairs = pd.read_csv(pairs_csv)
    if not {"path_a", "path_b", "same"} <= set(pairs.columns):
        raise FacemineError(f"{pairs_csv} needs the columns path_a,path_b,same")
    for column in ("path_a", "path_b"):
        pairs[column] = [str((pairs_csv.parent / path).resolve()) for path in pairs[column]]
    pairs["same"] = pairs.same.astype(bool)
    return pairs[["path_a", "path_b", "same"]]


def holdout_key(paths: Sequence[str], settings_json: str) -> str:
    """Fingerprint of held-out photos (path, size, mtime) and the settings that find their faces."""
    digest = hashlib.sha256(settings_json.encode())
    for path in paths:
        try:
            stat = Path(path).stat()
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()[:24]


class HoldoutCache:
    """holdout/<key>.faces.npz (paths, landmarks) and holdout/<key>.<template>.npz (chips)."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "holdout"

    def _path(self, key: str, part: str) -> Path:
        return self.root / f"{key}.{part}.npz"

    def _read(self, key: str, part: str) -> dict[str, np.ndarray] | None:
        path = self._path(key, part)
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as content:
            return {name: content[name] for name in content.files}

    def _write(self, key: str, part: str, **arrays: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        atomic_write_bytes(self._path(key, part), buffer.getvalue())

    def landmarks(self, key: str, paths: Sequence[str]) -> np.ndarray | None:
        """Cached (N, 5, 2) landmarks of `paths` (NaN: no face), None when not cached."""
        content = self._read(key, "faces")
        if content is None:
            return None
        if content["paths"].tolist() != list(paths):
            raise FacemineError(f"held-out cache {self._path(key, 'faces')} belongs to other photos: delete it")
        return content["landmarks"]

    def save_landmarks(self, key: str, paths: Sequence[str], landmarks: np.ndarray) -> None:
        self._write(key, "faces", paths=np.asarray(paths, dtype=str), landmarks=landmarks)

    def chips(self, key: str, template: str) -> np.ndarray | None:
        """Cached uint8 (faces found, S, S, 3) chips for `template`, None when not cached."""
        content = self._read(key, template)
        return None if content is None else content["chips"]

    def save_chips(self, key: str, template: str, chips: np.ndarray) -> None:
        self._write(key, template, chips=chips)
