"""Write versioned dataset exports: exports/NAME/vN/{identity folders, manifest, card} under the data root.

A version appears whole. In a folder it is written in a staging folder renamed to vN at the end;
object storage has no rename, so there its objects are written in place and `manifest.parquet`,
written last, is what makes the version finished: a version without one is an unfinished export
(`unfinished_exports`), which `doctor` removes after its grace period.
"""
from __future__ import annotations

import errno
import io
import json
import posixpath
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.config import ExportConfig
from pipeline.errors import FacemineError
from pipeline.export import _summary as summarize_manifest
from pipeline.export import plan_export, safe_folder_name
from storage import identities as identity_store
from storage.dataroot import Entry
from storage.schema import DatasetExport
from storage.store import Store

MANIFEST, MANIFEST_CSV, CARD = "manifest.parquet", "manifest.csv", "dataset_card.json"
# On object storage: the marker claiming a version while it is written (`_claim_version`).
CLAIM = ".claim"
# Staging folder of a version being written in a folder (`export_dataset`); left behind only by a
# killed export. A version's own folder or prefix: vN.
_STAGING_NAME = re.compile(r"^\.v\d+\.")
_VERSION_NAME = re.compile(r"^v\d+$")


def _export_prefix(name: str) -> str:
    folder = safe_folder_name(0, name).removeprefix("000000_")
    if folder != name:
        raise FacemineError(f"export name {name!r} may use only letters, digits, '_' and '-'")
    return f"exports/{name}"


def _next_version(store: Store, name: str, prefix: str) -> int:
    with store.session() as session:
        stored = session.scalar(select(func.max(DatasetExport.version)).where(DatasetExport.name == name)) or 0
    versions = {entry.relative.split("/")[2] for entry in store.root.list(prefix, with_folders=True)}
    on_disk = [int(version[1:]) for version in versions if _VERSION_NAME.match(version)]
    return max([stored, *on_disk]) + 1


def _claim_version(store: Store, name: str, prefix: str) -> int:
    """The next version of an export on object storage, claimed by a marker object that only one
    writer can create: two exports of one name started at once on two machines would otherwise
    pick one number and write into each other's prefix (objects are written in place there)."""
    while True:
        version = _next_version(store, name, prefix)
        if store.root.create_exclusive(f"{prefix}/v{version}/{CLAIM}"):
            return version


def _publish(store: Store, staging: str, name: str, prefix: str, version: int) -> int:
    """Rename a finished staging folder to vN, taking the next free N when another export took N
    meanwhile (a rename never replaces a folder that has files). The files name no version."""
    while True:
        try:
            store.root.rename_folder(staging, f"{prefix}/v{version}")
            return version
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            version = _next_version(store, name, prefix)


def run_faces(store: Store, run_id: int) -> pd.DataFrame:
    """Faces of a run joined with their assignment and identity name."""
    faces = identity_store.face_table(store).merge(identity_store.assignments(store, run_id), on="face_id")
    names = identity_store.identity_rows(store)[["identity_id", "name"]].rename(columns={"name": "identity_name"})
    return faces.merge(names, on="identity_id", how="left")


def export_dataset(store: Store, name: str, config: ExportConfig, run_id: int | None = None) -> dict:
    """Export a clustering run (default: the newest) as an ImageFolder-compatible dataset."""
    prefix = _export_prefix(name)
    run_id = run_id or identity_store.latest_run_id(store)
    if run_id is None:
        raise FacemineError("no clustering run yet: run `facemine cluster` first")
    run = identity_store.run_info(store, run_id)
    faces = run_faces(store, run_id)
    manifest, summary = plan_export(faces, config)
    stored_chip = faces.set_index("face_id").chip_path
    if summary["faces"] == 0:
        raise FacemineError("nothing to export: no identity has enough faces")
    model = store.model(run["model_id"])
    version = _next_version(store, name, prefix) if store.root.is_local else _claim_version(store, name, prefix)
    # The card holds no version or time: exporting one run twice gives identical files.
    card = {
        "name": name,
        "run_id": run_id,
        "clustering": {"method": run["method"], "params": run["params"], "subsets": run["subsets"]},
        "model": {"id": model.id, "name": model.name, "weights_hash": model.weights_hash,
                  "preprocessing": model.preprocessing},
        **summary,
    }
    final = f"{prefix}/v{version}"
    if store.root.is_local:
        store.root.local_path(prefix).mkdir(parents=True, exist_ok=True)
        staging_folder = tempfile.mkdtemp(dir=store.root.local_path(prefix), prefix=f".v{version}.")  # _STAGING_NAME
        staging = f"{prefix}/{Path(staging_folder).name}"
    else:
        staging = final  # no rename: the manifest, written last, finishes the version
    try:
        exported = manifest[manifest.chip_path != ""]
        for relative, face_id in zip(exported.chip_path, exported.face_id):
            target = posixpath.normpath(f"{staging}/{relative}")
            if not target.startswith(f"{staging}/"):
                raise FacemineError(f"refusing to write outside the export folder: {relative}")
            store.root.copy(stored_chip[face_id], target)
        store.root.write_bytes(f"{staging}/{MANIFEST_CSV}", manifest.to_csv(index=False).encode())
        store.root.write_bytes(f"{staging}/{CARD}", _card_text(card).encode())
        store.root.write_bytes(f"{staging}/{MANIFEST}", _parquet_bytes(manifest))
        if staging != final:
            version = _publish(store, staging, name, prefix, version)
            final = f"{prefix}/v{version}"
        else:
            store.root.delete(f"{final}/{CLAIM}")  # finished: its objects now hold the version
    except BaseException:
        store.root.delete(staging)
        raise
    with store.session() as session:
        row = DatasetExport(
            name=name, version=version, run_id=run_id, model_id=model.id, path=store.root.location(final),
            params=config.model_dump(), card=card,
        )
        session.add(row)
        session.flush()
        export_id = row.id
    return {"export_id": export_id, "path": store.root.location(final), "version": version, **card}


