"""Repository: every read and write of facemine's metadata goes through `Store`."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from storage.db import migrate, session_scope
from storage.embeddings import EmbeddingShards
from storage.files import ChipStore
from storage.schema import Embedding, EmbeddingShard, Face, Image, Model, Subset
from storage.settings import Settings


@dataclass(frozen=True)
class ModelInfo:
    id: int
    name: str
    kind: str
    weights_path: str | None
    weights_hash: str
    embedding_dim: int
    preprocessing: dict
    parent_id: int | None
    is_current: bool


class ShardWriteSummary(BaseModel):
    """What storing shards changed; faces count only those of new or changed photos."""

    photos_new: int = 0
    photos_unchanged: int = 0
    photos_skipped: int = 0
    photos_failed: int = 0
    faces_found: int = 0
    faces_passed: int = 0

    def add(self, other: "ShardWriteSummary") -> None:
        for name in ShardWriteSummary.model_fields:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def _model_info(row: Model) -> ModelInfo:
    return ModelInfo(
        id=row.id,
        name=row.name,
        kind=row.kind,
        weights_path=row.weights_path,
        weights_hash=row.weights_hash,
        embedding_dim=row.embedding_dim,
        preprocessing=dict(row.preprocessing),
        parent_id=row.parent_id,
        is_current=row.is_current,
    )


class Store:
    def __init__(self, settings: Settings, create: bool = True) -> None:
        self.settings = settings
        self.url = settings.db_url
        self.data_dir = settings.data_dir
        self.chips = ChipStore(settings.data_dir)
        self.shards = EmbeddingShards(settings.data_dir)
        if create:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            migrate(self.url)

    def session(self):  # noqa: ANN201 - context manager of Session
        return session_scope(self.url)

    # ---- subsets and images -------------------------------------------------------------

    @staticmethod
    def _subset(session: Session, name: str) -> Subset:
        subset = session.scalar(select(Subset).where(Subset.name == name))
        if subset is None:
            subset = Subset(name=name)
            session.add(subset)
            session.flush()
        return subset

    def unchanged_paths(self, subset: str, hashes: dict[str, str]) -> set[str]:
        """Paths already recorded in `subset` with the same content hash (nothing to redo)."""
        with self.session() as session:
            rows = session.execute(
                select(Image.path, Image.content_hash)
                .join(Subset, Subset.id == Image.subset_id)
                .where(Subset.name == subset, Image.path.in_(list(hashes)))
            ).all()
        return {path for path, content_hash in rows if content_hash is not None and hashes[path] == content_hash}

    def write_mine_shard(self, subset: str, model: ModelInfo, records: Sequence) -> ShardWriteSummary:
        """Store one shard of `pipeline.mining.PhotoRecord`s in one transaction.

        Idempotent: a photo already stored with the same content hash is left alone (so a
        re-run, or a concurrent run that got there first, adds nothing); a changed photo
        replaces its earlier faces. Chips are written before the transaction (content-addressed,
        so a crash leaves at most unreferenced files).
        """
        chip_paths = [[self.chips.put(face.chip) for face in record.faces] for record in records]
        summary = ShardWriteSummary()
        new_face_ids: list[int] = []
        new_vectors: list[np.ndarray] = []
        with self.session() as session:
            subset_row = self._subset(session, subset)
            for record, chips in zip(records, chip_paths):
                image = session.scalar(
                    select(Image).where(Image.subset_id == subset_row.id, Image.path == record.path)
                )
                if image is not None and image.content_hash is not None and image.content_hash == record.content_hash:
                    summary.photos_unchanged += 1
                    continue
                if image is None:
                    image = Image(subset_id=subset_row.id, path=record.path)
                    session.add(image)
                else:
                    session.execute(delete(Face).where(Face.image_id == image.id))
                image.content_hash = record.content_hash
                image.perceptual_hash = record.perceptual_hash
                image.size_bytes = record.size_bytes
                image.width, image.height = record.width, record.height
                image.status, image.reason = record.status, record.reason
                session.flush()
                if record.status == "skipped":
                    summary.photos_skipped += 1
                elif record.status == "failed":
                    summary.photos_failed += 1
                else:
                    summary.photos_new += 1
                for index, (face, chip_path) in enumerate(zip(record.faces, chips)):
                    row = self._face_row(image.id, index, face, chip_path, model)
                    session.add(row)
                    session.flush()
                    new_face_ids.append(row.id)
                    new_vectors.append(face.embedding)
                    summary.faces_found += 1
                    summary.faces_passed += int(face.quality.passed)
            if new_face_ids:
                self._add_shard(session, model, np.asarray(new_face_ids), np.stack(new_vectors))
        return summary

    @staticmethod
    def _face_row(image_id: int, index: int, face, chip_path: str, model: ModelInfo) -> Face:  # noqa: ANN001
        detection, quality = face.detection, face.quality
        metrics = quality.metrics
        x1, y1, x2, y2 = (float(v) for v in detection.box)
        return Face(
            image_id=image_id,
            face_index=index,
            x1=x1,
            y1=y1,
            x2=x2,
            y2=y2,
            landmarks=[float(v) for v in np.asarray(detection.landmarks).ravel()],
            det_score=float(detection.score),
            eye_distance=float(metrics.eye_distance),
            sharpness=float(metrics.sharpness),
            yaw=float(metrics.yaw),
            pitch=float(metrics.pitch),
            brightness=float(metrics.brightness),
            contrast=float(metrics.contrast),
            quality=float(quality.score),
            passed=bool(quality.passed),
            fail_reasons=",".join(quality.reasons),
            chip_path=chip_path,
            chip_template=model.preprocessing["template"],
        )

    def _add_shard(self, session: Session, model: ModelInfo, face_ids: np.ndarray, vectors: np.ndarray) -> None:
        relative = self.shards.write(model.weights_hash, face_ids, vectors)
        shard = EmbeddingShard(model_id=model.id, path=relative, count=len(face_ids))
        session.add(shard)
        session.flush()
        session.add_all(
            Embedding(model_id=model.id, face_id=int(face_id), shard_id=shard.id, row=row)
            for row, face_id in enumerate(face_ids)
        )

    def write_embeddings(self, model: ModelInfo, face_ids: np.ndarray, vectors: np.ndarray) -> int:
        """Add embeddings of existing faces for `model`; faces that already have one are skipped."""
        with self.session() as session:
            existing = set(
                session.scalars(
                    select(Embedding.face_id).where(
                        Embedding.model_id == model.id, Embedding.face_id.in_([int(i) for i in face_ids])
                    )
                )
            )
            keep = np.array([int(i) not in existing for i in face_ids], bool)
            if keep.any():
                self._add_shard(session, model, np.asarray(face_ids)[keep], np.asarray(vectors)[keep])
        return int(keep.sum())

    # ---- models ------------------------------------------------------------------------

    def register_model(
        self,
        name: str,
        kind: str,
        weights_path: str | None,
        weights_hash: str,
        embedding_dim: int,
        preprocessing: dict,
        parent_id: int | None = None,
        training_run_id: int | None = None,
    ) -> ModelInfo:
        """Get-or-create by weights hash. The first model ever registered becomes current."""
        with self.session() as session:
            row = session.scalar(select(Model).where(Model.weights_hash == weights_hash))
            if row is None:
                has_current = session.scalar(select(func.count()).where(Model.is_current.is_(True))) > 0
                row = Model(
                    name=name,
                    kind=kind,
                    weights_path=weights_path,
                    weights_hash=weights_hash,
                    embedding_dim=embedding_dim,
                    preprocessing=preprocessing,
                    parent_id=parent_id,
                    training_run_id=training_run_id,
                    is_current=not has_current,
                    status="candidate" if has_current else "current",
                    metrics={},
                )
                session.add(row)
                session.flush()
            return _model_info(row)

    def current_model(self) -> ModelInfo | None:
        with self.session() as session:
            row = session.scalar(select(Model).where(Model.is_current.is_(True)))
            return _model_info(row) if row else None

    def set_current_model(self, model_id: int, reason: str) -> None:
        """Make `model_id` the embedder every later stage uses; the previous one is retired."""
        with self.session() as session:
            for row in session.scalars(select(Model).where(Model.is_current.is_(True))):
                row.is_current, row.status = False, "retired"
            row = session.get_one(Model, model_id)
            row.is_current, row.status, row.gate_reason = True, "current", reason

    def model(self, model_id: int) -> ModelInfo:
        with self.session() as session:
            return _model_info(session.get_one(Model, model_id))

    # ---- embeddings --------------------------------------------------------------------

    def faces_without_embedding(self, model_id: int) -> list[int]:
        with self.session() as session:
            embedded = select(Embedding.face_id).where(Embedding.model_id == model_id)
            return list(session.scalars(select(Face.id).where(Face.id.not_in(embedded)).order_by(Face.id)))

    def load_embeddings(self, model_id: int, face_ids: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(face_ids sorted, vectors) of one model; memory-mapped shards, filtered to `face_ids`."""
        with self.session() as session:
            paths = list(session.scalars(select(EmbeddingShard.path).where(EmbeddingShard.model_id == model_id)))
        wanted = None if face_ids is None else np.fromiter(face_ids, np.int64)
        return self.shards.gather(paths, wanted)

    # ---- reporting ---------------------------------------------------------------------

    def status_counts(self) -> list[dict]:
        """Photo counts per subset, status and failure reason (reason code before ':')."""
        with self.session() as session:
            rows = session.execute(
                select(Subset.name, Image.status, Image.reason, func.count())
                .join(Image, Image.subset_id == Subset.id)
                .group_by(Subset.name, Image.status, Image.reason)
            ).all()
            face_rows = session.execute(
                select(Subset.name, Face.passed, func.count())
                .join(Image, Image.subset_id == Subset.id)
                .join(Face, Face.image_id == Image.id)
                .group_by(Subset.name, Face.passed)
            ).all()
        counts: dict[tuple[str, str, str], int] = {}
        for subset, status, reason, count in rows:
            code = (reason or "").split(":", 1)[0]
            counts[(subset, "photos " + status, code)] = counts.get((subset, "photos " + status, code), 0) + count
        for subset, passed, count in face_rows:
            counts[(subset, "faces " + ("passed" if passed else "failed quality"), "")] = count
        return [
            {"subset": subset, "what": what, "reason": reason, "count": count}
            for (subset, what, reason), count in sorted(counts.items())
        ]
