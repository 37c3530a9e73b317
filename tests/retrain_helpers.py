"""Small real held-out sets and a prepared store for the retraining and closed-loop tests."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from review_helpers import LFW, PEOPLE, mined_store_copy

from pipeline.config import TrainConfig
from storage.settings import Settings

# Every n-th LFW pair of each kind: about 15 same- and 15 different-person pairs.
PAIR_STRIDE = 75
TRUTH_PEOPLE, TRUTH_PHOTOS = 4, 4


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


def small_train_config(**changes: object) -> TrainConfig:
    """One CPU-sized epoch: only the last tenth of the parameter tensors train."""
    return TrainConfig(epochs=1, freeze_fraction=0.9, batch_size=16, warmup_epochs=0, num_workers=0, **changes)


def prepared_store(factory: pytest.TempPathFactory, name: str, pairs: Path, truth: Path) -> Settings:
    """The session's mined LFW store (8 people x 8 photos), clustered, exported once, and with the
    held-out faces already detected (cached in its data folder)."""
    from flows.cluster import run_cluster
    from flows.holdout import load_holdout
    from storage.exports import export_dataset
    from storage.store import Store

    settings = mined_store_copy(factory, name)
    store = Store(settings)
    run_cluster(store, settings)
    export_dataset(store, "faces", settings.export)
    load_holdout(settings, str(pairs), str(truth))
    return settings


def use_store(monkeypatch: pytest.MonkeyPatch, settings: Settings, pairs: Path, truth: Path, **gate: str) -> None:
    """Point flows (which read Settings() from the environment) at `settings`' data folder and the held-out CSVs."""
    monkeypatch.setenv("FACEMINE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("FACEMINE_GATE__VALIDATION_PAIRS", str(pairs))
    monkeypatch.setenv("FACEMINE_GATE__VALIDATION_TRUTH", str(truth))
    for name, value in gate.items():
        monkeypatch.setenv(f"FACEMINE_GATE__{name.upper()}", value)


def copy_store(source: Settings, target: Path) -> Settings:
    shutil.copytree(source.data_dir, target)
    return Settings(data_dir=target)
