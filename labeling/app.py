"""`facemine review`: work through the review queue in a full-screen terminal app, keyboard only.

Every decision goes through `labeling.actions.Labeler`, the same code as `facemine label`.
Only one page of the current identity's faces is on screen at a time and thumbnails are cached,
so identities of thousands of faces stay responsive.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rich.text import Text
from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Container, Vertical
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Footer, Input, Label, Static

from labeling.actions import IdentityInfo, Labeler
from labeling.queue import QueueConfig, QueueItem, ReviewQueue, build_queue
from labeling.text import plural
from labeling.thumbnails import Thumbnails
from pipeline.errors import FacemineError
from storage.store import Store

# Faces of the highlighted merge suggestion shown beside the current identity.
COMPARE_FACES = 12


class Prompt(ModalScreen[str | None]):
    """One line of input: Enter submits, Escape cancels."""

    BINDINGS = [Binding("escape", "cancel", "cancel")]
    DEFAULT_CSS = """
    Prompt { align: center middle; }
    Prompt > Vertical { width: 60; height: auto; border: thick $accent; background: $surface; padding: 0 1; }
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


@dataclass
class ItemView:
    """The identity on screen: its faces in display order, cursor, selection, suggestions."""

    item: QueueItem
    identity: IdentityInfo
    faces: list[int]
    selected: set[int] = field(default_factory=set)
    cursor: int = 0
    suggestions: list[tuple[int, float]] = field(default_factory=list)
    highlighted: int = 0


