"""Identities, clustering runs and assignments: the persisted side of clustering and review.

The newest finished clustering run is the *current labelling*; review decisions edit its
assignments in place (source="decision") and record constraints that later runs obey.
"""
from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone

import pandas as pd
from sqlalchemy import func, insert, select, update

from storage.schema import Assignment, ClusteringRun, Face, Identity, Image, Subset
from storage.store import Store


def face_table(store: Store, subsets: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per face with what clustering, dedup and export need, ordered by face id."""
    query = (
        select(
            Face.id.label("face_id"),
            Face.image_id,
            Subset.name.label("subset"),
            Image.path.label("source_path"),
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
        .join(Subset, Subset.id == Image.subset_id)
        .order_by(Face.id)
    )
    subset_list = list(subsets) if subsets else []
    if subset_list:
        query = query.where(Subset.name.in_(subset_list))
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
        run = session.get_one(ClusteringRun, run_id)
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

    Photos never ingested or without a face come back with NaN (scored as singletons).
    """
    faces = face_table(store)
    faces = faces[faces.source_path.isin(paths)]
    largest = faces.sort_values(["face_area", "face_id"], ascending=[False, True]).drop_duplicates("source_path")
    assigned = largest.merge(assignments(store, run_id)[["face_id", "identity_id"]], on="face_id", how="left")
    frame = pd.DataFrame({"source_path": paths})
    return frame.merge(assigned[["source_path", "face_id", "identity_id"]], on="source_path", how="left")
