"""Store upkeep: `doctor` finds (and with `fix` removes) orphans and dangling references;
`forget_faces` erases faces and every trace of them.

Both may run while a `mine` or `cluster` run is going. Runs write chips and embedding shards
BEFORE the transaction that names them (`Store.write_mine_shard`), so a file nothing names yet
may be one a running shard is about to commit: only files older than a grace period are ever
removed as orphans, and a chip a run reuses is claimed again (`ChipStore.put`) so its age restarts.
Files are those of the data root (`storage.dataroot`): a folder, or object storage, where an
object that a crash left before its commit is such an orphan.
The SQL part runs in one transaction, which takes the write lock every shard write takes
(`storage.db`: BEGIN IMMEDIATE on SQLite, an advisory lock on PostgreSQL): no shard commits
between what is read and what is changed.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import delete, insert, or_, select, text, update
from sqlalchemy.orm import Session

from pipeline.errors import FacemineError
from pipeline.ingest import path_from_key, path_key
from storage.dataroot import is_partial_write
from storage.db import get_engine, in_chunks
from storage.embeddings import IDS_SUFFIX, VECTORS_SUFFIX
from storage.exports import remove_faces_from_exports, unfinished_exports
from storage.identities import latest_run_id
from storage.schema import (
    DOCTOR,
    FORGET,
    Assignment,
    Constraint,
    Decision,
    Embedding,
    EmbeddingShard,
    Face,
    Identity,
    Image,
    PhotoPath,
    Subset,
)
from storage.store import Store

# A shard of 1000 photos takes minutes to mine on a CPU between writing its first chip and its
# commit; an hour leaves a wide margin (a run stalled for longer leaves faces `doctor` reports
# as missing their chip, and a re-run of it writes the chip again).
DEFAULT_GRACE_SECONDS = 3600
# Log files of facemine's runs in the data folder (`flows.progress`), which may name photos.
LOGS_DIR = "logs"


# ---- files of the data root ------------------------------------------------------------


def _age_seconds(store: Store, relative: str, now: float) -> float | None:
    """Seconds since `relative` was last written or claimed; None when it is gone."""
    modified = store.root.modified(relative)
    return None if modified is None else now - modified


@dataclass
class _Files:
    chips: set[str] = field(default_factory=set)
    shard_files: dict[str, list[str]] = field(default_factory=dict)  # shard path -> its files
    partial: list[str] = field(default_factory=list)


def _scan(store: Store) -> _Files:
    """Chips, shard files and partial writes (temporary files, unfinished exports) of the data root."""
    found = _Files()
    for prefix in ("chips", "embeddings"):
        for entry in store.root.list(prefix):
            relative = entry.relative
            if is_partial_write(relative):
                found.partial.append(relative)
            elif prefix == "chips" and relative.endswith(".png"):
                found.chips.add(relative)
            elif prefix == "embeddings" and relative.endswith(VECTORS_SUFFIX):
                shard = relative.removesuffix(IDS_SUFFIX) if relative.endswith(IDS_SUFFIX) else relative.removesuffix(VECTORS_SUFFIX)
                found.shard_files.setdefault(shard, []).append(relative)
    found.partial += unfinished_exports(list(store.root.list("exports", with_folders=True)))
    return found


# ---- embedding shards ----------------------------------------------------------------------


@dataclass
class _ShardPlan:
    id: int
    path: str
    model_id: int
    exists: bool
    rows: int = 0
    keep_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # sorted
    keep_faces: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    bad_index: list[tuple[int, int]] = field(default_factory=list)  # (model, face) naming a wrong row
    dropped_named: int = 0  # rows the index names for a dropped face

    @property
    def dropped(self) -> int:
        return self.rows - len(self.keep_rows)


def _plan_shards(store: Store, session: Session, drop_faces: set[int], listed: set[str] = frozenset()) -> list[_ShardPlan]:
    """For every recorded shard: the rows its index names (less `drop_faces`); index rows whose
    shard file is missing or whose row holds another face are dangling. `listed`: shards whose
    files a listing found (asked again for the others: on object storage, one request a file)."""
    index: dict[int, list[tuple[int, int, int]]] = {}
    for model_id, face_id, shard_id, row in session.execute(
        select(Embedding.model_id, Embedding.face_id, Embedding.shard_id, Embedding.row)
    ):
        index.setdefault(shard_id, []).append((model_id, face_id, row))
    plans = []
    for shard_id, path, model_id in session.execute(
        select(EmbeddingShard.id, EmbeddingShard.path, EmbeddingShard.model_id).order_by(EmbeddingShard.id)
    ):
        named = index.get(shard_id, [])
        exists = path in listed or all(store.root.is_file(file) for file in store.shards.files(path))
        try:
            ids = store.shards.ids(path) if exists else None
        except FileNotFoundError:  # removed since the listing
            ids = None
        plan = _ShardPlan(shard_id, path, model_id, exists=ids is not None)
        if ids is None:
            plan.bad_index = [(model, face) for model, face, _ in named]
            plans.append(plan)
            continue
        plan.rows = len(ids)
        keep = []
        for model, face, row in named:
            if row >= len(ids) or ids[row] != face:
                plan.bad_index.append((model, face))
            elif face in drop_faces:
                plan.dropped_named += 1
            else:
                keep.append((row, face))
        keep.sort()
        plan.keep_rows = np.array([row for row, _ in keep], np.int64)
        plan.keep_faces = np.array([face for _, face in keep], np.int64)
        plans.append(plan)
    return plans


def _apply_shard_plans(store: Store, session: Session, plans: list[_ShardPlan]) -> list[str]:
    """Rewrite shards to their kept rows (new files, index repointed), drop empty or missing ones.

    Returns the shard paths whose files the caller removes after the commit: a reader that looked
    up a path just before still finds a whole file until then."""
    retired = []
    for plan in plans:
        if plan.exists and plan.dropped == 0 and not plan.bad_index:
            continue
        session.execute(delete(Embedding).where(Embedding.shard_id == plan.id))
        if not plan.exists or len(plan.keep_rows) == 0:
            session.execute(delete(EmbeddingShard).where(EmbeddingShard.id == plan.id))
        else:
            new_path = store.shards.rewrite_keeping(plan.path, plan.keep_rows)
            session.execute(
                update(EmbeddingShard)
                .where(EmbeddingShard.id == plan.id)
                .values(path=new_path, count=len(plan.keep_rows))
            )
            session.execute(
                insert(Embedding),
                [
                    {"model_id": plan.model_id, "face_id": int(face), "shard_id": plan.id, "row": row}
                    for row, face in enumerate(plan.keep_faces)
                ],
            )
        if plan.exists:
            retired.append(plan.path)
    return retired


# ---- faces ---------------------------------------------------------------------------------


def _delete_faces(session: Session, face_ids: list[int]) -> None:
    """Face rows and every row naming them (index entries, assignments, constraints); links of
    other faces to them (`duplicate_of`) are cleared. Vectors are the shard plans' business."""
    for chunk in in_chunks(face_ids):
        session.execute(update(Assignment).where(Assignment.duplicate_of.in_(chunk)).values(duplicate_of=None))
        session.execute(delete(Assignment).where(Assignment.face_id.in_(chunk)))
        session.execute(delete(Constraint).where(or_(Constraint.face_a.in_(chunk), Constraint.face_b.in_(chunk))))
        session.execute(delete(Embedding).where(Embedding.face_id.in_(chunk)))
        session.execute(delete(Face).where(Face.id.in_(chunk)))


