"""The data root: where chips, embedding shards and exports live, seen by every machine.

Two kinds, one interface (keys are '/'-separated paths relative to the root):

- A folder: local, or a shared mount (NFS and the like). A write goes to a temporary file in the
  same folder, is fsync'd, made 0644 and renamed over its name: readers never see half a file.
- Object storage through fsspec (`s3://bucket/prefix`). There is no rename there, but one PUT of a
  whole object is atomic: readers see the old object, none, or the new one, never a part. So every
  object is written whole, in one PUT, under a key nothing else writes differently: chips under the
  hash of their bytes, shards and export versions under fresh names. An object counts only once the
  SQL commit that names it is done; one left by a crash before that commit is unreferenced, and
  `facemine doctor` removes it after its grace period.

Modification times judge that grace period. A folder's come from the machine that writes; an
object's `LastModified` from the server, in whole seconds (`time_resolution`); the grace period
(an hour by default) dwarfs both the rounding and any usual clock skew between machines.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import FacemineError
from storage.settings import ObjectStoreConfig, Settings

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


def is_partial_write(relative: str) -> bool:
    """Whether `relative` is the temporary file of an `atomic_write_bytes` that never finished."""
    name = posixpath.basename(relative)
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


@dataclass(frozen=True)
class Entry:
    relative: str
    modified: float  # seconds since the epoch
    is_dir: bool = False


def _modified(info: dict) -> float:
    """A listing entry's modification time: `mtime` for folders, `LastModified` for S3 objects."""
    if "mtime" in info:
        return float(info["mtime"])
    stamp = info.get("LastModified") or info.get("last_modified") or info.get("updated")
    if isinstance(stamp, datetime):
        return stamp.timestamp()
    if isinstance(stamp, str):
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    raise FacemineError(f"the data root's file system reports no modification time for {info.get('name')}")


