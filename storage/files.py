"""File layout under the data folder: atomic writes and content-addressed chips."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import cv2
import numpy as np

TMP_SUFFIX = ".tmp"
# Files under the data root are read by other users and machines (review pages, shared mounts,
# dataset consumers); mkstemp creates its temporary file 0600, so the mode is set before the rename.
FILE_MODE = 0o644


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            os.fchmod(handle.fileno(), FILE_MODE)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_partial_write(path: Path) -> bool:
    """Whether `path` is the temporary file of an `atomic_write_bytes` that never finished."""
    return path.name.startswith(".") and path.name.endswith(TMP_SUFFIX)


def encode_png(rgb: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("could not encode chip as PNG")
    return buffer.tobytes()


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"cannot read image file {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class ChipStore:
    """Aligned face chips as PNG files named by the hash of their bytes (chips/ab/cd/<sha256>.png).

    Identical chips share one file, and rewriting a chip after a crash is harmless.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def put(self, chip_rgb: np.ndarray) -> str:
        data = encode_png(chip_rgb)
        digest = hashlib.sha256(data).hexdigest()
        relative = Path("chips") / digest[:2] / digest[2:4] / f"{digest}.png"
        target = self.data_dir / relative
        try:
            # A chip already stored is claimed again: its fresh mtime keeps `doctor` (which removes only
            # unreferenced chips older than its grace period) from deleting it before this run commits.
            os.utime(target)
        except FileNotFoundError:
            atomic_write_bytes(target, data)
        return relative.as_posix()

    def get(self, relative: str) -> np.ndarray:
        return read_rgb(self.data_dir / relative)

    def get_many(self, relatives: list[str]) -> np.ndarray:
        return np.stack([self.get(r) for r in relatives]) if relatives else np.zeros((0, 0, 0, 3), np.uint8)
