"""Migration 0002 carries a store of the 0001 schema over: copies of one photo merged, every decision kept."""
from __future__ import annotations

import json

from alembic import command
from sqlalchemy import text

from storage.db import alembic_config, get_engine
from storage.schema import Base
from storage.settings import Settings
from storage.store import Store
from test_storage import schema_differences

WHEN = "2026-01-01 00:00:00"

# Store of schema 0001: content X mined into subsets a and b (images 1 and 2, faces 1-2 and 3-4),
# content Y in a (image 3, face 5), and a file in b that could not be hashed (image 4).
# A person pinned face 3 (the copy's first face) to identity 1 and set faces 4 and 5 apart.
OLD_ROWS = [
    "INSERT INTO subsets (id, name, created_at) VALUES (1, 'a', :when), (2, 'b', :when)",
    "INSERT INTO images (id, subset_id, path, content_hash, status, reason, processed_at) VALUES"
    " (1, 1, '/p/x.jpg', 'x', 'ok', NULL, :when), (2, 2, '/q/x.jpg', 'x', 'ok', NULL, :when),"
    " (3, 1, '/p/y.jpg', 'y', 'ok', NULL, :when), (4, 2, '/q/fifo.jpg', NULL, 'failed', 'unreadable: fifo', :when)",
    "INSERT INTO faces (id, image_id, face_index, x1, y1, x2, y2, landmarks, det_score, eye_distance, sharpness,"
    " yaw, pitch, brightness, contrast, quality, passed, fail_reasons, chip_path, chip_template) VALUES"
    " (1, 1, 0, 0, 0, 1, 1, '[]', 1, 1, 1, 0, 0, 0, 0, 1, TRUE, '', 'c0', 't'),"
    " (2, 1, 1, 0, 0, 1, 1, '[]', 1, 1, 1, 0, 0, 0, 0, 1, TRUE, '', 'c1', 't'),"
    " (3, 2, 0, 0, 0, 1, 1, '[]', 1, 1, 1, 0, 0, 0, 0, 1, TRUE, '', 'c0', 't'),"
    " (4, 2, 1, 0, 0, 1, 1, '[]', 1, 1, 1, 0, 0, 0, 0, 1, TRUE, '', 'c1', 't'),"
    " (5, 3, 0, 0, 0, 1, 1, '[]', 1, 1, 1, 0, 0, 0, 0, 1, TRUE, '', 'c2', 't')",
    "INSERT INTO models (id, name, kind, weights_hash, embedding_dim, preprocessing, is_current, status, metrics,"
    " created_at) VALUES (1, 'm', 'sface', 'w', 2, '{}', TRUE, 'current', '{}', :when)",
    "INSERT INTO embedding_shards (id, model_id, path, count, created_at) VALUES (1, 1, 's', 5, :when)",
    "INSERT INTO embeddings (model_id, face_id, shard_id, row) VALUES (1, 1, 1, 0), (1, 2, 1, 1), (1, 3, 1, 2),"
    " (1, 4, 1, 3), (1, 5, 1, 4)",
    "INSERT INTO identities (id, locked, status, accepted, created_at) VALUES (1, FALSE, 'active', FALSE, :when),"
    " (2, FALSE, 'active', FALSE, :when)",
    "INSERT INTO clustering_runs (id, model_id, method, params, subsets, stats, status, created_at) VALUES"
    " (1, 1, 'infomap', '{}', '[]', '{}', 'done', :when)",
    "INSERT INTO assignments (run_id, face_id, identity_id, confidence, source, duplicate_of, outlier) VALUES"
    " (1, 1, 2, 0.5, 'cluster', NULL, FALSE), (1, 2, 2, 0.5, 'cluster', NULL, FALSE),"
    " (1, 3, 1, 1.0, 'decision', NULL, FALSE), (1, 4, 2, 0.5, 'cluster', 2, FALSE), (1, 5, 2, 0.5, 'cluster', NULL, FALSE)",
    "INSERT INTO decisions (id, at, who, action, payload) VALUES (1, :when, 'ann', 'move', :move),"
    " (2, :when, 'ann', 'split', :split)",
    "INSERT INTO constraints (id, decision_id, kind, face_a, face_b, identity_id, active) VALUES"
    " (1, 1, 'member', 3, NULL, 1, TRUE), (2, 2, 'cannot_link', 4, 5, NULL, TRUE)",
]
MOVE = {"run_id": 1, "summary": "moved", "faces": [3], "identities": [1, 2],
        "before": {"assignments": [[3, 2, 0.5, "cluster"]], "identities": [], "created_identities": [],
                   "deactivated_constraints": []}}