def _audit(session: Session, who: str, action: str, why: str | None, summary: str, counts: dict) -> int:
    """One decision-log line, with counts only (an audit record: undo passes over it)."""
    row = Decision(who=who, action=action, why=why, payload={"summary": summary, "details": counts})
    session.add(row)
    session.flush()
    return row.id


# ---- doctor --------------------------------------------------------------------------------


@dataclass
class DoctorReport:
    """What `doctor` found; every list is sorted. Files younger than the grace period are not
    problems: they are listed in `young_files_kept` and left alone."""

    partial_writes: list[str] = field(default_factory=list)
    orphan_chips: list[str] = field(default_factory=list)
    dead_vectors: dict[str, int] = field(default_factory=dict)  # shard path -> vectors no index row names
    missing_shards: list[str] = field(default_factory=list)  # recorded shards whose files are gone
    dangling_index: list[tuple[int, int]] = field(default_factory=list)  # (model, face): no vector where it says
    faces_without_chip: list[int] = field(default_factory=list)
    unlisted_shard_files: list[str] = field(default_factory=list)
    young_files_kept: list[str] = field(default_factory=list)
    fixed: bool = False

    def problems(self) -> int:
        return (len(self.partial_writes) + len(self.orphan_chips) + sum(self.dead_vectors.values())
                + len(self.missing_shards) + len(self.dangling_index) + len(self.faces_without_chip)
                + len(self.unlisted_shard_files))

    def rows(self) -> list[dict]:
        counts = {
            "partial writes (*.tmp, unfinished exports)": len(self.partial_writes),
            "chip files no face refers to": len(self.orphan_chips),
            "dead vectors in shards": sum(self.dead_vectors.values()),
            "recorded shards whose files are missing": len(self.missing_shards),
            "index rows naming no vector": len(self.dangling_index),
            "faces whose chip file is missing": len(self.faces_without_chip),
            "shard files no shard row names": len(self.unlisted_shard_files),
            "files younger than the grace period (kept)": len(self.young_files_kept),
        }
        done = "kept" if not self.fixed else "removed"
        return [{"what": what, "found": count, "now": (done if "kept" not in what else "kept") if count else ""}
                for what, count in counts.items()]


