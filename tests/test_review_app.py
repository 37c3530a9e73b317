"""The review app driven by Textual's Pilot: keys in, store state out (real LFW faces)."""
from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from review_helpers import Scenario, add_face_copies, make_run, mined_store_copy, scenario_run
from textual.pilot import Pilot
from textual.widgets import Static

from labeling.actions import Labeler
from labeling.app import FaceCell, HelpScreen, KeyBar, ReviewApp
from labeling.queue import MERGE, QueueConfig, QueueItem
from labeling.session import KEYS
from labeling.thumbnails import Thumbnails
from storage import decisions
from storage.identities import face_table, identity_rows
from storage.store import Store

SCREEN = (160, 50)
# Every unnamed identity of 2+ faces is an item, so each one can be reached.
EVERY_IDENTITY = QueueConfig(unnamed_min_faces=2)


@pytest.fixture
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return Store(mined_store_copy(tmp_path_factory, "review-app"))


@pytest.fixture
def scenario(store: Store) -> Scenario:
    return scenario_run(store)


def make_app(store: Store, config: QueueConfig = EVERY_IDENTITY, thumbnails: str = "halfblock") -> ReviewApp:
    return ReviewApp(store, Labeler(store, who="pilot"), Thumbnails(store.chips, thumbnails), config)


def drive(app: ReviewApp, script: Callable[[Pilot], object], size: tuple[int, int] = SCREEN) -> None:
    """Run `script(pilot)` against the app once its first item is on screen."""

    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            for _ in range(100):
                if app.view is None or app.query_one("#grid").query(FaceCell):
                    break
                await pilot.pause(0.05)
            await pilot.pause()
            await script(pilot)

    asyncio.run(main())


async def go_to(pilot: Pilot, wanted: Callable[[QueueItem], bool]) -> None:
    """Press tab until the item on screen is the wanted one."""
    app = pilot.app
    for _ in range(len(app.queue.items)):
        if app.item is not None and wanted(app.item):
            return
        await pilot.press("tab")
    raise AssertionError("item not in the queue")


async def type_text(pilot: Pilot, text: str) -> None:
    await pilot.press(*["space" if char == " " else char for char in text])


def members(store: Store, identity: int) -> list[int]:
    return decisions.identity_faces(store, decisions_run(store), identity)


def decisions_run(store: Store) -> int:
    from storage.identities import latest_run_id

    return latest_run_id(store)


def screen_text(app: ReviewApp, widget_id: str) -> str:
    return str(app.query_one(widget_id, Static).content)


def test_split_off_the_preselected_mode(store, scenario):
    app = make_app(store)
    people = list(scenario.people.values())

    async def script(pilot: Pilot) -> None:
        await go_to(pilot, lambda item: item.identity_id == scenario.mixed)
        assert app.item.kind == "mixed" and app.item.reason.startswith("two groups")
        await pilot.press("s")

    drive(app, script)
    (split,) = decisions.history(store)
    (new,) = split.created_identities
    parts = {frozenset(members(store, new)), frozenset(members(store, scenario.mixed))}
    assert parts == {frozenset(people[0]), frozenset(people[1])}


def test_reject_the_preselected_intruder(store, scenario):
    app = make_app(store)

    async def script(pilot: Pilot) -> None:
        await go_to(pilot, lambda item: item.identity_id == scenario.intruded)
        assert app.view.selected == {scenario.intruder}
        assert app.view.faces[0] == scenario.intruder  # suspects first
        await pilot.press("r")
        assert "9 faces" not in screen_text(app, "#progress")

    drive(app, script)
    assert scenario.intruder not in members(store, scenario.intruded)
    assert (scenario.intruder, scenario.intruded) in decisions.load_review_state(store).rejected


def test_merge_with_the_suggested_identity(store, scenario):
    app = make_app(store)

    async def script(pilot: Pilot) -> None:
        await go_to(pilot, lambda item: item.kind == MERGE and {item.identity_id, item.other_id} == set(scenario.halves))
        assert app.view.suggestions[0][0] == app.item.other_id
        await pilot.press("m")

    drive(app, script)
    rows = identity_rows(store, scenario.halves).set_index("identity_id")
    assert sorted(rows.status) == ["active", "merged"]
    assert len(members(store, int(rows.index[rows.status == "active"][0]))) == 8


def test_choose_another_suggestion_by_number(store, scenario):
    app = make_app(store)
    chosen = {}

    async def script(pilot: Pilot) -> None:
        await go_to(pilot, lambda item: item.identity_id == scenario.pure and item.kind != MERGE)
        chosen["id"] = app.view.suggestions[2][0]
        await pilot.press("3")
        assert app.view.highlighted == 2
        await pilot.press("m")

    drive(app, script)
    merged = identity_rows(store, [scenario.pure, chosen["id"]]).set_index("identity_id")
    assert "merged" in set(merged.status) and "active" in set(merged.status)