SPLIT = {"run_id": 1, "summary": "split", "faces": [4, 5], "identities": [2], "before": {}}


def check_0002_merges_copies_keeping_every_decision(settings: Settings) -> None:
    """Build a 0001 store with copies of one photo at `settings`' database, migrate, check (any backend)."""
    url = settings.db_url
    command.upgrade(alembic_config(url), "0001")
    with get_engine(url).begin() as connection:
        for statement in OLD_ROWS:
            connection.execute(text(statement), {"when": WHEN, "move": json.dumps(MOVE), "split": json.dumps(SPLIT)})

    Store(settings)  # migrates to the newest schema

    assert rows(url, "SELECT id, content_hash, status FROM images ORDER BY id") == [(1, "x", "ok"), (3, "y", "ok")]
    assert rows(url, "SELECT subset_id, path, image_id, status, reason FROM photo_paths ORDER BY id") == [
        (1, "/p/x.jpg", 1, "ok", None),
        (2, "/q/x.jpg", 1, "ok", None),
        (1, "/p/y.jpg", 3, "ok", None),
        (2, "/q/fifo.jpg", None, "failed", "unreadable: fifo"),
    ]
    assert rows(url, "SELECT id, image_id, face_index FROM faces ORDER BY id") == [(1, 1, 0), (2, 1, 1), (5, 3, 0)]
    assert rows(url, "SELECT id, kind, face_a, face_b, identity_id, active FROM constraints ORDER BY id") == [
        (1, "member", 1, None, 1, True),
        (2, "cannot_link", 2, 5, None, True),
    ]
    # The person's decision on the copy wins over the kept face's automatic assignment.
    assert rows(url, "SELECT face_id, identity_id, source, duplicate_of FROM assignments ORDER BY face_id") == [
        (1, 1, "decision", None),
        (2, 2, "cluster", None),
        (5, 2, "cluster", None),
    ]
    assert rows(url, "SELECT face_id, row FROM embeddings ORDER BY face_id") == [(1, 0), (2, 1), (5, 4)]
    payloads = {
        decision_id: payload if isinstance(payload, dict) else json.loads(payload)
        for decision_id, payload in rows(url, "SELECT id, payload FROM decisions")
    }
    assert payloads[1]["faces"] == [1] and payloads[1]["before"]["assignments"] == [[1, 2, 0.5, "cluster"]]
    assert payloads[1]["merged_faces"] == {"3": 1}
    assert payloads[2]["faces"] == [2, 5] and payloads[2]["merged_faces"] == {"4": 2}
    assert schema_differences(url) == []


def rows(url: str, sql: str) -> list[tuple]:
    with get_engine(url).connect() as connection:
        return [tuple(row) for row in connection.execute(text(sql))]


def test_0002_merges_copies_of_a_photo_keeping_every_decision(tmp_path):
    settings = Settings(data_dir=tmp_path)
    check_0002_merges_copies_keeping_every_decision(settings)
    url = settings.db_url
    autoincrement = {name for (name,) in rows(url, "SELECT name FROM sqlite_master WHERE sql LIKE '%AUTOINCREMENT%'")}
    with_ids = {table.name for table in Base.metadata.sorted_tables if list(table.primary_key.columns.keys()) == ["id"]}
    assert "faces" in with_ids and with_ids - autoincrement == set()
    with get_engine(url).begin() as connection:
        connection.execute(text("DELETE FROM faces WHERE id = 5"))
        connection.execute(
            text(
                "INSERT INTO faces (image_id, face_index, x1, y1, x2, y2, landmarks, det_score, eye_distance, sharpness,"
                " yaw, pitch, brightness, contrast, quality, passed, fail_reasons, chip_path, chip_template)"
                " VALUES (3, 0, 0, 0, 1, 1, '[]', 1, 1, 1, 0, 0, 0, 0, 1, TRUE, '', 'c2', 't')"
            )
        )
    assert rows(url, "SELECT id FROM faces WHERE image_id = 3") == [(6,)]  # face 5's id is not handed out again
