"""A small real held-out set and a prepared store for the retraining and closed-loop tests.

Prepared once per test session (mined LFW store, clustered, exported, held-out faces detected)
and copied per test, like `review_helpers.mined_store_copy`.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from review_helpers import LFW, PEOPLE, mined_store_copy

from pipeline.config import TrainConfig
from storage.settings import Settings
from storage.store import Store

# Every n-th LFW pair of each kind: about 15 same- and 15 different-person pairs.
PAIR_STRIDE = 75
TRUTH_PEOPLE, TRUTH_PHOTOS = 4, 4


@dataclass(frozen=True)
class Prepared:
    data_dir: Path
    pairs: Path  # held-out verification pairs CSV
    truth: Path  # held-out labelled photos CSV


def write_holdout_csvs(folder: Path) -> tuple[Path, Path]:
    """(pairs.csv, labels.csv) of LFW people the mined store does not hold, with absolute paths."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = pd.read_csv(LFW / "pairs.csv")
    person = lambda path: Path(path).parent.name  # noqa: E731
    unrelated = ~pairs.path_a.map(person).isin(PEOPLE) & ~pairs.path_b.map(person).isin(PEOPLE)
    pairs = pairs[unrelated]
    chosen = pd.concat([pairs[pairs.same == 1].iloc[::PAIR_STRIDE], pairs[pairs.same == 0].iloc[::PAIR_STRIDE]])
    for column in ("path_a", "path_b"):
        chosen[column] = [str(LFW / path) for path in chosen[column]]
    labels = pd.read_csv(LFW / "labels.csv")
    counts = labels.identity.value_counts()
    people = sorted(set(counts[counts >= TRUTH_PHOTOS + 2].index) - set(PEOPLE))[:TRUTH_PEOPLE]
    truth = labels[labels.identity.isin(people)].sort_values("path").groupby("identity").head(TRUTH_PHOTOS)
    truth = truth.assign(path=[str(LFW / path) for path in truth.path])
    chosen.to_csv(folder / "pairs.csv", index=False)
    truth.to_csv(folder / "labels.csv", index=False)
    return folder / "pairs.csv", folder / "labels.csv"


def prepared_store(factory: pytest.TempPathFactory) -> Prepared:
    """The session's mined LFW store (8 people x 8 photos), clustered and exported once, with the
    held-out faces already detected (cached in its data folder). Needs the Prefect harness."""
    from storage.exports import export_dataset
    from usecases.clustering import run_cluster
    from usecases.holdout import load_holdout

    root = factory.getbasetemp() / "retrain-prepared"
    prepared = Prepared(root / "data", root / "holdout" / "pairs.csv", root / "holdout" / "labels.csv")
    if not (root / "done").exists():
        shutil.rmtree(root, ignore_errors=True)
        write_holdout_csvs(root / "holdout")
        settings = mined_store_copy(factory, "retrain-mined")
        shutil.move(settings.data_dir, prepared.data_dir)
        settings = Settings(data_dir=prepared.data_dir)
        store = Store(settings)
        run_cluster(store, settings)
        export_dataset(store, "faces", settings.export)
        load_holdout(settings, str(prepared.pairs), str(prepared.truth))
        (root / "done").touch()
    return prepared


def store_copy(prepared: Prepared, target: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    """A copy of the prepared store that flows (which read Settings() from the environment) use,
    with the held-out CSVs as validation data."""
    shutil.copytree(prepared.data_dir, target)
    monkeypatch.setenv("FACEMINE_DATA_DIR", str(target))
    monkeypatch.setenv("FACEMINE_GATE__VALIDATION_PAIRS", str(prepared.pairs))
    monkeypatch.setenv("FACEMINE_GATE__VALIDATION_TRUTH", str(prepared.truth))
    return Store(Settings())


def small_train_config(**changes: object) -> TrainConfig:
    """One CPU-sized epoch: only the last tenth of the parameter tensors train."""
    return TrainConfig(epochs=1, freeze_fraction=0.9, batch_size=16, warmup_epochs=0, num_workers=0, **changes)



@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, prefect_harness) -> Prepared:  # noqa: ANN001
    return prepared_store(tmp_path_factory)


@pytest.fixture
def store(prepared: Prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    return store_copy(prepared, tmp_path / "data", monkeypatch)
