"""Embedding shards: one float32 .npy matrix plus a face-id vector per shard, per model.

Shards are memory-mapped on read, so the vectors of 10 million faces never need to sit in
memory at once; SQL keeps only the (model, face) -> (shard, row) index.
"""
from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from storage.files import atomic_write_bytes


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class EmbeddingShards:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def write(self, model_hash: str, face_ids: np.ndarray, vectors: np.ndarray) -> str:
        """Write one shard atomically; returns its path relative to the data folder."""
        if len(face_ids) != len(vectors):
            raise ValueError("face_ids and vectors differ in length")
        relative = Path("embeddings") / model_hash[:16] / f"{uuid.uuid4().hex}"
        # Ids first: a shard is only valid once its vectors file exists.
        atomic_write_bytes(self.data_dir / f"{relative}.ids.npy", _npy_bytes(np.asarray(face_ids, np.int64)))
        atomic_write_bytes(self.data_dir / f"{relative}.npy", _npy_bytes(np.asarray(vectors, np.float32)))
        return relative.as_posix()

    def open(self, relative: str) -> tuple[np.ndarray, np.ndarray]:
        """(face_ids, vectors) of a shard; vectors are memory-mapped."""
        ids = np.load(self.data_dir / f"{relative}.ids.npy")
        vectors = np.load(self.data_dir / f"{relative}.npy", mmap_mode="r")
        return ids, vectors

    def gather(self, shard_paths: list[str], face_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Concatenate shards, keeping only `face_ids` when given; result sorted by face id."""
        ids_parts, vector_parts = [], []
        for ids, vectors in self._iter(shard_paths):
            keep = np.isin(ids, face_ids) if face_ids is not None else slice(None)
            ids_parts.append(ids[keep])
            vector_parts.append(np.asarray(vectors[keep], np.float32))
        if not ids_parts:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        ids = np.concatenate(ids_parts)
        vectors = np.concatenate(vector_parts)
        # A face embedded twice by racing runs keeps one vector (the index in SQL names the winner;
        # duplicates are bit-identical for one model anyway).
        ids, first = np.unique(ids, return_index=True)
        return ids, vectors[first]

    def _iter(self, shard_paths: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for relative in shard_paths:
            yield self.open(relative)
