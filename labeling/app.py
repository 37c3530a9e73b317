"""`facemine review`: work through the review queue in a full-screen terminal app, keyboard only.

The app draws a `labeling.session.ReviewSession` and passes keys to it; the session decides
through `labeling.actions.Labeler` (the code of `facemine label` and of the web page).
Thumbnails are as large as the screen allows (up to `Thumbnails.size` columns) with one row of the
identity's faces and one of the highlighted suggestion's; only one page of faces is on screen
at a time and thumbnails are cached, so identities of thousands of faces stay responsive.
"""
from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Container, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Input, Label, Static

from labeling.actions import Labeler
from labeling.queue import QueueConfig, QueueItem
from labeling.session import KEYS, ReviewSession
from labeling.text import plural
from labeling.thumbnails import MIN_SIZE, Thumbnails
from storage.store import Store

# Lines above and below the face rows: progress, reason (2), suggestions, status.
FIXED_LINES = 5


class Prompt(ModalScreen[str | None]):
    """One line of input: Enter submits, Escape cancels."""

    BINDINGS = [Binding("escape", "cancel", "cancel")]
    DEFAULT_CSS = """
    Prompt { align: center middle; }
    Prompt > Vertical { width: 60; max-width: 100%; height: auto; border: thick $accent; background: $surface; padding: 0 1; }
    """

    def __init__(self, question: str, value: str = "") -> None:
        super().__init__()
        self.question, self.value = question, value

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question)
            yield Input(value=self.value, id="answer")

    @on(Input.Submitted)
    def submit(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)


