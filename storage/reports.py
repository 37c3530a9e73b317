"""Read-only reports over the store for people: what the quality rules removed, which paths were
mined, what each model was trained with and measured at."""
from __future__ import annotations

import json

from sqlalchemy import select

from pipeline.quality import report_from_reasons
from storage.db import in_chunks
from storage.schema import Face, PhotoPath, Subset
from storage.store import Store

# Paths per query: far below every database's limit on bound parameters.


def stored_reasons(fail_reasons: str | None) -> tuple[str, ...]:
    """A face's failed rules as `Face.fail_reasons` stores them (comma-joined, "" when it passed)."""
    return tuple(reason for reason in (fail_reasons or "").split(",") if reason)


def quality_by_subset(store: Store) -> dict[str, dict]:
    """`pipeline.quality.report_from_reasons` of each subset's faces (each face once per subset,
    however many of the subset's paths hold its photo), subsets by name."""
    query = (
        select(Subset.name, Face.id, Face.fail_reasons)
        .join(PhotoPath, PhotoPath.subset_id == Subset.id)
        .join(Face, Face.image_id == PhotoPath.image_id)
        .distinct()
        .order_by(Subset.name, Face.id)
    )
    reasons: dict[str, list[tuple[str, ...]]] = {}
    with store.session() as session:
        for subset, _face_id, fail_reasons in session.execute(query):
            reasons.setdefault(subset, []).append(stored_reasons(fail_reasons))
    return {subset: report_from_reasons(faces) for subset, faces in reasons.items()}


def quality_rows(report: dict, every_rule: bool = False) -> list[dict]:
    """Table rows of one `report_from_reasons` report, in rule order: the rules that removed a
    face, or `every_rule`."""
    return [
        {"rule": rule, "faces removed": counts["removed"], "by this rule alone": counts["only"]}
        for rule, counts in report["rules"].items()
        if counts["removed"] or every_rule
    ]


def mined_paths(store: Store, paths: list[str]) -> set[str]:
    """The paths among `paths` recorded with a photo content (mined, in any subset)."""
    found: set[str] = set()
    with store.session() as session:
        for chunk in in_chunks(paths):
            found.update(session.scalars(
                select(PhotoPath.path).where(PhotoPath.path.in_(chunk),
                                             PhotoPath.image_id.is_not(None))
            ))
    return found


def model_details(train_params: dict, metrics: dict) -> list[dict]:
    """Rows (`kind`, `name`, `value`) of a model's training parameters (its training run's) and
    its metrics (`registry.models_table` has both); nested values by dotted name, floats to 4 places."""
    return [
        {"kind": kind, "name": name, "value": value}
        for kind, values in (("training parameter", train_params), ("metric", metrics))
        for name, value in _flat(values)
    ]


def _flat(values: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    for key, value in sorted(values.items()):
        if isinstance(value, dict):
            rows += _flat(value, f"{prefix}{key}.")
        elif isinstance(value, float):
            rows.append((prefix + key, round(value, 4)))
        elif isinstance(value, list):
            rows.append((prefix + key, json.dumps(value, default=str)))
        else:
            rows.append((prefix + key, value))
    return rows
