"""Content hashes that identify files (model weights, photos) independently of their path,
and the one safe way to open a file that something else handed us."""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import BinaryIO

import fsspec

_KINDS = (
    (stat.S_ISDIR, "folder"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


class NotARegularFile(OSError):
    """The path names a folder, FIFO, socket or device: nothing to read as a photo."""


def file_kind(mode: int) -> str:
    """'regular file', 'folder', 'FIFO', 'socket', 'character device' or 'block device'."""
    if stat.S_ISREG(mode):
        return "regular file"
    return next((name for test, name in _KINDS if test(mode)), "special file")


def open_regular_file(path: str | os.PathLike) -> BinaryIO:
    """Open a regular file (or a symlink to one) for reading; anything else raises `NotARegularFile`.

    The type is checked before opening, because opening some devices has effects of its own
    and reading a FIFO or /dev/zero never ends; the file is opened non-blocking (no effect on
    regular files) and checked again on the descriptor, so a FIFO swapped in between cannot
    hang the caller either.
    """
    kind = file_kind(os.stat(path).st_mode)
    if kind != "regular file":
        raise NotARegularFile(f"not a regular file ({kind})")
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        kind = file_kind(os.fstat(descriptor).st_mode)
        if kind != "regular file":
            raise NotARegularFile(f"not a regular file ({kind})")
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` is an fsspec URL (s3://bucket/key, ...) rather than a local path."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def open_input(path: str | os.PathLike) -> BinaryIO:
    """A photo, chip or manifest handed to us: `open_regular_file` for a path; fsspec for a URL
    (object storage holds only plain objects).
    A URL is opened with the fsspec options of its protocol registered for this process
    (`storage.dataroot.register_object_store`: the `object_store` settings, for s3://)."""
    if is_url(path):
        return fsspec.open(path, "rb").open()
    return open_regular_file(path)


def file_size(file: BinaryIO) -> int:
    size = getattr(file, "size", None)  # fsspec's files know theirs
    return size if isinstance(size, int) else os.fstat(file.fileno()).st_size


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a regular file's (or an object's) bytes, read in chunks so large files never
    sit in memory."""
    with open_input(path) as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
