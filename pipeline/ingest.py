"""Ingest: find photo files, decode them to RGB, hash them.

Every problem with a file becomes an `ImageRejected` with a status and a short reason, so the
caller can record it and move on; nothing here stops a run because one photo is bad.

Statuses:
- ``skipped``: the file is not a photo at all (``not-an-image``: text, video, documents that
  carry an image extension). Nothing to fix.
- ``failed``: the file should be a photo but cannot be used: ``empty-file`` (usually an
  interrupted copy or download), ``truncated``, ``corrupt: ...``, ``unsupported-mode: ...``,
  ``decompression-bomb: ...``, ``unreadable: ...`` (missing, broken symlink, permissions, not a
  regular file). Worth a look by the user.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.config import IngestConfig
from pipeline.errors import FacemineError

logger = logging.getLogger(__name__)

# Pillow modes holding more than 8 bits per grey pixel; Pillow's own convert() clips them.
_HIGH_BIT_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MAX = 65535
# 65535 / 255: maps 0..65535 onto 0..255 exactly at both ends.
_SIXTEEN_TO_EIGHT_BIT = 257.0


class ImageRejected(Exception):
    """A file that yields no image; `status` is "skipped" or "failed" (see module docstring)."""

    def __init__(self, status: Literal["skipped", "failed"], reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


@dataclass
class LoadedImage:
    rgb: np.ndarray  # uint8 (height, width, 3), EXIF orientation applied
    width: int
    height: int
    content_hash: str  # sha256 hex of the file bytes
    size_bytes: int
    perceptual_hash: str  # 16 hex chars, see perceptual_hash()


def iter_image_files(roots: Iterable[Path | str], extensions: Iterable[str]) -> Iterator[Path]:
    """Absolute paths of image files under `roots`, depth first in sorted name order.

    Directory symlinks are followed, each real directory is visited once (no loops, no double
    visits through overlapping roots). Broken symlinks with an image extension are yielded so
    they are recorded as failed rather than silently dropped. A root that is a file is yielded
    whatever its extension.
    """
    wanted = {extension.lower() for extension in extensions}
    absolute_roots = [Path(root).absolute() for root in roots]
    for root in absolute_roots:
        if not root.exists():
            raise FacemineError(f"folder not found: {root}")
    visited: set[str] = set()
    for root in absolute_roots:
        if root.is_dir():
            yield from _walk(root, wanted, visited)
        else:
            yield root


def _walk(directory: Path, wanted: set[str], visited: set[str]) -> Iterator[Path]:
    real = os.path.realpath(directory)
    if real in visited:
        return
    visited.add(real)
    try:
        with os.scandir(directory) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
    except OSError as error:
        logger.warning("cannot list folder %s: %s", directory, error)
        return
    for entry in entries:
        path = directory / entry.name
        if entry.is_dir():  # follows symlinks
            yield from _walk(path, wanted, visited)
        elif path.suffix.lower() in wanted:
            yield path


def load_image(path: Path | str, config: IngestConfig) -> LoadedImage:
    """Decode one photo to RGB uint8; raises `ImageRejected` for any problem with the file."""
    data = _read_file(Path(path))
    if not data:
        raise ImageRejected("failed", "empty-file")
    rgb = _decode_rgb(data, config.max_image_pixels)
    return LoadedImage(
        rgb=rgb,
        width=rgb.shape[1],
        height=rgb.shape[0],
        content_hash=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        perceptual_hash=perceptual_hash(rgb),
    )


def _read_file(path: Path) -> bytes:
    # One read feeds both the hash and the decoder, so they always see the same bytes.
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise ImageRejected("failed", "unreadable: not a regular file")
        return path.read_bytes()
    except OSError as error:
        raise ImageRejected("failed", f"unreadable: {type(error).__name__} {error}") from error


def _decode_rgb(data: bytes, max_pixels: int) -> np.ndarray:
    # Pillow's global MAX_IMAGE_PIXELS is left alone (threads decode concurrently); the limit
    # is checked here on the header size, before any pixel is decoded. Pillow still refuses
    # on its own anything above twice its global limit, reported as a bomb as well.
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as error:
        raise ImageRejected("skipped", "not-an-image") from error
    except Image.DecompressionBombError as error:
        raise ImageRejected("failed", f"decompression-bomb: {error}") from error
    except Exception as error:  # Pillow raises many types on malformed headers
        raise ImageRejected("failed", _decode_failure(error)) from error
    with image:
        pixels = image.width * image.height
        if pixels > max_pixels:
            raise ImageRejected("failed", f"decompression-bomb: {pixels:.1e} pixels")
        try:
            image.load()  # first frame of animated images
            ImageOps.exif_transpose(image, in_place=True)
        except Exception as error:  # truncated or corrupt pixel data, of any format
            raise ImageRejected("failed", _decode_failure(error)) from error
        try:
            return _to_rgb(image)
        except ValueError as error:  # a mode Pillow cannot convert, e.g. LAB
            raise ImageRejected("failed", f"unsupported-mode: {image.mode}") from error


def _decode_failure(error: Exception) -> str:
    if "truncated" in str(error).lower():
        return "truncated"
    return f"corrupt: {type(error).__name__} {error}"


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        grey = np.clip(np.asarray(image, dtype=np.float64), 0, _SIXTEEN_BIT_MAX)
        grey8 = np.round(grey / _SIXTEEN_TO_EIGHT_BIT).astype(np.uint8)
        return cv2.cvtColor(grey8, cv2.COLOR_GRAY2RGB)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        # Composite on white, as viewers show transparency: the colour stored under
        # fully transparent pixels is arbitrary (often black) and would invent edges.
        background = Image.new("RGBA", image.size, "white")
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return np.array(image.convert("RGB"))


def perceptual_hash(rgb: np.ndarray) -> str:
    """64-bit DCT perceptual hash (pHash) as 16 hex chars; close for re-encoded/resized copies.

    Hand-written (a few lines of OpenCV) because the `imagehash` package is not a dependency
    and OpenCV's img_hash module ships only in opencv-contrib.
    """
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low_frequencies = cv2.dct(small)[:8, :8]
    bits = low_frequencies > np.median(low_frequencies)
    return np.packbits(bits.ravel()).tobytes().hex()


def hamming_distance(hash_a: str, hash_b: str) -> int:
    """Number of differing bits between two perceptual hashes of equal length."""
    if len(hash_a) != len(hash_b):
        raise ValueError(f"hash lengths differ: {len(hash_a)} vs {len(hash_b)}")
    return (int(hash_a, 16) ^ int(hash_b, 16)).bit_count()


def downscale_for_detection(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Shrink so the long side is at most `max_side`; returns (image, scale).

    Coordinates found on the returned image map back with ``original = detected / scale``;
    scale is 1.0 (and the image returned as is) when no shrinking is needed.
    """
    height, width = rgb.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return rgb, 1.0
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), scale
