"""Embedding shards: one float32 .npy matrix plus a face-id vector per shard, per model.

In a folder, shards are memory-mapped on read, so the vectors of 10 million faces never need to
sit in memory at once; on object storage a shard's bytes are read whole (one GET), one shard at a
time. SQL keeps only the (model, face) -> (shard, row) index: a shard under a fresh key counts
once the commit naming it is done, so one half written by a crash is an object nothing names.
"""
from __future__ import annotations

import io
import posixpath
import uuid

import numpy as np

from pipeline.errors import FacemineError
from storage.dataroot import DataRoot

IDS_SUFFIX, VECTORS_SUFFIX = ".ids.npy", ".npy"


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class EmbeddingShards:
    def __init__(self, root: DataRoot) -> None:
        self.root = root

    def write(self, model_hash: str, face_ids: np.ndarray, vectors: np.ndarray) -> str:
        """Write one shard atomically under a fresh key; returns its path relative to the data root."""
        if len(face_ids) != len(vectors):
            raise ValueError("face_ids and vectors differ in length")
        relative = f"embeddings/{model_hash[:16]}/{uuid.uuid4().hex}"
        # Ids first: a shard is only valid once its vectors file exists.
        self.root.write_bytes(f"{relative}{IDS_SUFFIX}", _npy_bytes(np.asarray(face_ids, np.int64)))
        self.root.write_bytes(f"{relative}{VECTORS_SUFFIX}", _npy_bytes(np.asarray(vectors, np.float32)))
        return relative

    def files(self, relative: str) -> list[str]:
        """The files of a shard, relative to the data root."""
        return [f"{relative}{IDS_SUFFIX}", f"{relative}{VECTORS_SUFFIX}"]

    def ids(self, relative: str) -> np.ndarray:
        return np.load(io.BytesIO(self.root.read_bytes(f"{relative}{IDS_SUFFIX}")))

    def open(self, relative: str) -> tuple[np.ndarray, np.ndarray]:
        """(face_ids, vectors) of a shard; vectors are memory-mapped in a folder."""
        if self.root.is_local:
            vectors = np.load(self.root.local_path(f"{relative}{VECTORS_SUFFIX}"), mmap_mode="r")
        else:
            vectors = np.load(io.BytesIO(self.root.read_bytes(f"{relative}{VECTORS_SUFFIX}")))
        return self.ids(relative), vectors

    def gather(self, face_ids: np.ndarray, shard_of: np.ndarray, rows: np.ndarray, shard_paths: list[str]) -> np.ndarray:
        """Vectors of `face_ids`, in that order, each read at the row `rows[i]` of shard
        `shard_paths[shard_of[i]]`: the (shard, row) the SQL index names.

        Shards may hold stale vectors under the same face id (a replaced face, a race's loser):
        only the indexed row counts, and its stored id must be the face's, or the store is corrupt.
        """
        face_ids, shard_of, rows = (np.asarray(a, np.int64) for a in (face_ids, shard_of, rows))
        order = np.argsort(shard_of, kind="stable")
        bounds = np.flatnonzero(np.diff(shard_of[order])) + 1
        out: np.ndarray | None = None
        for picked in np.split(order, bounds) if len(order) else []:
            relative = shard_paths[shard_of[picked[0]]]
            ids, vectors = self.open(relative)
            if not np.array_equal(ids[rows[picked]], face_ids[picked]):
                raise FacemineError(f"embedding shard {relative} does not hold the faces its index names: run `facemine doctor`")
            if out is None:
                out = np.empty((len(face_ids), vectors.shape[1]), np.float32)
            out[picked] = vectors[rows[picked]]
        return out if out is not None else np.zeros((0, 0), np.float32)

    def rewrite_keeping(self, relative: str, rows: np.ndarray) -> str:
        """Write a new shard beside `relative` holding only its `rows` (in that order); returns its path.

        The old files stay: the caller deletes them once the index names the new shard."""
        ids, vectors = self.open(relative)
        return self.write(posixpath.basename(posixpath.dirname(relative)), ids[rows], np.asarray(vectors[rows]))
