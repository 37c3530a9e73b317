"""Write versioned dataset exports: exports/NAME/vN/{identity folders, manifest, card}."""
from __future__ import annotations

import io
import json
import re
import shutil
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
from storage.files import atomic_write_bytes
from storage.schema import DatasetExport
from storage.store import Store

MANIFEST, MANIFEST_CSV, CARD = "manifest.parquet", "manifest.csv", "dataset_card.json"
# Staging folder of a version being written (`export_dataset`); left behind only by a killed export.
_STAGING_NAME = re.compile(r"^\.v\d+\.")


def _export_root(store: Store, name: str) -> Path:
    folder = safe_folder_name(0, name).removeprefix("000000_")
    if folder != name:
        raise FacemineError(f"export name {name!r} may use only letters, digits, '_' and '-'")
    return store.settings.exports_dir / name


def _next_version(store: Store, name: str, root: Path) -> int:
    with store.session() as session:
        stored = session.scalar(select(func.max(DatasetExport.version)).where(DatasetExport.name == name)) or 0
    on_disk = [int(p.name[1:]) for p in root.glob("v*") if p.name[1:].isdigit()] if root.exists() else []
    return max([stored, *on_disk]) + 1


def run_faces(store: Store, run_id: int) -> pd.DataFrame:
    """Faces of a run joined with their assignment and identity name."""
    faces = identity_store.face_table(store).merge(identity_store.assignments(store, run_id), on="face_id")
    names = identity_store.identity_rows(store)[["identity_id", "name"]].rename(columns={"name": "identity_name"})
    return faces.merge(names, on="identity_id", how="left")


def export_dataset(store: Store, name: str, config: ExportConfig, run_id: int | None = None) -> dict:
    """Export a clustering run (default: the newest) as an ImageFolder-compatible dataset."""
    root = _export_root(store, name)
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
    version = _next_version(store, name, root)
    # The card holds no version or time: exporting one run twice gives identical files.
    card = {
        "name": name,
        "run_id": run_id,
        "clustering": {"method": run["method"], "params": run["params"], "subsets": run["subsets"]},
        "model": {"id": model.id, "name": model.name, "weights_hash": model.weights_hash,
                  "preprocessing": model.preprocessing},
        **summary,
    }
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".v{version}."))  # matches _STAGING_NAME
    try:
        exported = manifest[manifest.chip_path != ""]
        for relative, face_id in zip(exported.chip_path, exported.face_id):
            source = store.data_dir / stored_chip[face_id]
            target = (staging / relative).resolve()
            if staging.resolve() not in target.parents:
                raise FacemineError(f"refusing to write outside the export folder: {relative}")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        manifest.to_parquet(staging / MANIFEST, index=False)
        manifest.to_csv(staging / MANIFEST_CSV, index=False)
        (staging / CARD).write_text(_card_text(card))
        final = root / f"v{version}"
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    with store.session() as session:
        row = DatasetExport(
            name=name, version=version, run_id=run_id, model_id=model.id, path=str(final),
            params=config.model_dump(), card=card,
        )
        session.add(row)
        session.flush()
        export_id = row.id
    return {"export_id": export_id, "path": str(final), "version": version, **card}


def export_info(store: Store, export_id: int) -> dict:
    with store.session() as session:
        row = session.get_one(DatasetExport, export_id)
        return {"id": row.id, "name": row.name, "version": row.version, "path": row.path, "run_id": row.run_id,
                "model_id": row.model_id, "card": dict(row.card)}


def _card_text(card: dict) -> str:
    return json.dumps(card, indent=2, sort_keys=True, default=str) + "\n"


def is_export_staging(path: Path) -> bool:
    """Whether `path` is the staging folder of an export that never finished."""
    return path.is_dir() and bool(_STAGING_NAME.match(path.name))


def export_folders(store: Store, session: Session) -> dict[Path, int | None]:
    """Every finished export version: recorded ones (folder -> export id) and folders on disk
    without a row (an export killed between its rename and its row: None)."""
    folders: dict[Path, int | None] = {
        Path(path): export_id for export_id, path in session.execute(select(DatasetExport.id, DatasetExport.path))
    }
    if store.settings.exports_dir.is_dir():
        for manifest in store.settings.exports_dir.glob(f"*/v*/{MANIFEST}"):
            folders.setdefault(manifest.parent, None)
    return folders


def remove_faces_from_exports(store: Store, session: Session, face_ids: set[int], note: str) -> dict[str, int]:
    """Rewrite every export holding one of `face_ids` without it: its chip files, manifest rows
    (and `duplicate_of` links to it) go, the card is recounted and says so; an export left with no
    face is deleted (its row stays for the training runs that name it, its card saying so)."""
    counts = {"exports_rewritten": 0, "exports_deleted": 0, "export_files_removed": 0}
    for folder, export_id in export_folders(store, session).items():
        if not (folder / MANIFEST).is_file():
            continue
        manifest = pd.read_parquet(folder / MANIFEST)
        gone = manifest.face_id.isin(face_ids)
        linked = manifest.duplicate_of.isin(face_ids)
        if not gone.any() and not linked.any():
            continue
        chips = [folder / chip for chip in manifest.chip_path[gone & (manifest.chip_path != "")]]
        for chip in chips:
            chip.unlink(missing_ok=True)
        counts["export_files_removed"] += len(chips)
        for identity_folder in {chip.parent for chip in chips}:  # its name may be the person's
            if identity_folder.is_dir() and not any(identity_folder.iterdir()):
                identity_folder.rmdir()
        kept = manifest[~gone].copy()
        kept.loc[kept.duplicate_of.isin(face_ids), "duplicate_of"] = np.nan
        card = json.loads((folder / CARD).read_text()) if (folder / CARD).is_file() else {}
        removed = int(gone.sum()) + int(card.get("forgotten", {}).get("faces_removed", 0))
        forgotten = {"faces_removed": removed, "note": note}
        if not (kept.split != "duplicate").any():
            shutil.rmtree(folder)
            card = {**card, "forgotten": {**forgotten, "deleted": True}}
            counts["exports_deleted"] += 1
        else:
            config = ExportConfig.model_validate(card.get("parameters", {}))
            card = {**card, **summarize_manifest(kept, config), "forgotten": forgotten}
            parquet = io.BytesIO()
            kept.to_parquet(parquet, index=False)
            atomic_write_bytes(folder / MANIFEST, parquet.getvalue())
            atomic_write_bytes(folder / MANIFEST_CSV, kept.to_csv(index=False).encode())
            atomic_write_bytes(folder / CARD, _card_text(card).encode())
            counts["exports_rewritten"] += 1
        if export_id is not None:
            session.get_one(DatasetExport, export_id).card = card
    return counts
