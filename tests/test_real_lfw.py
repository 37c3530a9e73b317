"""Mining, clustering and export on all of LFW (real photos; the slowest module, one store for all).

Must-shows: every LFW photo yields a face; on lfw/pairs.csv same-person pairs are closer than
SFace's threshold and different-person pairs farther on >= 95 % of pairs; clustering scores
against labels.csv; exports are deterministic and ImageFolder-compatible.
"""
from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from torchvision.datasets import ImageFolder

from conftest import DATA
from usecases.evaluation import evaluate_run
from usecases.mining import mine_paths, shard_paths
from storage import identities as identity_store
from storage.exports import export_dataset
from storage.settings import Settings
from storage.store import Store

# Mining all 8,658 LFW photos on 2 CPU cores takes 10-20 minutes.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
LFW = DATA / "lfw"
SFACE_SAME_PERSON_THRESHOLD = 0.363  # OpenCV's published cosine threshold for SFace


@pytest.fixture(scope="module")
def lfw_store(tmp_path_factory) -> Store:
    settings = Settings(data_dir=tmp_path_factory.mktemp("lfw") / "data")
    paths = [str((LFW / p).resolve()) for p in pd.read_csv(LFW / "labels.csv").path]
    for shard in shard_paths(paths, settings.mine.shard_size):
        mine_paths("lfw", shard, settings)
    return Store(settings)


@pytest.fixture(scope="module")
def lfw_faces(lfw_store: Store) -> pd.DataFrame:
    return identity_store.face_table(lfw_store)


def test_every_lfw_photo_yields_a_face(lfw_store: Store, lfw_faces: pd.DataFrame):
    labels = pd.read_csv(LFW / "labels.csv")
    assert lfw_store.status_counts() and set(lfw_faces.subset) == {"lfw"}
    with_face = set(lfw_faces.source_path)
    missing = [p for p in labels.path if str((LFW / p).resolve()) not in with_face]
    assert not missing, f"{len(missing)} LFW photos without a face, e.g. {missing[:5]}"


def test_lfw_pairs_verified_at_sface_threshold(lfw_store: Store, lfw_faces: pd.DataFrame):
    largest = lfw_faces.sort_values("face_area", ascending=False).drop_duplicates("source_path")
    ids, vectors = lfw_store.load_embeddings(lfw_store.current_model().id, largest.face_id)
    vector_of = dict(zip(largest.set_index("face_id").loc[ids].source_path, vectors))
    pairs = pd.read_csv(LFW / "pairs.csv")
    a = np.stack([vector_of[str((LFW / p).resolve())] for p in pairs.path_a])
    b = np.stack([vector_of[str((LFW / p).resolve())] for p in pairs.path_b])
    cosine = np.sum(a * b, axis=1)
    correct = (cosine > SFACE_SAME_PERSON_THRESHOLD) == pairs.same.astype(bool).to_numpy()
    same, different = correct[pairs.same == 1].mean(), correct[pairs.same == 0].mean()
    assert correct.mean() >= 0.95, f"right on {correct.mean():.3f} of pairs (same {same:.3f}, different {different:.3f})"


@pytest.fixture(scope="module")
def lfw_run(lfw_store: Store) -> int:
    from usecases.clustering import run_cluster

    return run_cluster(lfw_store, lfw_store.settings)


def test_lfw_clustering_quality(lfw_store: Store, lfw_run: int):
    metrics = evaluate_run(lfw_store, LFW / "labels.csv", lfw_run)
    assert metrics["photos_with_face"] == metrics["photos"]
    # SFace + Infomap on LFW measured ~0.9 BCubed F; a broken graph or label mapping scores far lower.
    assert metrics["bcubed_f"] > 0.8, metrics
    assert metrics["pairwise_precision"] > 0.8, metrics


def test_export_is_deterministic_and_loads_as_imagefolder(lfw_store: Store, lfw_run: int):
    first = export_dataset(lfw_store, "lfw", lfw_store.settings.export, run_id=lfw_run)
    second = export_dataset(lfw_store, "lfw", lfw_store.settings.export, run_id=lfw_run)
    assert (first["version"], second["version"]) == (1, 2)
    comparison = filecmp.dircmp(first["path"], second["path"])
    assert _identical_trees(comparison), "two exports of one run differ"
    dataset = ImageFolder(first["path"])
    manifest = pd.read_parquet(Path(first["path"]) / "manifest.parquet")
    exported = manifest[manifest.split != "duplicate"]
    assert len(dataset) == len(exported) == first["faces"]
    assert set(exported.split) == {"train", "val"}
    assert (exported.groupby("identity").size() >= lfw_store.settings.export.min_faces_per_identity).all()
    # LFW holds byte-identical files under two names: the run records one as the other's duplicate.
    duplicates = identity_store.assignments(lfw_store, lfw_run).dropna(subset=["duplicate_of"])
    assert len(duplicates) >= 1


def _identical_trees(comparison: filecmp.dircmp) -> bool:
    if comparison.left_only or comparison.right_only or comparison.diff_files or comparison.funny_files:
        return False
    return all(_identical_trees(sub) for sub in comparison.subdirs.values())
