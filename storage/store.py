"""Repository: every read and write of facemine's metadata goes through `Store`."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel
from sqlalchemy import delete, distinct, func, or_, select
from sqlalchemy.orm import Session

from pipeline.errors import FacemineError
from storage.dataroot import open_data_root
from storage.db import in_chunks, migrate, session_scope
from storage.embeddings import EmbeddingShards
from storage.files import ChipStore
from storage.schema import (
    ORPHANED,
    Constraint,
    Decision,
    Embedding,
    EmbeddingShard,
    Face,
    Image,
    Model,
    PhotoPath,
    Subset,
    utcnow,
)
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
    """What storing shards changed; faces count only those of new contents.

    photos_linked: paths whose content was already stored (a copy in another folder or subset,
    a moved or renamed photo): recorded as a membership, nothing mined again.
    """

    photos_new: int = 0
    photos_unchanged: int = 0
    photos_linked: int = 0
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
        self.data_dir = settings.data_dir  # this machine's: the SQLite file, logs, Prefect's home
        self.root = open_data_root(settings)  # everyone's: chips, embedding shards, exports
        self.chips = ChipStore(self.root)
        self.shards = EmbeddingShards(self.root)
        if create:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            self.root.prepare()
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

    def known_contents(self, hashes: Mapping[str, str]) -> dict[str, str]:
        """The paths among `hashes` (path -> content hash) whose content is stored already."""
        by_hash: dict[str, list[str]] = {}
        for path, content_hash in hashes.items():
            by_hash.setdefault(content_hash, []).append(path)
        known: dict[str, str] = {}
        with self.session() as session:
            for chunk in in_chunks(sorted(by_hash)):
                for content_hash in session.scalars(select(Image.content_hash).where(Image.content_hash.in_(chunk))):
                    known.update((path, content_hash) for path in by_hash[content_hash])
        return known

    def write_mine_shard(
        self, subset: str, model: ModelInfo, records: Sequence, known: Mapping[str, str] | None = None
    ) -> ShardWriteSummary:
        """Store one shard of `pipeline.mining.PhotoRecord`s, plus the `known` paths (path -> content
        hash of a stored content, not mined again), in one transaction.

        A content is stored once: a path whose content is already stored only gets its membership
        row (re-runs, copies, moves and other subsets add no faces). A path whose bytes changed
        points to its new content; the old content's faces go once no path refers to it. A record
        without a content hash (unreadable, unhashable) is a membership with its status and reason.
        Chips are written before the transaction (content-addressed, so a crash leaves at most
        unreferenced files).
        """
        known = dict(known or {})
        # (path, record or None when known, content hash, chip paths)
        photos = [
            (record.path, record, record.content_hash, [self.chips.put(face.chip) for face in record.faces])
            for record in records
        ] + [(path, None, content_hash, []) for path, content_hash in known.items()]
        summary = ShardWriteSummary()
        new_face_ids: list[int] = []
        new_vectors: list[np.ndarray] = []
        with self.session() as session:
            subset_row = self._subset(session, subset)
            seen = {
                row.path: row
                for chunk in in_chunks([photo[0] for photo in photos])
                for row in session.scalars(
                    select(PhotoPath).where(PhotoPath.subset_id == subset_row.id, PhotoPath.path.in_(chunk))
                )
            }
            images = {
                row.content_hash: row
                for chunk in in_chunks(sorted({photo[2] for photo in photos if photo[2]}))
                for row in session.scalars(select(Image).where(Image.content_hash.in_(chunk)))
            }
            replaced: set[int] = set()
            for path, record, content_hash, chips in photos:
                image = images.get(content_hash) if content_hash else None
                membership = seen.get(path)
                if membership is not None and image is not None and membership.image_id == image.id:
                    summary.photos_unchanged += 1
                    continue
                if image is not None:
                    summary.photos_linked += 1
                    status, reason = image.status, image.reason
                elif record is None:
                    # Its content was removed (another run dropped a subset) after this run looked it up.
                    summary.photos_failed += 1
                    status, reason = "failed", "retry: its content was removed while this run mined it"
                else:
                    status, reason = record.status, record.reason
                    self._count(summary, status)
                    if content_hash is not None:
                        image = images[content_hash] = self._new_image(session, record)
                        for index, (face, chip_path) in enumerate(zip(record.faces, chips)):
                            row = self._face_row(image.id, index, face, chip_path, model)
                            session.add(row)
                            session.flush()
                            new_face_ids.append(row.id)
                            new_vectors.append(face.embedding)
                            summary.faces_found += 1
                            summary.faces_passed += int(face.quality.passed)
                if membership is None:
                    membership = PhotoPath(subset_id=subset_row.id, path=path)
                    session.add(membership)
                    seen[path] = membership
                elif membership.image_id is not None:
                    replaced.add(membership.image_id)
                membership.image_id = image.id if image is not None else None
                membership.status, membership.reason, membership.seen_at = status, reason, utcnow()
            session.flush()
            self._drop_unreferenced(session, replaced, "its photo changed")
            if new_face_ids:
                self._add_shard(session, model, np.asarray(new_face_ids), np.stack(new_vectors))
        return summary

    @staticmethod
    def _count(summary: ShardWriteSummary, status: str) -> None:
        if status == "skipped":
            summary.photos_skipped += 1
        elif status == "failed":
            summary.photos_failed += 1
        else:
            summary.photos_new += 1

    @staticmethod
    def _new_image(session: Session, record) -> Image:  # noqa: ANN001 - pipeline.mining.PhotoRecord
        image = Image(
            content_hash=record.content_hash,
            perceptual_hash=record.perceptual_hash,
            size_bytes=record.size_bytes,
            width=record.width,
            height=record.height,
            status=record.status,
            reason=record.reason,
        )
        session.add(image)
        session.flush()
        return image

    def _drop_unreferenced(self, session: Session, image_ids: Iterable[int], why: str) -> int:
        """Delete the contents among `image_ids` that no path refers to any more, with their faces
        (their embeddings, assignments and constraints go by cascade). Constraints about those faces
        are copied into one `orphaned` decision, so the log keeps what people had decided."""
        candidates = sorted(set(image_ids))
        if not candidates:
            return 0
        referenced = set(
            session.scalars(select(PhotoPath.image_id).where(PhotoPath.image_id.in_(candidates)).distinct())
        )
        gone = [image_id for image_id in candidates if image_id not in referenced]
        if not gone:
            return 0
        face_ids = list(session.scalars(select(Face.id).where(Face.image_id.in_(gone)).order_by(Face.id)))
        orphaned = []
        for chunk in in_chunks(face_ids):
            orphaned += session.execute(
                select(Constraint).where(or_(Constraint.face_a.in_(chunk), Constraint.face_b.in_(chunk)))
            ).scalars().all()
        if orphaned:
            session.add(
                Decision(
                    who="facemine",
                    action=ORPHANED,
                    why=why,
                    payload={
                        "summary": f"{len(face_ids)} faces removed ({why}); {len(orphaned)} constraints went with them",
                        "orphaned_faces": face_ids,
                        "constraints": [
                            {"id": c.id, "decision_id": c.decision_id, "kind": c.kind, "face_a": c.face_a,
                             "face_b": c.face_b, "identity_id": c.identity_id, "active": c.active}
                            for c in sorted(orphaned, key=lambda c: c.id)
                        ],
                        "decisions": sorted({c.decision_id for c in orphaned}),
                    },
                )
            )
        for chunk in in_chunks(gone):
            session.execute(delete(Image).where(Image.id.in_(chunk)))
        return len(face_ids)

    # ---- subsets -----------------------------------------------------------------------

    def subsets(self) -> list[dict]:
        """Per subset: paths recorded, photos with a content, distinct faces; by name."""
        with self.session() as session:
            rows = session.execute(
                select(
                    Subset.name,
                    func.count(distinct(PhotoPath.id)),
                    func.count(distinct(PhotoPath.image_id)),
                    func.count(distinct(Face.id)),
                )
                .outerjoin(PhotoPath, PhotoPath.subset_id == Subset.id)
                .outerjoin(Face, Face.image_id == PhotoPath.image_id)
                .group_by(Subset.name)
                .order_by(Subset.name)
            ).all()
        return [{"subset": name, "paths": paths, "photos": photos, "faces": faces} for name, paths, photos, faces in rows]

    def remove_subset(self, name: str) -> dict:
        """Remove a subset's memberships; photos no other path refers to go with their faces."""
        with self.session() as session:
            subset = session.scalar(select(Subset).where(Subset.name == name))
            if subset is None:
                raise FacemineError(f"no subset named {name!r}")
            image_ids = list(
                session.scalars(select(PhotoPath.image_id).where(PhotoPath.subset_id == subset.id).distinct())
            )
            paths = session.execute(delete(PhotoPath).where(PhotoPath.subset_id == subset.id)).rowcount
            faces = self._drop_unreferenced(session, [i for i in image_ids if i is not None], f"subset {name!r} removed")
            session.delete(subset)
        return {"subset": name, "paths": paths, "faces_removed": faces}

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

    def shared_weights(self, weights_path: str, weights_hash: str) -> str:
        """Where every machine loads trained weights from: a folder data root holds them already
        (`Settings.models_dir`); on object storage the file is put under `models/<hash>.pt` (one
        PUT; its name is its content, so it is never rewritten differently) and its URL returned."""
        if self.root.is_local:
            return weights_path
        key = f"models/{weights_hash}{Path(weights_path).suffix}"
        if not self.root.exists(key):
            self.root.write_bytes(key, Path(weights_path).read_bytes())
        return self.root.location(key)

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
        """(face_ids sorted, vectors) of one model, optionally only `face_ids`; each vector read at
        the (shard, row) the index names (shards are memory-mapped; stale copies are ignored)."""
        query = select(Embedding.face_id, Embedding.shard_id, Embedding.row).where(Embedding.model_id == model_id)
        with self.session() as session:
            shard_paths = dict(
                session.execute(select(EmbeddingShard.id, EmbeddingShard.path).where(EmbeddingShard.model_id == model_id)).all()
            )
            if face_ids is None:
                rows = session.execute(query).all()
            else:
                wanted = sorted({int(face_id) for face_id in face_ids})
                rows = [row for chunk in in_chunks(wanted) for row in session.execute(query.where(Embedding.face_id.in_(chunk)))]
        index = np.array(rows, np.int64).reshape(-1, 3)  # face, shard, row
        index = index[np.argsort(index[:, 0], kind="stable")]
        shard_ids = sorted(shard_paths)
        shard_of = np.searchsorted(shard_ids, index[:, 1])
        vectors = self.shards.gather(index[:, 0], shard_of, index[:, 2], [shard_paths[i] for i in shard_ids])
        return index[:, 0], vectors

    # ---- reporting ---------------------------------------------------------------------

    def status_counts(self) -> list[dict]:
        """Photo counts per subset, status and failure reason (reason code before ':'), from the
        subset's paths; faces once per subset however many of its paths hold their photo."""
        with self.session() as session:
            rows = session.execute(
                select(Subset.name, PhotoPath.status, PhotoPath.reason, func.count())
                .join(PhotoPath, PhotoPath.subset_id == Subset.id)
                .group_by(Subset.name, PhotoPath.status, PhotoPath.reason)
            ).all()
            face_rows = session.execute(
                select(Subset.name, Face.passed, func.count(distinct(Face.id)))
                .join(PhotoPath, PhotoPath.subset_id == Subset.id)
                .join(Face, Face.image_id == PhotoPath.image_id)
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