def export_info(store: Store, export_id: int) -> dict:
    with store.session() as session:
        row = session.get_one(DatasetExport, export_id)
        return {"id": row.id, "name": row.name, "version": row.version, "path": row.path, "run_id": row.run_id,
                "model_id": row.model_id, "card": dict(row.card)}


def _card_text(card: dict) -> str:
    return json.dumps(card, indent=2, sort_keys=True, default=str) + "\n"


def _parquet_bytes(manifest: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    manifest.to_parquet(buffer, index=False)
    return buffer.getvalue()


def unfinished_exports(entries: list[Entry]) -> list[str]:
    """Exports that never finished, from a listing of `exports/`: staging folders of a killed
    export (in a folder), and versions without their manifest (on object storage)."""
    staging, versions, finished = set(), set(), set()
    for entry in entries:
        parts = entry.relative.split("/")  # exports/NAME/VERSION/...
        if len(parts) < 3:
            continue
        version = "/".join(parts[:3])
        if _STAGING_NAME.match(parts[2]):
            staging.add(version)
        elif _VERSION_NAME.match(parts[2]):
            versions.add(version)
            if len(parts) == 4 and parts[3] == MANIFEST and not entry.is_dir:
                finished.add(version)
    return sorted(staging | (versions - finished))


def export_folders(store: Store, session: Session) -> dict[str, int | None]:
    """Every finished export version under the data root: recorded ones (prefix -> export id) and
    versions without a row (an export killed between its last write and its row: None)."""
    folders: dict[str, int | None] = {}
    for export_id, path in session.execute(select(DatasetExport.id, DatasetExport.path)):
        relative = store.root.relative_of(path)
        if relative is not None:
            folders[relative] = export_id
    for entry in store.root.list("exports"):
        parts = entry.relative.split("/")
        if len(parts) == 4 and parts[3] == MANIFEST and _VERSION_NAME.match(parts[2]):
            folders.setdefault("/".join(parts[:3]), None)
    return folders


def remove_faces_from_exports(store: Store, session: Session, face_ids: set[int], note: str) -> dict[str, int]:
    """Rewrite every export holding one of `face_ids` without it: its chip files, manifest rows
    (and `duplicate_of` links to it) go, the card is recounted and says so; an export left with no
    face is deleted (its row stays for the training runs that name it, its card saying so)."""
    counts = {"exports_rewritten": 0, "exports_deleted": 0, "export_files_removed": 0}
    root = store.root
    for folder, export_id in export_folders(store, session).items():
        if not root.is_file(f"{folder}/{MANIFEST}"):
            continue
        manifest = pd.read_parquet(io.BytesIO(root.read_bytes(f"{folder}/{MANIFEST}")))
        gone = manifest.face_id.isin(face_ids)
        linked = manifest.duplicate_of.isin(face_ids)
        if not gone.any() and not linked.any():
            continue
        chips = [f"{folder}/{chip}" for chip in manifest.chip_path[gone & (manifest.chip_path != "")]]
        for chip in chips:
            root.delete(chip)
        counts["export_files_removed"] += len(chips)
        if root.is_local:  # an emptied identity folder goes too: its name may be the person's
            for identity_folder in {root.local_path(posixpath.dirname(chip)) for chip in chips}:
                if identity_folder.is_dir() and not any(identity_folder.iterdir()):
                    identity_folder.rmdir()
        kept = manifest[~gone].copy()
        kept.loc[kept.duplicate_of.isin(face_ids), "duplicate_of"] = np.nan
        card = json.loads(root.read_bytes(f"{folder}/{CARD}")) if root.is_file(f"{folder}/{CARD}") else {}
        removed = int(gone.sum()) + int(card.get("forgotten", {}).get("faces_removed", 0))
        forgotten = {"faces_removed": removed, "note": note}
        if not (kept.split != "duplicate").any():
            root.delete(folder)
            card = {**card, "forgotten": {**forgotten, "deleted": True}}
            counts["exports_deleted"] += 1
        else:
            config = ExportConfig.model_validate(card.get("parameters", {}))
            card = {**card, **summarize_manifest(kept, config), "forgotten": forgotten}
            root.write_bytes(f"{folder}/{MANIFEST}", _parquet_bytes(kept))
            root.write_bytes(f"{folder}/{MANIFEST_CSV}", kept.to_csv(index=False).encode())
            root.write_bytes(f"{folder}/{CARD}", _card_text(card).encode())
            counts["exports_rewritten"] += 1
        if export_id is not None:
            session.get_one(DatasetExport, export_id).card = card
    return counts