def doctor(store: Store, fix: bool = False, grace_seconds: float = DEFAULT_GRACE_SECONDS, who: str = DOCTOR) -> DoctorReport:
    """Report orphans and dangling references; with `fix`, remove them (see the module's note on
    running beside other runs). Faces whose chip is gone are removed with their index entries,
    assignments and constraints (one `doctor` line in the decision log says how many)."""
    files = _scan(store)  # before the lock: listing a large store must not stall the runs
    report = DoctorReport()
    with store.session() as session:
        now = time.time()

        def old_enough(relative: str) -> bool:
            age = _age_seconds(store, relative, now)
            if age is not None and age < grace_seconds:
                report.young_files_kept.append(relative)
            return age is not None and age >= grace_seconds

        chip_of_face = dict(session.execute(select(Face.id, Face.chip_path)).tuples().all())
        referenced = set(chip_of_face.values())
        missing_chips = {chip for chip in referenced - files.chips if not store.root.is_file(chip)}
        report.faces_without_chip = sorted(face for face, chip in chip_of_face.items() if chip in missing_chips)
        report.orphan_chips = sorted(chip for chip in files.chips - referenced if old_enough(chip))
        report.partial_writes = sorted(path for path in files.partial if old_enough(path))

        complete = {shard for shard, paths in files.shard_files.items() if len(paths) == 2}
        plans = _plan_shards(store, session, set(report.faces_without_chip), complete)
        recorded = {plan.path for plan in plans}
        report.missing_shards = sorted(plan.path for plan in plans if not plan.exists)
        report.dangling_index = sorted(pair for plan in plans for pair in plan.bad_index)
        for plan in plans:
            # Vectors of faces removed here (chip gone) are counted with the faces, not as dead.
            dead = plan.dropped - plan.dropped_named
            if plan.exists and dead:
                report.dead_vectors[plan.path] = dead
        report.unlisted_shard_files = sorted(
            path
            for shard, paths in files.shard_files.items()
            if shard not in recorded
            for path in paths
            if old_enough(path)
        )
        report.young_files_kept.sort()
        if not fix or report.problems() == 0:
            return report
        _delete_faces(session, report.faces_without_chip)
        retired = _apply_shard_plans(store, session, plans)
        if report.faces_without_chip:
            counts = {"faces_without_chip": len(report.faces_without_chip)}
            _audit(session, who, DOCTOR, None, f"removed {counts['faces_without_chip']} faces whose chip file was missing", counts)
        for relative in report.orphan_chips + report.partial_writes + report.unlisted_shard_files:
            age = _age_seconds(store, relative, time.time())
            if age is not None and age >= grace_seconds:  # not claimed again by a run meanwhile
                store.root.delete(relative)
    # After the commit. Replaced shard files stay one more grace period, claimed: a reader that
    # looked up their path before the commit can still read them; a later doctor removes them.
    for shard in retired:
        for relative in store.shards.files(shard):
            store.root.claim(relative)
    empty_sqlite_log(store)  # old pages of rows deleted before (a forget beside a busy run)
    report.fixed = True
    return report


def _rows_of(store: Store, plan: _ShardPlan, faces: set[int]) -> int:
    """How many rows of a shard hold a vector of one of `faces` (live or dead copies)."""
    if not faces or not plan.exists:
        return 0
    return int(np.isin(store.shards.ids(plan.path), list(faces)).sum())


