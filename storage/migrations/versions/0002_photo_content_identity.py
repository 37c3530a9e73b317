"""photo content is a photo's identity; ids are never reused

Photos were keyed by (subset, path): the same content mined into two subsets (or moved) had two
`images` rows, each with its own faces. Now `images` holds one row per content hash and
`photo_paths` records where each copy was seen and in which subset. Existing copies are merged
into the oldest row of their content; every constraint, assignment and decision naming a copy's
face is repointed to the kept face with the same face index, so no decision is lost.

On SQLite every table with a surrogate id is rebuilt with AUTOINCREMENT (PostgreSQL sequences
never reuse ids already).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 15:30:00
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ID_TABLES = (
    "subsets", "faces", "models", "embedding_shards", "identities", "clustering_runs", "decisions",
    "constraints", "dataset_exports", "training_runs", "loop_iterations",
)

images = sa.table(
    "images",
    sa.column("id", sa.Integer),
    sa.column("subset_id", sa.Integer),
    sa.column("path", sa.Text),
    sa.column("content_hash", sa.String),
    sa.column("status", sa.String),
    sa.column("reason", sa.Text),
    sa.column("processed_at", sa.DateTime(timezone=True)),
)
photo_paths = sa.table(
    "photo_paths",
    sa.column("subset_id", sa.Integer),
    sa.column("path", sa.Text),
    sa.column("image_id", sa.Integer),
    sa.column("status", sa.String),
    sa.column("reason", sa.Text),
    sa.column("seen_at", sa.DateTime(timezone=True)),
)
faces = sa.table("faces", sa.column("id", sa.Integer), sa.column("image_id", sa.Integer), sa.column("face_index", sa.Integer))
embeddings = sa.table("embeddings", sa.column("model_id", sa.Integer), sa.column("face_id", sa.Integer))
constraints = sa.table("constraints", sa.column("id", sa.Integer), sa.column("face_a", sa.Integer), sa.column("face_b", sa.Integer))
assignments = sa.table(
    "assignments",
    sa.column("run_id", sa.Integer),
    sa.column("face_id", sa.Integer),
    sa.column("identity_id", sa.Integer),
    sa.column("confidence", sa.Float),
    sa.column("source", sa.String),
    sa.column("duplicate_of", sa.Integer),
    sa.column("outlier", sa.Boolean),
)
decisions = sa.table("decisions", sa.column("id", sa.Integer), sa.column("payload", sa.JSON))


def upgrade() -> None:
    op.create_table(
        "photo_paths",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("subset_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"]),
        sa.ForeignKeyConstraint(["subset_id"], ["subsets.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("subset_id", "path", name="uq_photo_paths_subset_path"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("photo_paths") as batch_op:
        batch_op.create_index(batch_op.f("ix_photo_paths_image_id"), ["image_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_photo_paths_status"), ["status"], unique=False)
        batch_op.create_index(batch_op.f("ix_photo_paths_subset_id"), ["subset_id"], unique=False)

    _carry_over_photos(op.get_bind())

    sqlite = op.get_bind().dialect.name == "sqlite"
    autoincrement = {"sqlite_autoincrement": True}
    # SQLite gets AUTOINCREMENT by rebuilding the table; PostgreSQL alters it in place.
    with op.batch_alter_table("images", recreate="always" if sqlite else "auto", table_kwargs=autoincrement) as batch_op:
        batch_op.drop_index("ix_images_subset_id")
        batch_op.drop_index("ix_images_content_hash")
        batch_op.drop_constraint("uq_images_subset_path", type_="unique")
        batch_op.drop_column("subset_id")
        batch_op.drop_column("path")
        batch_op.alter_column("content_hash", existing_type=sa.String(length=64), nullable=False)
        batch_op.create_index(batch_op.f("ix_images_content_hash"), ["content_hash"], unique=True)
    if sqlite:
        for table in ID_TABLES:
            with op.batch_alter_table(table, recreate="always", table_kwargs=autoincrement):
                pass


def _carry_over_photos(bind: sa.Connection) -> None:
    """One `photo_paths` row per old image row; copies of one content merged into its oldest row."""
    kept: dict[str, int] = {}
    renamed: dict[int, int] = {}
    for row in bind.execute(sa.select(images).order_by(images.c.id)).mappings().all():
        content = row["content_hash"]
        if content is None and bind.scalar(sa.select(sa.func.count()).where(faces.c.image_id == row["id"])):
            # Never happens (faces come from decoded, hence hashed, photos); keep them all the same.
            content = f"unhashed-{row['id']}"
            bind.execute(images.update().where(images.c.id == row["id"]).values(content_hash=content))
        image_id = None if content is None else kept.setdefault(content, row["id"])
        bind.execute(
            photo_paths.insert().values(
                subset_id=row["subset_id"],
                path=row["path"],
                image_id=image_id,
                status=row["status"],
                reason=row["reason"],
                seen_at=row["processed_at"],
            )
        )
        if image_id is None:
            bind.execute(images.delete().where(images.c.id == row["id"]))
        elif image_id != row["id"]:
            renamed |= _merge_copy(bind, copy_id=row["id"], kept_id=image_id)
    if renamed:
        _repoint_decision_payloads(bind, renamed)


def _merge_copy(bind: sa.Connection, copy_id: int, kept_id: int) -> dict[int, int]:
    """Fold image `copy_id` into `kept_id`; returns {copy's face: kept face} for faces merged."""
    kept_faces = dict(bind.execute(sa.select(faces.c.face_index, faces.c.id).where(faces.c.image_id == kept_id)).all())
    renamed: dict[int, int] = {}
    for face_id, face_index in bind.execute(sa.select(faces.c.id, faces.c.face_index).where(faces.c.image_id == copy_id)).all():
        if face_index in kept_faces:
            renamed[face_id] = kept_faces[face_index]
        else:  # a face only the copy has (detected under other settings): it moves over whole
            bind.execute(faces.update().where(faces.c.id == face_id).values(image_id=kept_id))
    for old, new in renamed.items():
        _repoint_face(bind, old, new)
    if renamed:
        bind.execute(faces.delete().where(faces.c.id.in_(list(renamed))))
    bind.execute(images.delete().where(images.c.id == copy_id))
    return renamed


def _repoint_face(bind: sa.Connection, old: int, new: int) -> None:
    """Everything naming face `old` names `new` instead (foreign keys are off: no cascades here)."""
    bind.execute(constraints.update().where(constraints.c.face_a == old).values(face_a=new))
    bind.execute(constraints.update().where(constraints.c.face_b == old).values(face_b=new))
    bind.execute(assignments.update().where(assignments.c.duplicate_of == old).values(duplicate_of=new))
    new_models = set(bind.scalars(sa.select(embeddings.c.model_id).where(embeddings.c.face_id == new)))
    for model_id in bind.scalars(sa.select(embeddings.c.model_id).where(embeddings.c.face_id == old)).all():
        rows = embeddings.c.face_id == old, embeddings.c.model_id == model_id
        if model_id in new_models:
            bind.execute(embeddings.delete().where(*rows))
        else:
            bind.execute(embeddings.update().where(*rows).values(face_id=new))
    kept_runs = {
        run_id: source
        for run_id, source in bind.execute(sa.select(assignments.c.run_id, assignments.c.source).where(assignments.c.face_id == new))
    }
    for row in bind.execute(sa.select(assignments).where(assignments.c.face_id == old)).mappings().all():
        copy = (assignments.c.run_id == row["run_id"]) & (assignments.c.face_id == old)
        if row["run_id"] not in kept_runs:
            bind.execute(assignments.update().where(copy).values(face_id=new))
            continue
        if row["source"] == "decision" and kept_runs[row["run_id"]] != "decision":
            # A person's decision on the copy outranks the automatic assignment of the kept face.
            values = {name: row[name] for name in ("identity_id", "confidence", "source", "outlier")}
            bind.execute(
                assignments.update()
                .where(assignments.c.run_id == row["run_id"], assignments.c.face_id == new)
                .values(**values)
            )
        bind.execute(assignments.delete().where(copy))


def _repoint_decision_payloads(bind: sa.Connection, renamed: dict[int, int]) -> None:
    """Decision payloads name faces in `faces` and in `before.assignments` rows ([face, ...])."""
    for decision_id, payload in bind.execute(sa.select(decisions.c.id, decisions.c.payload)).all():
        faces_named = payload.get("faces", [])
        before = payload.get("before", {})
        rows = before.get("assignments", [])
        named = (set(faces_named) | {row[0] for row in rows}) & set(renamed)
        if not named:
            continue
        payload = dict(payload, faces=sorted({renamed.get(face, face) for face in faces_named}))
        if rows:
            payload["before"] = dict(before, assignments=[[renamed.get(row[0], row[0]), *row[1:]] for row in rows])
        payload["merged_faces"] = payload.get("merged_faces", {}) | {str(old): renamed[old] for old in sorted(named)}
        bind.execute(decisions.update().where(decisions.c.id == decision_id).values(payload=payload))


def downgrade() -> None:
    raise NotImplementedError("0002 is one-way: merged copies of a photo cannot be split back into per-path rows")