class ReviewApp(App[None]):
    """Keys: see BINDINGS (also shown in the footer)."""

    TITLE = "facemine review"
    CSS = """
    #progress { height: 1; background: $primary; color: $text; padding: 0 1; }
    #reason { height: auto; max-height: 3; padding: 0 1; }
    #grid { height: 1fr; layout: grid; grid-gutter: 0 1; padding: 0 1; }
    #suggestions { height: 1; padding: 0 1; color: $text-muted; }
    #compare { layout: grid; grid-gutter: 0 1; padding: 0 1; }
    #status { height: 1; padding: 0 1; }
    """
    BINDINGS = [
        Binding("a", "accept", "accept"),
        Binding("r", "reject", "reject"),
        Binding("m", "merge", "merge"),
        Binding("v", "move", "move"),
        Binding("s", "split", "split"),
        Binding("n", "name", "name"),
        Binding("x", "not_a_face", "no face"),
        Binding("L", "lock", "lock"),
        Binding("u", "undo", "undo"),
        Binding("space", "toggle", "select"),
        Binding("c", "clear", "clear", show=False),
        Binding("enter,full_stop", "next_item", "skip"),
        # Priority: the screen would otherwise take tab for moving focus.
        Binding("tab", "next_item", "next", show=False, priority=True),
        Binding("shift+tab", "previous_item", "back", show=False, priority=True),
        Binding("left,h", "cursor(-1, 0)", "left", show=False),
        Binding("right,l", "cursor(1, 0)", "right", show=False),
        Binding("up,k", "cursor(0, -1)", "up", show=False),
        Binding("down,j", "cursor(0, 1)", "down", show=False),
        Binding("pagedown,right_square_bracket", "page(1)", "page", show=False),
        Binding("pageup,left_square_bracket", "page(-1)", "page", show=False),
        *(Binding(str(k), f"suggest({k})", f"suggestion {k}", show=False) for k in range(1, 10)),
        Binding("q", "quit", "quit"),
    ]

    def __init__(self, store: Store, labeler: Labeler, thumbnails: Thumbnails, queue_config: QueueConfig | None = None) -> None:
        super().__init__()
        self.store, self.labeler, self.thumbnails = store, labeler, thumbnails
        self.queue: ReviewQueue = build_queue(store, queue_config)
        self.index = 0
        self.view: ItemView | None = None
        self.page = 0
        self.decisions_made = 0
        # (decision id, item index) of this session's decisions still in effect, for undo.
        self.undo_stack: list[tuple[int, int]] = []

    # ---- layout ------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static(id="progress")
        yield Static(id="reason")
        yield Container(id="grid")
        yield Static(id="suggestions")
        yield Container(id="compare")
        yield Static(id="status")
        yield Footer(compact=True, show_command_palette=False)

    async def on_mount(self) -> None:
        cell_height = self.thumbnails.rows + 1
        for grid in (self.query_one("#grid"), self.query_one("#compare")):
            grid.styles.grid_columns = str(self.cell_width)
            grid.styles.grid_rows = str(cell_height)
        # A fixed height keeps the face grid's size, hence its page size, steady.
        self.query_one("#compare").styles.height = cell_height
        # The grid's size is known once laid out.
        self.call_after_refresh(self.show_item, 0)

    @property
    def cell_width(self) -> int:
        return max(self.thumbnails.columns, 8)

    def grid_shape(self) -> tuple[int, int]:
        """Columns and rows of faces that fit the grid now."""
        grid = self.query_one("#grid")
        columns = max(1, (grid.size.width + 1) // (self.cell_width + 1))  # +1: no gutter after the last
        rows = max(1, grid.size.height // (self.thumbnails.rows + 1))
        return columns, rows

    @property
    def page_size(self) -> int:
        columns, rows = self.grid_shape()
        return columns * rows

    def on_resize(self) -> None:
        self.call_after_refresh(self.refresh_view)

    # ---- showing items -----------------------------------------------------------------------

    @property
    def item(self) -> QueueItem | None:
        return self.view.item if self.view else None

    def _load(self, item: QueueItem) -> ItemView | None:
        """The item's view, or None when decisions since the queue was built have settled it."""
        try:
            identity = self.labeler.identity(item.identity_id)
            if item.other_id is not None:
                self.labeler.identity(item.other_id)
        except FacemineError:
            return None
        if not identity.faces:
            return None
        faces = self.queue.face_order(list(identity.faces), item.faces)
        suggestions = self.queue.suggestions(identity.id, faces)
        if item.other_id is not None:
            suggestions = [(item.other_id, item.similarity or 0.0)] + [s for s in suggestions if s[0] != item.other_id]
        return ItemView(item, identity, faces, set(item.faces) & set(faces), 0, suggestions[:9])

    async def show_item(self, index: int, step: int = 1) -> None:
        """Show the first item from `index` on (going `step`) that still needs review."""
        while 0 <= index < len(self.queue.items):
            view = self._load(self.queue.items[index])
            if view is not None:
                self.index, self.view, self.page = index, view, 0
                await self.refresh_view()
                return
            index += step
        if step > 0:
            self.index, self.view = len(self.queue.items), None
            await self.refresh_view()

    async def reload_item(self) -> None:
        """Re-read the current identity after a decision, keeping cursor and page where possible."""
        assert self.view is not None
        view = self._load(self.view.item)
        if view is None:
            await self.show_item(self.index + 1)
            return
        view.selected &= self.view.selected
        view.cursor = min(self.view.cursor, len(view.faces) - 1)
        view.highlighted = min(self.view.highlighted, max(len(view.suggestions) - 1, 0))
        self.view = view
        await self.refresh_view()

    async def refresh_view(self) -> None:
        await self.render_grid()
        await self.render_compare()
        self.update_text()

    def update_text(self) -> None:
        total = len(self.queue.items)
        progress = f"item {min(self.index + 1, total)}/{total} · {plural(self.decisions_made, 'decision')} this session"
        if self.view is None:
            self.query_one("#progress", Static).update(Text(progress + " · queue done"))
            self.query_one("#reason", Static).update("Nothing left to review. u: undo the last decision, q: quit.")
            self.query_one("#suggestions", Static).update("")
            return
        view = self.view
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
        if self.view is None:
            return
        columns, _rows = self.grid_shape()
        grid.styles.grid_size_columns = columns
        size = self.page_size
        self.page = min(self.view.cursor // size, max(len(self.view.faces) - 1, 0) // size)
        on_page = self.view.faces[self.page * size : (self.page + 1) * size]
        cursor_face = self.view.faces[self.view.cursor]
        await grid.mount_all(self._cell(face, face == cursor_face, face in self.view.selected) for face in on_page)

    async def render_compare(self) -> None:
        compare = self.query_one("#compare")
        await compare.remove_children()
        if self.view is None or not self.view.suggestions:
            return
        other = self.view.suggestions[self.view.highlighted][0]
        typical = list(reversed(self.queue.face_order(list(self.labeler.identity(other).faces))))  # most typical first
        columns, _rows = self.grid_shape()
        compare.styles.grid_size_columns = columns
        await compare.mount_all(self._cell(face) for face in typical[: min(columns, COMPARE_FACES)])

    def _cell(self, face: int, cursor: bool = False, selected: bool | None = None) -> FaceCell:
        return FaceCell(face, self.thumbnails.widget(self.queue.chip_paths[face]), cursor, selected)

    def mark_cells(self) -> None:
        if self.view is None:
            return
        cursor_face = self.view.faces[self.view.cursor]
        for cell in self.query_one("#grid").query(FaceCell):
            cell.show(cell.face_id == cursor_face, cell.face_id in self.view.selected)

    def say(self, message: str, error: bool = False) -> None:
        self.query_one("#status", Static).update(Text(message, "red" if error else ""))

    # ---- navigation ------------------------------------------------------------------------

    async def action_cursor(self, dx: int, dy: int) -> None:
        if self.view is None:
            return
        columns, _rows = self.grid_shape()
        old_page = self.page
        self.view.cursor = max(0, min(len(self.view.faces) - 1, self.view.cursor + dx + dy * columns))
        if self.view.cursor // self.page_size != old_page:
            await self.render_grid()
        else:
            self.mark_cells()
        self.update_text()

    async def action_page(self, step: int) -> None:
        if self.view is None:
            return
        self.view.cursor = max(0, min(len(self.view.faces) - 1, self.view.cursor + step * self.page_size))
        await self.render_grid()
        self.update_text()

    def action_toggle(self) -> None:
        if self.view is None:
            return
        face = self.view.faces[self.view.cursor]
        self.view.selected ^= {face}
        self.mark_cells()
        self.update_text()

    def action_clear(self) -> None:
        if self.view is not None:
            self.view.selected.clear()
            self.mark_cells()
            self.update_text()

    async def action_suggest(self, number: int) -> None:
        if self.view is None or number > len(self.view.suggestions):
            self.say(f"no suggestion {number}", error=True)
            return
        self.view.highlighted = number - 1
        self.update_text()
        await self.render_compare()

    async def action_next_item(self) -> None:
        await self.show_item(self.index + 1)

    async def action_previous_item(self) -> None:
        await self.show_item(self.index - 1, step=-1)

    # ---- decisions -------------------------------------------------------------------------

    def _targets(self) -> list[int]:
        """Selected faces, else the face under the cursor."""
        assert self.view is not None
        return sorted(self.view.selected) or [self.view.faces[self.view.cursor]]

    async def decide(self, act, advance: bool) -> None:  # noqa: ANN001 - a callable returning a DecisionRecord
        """Run one action; report it; then move on or show the identity as it is now."""
        if self.view is None:
            return
        try:
            record = act()
        except FacemineError as error:
            self.say(str(error), error=True)
            return
        self.decisions_made += 1
        self.undo_stack.append((record.id, self.index))
        self.say(f"decision {record.id}: {record.summary}")
        if advance:
            await self.show_item(self.index + 1)
        else:
            await self.reload_item()

    async def action_accept(self) -> None:
        if self.view:
            await self.decide(lambda: self.labeler.accept(self.view.identity.id), advance=True)

    async def action_lock(self) -> None:
        if self.view:
            await self.decide(lambda: self.labeler.lock(self.view.identity.id), advance=True)

    async def action_reject(self) -> None:
        if self.view:
            faces = self._targets()
            await self.decide(lambda: self.labeler.reject(self.view.identity.id, faces), advance=False)

    async def action_not_a_face(self) -> None:
        if self.view:
            faces = self._targets()
            await self.decide(lambda: self.labeler.not_a_face(faces), advance=False)

    async def action_split(self) -> None:
        if self.view is None:
            return
        if not self.view.selected:
            self.say("select the faces to split off first (space)", error=True)
            return
        faces = sorted(self.view.selected)
        await self.decide(lambda: self.labeler.split(self.view.identity.id, faces), advance=False)

    async def action_merge(self) -> None:
        if self.view is None:
            return
        if not self.view.suggestions:
            self.say("no identity to merge with", error=True)
            return
        other = self.view.suggestions[self.view.highlighted][0]
        await self.decide(lambda: self.labeler.merge(self.view.identity.id, other), advance=True)

    def action_move(self) -> None:
        if self.view is None:
            return
        faces = self._targets()

        async def moved(answer: str | None) -> None:
            if not answer:
                return
            if not answer.strip().isdigit():
                self.say(f"not an identity id: {answer!r}", error=True)
                return
            await self.decide(lambda: self.labeler.move(faces, int(answer)), advance=False)

        self.push_screen(Prompt(f"Move {plural(len(faces))} to identity id:"), moved)

    def action_name(self) -> None:
        if self.view is None:
            return
        identity = self.view.identity

        async def named(answer: str | None) -> None:
            if answer is not None and answer.strip():
                await self.decide(lambda: self.labeler.name(identity.id, answer), advance=True)

        self.push_screen(Prompt(f"Name for {identity.label()}:", identity.name or ""), named)

    async def action_undo(self) -> None:
        try:
            record = self.labeler.undo()
        except FacemineError as error:
            self.say(str(error), error=True)
            return
        self.say(f"decision {record.id}: {record.summary}")
        back_to = next((index for decision, index in self.undo_stack if decision == record.undid), None)
        if back_to is not None:
            self.undo_stack = [(d, i) for d, i in self.undo_stack if d != record.undid]
            self.decisions_made -= 1
            await self.show_item(back_to)
        elif self.view is not None:
            await self.reload_item()


def run_review(store: Store, who: str | None, thumbnails: Thumbnails, queue_config: QueueConfig | None = None) -> None:
    ReviewApp(store, Labeler(store, who), thumbnails, queue_config).run()
