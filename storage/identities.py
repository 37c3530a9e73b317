"""Identities, clustering runs and assignments: the persisted side of clustering and review.

The newest finished clustering run is the *current labelling*; review decisions edit its
assignments in place (source="decision") and record constraints that later runs obey.
"""
from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone

import pandas as pd
from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import aliased

from pipeline.errors import FacemineError
from storage.schema import Assignment, ClusteringRun, Face, Identity, Image, PhotoPath, Subset
from storage.store import Store


def face_table(store: Store, subsets: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per face with what clustering, dedup and export need, ordered by face id.

    A photo seen at several paths or in several subsets is one content with one set of faces, so
    each face is one row: `subset` is its photo's first membership (oldest path row) among
    `subsets` (per-subset clustering puts it there, and the cross-subset merge sees it once);
    `source_path` is the newest path its photo was seen at (the likeliest still to exist).
    """
    members = select(
        PhotoPath.image_id,
        func.min(PhotoPath.id).label("first_path"),
        func.max(PhotoPath.id).label("last_path"),
    ).where(PhotoPath.image_id.is_not(None))
    subset_list = list(subsets) if subsets else []
    if subset_list:
        members = members.join(Subset, Subset.id == PhotoPath.subset_id).where(Subset.name.in_(subset_list))
    members = members.group_by(PhotoPath.image_id).subquery()
    first, last = aliased(PhotoPath), aliased(PhotoPath)
    query = (
        select(
            Face.id.label("face_id"),
            Face.image_id,
            Subset.name.label("subset"),
            last.path.label("source_path"),
            Image.content_hash,
            Image.perceptual_hash,
            Face.face_index,
            Face.x1,
            Face.y1,
            Face.x2,
            Face.y2,
            Face.det_score,
            Face.quality,
            Face.passed,
            Face.fail_reasons,
            Face.chip_path,
            Face.chip_template,
            Face.landmarks,
        )
        .join(Image, Image.id == Face.image_id)
        .join(members, members.c.image_id == Image.id)
        .join(first, first.id == members.c.first_path)
        .join(Subset, Subset.id == first.subset_id)
        .join(last, last.id == members.c.last_path)
        .order_by(Face.id)
    )
    with store.session() as session:
        frame = pd.DataFrame(session.execute(query).mappings().all())
    if frame.empty:
        return pd.DataFrame(
            columns=[c.key for c in query.selected_columns]  # keep the schema for empty stores
        )
    frame["face_area"] = (frame.x2 - frame.x1) * (frame.y2 - frame.y1)
    return frame


def latest_run_id(store: Store) -> int | None:
    with store.session() as session:
        return session.scalar(
            select(ClusteringRun.id).where(ClusteringRun.status == "done").order_by(ClusteringRun.id.desc()).limit(1)
        )


def run_info(store: Store, run_id: int) -> dict:
    with store.session() as session:
        run = session.get(ClusteringRun, run_id)
        if run is None:
            raise FacemineError(f"no clustering run {run_id}")
        return {
            "id": run.id,
            "model_id": run.model_id,
            "method": run.method,
            "params": dict(run.params),
            "subsets": list(run.subsets),
            "stats": dict(run.stats),
            "status": run.status,
            "created_at": run.created_at,
        }


def assignments(store: Store, run_id: int) -> pd.DataFrame:
    """face_id, identity_id (NaN when unassigned), confidence, source, duplicate_of, outlier."""
    with store.session() as session:
        rows = session.execute(
            select(
                Assignment.face_id,
                Assignment.identity_id,
                Assignment.confidence,
                Assignment.source,
                Assignment.duplicate_of,
                Assignment.outlier,
            )
            .where(Assignment.run_id == run_id)
            .order_by(Assignment.face_id)
        ).mappings().all()
    return pd.DataFrame(rows, columns=["face_id", "identity_id", "confidence", "source", "duplicate_of", "outlier"])


def create_run(store: Store, model_id: int, method: str, params: dict, subsets: list[str]) -> int:
    with store.session() as session:
        run = ClusteringRun(model_id=model_id, method=method, params=params, subsets=subsets, status="running")
        session.add(run)
        session.flush()
        return run.id


def new_identities(store: Store, count: int) -> list[int]:
    with store.session() as session:
        rows = [Identity() for _ in range(count)]
        session.add_all(rows)
        session.flush()
        return [row.id for row in rows]


def finish_run(store: Store, run_id: int, table: pd.DataFrame, stats: dict) -> None:
    """Store a run's assignments and mark it done, in one transaction (all or nothing)."""
    records = [
        {
            "run_id": run_id,
            "face_id": int(row.face_id),
            "identity_id": None if pd.isna(row.identity_id) else int(row.identity_id),
            "confidence": float(row.confidence),
            "source": str(row.source),
            "duplicate_of": None if pd.isna(row.duplicate_of) else int(row.duplicate_of),
            "outlier": bool(row.outlier),
        }
        for row in table.itertuples(index=False)
    ]
    with store.session() as session:
        if records:
            session.execute(insert(Assignment), records)
        session.execute(
            update(ClusteringRun)
            .where(ClusteringRun.id == run_id)
            .values(status="done", stats=stats, finished_at=datetime.now(timezone.utc))
        )


def fail_run(store: Store, run_id: int, reason: str) -> None:
    with store.session() as session:
        session.execute(
            update(ClusteringRun)
            .where(ClusteringRun.id == run_id)
            .values(status="failed", stats={"error": reason}, finished_at=datetime.now(timezone.utc))
        )


def identity_rows(store: Store, identity_ids: Iterable[int] | None = None) -> pd.DataFrame:
    query = select(
        Identity.id.label("identity_id"),
        Identity.name,
        Identity.locked,
        Identity.status,
        Identity.merged_into,
        Identity.accepted,
    )
    ids = list(identity_ids) if identity_ids is not None else None
    if ids is not None:
        query = query.where(Identity.id.in_(ids))
    with store.session() as session:
        rows = session.execute(query.order_by(Identity.id)).mappings().all()
    return pd.DataFrame(rows, columns=["identity_id", "name", "locked", "status", "merged_into", "accepted"])


def identities_summary(store: Store, run_id: int) -> pd.DataFrame:
    """Per identity of a run: size, name, mean and min confidence, lock/accept flags; largest first."""
    with store.session() as session:
        rows = session.execute(
            select(
                Assignment.identity_id,
                func.count().label("faces"),
                func.avg(Assignment.confidence).label("mean_confidence"),
                func.min(Assignment.confidence).label("min_confidence"),
            )
            .where(Assignment.run_id == run_id, Assignment.identity_id.is_not(None))
            .group_by(Assignment.identity_id)
        ).mappings().all()
    sizes = pd.DataFrame(rows, columns=["identity_id", "faces", "mean_confidence", "min_confidence"])
    if sizes.empty:
        return sizes.assign(name=None, locked=False, accepted=False)
    meta = identity_rows(store, sizes.identity_id.tolist())
    merged = sizes.merge(meta[["identity_id", "name", "locked", "accepted"]], on="identity_id", how="left")
    return merged.sort_values(["faces", "identity_id"], ascending=[False, True]).reset_index(drop=True)


def largest_face_identity(store: Store, run_id: int, paths: list[str]) -> pd.DataFrame:
    """For each photo path: the identity (NaN if none) of its largest face in the run.

    A path counts wherever it was seen (any subset); photos never ingested or without a face
    come back with NaN (scored as singletons).
    """
    found: list[tuple[str, int]] = []
    with store.session() as session:
        for start in range(0, len(paths), 5000):
            found += session.execute(
                select(PhotoPath.path, PhotoPath.image_id)
                .where(PhotoPath.path.in_(paths[start : start + 5000]), PhotoPath.image_id.is_not(None))
                .order_by(PhotoPath.id)
            ).all()
    # The newest record of a path says what it holds now.
    photo_of = pd.DataFrame(found, columns=["source_path", "image_id"]).drop_duplicates("source_path", keep="last")
    faces = face_table(store)
    largest = faces.sort_values(["face_area", "face_id"], ascending=[False, True]).drop_duplicates("image_id")
    assigned = largest.merge(assignments(store, run_id)[["face_id", "identity_id"]], on="face_id", how="left")
    by_path = photo_of.merge(assigned[["image_id", "face_id", "identity_id"]], on="image_id", how="left")
    frame = pd.DataFrame({"source_path": paths})
    return frame.merge(by_path[["source_path", "face_id", "identity_id"]], on="source_path", how="left")
