"""Stores of real LFW faces for the review tests: mined once per test session, copied per use."""
from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


def mine_into(data_dir: Path, paths: list[str]) -> None:
    from usecases.mining import mine_paths

    summary = mine_paths(SUBSET, paths, Settings(data_dir=data_dir))
    assert summary["photos_new"] == len(paths), summary


def mined_store_copy(factory: pytest.TempPathFactory, name: str) -> Settings:
    """Settings of a fresh copy of the session's mined LFW store (mined on first use)."""
    template = factory.getbasetemp() / "lfw-mined-template"
    if not (template / "done").exists():
        shutil.rmtree(template, ignore_errors=True)
        mine_into(template, lfw_paths())
        (template / "done").touch()
    target = factory.mktemp(name) / "data"
    shutil.copytree(template, target)
    return Settings(data_dir=target)


def cli_store(factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, name: str) -> Store:
    """A copy of the mined store that `facemine` commands run in this process act on, as user `cli-user`."""
    settings = mined_store_copy(factory, name)
    monkeypatch.setenv("FACEMINE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("USER", "cli-user")
    return Store(settings)


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


def people_faces(store: Store) -> dict[str, list[int]]:
    """Labelled face ids of each LFW person, by face id."""
    person = person_of_face(store)
    return {name: sorted(person[person == name].index.tolist()) for name in sorted(person.unique())}


@dataclass
class Scenario:
    """A clustering run with the mistakes a reviewer fixes: a two-person identity, one person cut
    in two, an intruder, a face joined with low confidence."""

    run_id: int
    people: dict[str, list[int]]
    pure: int  # one person, clean
    mixed: int  # people[0] + people[1]
    halves: tuple[int, int]  # people[2] cut in two
    intruded: int  # people[3] + first face of people[4]
    rest_of_intruder: int  # people[4] without its first face
    low_confidence: int  # people[5], its first face joined with confidence 0.2
    others: tuple[int, ...]  # remaining people, one identity each
    intruder: int
    doubtful: int


def scenario_run(store: Store) -> Scenario:
    people = people_faces(store)
    names = list(people)
    faces = [people[name] for name in names]
    groups = [
        faces[6], faces[0] + faces[1], faces[2][:4], faces[2][4:], faces[3] + faces[4][:1], faces[4][1:], faces[5],
        *faces[7:],
    ]
    run_id, ids = make_run(store, groups, confidence={faces[5][0]: 0.2})
    return Scenario(
        run_id, {name: people[name] for name in names}, pure=ids[0], mixed=ids[1], halves=(ids[2], ids[3]),
        intruded=ids[4], rest_of_intruder=ids[5], low_confidence=ids[6], others=tuple(ids[7:]),
        intruder=faces[4][0], doubtful=faces[5][0],
    )


def add_face_copies(store: Store, count: int, seed: int = 0) -> list[int]:
    """`count` extra faces reusing the stored chips (and embeddings, slightly jittered) of real faces:
    enough faces for one very large identity without mining thousands of photos."""
    from sqlalchemy import select

    from storage.schema import Face

    rng = np.random.default_rng(seed)
    model = store.current_model()
    with store.session() as session:
        originals = session.scalars(select(Face).order_by(Face.id)).all()
        columns = [c.key for c in Face.__table__.columns if c.key not in ("id", "face_index")]
        copies = []
        for k in range(count):
            source = originals[k % len(originals)]
            copy = Face(**{c: getattr(source, c) for c in columns}, face_index=1000 + k)
            session.add(copy)
            copies.append((copy, source.id))
        session.flush()
        new_ids = [copy.id for copy, _ in copies]
        source_ids = [source for _, source in copies]
    ids, base = store.load_embeddings(model.id, sorted(set(source_ids)))
    row = {face: i for i, face in enumerate(ids)}
    jittered = base[[row[s] for s in source_ids]] + rng.normal(0, 0.01, (count, base.shape[1])).astype(np.float32)
    store.write_embeddings(model, np.asarray(new_ids), jittered / np.linalg.norm(jittered, axis=1, keepdims=True))
    return new_ids