class DataRoot:
    """Bytes under a root folder or object-storage prefix (see the module's note)."""

    def __init__(self, url: str | Path, storage_options: dict | None = None) -> None:
        self.url = str(url).rstrip("/") or "/"
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.time_resolution = 0.0 if self.is_local else 1.0
        # Locations of a folder root keep the path as given (export rows name them so today).
        self._base = self.url if self.is_local and "://" not in self.url else self.root

    def __repr__(self) -> str:
        return f"DataRoot({self.url!r})"

    def path(self, relative: str) -> str:
        """The file system's own path of `relative` (for fsspec calls)."""
        return f"{self.root}/{relative}" if relative else self.root

    def local_path(self, relative: str = "") -> Path:
        if not self.is_local:
            raise ValueError(f"{self.url} is not a local folder")
        return Path(self.path(relative))

    def location(self, relative: str) -> str:
        """Where `relative` is, as a person or another machine names it (a path, or a URL)."""
        return str(Path(self._base) / relative) if self.is_local else f"{self.url}/{relative}"

    def relative_of(self, location: str) -> str | None:
        """The key of a `location` under this root, or None when it is elsewhere."""
        if self.is_local:
            if "://" in location:
                return None
            try:
                return Path(location).resolve().relative_to(Path(self.root).resolve()).as_posix()
            except ValueError:
                return None
        prefix = f"{self.url}/"
        return location[len(prefix):] if location.startswith(prefix) else None

    def prepare(self) -> None:
        """Create a folder root; check that an object-storage root answers and its bucket exists."""
        if self.is_local:
            Path(self.root).mkdir(parents=True, exist_ok=True)
            return
        bucket = self.root.split("/")[0]
        try:
            if hasattr(self.fs, "call_s3"):  # s3fs: `exists` would answer False for an unreachable server too
                self.fs.call_s3("head_bucket", Bucket=bucket)
            elif not self.fs.exists(bucket):
                raise FileNotFoundError(bucket)
        except FileNotFoundError:
            raise FacemineError(f"data root {self.url}: bucket {bucket!r} does not exist (create it first)") from None
        except Exception as error:  # noqa: BLE001 - any client error (connection, credentials) is the user's to fix
            raise FacemineError(f"data root {self.url} cannot be reached: {error}") from None

    # ---- bytes ----------------------------------------------------------------------------

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write a whole file atomically: a rename in a folder, one PUT on object storage."""
        if self.is_local:
            atomic_write_bytes(self.local_path(relative), data)
        else:
            self.fs.pipe_file(self.path(relative), data)

    def create_exclusive(self, relative: str, data: bytes = b"") -> bool:
        """Write a new file only if none exists under that name (False when one does): the one
        step that lets machines racing for a name agree on who took it.

        In a folder, O_CREAT | O_EXCL; on S3, a PUT with `If-None-Match: *` (s3fs's "create"
        mode). A store that ignores that header (older S3-compatible servers) lets both writers
        through: such stores must not race for names."""
        if self.is_local:
            path = self.local_path(relative)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            except FileExistsError:
                return False
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
            return True
        try:
            self.fs.pipe_file(self.path(relative), data, mode="create")
        except FileExistsError:
            return False
        return True

    def read_bytes(self, relative: str) -> bytes:
        return self.fs.cat_file(self.path(relative))

    def exists(self, relative: str) -> bool:
        return self.fs.exists(self.path(relative))

    def is_file(self, relative: str) -> bool:
        return self.fs.isfile(self.path(relative))

    def copy(self, source: str, target: str) -> None:
        """Copy a file within the root (server-side on object storage: one whole-object copy)."""
        if self.is_local:
            target_path = self.local_path(target)
            target_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.local_path(source), target_path)
        else:
            self.fs.copy(self.path(source), self.path(target))

    def rename_folder(self, source: str, target: str) -> None:
        """Rename a folder in one step; only folders can (object storage has no rename)."""
        self.local_path(source).rename(self.local_path(target))

    def delete(self, relative: str) -> None:
        """Delete a file, or a folder / prefix with everything under it; nothing when it is gone."""
        if self.is_local:
            path = self.local_path(relative)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            return
        try:
            self.fs.rm(self.path(relative), recursive=True)
        except FileNotFoundError:
            pass

    # ---- times ----------------------------------------------------------------------------

    def modified(self, relative: str) -> float | None:
        """When `relative` was last written or claimed; for a prefix on object storage, its newest
        object; None when it is gone."""
        try:
            if self.is_local:
                return self.local_path(relative).stat().st_mtime
            info = self.fs.info(self.path(relative))
            if info["type"] == "directory":
                times = [_modified(found) for found in self.fs.find(self.path(relative), detail=True).values()]
                return max(times) if times else None
            return _modified(info)
        except FileNotFoundError:
            return None

    def claim(self, relative: str) -> bool:
        """Refresh the modification time of an existing file (so `doctor`'s grace period starts
        again); False when there is no such file.

        Object storage has no utime: an S3 object is copied onto itself (CopyObject with
        MetadataDirective=REPLACE, the one in-place update S3 allows; server-side, nothing moves
        through this machine); on other object stores it is rewritten with its own bytes."""
        path = self.path(relative)
        try:
            if self.is_local:
                os.utime(path)
            elif hasattr(self.fs, "call_s3"):  # s3fs
                bucket, key, _ = self.fs.split_path(path)
                self.fs.call_s3(
                    "copy_object", Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": key},
                    MetadataDirective="REPLACE",
                )
            else:
                self.fs.pipe_file(path, self.fs.cat_file(path))
        except FileNotFoundError:
            return False
        return True

    def list(self, prefix: str, with_folders: bool = False) -> Iterator[Entry]:
        """Every file under `prefix` (and, with `with_folders`, every folder of a local root), with
        its modification time. Listings are never cached: other machines write meanwhile."""
        listed = self.path(prefix)
        found = self.fs.find(listed, detail=True, withdirs=with_folders and self.is_local)
        start = len(self.root) + 1
        for name, info in found.items():
            name = name.rstrip("/")
            if name == listed or len(name) < start:  # the prefix itself
                continue
            yield Entry(name[start:], _modified(info), info["type"] == "directory")


def local_file(location: str) -> str:
    """A local path with the bytes of `location`: a path as it is; a URL (trained weights on
    object storage, `Store.shared_weights`) fetched once into this machine's cache by fsspec's
    `simplecache`, since torch and onnx load from files. Such URLs name their content (a hash),
    so a cached copy is never stale."""
    if "://" not in location or location.startswith("file://"):
        return location.removeprefix("file://")
    cache = Path(tempfile.gettempdir()) / f"facemine-{os.getuid()}" / "weights"
    return fsspec.open_local(f"simplecache::{location}", simplecache={"cache_storage": str(cache)})


def object_store_options(config: ObjectStoreConfig) -> dict:
    """fsspec options (endpoint, credentials) of the `object_store` settings."""
    options: dict = {"use_listings_cache": False}  # see other machines' writes at once
    if config.endpoint_url:
        options["endpoint_url"] = config.endpoint_url
    if config.key:
        options["key"] = config.key
    if config.secret:
        options["secret"] = config.secret
    return options | config.options


def storage_options(settings: Settings) -> dict:
    """fsspec options of the data root: those of the object store, for an object-storage root."""
    return object_store_options(settings.object_store) if settings.data_root_is_remote else {}


def register_object_store(settings: Settings) -> None:
    """Make the `object_store` settings this process's fsspec defaults for s3:// URLs, so photos
    mined from such URLs (`pipeline.ingest`, which knows no settings) are read with them."""
    if settings.object_store != ObjectStoreConfig():
        fsspec.config.conf["s3"] = object_store_options(settings.object_store)


def open_data_root(settings: Settings) -> DataRoot:
    """The data root the settings name (default: the data folder)."""
    register_object_store(settings)
    return DataRoot(settings.data_root or settings.data_dir, storage_options(settings))
