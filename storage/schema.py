"""SQL schema of facemine (SQLAlchemy 2 ORM). Changes go through Alembic migrations.

Embeddings are not stored in rows here: `embeddings` is only the face-id index into the
memory-mapped shard files of `storage.embeddings`.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Ids are never reused: shard files, exports and the decision log name rows by id, so a deleted
# row's id must not come back for another row (SQLite reuses the newest deleted rowid without
# AUTOINCREMENT; PostgreSQL sequences never reuse).
NEVER_REUSE_IDS = {"sqlite_autoincrement": True}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Subset(Base):
    """A named group of sources: an album, a crawl batch, a camera."""

    __tablename__ = "subsets"
    __table_args__ = NEVER_REUSE_IDS
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Image(Base):
    """One photo content, identified by its sha256: its faces, chips and embeddings exist once,
    however many paths and subsets it was seen at (`PhotoPath`)."""

    __tablename__ = "images"
    __table_args__ = NEVER_REUSE_IDS
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    # 64-bit perceptual hash (hex) for near-duplicate photos.
    perceptual_hash: Mapped[str | None] = mapped_column(String(16))
    size_bytes: Mapped[int | None] = mapped_column(Integer)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    # ok | skipped | failed
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    processed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class PhotoPath(Base):
    """Where a copy of a photo was seen, and in which subset: a subset's membership.

    `image_id` is null for a file that could not be read or hashed (its status and reason say why).
    """

    __tablename__ = "photo_paths"
    __table_args__ = (UniqueConstraint("subset_id", "path", name="uq_photo_paths_subset_path"), NEVER_REUSE_IDS)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subset_id: Mapped[int] = mapped_column(ForeignKey("subsets.id"), index=True)
    # Absolute path as ingested.
    path: Mapped[str] = mapped_column(Text)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id"), index=True)
    # ok | skipped | failed: the content's status, or why this file has no content
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Face(Base):
    __tablename__ = "faces"
    __table_args__ = (UniqueConstraint("image_id", "face_index", name="uq_faces_image_index"), NEVER_REUSE_IDS)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    face_index: Mapped[int] = mapped_column(Integer)
    x1: Mapped[float] = mapped_column(Float)
    y1: Mapped[float] = mapped_column(Float)
    x2: Mapped[float] = mapped_column(Float)
    y2: Mapped[float] = mapped_column(Float)
    # Five landmarks in original pixels: left eye, right eye, nose, mouth left, mouth right
    # (left/right as seen in the image), flattened x0, y0, x1, y1, ...
    landmarks: Mapped[list] = mapped_column(JSON)
    det_score: Mapped[float] = mapped_column(Float)
    eye_distance: Mapped[float] = mapped_column(Float)
    sharpness: Mapped[float] = mapped_column(Float)
    yaw: Mapped[float] = mapped_column(Float)
    pitch: Mapped[float] = mapped_column(Float)
    brightness: Mapped[float] = mapped_column(Float)
    contrast: Mapped[float] = mapped_column(Float)
    quality: Mapped[float] = mapped_column(Float)
    passed: Mapped[bool] = mapped_column(Boolean, index=True)
    # Every failing rule, comma-separated; empty when passed.
    fail_reasons: Mapped[str] = mapped_column(Text, default="")
    # Relative to the data folder; content-addressed.
    chip_path: Mapped[str] = mapped_column(Text)
    chip_template: Mapped[str] = mapped_column(String(64))


class Model(Base):
    """An embedding model, identified by the hash of its weights."""

    __tablename__ = "models"
    __table_args__ = NEVER_REUSE_IDS
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    # Registry name of the embedder family (sface, facenet-vggface2, checkpoint, ...).
    kind: Mapped[str] = mapped_column(String(64))
    weights_path: Mapped[str | None] = mapped_column(Text)
    weights_hash: Mapped[str] = mapped_column(String(64), unique=True)
    embedding_dim: Mapped[int] = mapped_column(Integer)
    preprocessing: Mapped[dict] = mapped_column(JSON)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"))
    training_run_id: Mapped[int | None] = mapped_column(Integer)
    is_current: Mapped[bool] = mapped_column(Boolean, default=False)
    # candidate | current | retired | rejected
    status: Mapped[str] = mapped_column(String(16), default="candidate")
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    gate_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class EmbeddingShard(Base):
    __tablename__ = "embedding_shards"
    __table_args__ = NEVER_REUSE_IDS
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    # Relative to the data folder.
    path: Mapped[str] = mapped_column(Text, unique=True)
    count: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Embedding(Base):
    """Face-id index: where the vector of (face, model) lives in the shard files."""

    __tablename__ = "embeddings"
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), primary_key=True)
    face_id: Mapped[int] = mapped_column(ForeignKey("faces.id", ondelete="CASCADE"), primary_key=True)
    shard_id: Mapped[int] = mapped_column(ForeignKey("embedding_shards.id"))
    row: Mapped[int] = mapped_column(Integer)


class Identity(Base):
    __tablename__ = "identities"
    __table_args__ = NEVER_REUSE_IDS
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str | None] = mapped_column(String(255), index=True)
    # A locked identity keeps exactly its reviewed members across runs.
    locked: Mapped[bool] = mapped_column(Boolean, default=False)
    # active | merged | retired
    status: Mapped[str] = mapped_column(String(16), default="active")
    merged_into: Mapped[int | None] = mapped_column(ForeignKey("identities.id"))
    accepted: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ClusteringRun(Base):
    __tablename__ = "clustering_runs"
    __table_args__ = NEVER_REUSE_IDS
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    method: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict] = mapped_column(JSON)
    # Subset names included (empty: all).
    subsets: Mapped[list] = mapped_column(JSON, default=list)
    stats: Mapped[dict] = mapped_column(JSON, default=dict)
    # running | done | failed
    status: Mapped[str] = mapped_column(String(16), default="running")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (Index("ix_assignments_identity", "run_id", "identity_id"),)
    run_id: Mapped[int] = mapped_column(ForeignKey("clustering_runs.id", ondelete="CASCADE"), primary_key=True)
    face_id: Mapped[int] = mapped_column(ForeignKey("faces.id", ondelete="CASCADE"), primary_key=True)
    # Null: unassigned.
    identity_id: Mapped[int | None] = mapped_column(ForeignKey("identities.id"))
    confidence: Mapped[float] = mapped_column(Float)
    # cluster | attached | decision | unassigned
    source: Mapped[str] = mapped_column(String(16))
    duplicate_of: Mapped[int | None] = mapped_column(Integer)
    outlier: Mapped[bool] = mapped_column(Boolean, default=False)


# Decision-log actions that record what facemine itself did (faces removed because no path refers
# to their photo any more; `forget`; `doctor --fix`): an audit trail, never undone.
ORPHANED, FORGET, DOCTOR = "orphaned", "forget", "doctor"
AUDIT_ACTIONS = (ORPHANED, FORGET, DOCTOR)


class Decision(Base):
    """Append-only log of human review decisions, and of facemine's own `AUDIT_ACTIONS`."""

    __tablename__ = "decisions"
    __table_args__ = NEVER_REUSE_IDS
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    who: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict] = mapped_column(JSON)
    why: Mapped[str | None] = mapped_column(Text)
    # Set when a later `undo` decision reverts this one.
    undone_by: Mapped[int | None] = mapped_column(ForeignKey("decisions.id"))