# ---- forget --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """Faces to forget. `photos` (contents) are forgotten whole, with every path they were seen at;
    `path_rows` are memberships removed as well (a path selected, a subset's files without a
    content); `identity` is blanked and retired; `subset` goes when no path is left in it."""

    description: str  # for the prompt and the audit line; never a path or a name
    face_ids: tuple[int, ...]
    photos: tuple[int, ...] = ()
    path_rows: tuple[int, ...] = ()
    identity: int | None = None
    subset: int | None = None


def select_identity(store: Store, identity_id: int) -> Selection:
    """Faces of an identity in the current labelling, plus faces a review pinned to it."""
    run_id = latest_run_id(store)
    with store.session() as session:
        identity = session.get(Identity, identity_id)
        if identity is None:
            raise FacemineError(f"identity {identity_id} does not exist")
        if identity.status == "merged":
            raise FacemineError(f"identity {identity_id} was merged into identity {identity.merged_into}: forget that one")
        faces = set(
            session.scalars(
                select(Assignment.face_id).where(Assignment.run_id == run_id, Assignment.identity_id == identity_id)
            )
        ) | set(
            session.scalars(
                select(Constraint.face_a).where(
                    Constraint.active.is_(True), Constraint.kind == "member", Constraint.identity_id == identity_id
                )
            )
        )
    return Selection(f"identity {identity_id}", tuple(sorted(faces)), identity=identity_id)


def _select_photos(session: Session, description: str, image_ids: Iterable[int | None], path_rows: Iterable[int] = (),
                   subset: int | None = None) -> Selection:
    photos = sorted({image for image in image_ids if image is not None})
    path_rows = sorted(set(path_rows))
    if not photos and not path_rows:
        raise FacemineError(f"no photo matches {description}")
    faces: list[int] = []
    for chunk in in_chunks(photos):
        faces += session.scalars(select(Face.id).where(Face.image_id.in_(chunk)))
    return Selection(description, tuple(sorted(faces)), tuple(photos), tuple(path_rows), subset=subset)


def select_path(store: Store, path: str) -> Selection:
    """The photo seen at `path` (as given, or resolved), in any subset: its content, every copy."""
    candidates = sorted({path, path_key(path), path_key(Path(path_from_key(path)).resolve())})
    with store.session() as session:
        rows = session.execute(select(PhotoPath.id, PhotoPath.image_id).where(PhotoPath.path.in_(candidates))).all()
        return _select_photos(session, "the given photo path", [image for _, image in rows], [row for row, _ in rows])


def select_content(store: Store, sha256: str) -> Selection:
    with store.session() as session:
        images = session.scalars(select(Image.id).where(Image.content_hash == sha256.strip().lower()))
        return _select_photos(session, "the given content hash", images)


def select_subset(store: Store, name: str) -> Selection:
    """Every photo of a subset, with all its copies (in other subsets too)."""
    with store.session() as session:
        subset_id = session.scalar(select(Subset.id).where(Subset.name == name))
        if subset_id is None:
            raise FacemineError(f"subset {name!r} does not exist")
        rows = session.execute(select(PhotoPath.id, PhotoPath.image_id).where(PhotoPath.subset_id == subset_id)).all()
        return _select_photos(session, f"subset {name!r}", [image for _, image in rows], [row for row, _ in rows], subset_id)


# Payload keys of the decision log that hold face ids: lists of ids, assignment rows
# [face, identity, confidence, source], constraint records {face_a, face_b, ...}.
_FACE_LISTS, _ASSIGNMENT_ROWS, _CONSTRAINT_RECORDS = ("faces", "orphaned_faces"), "assignments", "constraints"


def _without_faces(value, faces: set[int]):  # noqa: ANN001, ANN202 - JSON values
    if isinstance(value, list):
        return [_without_faces(item, faces) for item in value]
    if not isinstance(value, dict):
        return value
    kept = {}
    for key, item in value.items():
        if key in _FACE_LISTS and isinstance(item, list):
            kept[key] = [face for face in item if face not in faces]
        elif key == _ASSIGNMENT_ROWS and isinstance(item, list):
            kept[key] = [row for row in item if not (isinstance(row, list) and row and row[0] in faces)]
        elif key == _CONSTRAINT_RECORDS and isinstance(item, list):
            kept[key] = [c for c in item if not (isinstance(c, dict) and {c.get("face_a"), c.get("face_b")} & faces)]
        else:
            kept[key] = _without_faces(item, faces)
    return kept


def _redact(value, secrets: set[str], note: str):  # noqa: ANN001, ANN202 - JSON values
    """`value` with every string that holds one of `secrets` replaced by `note`."""
    if isinstance(value, str):
        return note if any(secret in value for secret in secrets) else value
    if isinstance(value, list):
        return [_redact(item, secrets, note) for item in value]
    if isinstance(value, dict):
        return {key: _redact(item, secrets, note) for key, item in value.items()}
    return value


def _strip_decisions(session: Session, faces: set[int], identity: int | None, secrets: set[str], note: str) -> int:
    """Keep every decision as an audit line, without the forgotten faces' ids, the forgotten
    identity's name, or any path, hash or chip of the forgotten photos; returns how many changed."""
    changed = 0
    for row in session.scalars(select(Decision)):
        payload = _redact(_without_faces(row.payload, faces), secrets, note)
        about_identity = identity is not None and identity in row.payload.get("identities", [])
        why = row.why if row.why is None or not any(secret in row.why for secret in secrets) else note
        if payload == row.payload and why == row.why and not about_identity:
            continue
        if about_identity:
            before = payload.get("before", {})
            before["identities"] = [
                [ident, {key: None if key == "name" and ident == identity else value for key, value in fields.items()}]
                for ident, fields in before.get("identities", [])
            ]
            if "name" in payload.get("details", {}):
                payload["details"]["name"] = note
        payload["summary"] = f"{row.action} ({note})"
        payload["forgotten"] = note
        row.payload, row.why = payload, why
        changed += 1
    return changed