class HelpScreen(ModalScreen[None]):
    """Every key and what it does; escape, ? or q closes it."""

    BINDINGS = [Binding("escape,question_mark,q", "close", "close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 90; max-width: 100%; height: auto; max-height: 100%;
                                  border: thick $accent; background: $surface; padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        text = Text("Keys (escape, ? or q closes this)\n\n", style="bold")
        for key in KEYS:
            text.append(" / ".join(key.names), "bold")
            text.append(f"  {key.help}\n")
        with VerticalScroll():
            yield Static(text, id="help")

    def action_close(self) -> None:
        self.dismiss(None)


def key_bar_lines(width: int) -> list[Text]:
    """Every key with its label, packed into lines of `width` columns; entries never break."""
    lines: list[Text] = [Text()]
    for key in KEYS:
        if not key.label:  # the rest of a group (e.g. the other arrows), shown with its first key
            continue
        entry = Text.assemble((key.shown, "bold reverse"), " ", key.label)
        if lines[-1].cell_len and lines[-1].cell_len + 2 + entry.cell_len > width:
            lines.append(Text())
        if lines[-1].cell_len:
            lines[-1].append("  ")
        lines[-1].append_text(entry)
    return lines


class KeyBar(Static):
    """The footer: every key, wrapped onto as many lines as the width needs."""

    DEFAULT_CSS = "KeyBar { dock: bottom; height: auto; padding: 0 1; background: $panel; }"

    def show_for(self, width: int) -> int:
        lines = key_bar_lines(max(width - 2, 20))
        self.update(Text("\n").join(lines))
        self.styles.height = len(lines)
        return len(lines)


class FaceCell(Vertical):
    """A thumbnail with its face id; the caption shows cursor and selection."""

    DEFAULT_CSS = """
    FaceCell { width: 100%; height: 100%; }
    FaceCell .caption { width: 100%; height: 1; }
    FaceCell.-cursor .caption { background: $accent; color: $text; text-style: bold; }
    FaceCell.-selected .caption { color: $warning; text-style: bold; }
    """

    def __init__(self, face_id: int, thumbnail: Widget, cursor: bool = False, selected: bool | None = None) -> None:
        """`selected` None: a face that cannot be selected (of a suggested identity)."""
        super().__init__()
        self.face_id, self.thumbnail = face_id, thumbnail
        self.caption = Static(classes="caption")
        self.show(cursor, selected)

    def compose(self) -> ComposeResult:
        yield self.thumbnail
        yield self.caption

    def show(self, cursor: bool, selected: bool | None) -> None:
        self.set_class(cursor, "-cursor")
        self.set_class(bool(selected), "-selected")
        box = "" if selected is None else f"[{'x' if selected else ' '}] "
        self.caption.update(Text(f"{box}{self.face_id}"))


def thumbnail_size(width: int, height: int, key_lines: int, largest: int) -> int:
    """The largest even thumbnail width (columns) up to `largest` for which one row of the
    identity's faces and one of the suggestion's fit a `width` x `height` screen."""
    rows_free = height - FIXED_LINES - key_lines
    for size in range(largest, MIN_SIZE - 1, -2):
        if 2 * (size // 2 + 1) <= rows_free and size + 2 <= width:
            return size
    return MIN_SIZE


class ReviewApp(App[None]):
    """Keys: labeling.session.KEYS, all in the footer and on the help screen (?)."""

    TITLE = "facemine review"
    CSS = """
    #progress { height: 1; background: $primary; color: $text; padding: 0 1; }
    #reason { height: 2; padding: 0 1; }
    #grid { height: 1fr; layout: grid; grid-gutter: 0 1; padding: 0 1; }
    #suggestions { height: 1; padding: 0 1; color: $text-muted; }
    #compare { layout: grid; grid-gutter: 0 1; padding: 0 1; }
    #status { height: 1; padding: 0 1; }
    """
    BINDINGS = [
        # Priority: the screen would otherwise take tab for moving focus.
        Binding(",".join(key.keys), key.action, key.label or key.help, show=False, priority="tab" in key.keys[0])
        for key in KEYS
    ]

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Tab needs priority over the screen's focus keys; it must not change items under a prompt.
        return not (isinstance(self.screen, ModalScreen) and action.endswith("_item"))

    def __init__(self, store: Store, labeler: Labeler, thumbnails: Thumbnails, queue_config: QueueConfig | None = None) -> None:
        super().__init__()
        self.store, self.thumbnails = store, thumbnails
        self.session = ReviewSession(store, labeler, queue_config)
        self.queue = self.session.queue
        self.page = 0
        self.size_columns = thumbnails.size

    # The session's state, as tests and the widgets read it.
    @property
    def view(self):  # noqa: ANN201 - labeling.session.ItemView | None
        return self.session.view

    @property
    def index(self) -> int:
        return self.session.index

    @property
    def item(self) -> QueueItem | None:
        return self.session.item

    # ---- layout ------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static(id="progress")
        yield Static(id="reason")
        yield Container(id="grid")
        yield Static(id="suggestions")
        yield Container(id="compare")
        yield Static(id="status")
        yield KeyBar(id="keys")

    def on_mount(self) -> None:
        self.fit_to_screen()
        # The grid's size is known once laid out.
        self.call_after_refresh(self.refresh_view)

    def fit_to_screen(self) -> None:
        """Key bar lines and thumbnail size for the screen as it is now."""
        width, height = self.size
        key_lines = self.query_one(KeyBar).show_for(width)
        self.size_columns = thumbnail_size(width, height, key_lines, self.thumbnails.size)
        cell_height = self.size_columns // 2 + 1
        for grid in (self.query_one("#grid"), self.query_one("#compare")):
            grid.styles.grid_columns = str(self.size_columns)
            grid.styles.grid_rows = str(cell_height)
        # A fixed height keeps the face grid's size, hence its page size, steady.
        self.query_one("#compare").styles.height = cell_height

    def grid_shape(self) -> tuple[int, int]:
        """Columns and rows of faces that fit the grid now."""
        grid = self.query_one("#grid")
        columns = max(1, (grid.size.width + 1) // (self.size_columns + 1))  # +1: no gutter after the last
        rows = max(1, grid.size.height // (self.size_columns // 2 + 1))
        return columns, rows

    @property
    def page_size(self) -> int:
        columns, rows = self.grid_shape()
        return columns * rows

    def on_resize(self) -> None:
        self.fit_to_screen()
        self.call_after_refresh(self.refresh_view)

    # ---- showing items -----------------------------------------------------------------------

    async def refresh_view(self) -> None:
        await self.render_grid()
        await self.render_compare()
        self.update_text()

    def update_text(self) -> None:
        session = self.session
        progress = session.progress()
        self.query_one("#status", Static).update(Text(session.message, "red" if session.error else ""))
        if session.view is None:
            self.query_one("#progress", Static).update(Text(progress + " · queue done"))
            self.query_one("#reason", Static).update("Nothing left to review. u: undo the last decision, q: quit.")
            self.query_one("#suggestions", Static).update("")
            return
        view = session.view
        pages = max(1, -(-len(view.faces) // self.page_size))
        progress += (
            f" · {view.identity.label()}: {plural(len(view.faces))}, {len(view.selected)} selected"
            f" · page {self.page + 1}/{pages}"
        )
        self.query_one("#progress", Static).update(Text(progress))
        self.query_one("#reason", Static).update(Text.assemble((view.item.kind, "bold"), "  ", view.item.reason))
        suggestions = Text("merge with " if view.suggestions else "no merge suggestions")
        for k, (identity, similarity) in enumerate(view.suggestions):
            suggestions.append(" ")
            suggestions.append(f"{k + 1}:#{identity} {similarity:.2f}", "reverse" if k == view.highlighted else "")
        self.query_one("#suggestions", Static).update(suggestions)

    async def render_grid(self) -> None:
        grid = self.query_one("#grid")
        await grid.remove_children()
        view = self.session.view
        if view is None:
            return
        columns, _rows = self.grid_shape()
        grid.styles.grid_size_columns = columns
        size = self.page_size
        self.page = min(view.cursor // size, max(len(view.faces) - 1, 0) // size)
        on_page = view.faces[self.page * size : (self.page + 1) * size]
        cursor_face = view.faces[view.cursor]
        await grid.mount_all(self._cell(face, face == cursor_face, face in view.selected) for face in on_page)

    async def render_compare(self) -> None:
        compare = self.query_one("#compare")
        await compare.remove_children()
        columns, _rows = self.grid_shape()
        compare.styles.grid_size_columns = columns
        await compare.mount_all(self._cell(face) for face in self.session.compare_faces(columns))

    def _cell(self, face: int, cursor: bool = False, selected: bool | None = None) -> FaceCell:
        return FaceCell(face, self.thumbnails.widget(self.queue.chip_paths[face], self.size_columns), cursor, selected)

    def mark_cells(self) -> None:
        view = self.session.view
        if view is None:
            return
        cursor_face = view.faces[view.cursor]
        for cell in self.query_one("#grid").query(FaceCell):
            cell.show(cell.face_id == cursor_face, cell.face_id in view.selected)
        self.update_text()

    # ---- keys --------------------------------------------------------------------------------

    async def action_cursor(self, dx: int, dy: int) -> None:
        if self.session.view is None:
            return
        old_page = self.page
        self.session.move_cursor(dx + dy * self.grid_shape()[0])
        if self.session.view.cursor // self.page_size != old_page:
            await self.render_grid()
        self.mark_cells()

    async def action_page(self, step: int) -> None:
        self.session.move_cursor(step * self.page_size)
        await self.render_grid()
        self.update_text()

    def action_toggle(self) -> None:
        self.session.toggle()
        self.mark_cells()

    def action_clear(self) -> None:
        self.session.clear()
        self.mark_cells()

    async def action_suggest(self, number: int) -> None:
        if self.session.suggest(number):
            await self.render_compare()
        self.update_text()

    async def action_next_item(self) -> None:
        self.session.next_item()
        await self.refresh_view()

    async def action_previous_item(self) -> None:
        self.session.previous_item()
        await self.refresh_view()

    async def _decided(self, decide) -> None:  # noqa: ANN001 - a session method
        decide()
        await self.refresh_view()

    async def action_accept(self) -> None:
        await self._decided(self.session.accept)

    async def action_lock(self) -> None:
        await self._decided(self.session.lock)

    async def action_reject(self) -> None:
        await self._decided(self.session.reject)

    async def action_not_a_face(self) -> None:
        await self._decided(self.session.not_a_face)

    async def action_split(self) -> None:
        await self._decided(self.session.split)

    async def action_merge(self) -> None:
        await self._decided(self.session.merge)

    async def action_undo(self) -> None:
        await self._decided(self.session.undo)

    async def action_force(self) -> None:
        await self._decided(self.session.force)

    def action_move(self) -> None:
        if self.session.view is None:
            return

        async def moved(answer: str | None) -> None:
            await self._decided(lambda: self.session.move(answer))

        self.push_screen(Prompt(self.session.move_prompt()), moved)

    def action_name(self) -> None:
        if self.session.view is None:
            return

        async def named(answer: str | None) -> None:
            await self._decided(lambda: self.session.name(answer))

        self.push_screen(Prompt(*self.session.name_prompt()), named)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())


def run_review(store: Store, who: str | None, thumbnails: Thumbnails, queue_config: QueueConfig | None = None) -> None:
    ReviewApp(store, Labeler(store, who), thumbnails, queue_config).run()