class Constraint(Base):
    """What decisions imply, honoured by every clustering run.

    kind: must_link (face_a, face_b) | cannot_link (face_a, face_b)
          | member (face_a belongs to identity_id) | reject (face_a never in identity_id)
          | not_a_face (face_a)
    """

    __tablename__ = "constraints"
    __table_args__ = NEVER_REUSE_IDS
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    decision_id: Mapped[int] = mapped_column(ForeignKey("decisions.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)
    # A face whose photo changed is a different face: constraints about it go with it once no
    # path refers to the old photo (an `orphaned` decision-log entry keeps a copy of them).
    face_a: Mapped[int | None] = mapped_column(ForeignKey("faces.id", ondelete="CASCADE"))
    face_b: Mapped[int | None] = mapped_column(ForeignKey("faces.id", ondelete="CASCADE"))
    identity_id: Mapped[int | None] = mapped_column(ForeignKey("identities.id"))
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class DatasetExport(Base):
    __tablename__ = "dataset_exports"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_exports_name_version"), NEVER_REUSE_IDS)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    version: Mapped[int] = mapped_column(Integer)
    run_id: Mapped[int] = mapped_column(ForeignKey("clustering_runs.id"))
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    path: Mapped[str] = mapped_column(Text)
    params: Mapped[dict] = mapped_column(JSON)
    card: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TrainingRun(Base):
    __tablename__ = "training_runs"
    __table_args__ = NEVER_REUSE_IDS
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    parent_model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"))
    export_id: Mapped[int | None] = mapped_column(ForeignKey("dataset_exports.id"))
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"))
    params: Mapped[dict] = mapped_column(JSON)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    # Per-epoch metrics, in order.
    history: Mapped[list] = mapped_column(JSON, default=list)
    checkpoint_dir: Mapped[str | None] = mapped_column(Text)
    # running | done | failed
    status: Mapped[str] = mapped_column(String(16), default="running")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class LoopIteration(Base):
    __tablename__ = "loop_iterations"
    __table_args__ = NEVER_REUSE_IDS
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    loop_name: Mapped[str] = mapped_column(String(255), index=True)
    iteration: Mapped[int] = mapped_column(Integer)
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("clustering_runs.id"))
    export_id: Mapped[int | None] = mapped_column(ForeignKey("dataset_exports.id"))
    training_run_id: Mapped[int | None] = mapped_column(ForeignKey("training_runs.id"))
    promoted: Mapped[bool] = mapped_column(Boolean, default=False)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
