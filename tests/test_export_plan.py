"""Export planning: which faces, folders that cannot escape, deterministic splits (small tables)."""
import numpy as np
import pandas as pd

from pipeline.config import ExportConfig
from pipeline.export import plan_export, safe_folder_name


def faces_table() -> pd.DataFrame:
    rows = []
    for identity, count in ((1, 6), (2, 3), (3, 1)):
        for k in range(count):
            rows.append({"identity_id": float(identity), "face_id": identity * 100 + k, "quality": 0.5 + k / 100})
    rows.append({"identity_id": np.nan, "face_id": 999, "quality": 0.9})  # unassigned
    table = pd.DataFrame(rows)
    table["identity_name"] = table.identity_id.map({1.0: "../../etc/passwd", 2.0: None})
    table["duplicate_of"] = np.nan
    table.loc[table.face_id == 101, "duplicate_of"] = 100
    table["outlier"] = table.face_id == 102
    for column in ("subset", "source_path"):
        table[column] = "x"
    for column in ("x1", "y1", "x2", "y2", "det_score", "confidence"):
        table[column] = 1.0
    return table


def test_folder_names_cannot_leave_the_export():
    assert safe_folder_name(7, "../../etc/passwd") == "000007_etc_passwd"
    assert safe_folder_name(7, "/abs/path") == "000007_abs_path"
    assert safe_folder_name(7, "..") == "000007"
    assert safe_folder_name(7, "Zoë Saldaña") == "000007_Zoe_Saldana"
    assert safe_folder_name(7, None) == "000007"


def test_plan_keeps_assigned_unique_inliers_of_big_enough_identities():
    manifest, card = plan_export(faces_table(), ExportConfig(min_faces_per_identity=2, val_fraction=0.25))
    exported = manifest[manifest.split != "duplicate"]
    assert set(exported.identity) == {1, 2}  # identity 3 too small, face 999 unassigned
    assert 102 not in set(exported.face_id)  # outlier
    assert manifest.loc[manifest.face_id == 101, "split"].item() == "duplicate"
    assert manifest.loc[manifest.face_id == 101, "chip_path"].item() == ""
    assert all(path.startswith(folder + "/") for path, folder in zip(exported.chip_path, exported.folder))
    assert card["identities"] == 2 and card["faces"] == len(exported) == 4 + 3
    assert card["val_faces"] == 1 + 1  # round(4 * 0.25), round(3 * 0.25)


def test_max_faces_keeps_best_quality_and_plan_is_deterministic():
    config = ExportConfig(min_faces_per_identity=1, max_faces_per_identity=2, val_fraction=0.5, seed=3)
    first, _ = plan_export(faces_table(), config)
    second, _ = plan_export(faces_table(), config)
    pd.testing.assert_frame_equal(first, second)
    kept = first[(first.identity == 1) & (first.split != "duplicate")]
    assert sorted(kept.face_id) == [104, 105]  # the two best-quality faces of identity 1
