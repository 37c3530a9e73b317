"""Stores of real LFW faces for the review tests: mined once per test session, copied per use."""
from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from storage.identities import create_run, face_table, finish_run, new_identities
from storage.settings import Settings
from storage.store import Store
LFW = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lfw"
# Eight people with many LFW photos, varied in age, sex and ethnicity.
PEOPLE = (
    "Hans_Blix", "Serena_Williams", "Vladimir_Putin", "Laura_Bush",
    "Andre_Agassi", "David_Beckham", "Jack_Straw", "Tom_Ridge",
)
PHOTOS_PER_PERSON = 8
SUBSET = "lfw"


def lfw_paths(people: Sequence[str] = PEOPLE, per_person: int = PHOTOS_PER_PERSON) -> list[str]:
    labels = pd.read_csv(LFW / "labels.csv")
    paths = []
    for person in people:
        rows = labels[labels.identity == person].sort_values("path").head(per_person)
        assert len(rows) == per_person, f"LFW has fewer than {per_person} photos of {person}"
        paths += [str(LFW / path) for path in rows.path]
    return paths


def _mine(data_dir: Path, paths: list[str]) -> None:
    from flows.mine import mine_shard
    from flows.runtime import settings_payload

    summary = mine_shard.fn(SUBSET, paths, settings_payload(Settings(data_dir=data_dir)))
    assert summary["photos_new"] == len(paths), summary


def mined_store_copy(factory: pytest.TempPathFactory, name: str) -> Settings:
    """Settings of a fresh copy of the session's mined LFW store (mined on first use)."""
    template = factory.getbasetemp() / "lfw-mined-template"
    if not (template / "done").exists():
        shutil.rmtree(template, ignore_errors=True)
        _mine(template, lfw_paths())
        (template / "done").touch()
    target = factory.mktemp(name) / "data"
    shutil.copytree(template, target)
    return Settings(data_dir=target)


def person_of_face(store: Store) -> pd.Series:
    """LFW person of each face whose photo it is centred in (the labelled face); others are dropped."""
    faces = face_table(store)
    centre_x, centre_y = (faces.x1 + faces.x2) / 2, (faces.y1 + faces.y2) / 2
    faces["off_centre"] = np.hypot(centre_x - 75, centre_y - 75)  # LFW photos are 150x150, face centred
    central = faces.sort_values("off_centre").groupby("image_id").head(1)
    central = central[central.off_centre < 20]
    person = central.source_path.map(lambda path: Path(path).parent.name)
    return pd.Series(person.to_numpy(), index=central.face_id.to_numpy()).sort_index()


def make_run(store: Store, groups: Sequence[Sequence[int]], confidence: Mapping[int, float] | None = None) -> tuple[int, list[int]]:
    """A finished clustering run with one new identity per group of face ids (other faces unassigned)."""
    model = store.current_model()
    run_id = create_run(store, model.id, "test-groups", {}, [])
    identity_ids = new_identities(store, len(groups))
    identity_of = {face: identity for identity, group in zip(identity_ids, groups) for face in group}
    faces = face_table(store).face_id.tolist()
    confidence = confidence or {}
    table = pd.DataFrame(
        {
            "face_id": faces,
            "identity_id": [identity_of.get(face, np.nan) for face in faces],
            "confidence": [confidence.get(face, 0.9) if face in identity_of else 0.0 for face in faces],
            "source": ["cluster" if face in identity_of else "unassigned" for face in faces],
            "duplicate_of": np.nan,
            "outlier": False,
        }
    )
    finish_run(store, run_id, table, {"identities": len(groups)})
    return run_id, identity_ids
