"""Content-addressed chips under the data root."""
from __future__ import annotations

import hashlib

import cv2
import numpy as np

from storage.dataroot import DataRoot


def encode_png(rgb: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("could not encode chip as PNG")
    return buffer.tobytes()


def decode_rgb(data: bytes, where: str) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"cannot decode image file {where}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class ChipStore:
    """Aligned face chips as PNG files named by the hash of their bytes (chips/ab/cd/<sha256>.png).

    Identical chips share one file, and rewriting a chip after a crash is harmless; on object
    storage each chip is one PUT under its hash, so there is never a partial chip to see.
    """

    def __init__(self, root: DataRoot) -> None:
        self.root = root

    def put(self, chip_rgb: np.ndarray) -> str:
        data = encode_png(chip_rgb)
        digest = hashlib.sha256(data).hexdigest()
        relative = f"chips/{digest[:2]}/{digest[2:4]}/{digest}.png"
        # A chip already stored is claimed again: its fresh time keeps `doctor` (which removes only
        # unreferenced chips older than its grace period) from deleting it before this run commits.
        if not self.root.claim(relative):
            self.root.write_bytes(relative, data)
        return relative

    def get(self, relative: str) -> np.ndarray:
        return decode_rgb(self.root.read_bytes(relative), self.root.location(relative))

    def get_many(self, relatives: list[str]) -> np.ndarray:
        return np.stack([self.get(r) for r in relatives]) if relatives else np.zeros((0, 0, 0, 3), np.uint8)
