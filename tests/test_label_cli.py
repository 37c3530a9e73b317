"""`facemine label ...` and `facemine review --sheet` through the real command line (real LFW faces)."""
from __future__ import annotations

import re

import cv2
import pytest
from review_helpers import Scenario, cli_store, scenario_run

from facemine_cli import main
from storage import decisions
from storage.identities import face_table, identity_rows
from storage.store import Store


@pytest.fixture
def store(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Store:
    return cli_store(tmp_path_factory, monkeypatch, "label-cli")


@pytest.fixture
def scenario(store: Store) -> Scenario:
    return scenario_run(store)


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(["label", *argv] if argv[0] != "review" else list(argv))
    out, err = capsys.readouterr()
    return code, out.strip(), err.strip()


def faces_arg(faces: list[int]) -> str:
    return ",".join(map(str, faces))


def test_every_action_through_the_cli(store, scenario, capsys):
    people = list(scenario.people.values())
    code, out, _ = run(capsys, "split", str(scenario.mixed), "--faces", faces_arg(people[1]), "--why", "two people")
    assert code == 0 and re.match(r"decision \d+: split 8 faces off identity \d+ into a new identity \(new identity \d+\)", out)
    new = int(out.rsplit(" ", 1)[1].rstrip(")"))
    assert run(capsys, "name", str(new), "Second Person")[0] == 0
    assert run(capsys, "reject", str(scenario.intruded), "--faces", str(scenario.intruder))[0] == 0
    assert run(capsys, "move", "--faces", str(scenario.intruder), "--to", str(scenario.rest_of_intruder))[0] == 0
    assert run(capsys, "merge", str(scenario.halves[0]), str(scenario.halves[1]))[0] == 0
    assert run(capsys, "not-a-face", "--faces", str(scenario.doubtful))[0] == 0
    assert run(capsys, "lock", str(scenario.pure))[0] == 0
    assert run(capsys, "accept", str(scenario.low_confidence), "--who", "someone-else")[0] == 0

    state = decisions.load_review_state(store)
    assert identity_rows(store, [new]).name.iloc[0] == "Second Person"
    assert state.pinned[scenario.intruder] == scenario.rest_of_intruder
    assert (scenario.intruder, scenario.intruded) in state.rejected
    assert scenario.halves[1] in state.retired and scenario.pure in state.locked
    assert scenario.doubtful in state.excluded

    code, out, _ = run(capsys, "history", "--limit", "3")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3
    assert "someone-else" in lines[0] and "accept" in lines[0]
    assert "cli-user" in lines[1] and "lock" in lines[1]
    code, out, _ = run(capsys, "history")
    assert "why: two people" in out.splitlines()[-1]


def test_undo_through_the_cli(store, scenario, capsys):
    run(capsys, "accept", str(scenario.pure))
    code, out, _ = run(capsys, "reject", str(scenario.pure), "--faces", str(scenario.people[list(scenario.people)[6]][0]))
    reject_id = int(out.split()[1].rstrip(":"))
    code, out, _ = run(capsys, "undo")
    assert code == 0 and f"undid decision {reject_id}" in out
    code, out, _ = run(capsys, "undo", str(reject_id))
    assert code == 2 and out == ""
    code, out, _ = run(capsys, "history")
    assert f"[undone by {reject_id + 1}]" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["accept", "9999"], "identity 9999 does not exist"),
        (["reject", "{pure}", "--faces", "{intruder}"], "face {intruder} is not in identity {pure}"),
        (["merge", "{pure}", "{pure}"], "cannot merge an identity with itself"),
        (["move", "--faces", "987654", "--to", "{pure}"], "face 987654 is not in the current labelling"),
        (["undo"], "nothing to undo"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(store, scenario, capsys, argv, message):
    values = {"pure": scenario.pure, "intruder": scenario.intruder}
    code, out, err = run(capsys, *[part.format(**values) for part in argv])
    assert code == 2 and out == ""
    assert err.startswith(f"facemine: error: {message.format(**values)}")
    assert len(err.splitlines()) == 1


def test_bad_face_list_is_an_argparse_error(store, scenario, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["label", "reject", str(scenario.pure), "--faces", "1,two"])
    assert exit_info.value.code == 2
    assert "expected comma-separated face ids" in capsys.readouterr().err


def test_no_clustering_run_yet(store, capsys):
    code, _, err = run(capsys, "accept", "1")
    assert code == 2 and "no clustering run yet" in err


def test_contact_sheet_shows_every_face(store, scenario, capsys, tmp_path):
    out_file = tmp_path / "sheet.png"
    code, out, _ = run(capsys, "review", "--sheet", str(scenario.mixed), "--out", str(out_file), "--columns", "5")
    assert code == 0 and out == f"wrote {out_file} (16 faces)"
    sheet = cv2.imread(str(out_file))
    chips = face_table(store).set_index("face_id").chip_path
    faces = decisions.identity_faces(store, scenario.run_id, scenario.mixed)
    chip_height, chip_width = store.chips.get(chips[faces[0]]).shape[:2]
    assert sheet.shape[1] == 5 * chip_width and sheet.shape[0] > 4 * chip_height  # 4 rows of 5, plus captions
    for face in faces:  # each chip appears unchanged somewhere on the sheet
        chip_bgr = cv2.cvtColor(store.chips.get(chips[face]), cv2.COLOR_RGB2BGR)
        assert cv2.matchTemplate(sheet, chip_bgr, cv2.TM_SQDIFF_NORMED).min() < 1e-4


def test_review_needs_a_terminal(store, scenario, capsys):
    code, _, err = run(capsys, "review")
    assert code == 2 and "needs an interactive terminal" in err