def test_name_through_the_prompt(store, scenario):
    app = make_app(store)

    async def script(pilot: Pilot) -> None:
        await go_to(pilot, lambda item: item.identity_id == scenario.pure)
        await pilot.press("n")
        await type_text(pilot, "Jack Straw")
        await pilot.press("enter")

    drive(app, script)
    assert identity_rows(store, [scenario.pure]).name.iloc[0] == "Jack Straw"
    assert all(decisions.load_review_state(store).pinned[f] == scenario.pure for f in members(store, scenario.pure))


def test_escape_cancels_the_prompt(store, scenario):
    app = make_app(store)

    async def script(pilot: Pilot) -> None:
        await pilot.press("n")
        await type_text(pilot, "Nobody")
        await pilot.press("escape", "a")

    drive(app, script)
    assert [record.action for record in decisions.history(store)] == ["accept"]
    assert identity_rows(store).name.isna().all()


def test_move_through_the_prompt(store, scenario):
    app = make_app(store)

    async def script(pilot: Pilot) -> None:
        await go_to(pilot, lambda item: item.identity_id == scenario.intruded)
        await pilot.press("v")
        await type_text(pilot, str(scenario.rest_of_intruder))
        await pilot.press("enter")

    drive(app, script)
    assert scenario.intruder in members(store, scenario.rest_of_intruder)


def test_not_a_face_under_the_cursor_then_undo(store, scenario):
    app = make_app(store)
    marked = {}

    async def script(pilot: Pilot) -> None:
        await go_to(pilot, lambda item: item.identity_id == scenario.pure)
        await pilot.press("right", "right", "left")
        assert app.view.cursor == 1
        marked["face"] = app.view.faces[app.view.cursor]
        await pilot.press("x")
        assert marked["face"] in decisions.load_review_state(store).excluded
        assert marked["face"] not in app.view.faces
        await pilot.press("u")
        assert marked["face"] in app.view.faces

    drive(app, script)
    assert marked["face"] in members(store, scenario.pure)
    assert not decisions.load_review_state(store).excluded
    assert [record.action for record in decisions.history(store)] == ["undo", "not_a_face"]


def test_select_then_split_and_lock(store, scenario):
    app = make_app(store)
    picked = []

    async def script(pilot: Pilot) -> None:
        await go_to(pilot, lambda item: item.identity_id == scenario.pure)
        await pilot.press("c", "space", "right", "right", "space")
        picked.extend(sorted(app.view.selected))
        assert len(picked) == 2
        await pilot.press("s")
        await pilot.press("L")

    drive(app, script)
    assert scenario.pure in decisions.load_review_state(store).locked
    split = next(r for r in decisions.history(store) if r.action == "split")
    assert members(store, split.created_identities[0]) == picked


def test_skip_accept_and_progress(store, scenario):
    app = make_app(store)

    async def script(pilot: Pilot) -> None:
        total = len(app.queue.items)
        assert screen_text(app, "#progress").startswith(f"item 1/{total} · 0 decisions")
        first = app.item
        await pilot.press("full_stop")
        assert app.index == 1 and screen_text(app, "#progress").startswith(f"item 2/{total}")
        await pilot.press("shift+tab")
        assert app.item == first
        await pilot.press("a")
        assert screen_text(app, "#progress").startswith(f"item 2/{total} · 1 decision ")
        assert "accepted" in screen_text(app, "#status")

    drive(app, script)
    (record,) = decisions.history(store)
    assert record.action == "accept" and record.who == "pilot"


def test_errors_show_in_the_status_line(store, scenario):
    app = make_app(store)

    async def script(pilot: Pilot) -> None:
        await pilot.press("c", "s")  # split with nothing selected
        assert "select the faces" in screen_text(app, "#status")
        await pilot.press("v", "9", "9", "9", "9", "enter")
        assert "identity 9999 does not exist" in screen_text(app, "#status")

    drive(app, script)
    assert decisions.history(store) == []


def test_fifty_items_with_single_keystrokes(store):
    """One identity per face: every face is an item, so a reviewer can clear 50 with 50 keys."""
    faces = face_table(store).face_id.tolist()
    make_run(store, [[face] for face in faces])
    app = make_app(store, QueueConfig(unnamed_min_faces=1))
    visited = []

    async def script(pilot: Pilot) -> None:
        assert len(app.queue.items) >= 50
        for _ in range(50):
            item = app.item
            visited.append(app.index)
            await pilot.press("m" if item.kind == MERGE else "a")
            assert app.index > visited[-1]
        assert screen_text(app, "#progress").startswith(f"item {app.index + 1}/{len(app.queue.items)} · 50 decisions")

    drive(app, script)
    history = decisions.history(store)
    assert len(history) == 50 and {r.action for r in history} <= {"accept", "merge"}