@dataclass
class _Erasure:
    faces: list[int]
    chips: set[str]
    photos: list[int]  # contents removed: selected, or left without a face
    path_rows: list[int]
    secrets: set[str]  # strings that must leave the decision log: chips, hashes, paths, the name
    merged_away: list[int]  # identities merged into the forgotten one, directly or not


def _erasure(session: Session, selection: Selection) -> _Erasure:
    faces = sorted(set(selection.face_ids))
    rows = []
    for chunk in in_chunks(faces):
        rows += session.execute(select(Face.image_id, Face.chip_path).where(Face.id.in_(chunk))).all()
    touched = {image for image, _ in rows} | set(selection.photos)
    still_has_faces = set()
    for chunk in in_chunks(sorted(touched)):
        still_has_faces |= set(
            session.scalars(select(Face.image_id).where(Face.image_id.in_(chunk), Face.id.not_in(faces)))
        )
    photos = sorted(touched - still_has_faces)
    chips = {chip for _, chip in rows}
    secrets = set(chips)
    path_rows = set(selection.path_rows)
    for chunk in in_chunks(photos):
        secrets |= set(session.scalars(select(Image.content_hash).where(Image.id.in_(chunk))))
        path_rows |= set(session.scalars(select(PhotoPath.id).where(PhotoPath.image_id.in_(chunk))))
    for chunk in in_chunks(sorted(path_rows)):
        secrets |= set(session.scalars(select(PhotoPath.path).where(PhotoPath.id.in_(chunk))))
    merged_away: set[int] = set()
    if selection.identity is not None:
        name = session.scalar(select(Identity.name).where(Identity.id == selection.identity))
        secrets |= {name} if name else set()
        into = {selection.identity}
        while into:
            into = set(session.scalars(select(Identity.id).where(Identity.merged_into.in_(into)))) - merged_away
            merged_away |= into
    return _Erasure(faces, chips, photos, sorted(path_rows), secrets, sorted(merged_away))


def empty_sqlite_log(store: Store) -> bool:
    """Copy SQLite's write-ahead log into the database and truncate it (the log still holds pages
    as they were before an erasure); False when readers kept it busy past the busy timeout, or
    the database is not SQLite."""
    if get_engine(store.url).dialect.name != "sqlite":
        return False
    connection = get_engine(store.url).raw_connection()
    try:
        busy, _, _ = connection.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        connection.close()
    return not busy


def _redact_logs(store: Store, secrets: set[str], note: str) -> int:
    """Replace the lines of facemine's log files (`logs/` in the data folder) that hold a secret;
    rewritten in place, so a process appending to a log keeps its handle. Returns lines changed."""
    changed = 0
    folder = store.data_dir / LOGS_DIR
    for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
        if not path.is_file():
            continue
        with path.open("r+", encoding="utf-8", errors="surrogateescape") as handle:
            lines = handle.readlines()
            kept = [f"{note}\n" if any(secret in line for secret in secrets) else line for line in lines]
            hits = sum(a != b for a, b in zip(lines, kept))
            if hits:
                handle.seek(0)
                handle.writelines(kept)
                handle.truncate()
                changed += hits
    return changed


