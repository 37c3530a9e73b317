"""Score a clustering run against ground-truth labels (`path,identity` CSV)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import FacemineError
from pipeline.evaluate import UNASSIGNED, clustering_metrics
from storage import identities as identity_store
from storage.reports import mined_paths
from storage.store import Store


def read_truth(truth_csv: Path) -> pd.DataFrame:
    """Labels with absolute paths (relative paths are relative to the CSV's folder)."""
    if not truth_csv.is_file():
        raise FacemineError(f"truth file not found: {truth_csv}")
    try:
        truth = pd.read_csv(truth_csv)
    except ValueError as error:  # pandas' parser and empty-file errors and UnicodeDecodeError are ValueErrors
        raise FacemineError(f"{truth_csv} is not a readable CSV file: {str(error).splitlines()[0]}") from None
    if not {"path", "identity"} <= set(truth.columns):
        raise FacemineError(f"{truth_csv} needs the columns path,identity")
    truth = truth.dropna(subset=["path", "identity"])
    if truth.empty:
        raise FacemineError(f"{truth_csv} has no labelled photos")
    truth["source_path"] = [str((truth_csv.parent / p).resolve()) for p in truth.path]
    return truth


def evaluate_run(store: Store, truth_csv: Path, run_id: int | None = None) -> dict:
    """Clustering metrics on the largest face of each labelled photo that was mined.

    Coverage comes first: truth paths that match no mined photo say nothing about the clustering
    (scored as singletons they would read as near-perfect precision), so they are left out and
    counted, and a truth file that matches no photo at all is refused."""
    run_id = run_id or identity_store.latest_run_id(store)
    if run_id is None:
        raise FacemineError("no clustering run yet: run `facemine cluster` first")
    truth = read_truth(truth_csv)
    mined = mined_paths(store, truth.source_path.tolist())
    if not mined:
        raise FacemineError(
            f"none of the {len(truth)} paths in {truth_csv} is a mined photo "
            "(paths are read relative to the file's folder): is it the truth for this store?"
        )
    matched = truth[truth.source_path.isin(mined)].reset_index(drop=True)
    predicted = identity_store.largest_face_identity(store, run_id, matched.source_path.tolist())
    labels = predicted.identity_id.fillna(UNASSIGNED).to_numpy(np.int64)
    metrics = clustering_metrics(pd.factorize(matched.identity)[0], labels)
    return {
        "run_id": run_id,
        "photos": len(truth),
        "photos_mined": len(matched),
        "coverage": len(matched) / len(truth),
        "photos_with_face": int(predicted.face_id.notna().sum()),
        "photos_assigned": int(predicted.identity_id.notna().sum()),
        **metrics,
    }