def test_an_identity_of_a_thousand_faces_is_paged(store):
    copies = add_face_copies(store, 1200)
    everyone = face_table(store).face_id.tolist()
    _, (big,) = make_run(store, [everyone])
    app = make_app(store, QueueConfig())

    async def script(pilot: Pilot) -> None:
        assert app.view.identity.id == big and len(app.view.faces) == len(everyone)
        on_screen = len(app.query_one("#grid").query(FaceCell))
        assert 0 < on_screen == app.page_size < 100
        await pilot.press("down", "l", "h", "j")
        assert app.view.cursor == 2 * app.grid_shape()[0]
        await pilot.press("pagedown")
        size = app.page_size
        assert app.view.cursor == 2 * app.grid_shape()[0] + size and app.page == app.view.cursor // size >= 1
        shown = [cell.face_id for cell in app.query_one("#grid").query(FaceCell)]
        assert shown == app.view.faces[app.page * size : (app.page + 1) * size]
        await pilot.press("a")

    drive(app, script)
    assert len(everyone) > len(copies) >= 1200
    assert set(decisions.load_review_state(store).pinned) == set(everyone)


def test_faces_are_32_pixels_at_200_columns(store, scenario):
    app = make_app(store)

    async def script(pilot: Pilot) -> None:
        await pilot.pause()
        assert app.size_columns == 32 and app.grid_shape()[0] == 6  # 6 faces of 32x32 half-block pixels a row
        thumbnails = [cell.thumbnail for cell in app.query_one("#grid").query(FaceCell)]
        assert len(thumbnails) == 6 and {(t.size.width, t.size.height) for t in thumbnails} == {(32, 16)}
        # Two pixels a cell, both drawn: each of the 16 rows is 32 half blocks in true colour.
        for y in range(16):
            segments = [segment for segment in thumbnails[0].render_line(y) if segment.text.strip()]
            assert "".join(segment.text for segment in segments) == "▄" * 32
            assert all(segment.style.color.triplet and segment.style.bgcolor.triplet for segment in segments)

    drive(app, script, size=(200, 50))


def within(region, screen) -> bool:  # noqa: ANN001 - textual.geometry.Region
    return region.x >= 0 and region.y >= 0 and region.right <= screen.width and region.bottom <= screen.height


def test_usable_at_80_by_24(store, scenario):
    """Fewer, smaller faces a row; every key in the footer; nothing cut off."""
    app = make_app(store)

    async def script(pilot: Pilot) -> None:
        await pilot.pause()
        screen = app.screen.region
        columns, rows = app.grid_shape()
        assert (app.size_columns, columns, rows) == (14, 5, 1)
        assert len(app.query_one("#grid").query(FaceCell)) == columns
        other = app.view.suggestions[app.view.highlighted][0]
        assert len(app.query_one("#compare").query(FaceCell)) == min(columns, len(members(store, other)))
        cells = list(app.query(FaceCell))
        assert all(within(cell.region, screen) and cell.thumbnail.size.width == 14 for cell in cells)
        bar = app.query_one(KeyBar)
        assert within(bar.region, screen) and bar.region.height == 3
        footer = str(bar.render())
        assert all(f"{key.shown} {key.label}" in footer for key in KEYS if key.label)
        for widget_id in ("#progress", "#reason", "#suggestions", "#status"):
            assert within(app.query_one(widget_id).region, screen)
        await pilot.press("a")
        assert "accepted" in screen_text(app, "#status")

    drive(app, script, size=(80, 24))


def test_help_screen_lists_every_key_and_decides_nothing(store, scenario):
    app = make_app(store)

    async def script(pilot: Pilot) -> None:
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        text = str(app.screen.query_one("#help", Static).content)
        assert all(key.help in text for key in KEYS)
        await pilot.press("a", "x", "tab")  # not decisions while the help is open
        assert isinstance(app.screen, HelpScreen) and app.index == 0
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)

    drive(app, script, size=(80, 24))
    assert decisions.history(store) == []


def test_thumbnail_modes(store):
    from pipeline.errors import FacemineError

    from labeling.thumbnails import terminal_has_graphics

    assert Thumbnails(store.chips).mode == ("graphics" if terminal_has_graphics() else "halfblock")
    with pytest.raises(FacemineError, match="unknown thumbnail mode 'sixel'"):
        Thumbnails(store.chips, "sixel")
    with pytest.raises(FacemineError, match="even number of at least 8"):
        Thumbnails(store.chips, size=31)


def test_contact_sheet_is_readable_by_everyone(store, scenario, tmp_path):
    import stat

    from labeling.sheet import write_identity_sheet

    out = write_identity_sheet(store, Labeler(store).identity(scenario.pure), scenario.run_id, tmp_path / "sheet.png")
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_graphics_thumbnails_fill_the_same_cells(store, scenario):
    """textual-image widgets (Sixel/Kitty in a terminal that has them) take the half blocks' place."""
    from textual_image.widget import Image

    app = make_app(store, thumbnails="graphics")

    async def script(pilot: Pilot) -> None:
        thumbnails = [cell.thumbnail for cell in app.query_one("#grid").query(FaceCell)]
        assert len(thumbnails) == 6 and all(isinstance(t, Image) for t in thumbnails)
        assert {(t.size.width, t.size.height) for t in thumbnails} == {(32, 16)}

    drive(app, script, size=(200, 50))