def forget_summary(store: Store, selection: Selection) -> dict[str, int]:
    """What `forget_faces` would remove, for the confirmation prompt."""
    with store.session() as session:
        erasure = _erasure(session, selection)
    return {"faces": len(erasure.faces), "photos": len(erasure.photos), "paths": len(erasure.path_rows)}


def forget_faces(store: Store, selection: Selection, who: str, why: str | None = None) -> dict[str, int]:
    """Remove every trace of the selected faces: face rows and all rows naming them, photos left
    without a face (with their paths), chips, vectors (shards rewritten without them), the faces
    in every export; the decision log keeps its entries, stripped, plus one `forget` line of counts.

    Source photos are not touched: mining them again brings their faces back as new ones."""
    started = time.time()
    note = f"forgotten on {time.strftime('%Y-%m-%d', time.gmtime(started))}"
    with store.session() as session:
        sqlite = session.get_bind().dialect.name == "sqlite"
        if sqlite:  # deleted rows' bytes are zeroed, not left in free space of the database file
            session.execute(text("PRAGMA secure_delete=ON"))
        erasure = _erasure(session, selection)
        face_set = set(erasure.faces)
        # Only shards holding their vectors are rewritten (other garbage is doctor's, which keeps
        # replaced files a while for readers; these go at once).
        holding = [(plan, _rows_of(store, plan, face_set)) for plan in _plan_shards(store, session, face_set)]
        plans = [plan for plan, rows in holding if rows]
        vectors = sum(rows for _, rows in holding)
        # Exports first: if this transaction fails after, a re-run selects the faces again.
        exports = remove_faces_from_exports(store, session, face_set, note)
        stripped = _strip_decisions(session, face_set, selection.identity, erasure.secrets, note)
        _delete_faces(session, erasure.faces)
        for chunk in in_chunks(erasure.path_rows):
            session.execute(delete(PhotoPath).where(PhotoPath.id.in_(chunk)))
        for chunk in in_chunks(erasure.photos):
            session.execute(delete(Image).where(Image.id.in_(chunk)))
        if selection.identity is not None:
            session.execute(
                update(Identity).where(Identity.id == selection.identity)
                .values(name=None, status="retired", locked=False, accepted=False)
            )
            # Identities merged into it may carry its name too (a merge keeps one name).
            session.execute(update(Identity).where(Identity.id.in_(erasure.merged_away)).values(name=None))
        if selection.subset is not None and not session.scalar(
            select(PhotoPath.id).where(PhotoPath.subset_id == selection.subset).limit(1)
        ):
            session.execute(delete(Subset).where(Subset.id == selection.subset))
        removed_shards = _apply_shard_plans(store, session, plans)
        still_used = set()
        for chunk in in_chunks(sorted(erasure.chips)):
            still_used |= set(session.scalars(select(Face.chip_path).where(Face.chip_path.in_(chunk))))
        counts = {
            "faces": len(erasure.faces),
            "photos": len(erasure.photos),
            "paths": len(erasure.path_rows),
            "vectors": vectors,
            "shards_rewritten": len(removed_shards),
            "chips_removed": len(erasure.chips - still_used),
            "chips_kept_for_other_faces": len(erasure.chips & still_used),
            **exports,
            "decisions_stripped": stripped,
        }
        counts["log_lines_redacted"] = _redact_logs(store, erasure.secrets, note)
        _audit(session, who, FORGET, why, f"forgot {selection.description}: {counts['faces']} faces", dict(counts))
        if sqlite:
            session.execute(text("PRAGMA secure_delete=OFF"))
    counts["sqlite_log_cleared"] = int(empty_sqlite_log(store)) if sqlite else 0
    # After the commit, so a failed transaction leaves every file its rows name. A chip claimed
    # again since (the same photo mined again meanwhile) is newer than `started` and stays; object
    # storage keeps times in whole seconds, so a chip of the second `started` falls in stays too.
    for shard in removed_shards:
        for relative in store.shards.files(shard):
            store.root.delete(relative)
    for chip in erasure.chips - still_used:
        modified = store.root.modified(chip)
        if modified is not None and modified <= started - store.root.time_resolution:
            store.root.delete(chip)
    return counts
