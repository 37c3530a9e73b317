"""Write versioned dataset exports: exports/NAME/vN/{identity folders, manifest, card}."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pandas as pd
from sqlalchemy import func, select

from pipeline.config import ExportConfig
from pipeline.errors import FacemineError
from pipeline.export import plan_export, safe_folder_name
from storage import identities as identity_store
from storage.schema import DatasetExport
from storage.store import Store


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
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".v{version}."))
    try:
        exported = manifest[manifest.chip_path != ""]
        for relative, face_id in zip(exported.chip_path, exported.face_id):
            source = store.data_dir / stored_chip[face_id]
            target = (staging / relative).resolve()
            if staging.resolve() not in target.parents:
                raise FacemineError(f"refusing to write outside the export folder: {relative}")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        manifest.to_parquet(staging / "manifest.parquet", index=False)
        manifest.to_csv(staging / "manifest.csv", index=False)
        (staging / "dataset_card.json").write_text(json.dumps(card, indent=2, sort_keys=True, default=str) + "\n")
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
