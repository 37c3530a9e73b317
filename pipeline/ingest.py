"""Ingest: find photo files, decode them to RGB, hash them.

Every problem with a file becomes an `ImageRejected` with a status and a short reason, so the
caller can record it and move on; nothing here stops a run because one photo is bad.

Statuses:
- ``skipped``: the file is not a photo at all (``not-an-image``: text, video, documents that
  carry an image extension). Nothing to fix.
- ``failed``: the file should be a photo but cannot be used: ``empty-file`` (usually an
  interrupted copy or download), ``truncated``, ``corrupt: ...`` (a damaged header included),
  ``unsupported-mode: ...``, ``decompression-bomb: ...``, ``too-large: ...``, ``unreadable: ...``
  (missing, broken symlink, symlink loop, permissions, not a regular file, a folder that cannot
  be listed). Worth a look by the user.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import fsspec
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.config import IngestConfig
from pipeline.errors import FacemineError
from pipeline.hashing import (
    NotARegularFile,
    file_kind,
    file_size,
    is_url,
    open_input,
    open_regular_file,
)

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


def path_key(path: str | os.PathLike) -> str:
    """The name a file is recorded under: its path, with bytes that are not UTF-8 written as \\xNN.

    Paths are stored and shown as text; a name the filesystem allows but UTF-8 does not (an old
    camera's Latin-1, a cut multi-byte character) still gets a printable key that is the same
    on every run, while the file itself is opened through its real bytes (`FoundFile.path`).
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


_ESCAPED_BYTE = re.compile(rb"\\x([0-9a-f]{2})")


def path_from_key(key: str) -> str:
    """The path a `path_key` names: the key itself if that exists, else the key with its \\xNN
    escapes turned back into bytes (so a folder can be passed on as printable text)."""
    if os.path.lexists(key):
        return key
    raw = _ESCAPED_BYTE.sub(lambda match: bytes([int(match.group(1), 16)]), key.encode("utf-8", "surrogateescape"))
    return os.fsdecode(raw)


@dataclass(frozen=True)
class FoundFile:
    """A file the walk offers: to be mined (`status` None) or already rejected with a reason."""

    path: str  # opens the file; non-UTF-8 bytes of its name are held as surrogate escapes
    status: Literal["skipped", "failed"] | None = None
    reason: str | None = None

    @property
    def key(self) -> str:
        return path_key(self.path)


def walk_photos(
    roots: Iterable[Path | str], extensions: Iterable[str], excluded: Iterable[Path | str] = ()
) -> Iterator[FoundFile]:
    """Every photo under `roots`, depth first in sorted name order, each offered once.

    A photo is a regular file with one of `extensions`, or without one whose content Pillow
    recognises as one of their formats. Anything the walk cannot use is offered as rejected
    so it is recorded, not dropped: a FIFO, socket or device with a photo's name (never
    opened), a broken symlink or symlink loop, a folder that cannot be listed. Folder symlinks
    are followed, each real folder visited once. Never entered: `excluded` folders and any
    folder holding a facemine store or dataset export (mining them would feed facemine's own
    chips back into it). A root that is a file is offered whatever its name. A root may also be
    an fsspec URL (s3://bucket/photos, see `_walk_url`).
    """
    wanted = {extension.lower() for extension in extensions}
    sniffed = _pillow_formats(wanted)
    roots = list(roots)
    absolute_roots = [None if is_url(root) else Path(path_from_key(os.fspath(root))).absolute() for root in roots]
    for root in absolute_roots:
        if root is not None and not root.exists():
            raise FacemineError(f"folder not found: {path_key(root)}")
    visited = {os.path.realpath(folder) for folder in excluded}
    for url, root in zip(roots, absolute_roots):
        if root is None:
            yield from _walk_url(str(url), wanted)
        elif root.is_dir():
            yield from _walk(str(root), wanted, sniffed, visited)
        else:
            yield _found(str(root), os.stat(root).st_mode)


def iter_image_files(roots: Iterable[Path | str], extensions: Iterable[str]) -> Iterator[Path]:
    """Paths `walk_photos` offers for mining (rejected files left out)."""
    for found in walk_photos(roots, extensions):
        if found.status is None:
            yield Path(found.path)


def _walk(folder: str, wanted: set[str], sniffed: list[str], visited: set[str]) -> Iterator[FoundFile]:
    real = os.path.realpath(folder)
    if real in visited:
        return
    visited.add(real)
    if _is_facemine_folder(folder):
        logger.info("not mining %s: it holds a facemine store or dataset export", path_key(folder))
        return
    try:
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
    except OSError as error:
        yield FoundFile(folder, "failed", f"unreadable: folder cannot be listed: {_error_text(error)}")
        return
    for entry in entries:
        path = os.path.join(folder, entry.name)
        is_photo_name = os.path.splitext(entry.name)[1].lower() in wanted
        try:
            mode = os.stat(path).st_mode  # follows symlinks
        except OSError as error:  # broken symlink, symlink loop, vanished
            if is_photo_name:
                yield FoundFile(path, "failed", f"unreadable: {_error_text(error)}")
            continue
        if stat.S_ISDIR(mode):
            yield from _walk(path, wanted, sniffed, visited)
        elif is_photo_name:
            yield _found(path, mode)
        elif stat.S_ISREG(mode) and _looks_like_image(path, sniffed):
            yield FoundFile(path)


def _walk_url(root: str, wanted: set[str]) -> Iterator[FoundFile]:
    """Objects under an fsspec URL with a photo's extension, in sorted key order, skipping
    facemine data roots and exports found there. Objects without a photo's extension are not
    offered: telling them apart would mean reading every object of the bucket."""
    fs, path = fsspec.core.url_to_fs(root)
    if fs.isfile(path):
        yield FoundFile(root)
        return
    keys = sorted(fs.find(path)) if fs.exists(path) else []
    if not keys:
        raise FacemineError(f"folder not found: {root}")
    names = set(keys)
    exports = {
        os.path.dirname(key) for key in keys
        if key.endswith("/dataset_card.json") and key.replace("dataset_card.json", "manifest.parquet") in names
    }
    holding = {folder: {key.split(f"/{folder}/")[0] for key in keys if f"/{folder}/" in key} for folder in ("chips", "embeddings")}
    facemine = exports | (holding["chips"] & holding["embeddings"])  # a data root
    for key in keys:
        if any(key.startswith(f"{folder}/") for folder in facemine):
            continue
        if os.path.splitext(key)[1].lower() in wanted:
            yield FoundFile(fs.unstrip_protocol(key))


def _found(path: str, mode: int) -> FoundFile:
    kind = file_kind(mode)
    if kind == "regular file":
        return FoundFile(path)
    return FoundFile(path, "failed", f"unreadable: not a regular file ({kind})")


# Marker files of a facemine data folder and of a dataset export (storage/exports.py).
_STORE_MARKERS = ("facemine.db",)
_EXPORT_MARKERS = ("dataset_card.json", "manifest.parquet")


def _is_facemine_folder(folder: str) -> bool:
    if any(os.path.isfile(os.path.join(folder, name)) for name in _STORE_MARKERS):
        return True
    if all(os.path.isdir(os.path.join(folder, name)) for name in ("chips", "embeddings")):
        return True  # a store on another database: chips and embeddings stay files
    return all(os.path.isfile(os.path.join(folder, name)) for name in _EXPORT_MARKERS)


def _pillow_formats(extensions: set[str]) -> list[str]:
    """Pillow's format names for file extensions (".jpg" -> "JPEG")."""
    Image.init()
    registered = Image.registered_extensions()
    return sorted({registered[extension] for extension in extensions if extension in registered})


# Enough for every format check Pillow makes on a file's first bytes.
_SNIFF_BYTES = 64


def _looks_like_image(path: str, formats: list[str]) -> bool:
    """Whether a file's first bytes are those of one of `formats` (Pillow's own format checks)."""
    try:
        with open_regular_file(path) as file:
            prefix = file.read(_SNIFF_BYTES)
    except OSError:
        return False  # unreadable and without a photo's name: nothing says it is one
    return _image_format(prefix, formats) is not None


def _image_format(prefix: bytes, formats: list[str]) -> str | None:
    # Image.OPEN holds each format's (factory, accept) as registered by Pillow's plugins.
    for name in formats:
        accept = Image.OPEN[name][1]
        if accept is not None and accept(prefix):
            return name
    return None


def _error_text(error: OSError) -> str:
    # Never the file name: reasons are stored as text, and the name may not be UTF-8.
    if isinstance(error, NotARegularFile):
        return str(error)
    return f"{type(error).__name__}: {error.strerror or error}"


def load_image(path: Path | str, config: IngestConfig) -> LoadedImage:
    """Decode one photo to RGB uint8; raises `ImageRejected` for any problem with the file."""
    data = _read_file(path, config.max_image_pixels)
    if not data:
        raise ImageRejected("failed", "empty-file")
    rgb = _decode_rgb(data, config.max_image_pixels, _pillow_formats({e.lower() for e in config.extensions}))
    return LoadedImage(
        rgb=rgb,
        width=rgb.shape[1],
        height=rgb.shape[0],
        content_hash=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        perceptual_hash=perceptual_hash(rgb),
    )


# No image within the pixel limit takes more bytes per pixel than this (16-bit RGBA, uncompressed).
_MAX_BYTES_PER_PIXEL = 8


def _read_file(path: Path | str, max_pixels: int) -> bytes:
    # One read feeds both the hash and the decoder, so they always see the same bytes.
    try:
        with open_input(path) as file:
            size = file_size(file)
            if size > max_pixels * _MAX_BYTES_PER_PIXEL:
                raise ImageRejected("failed", f"too-large: {size} bytes, more than any photo within the pixel limit")
            return file.read()
    except OSError as error:
        raise ImageRejected("failed", f"unreadable: {_error_text(error)}") from error


def _decode_rgb(data: bytes, max_pixels: int, formats: list[str]) -> np.ndarray:
    # Pillow's global MAX_IMAGE_PIXELS is left alone (threads decode concurrently); the limit
    # is checked here on the header size, before any pixel is decoded. Pillow still refuses
    # on its own anything above twice its global limit, reported as a bomb as well.
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as error:
        # A file that starts like a photo but does not parse is a damaged photo, not "no photo".
        known = _image_format(data[:_SNIFF_BYTES], formats)
        if known is not None:
            raise ImageRejected("failed", f"corrupt: {known} header damaged") from error
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
