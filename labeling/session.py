"""One reviewer's pass through the review queue, shared by the terminal app and the web page.

The session holds the item on screen (its faces in display order, the cursor, the selection and
the merge suggestions), the keys and what each one does, and this session's decisions for undo.
Every decision goes through `labeling.actions.Labeler`, the same code as `facemine label`; the
terminal app (labeling/app.py) and the web page (labeling/web.py) only draw the session and pass
keys to it, so both decide exactly alike.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from labeling.actions import IdentityInfo, Labeler
from labeling.queue import QueueConfig, QueueItem, ReviewQueue, build_queue
from labeling.text import plural
from pipeline.errors import FacemineError
from storage.decisions import DecisionConflict, DecisionRecord
from storage.store import Store

# Faces of the highlighted merge suggestion shown beside the current identity.
COMPARE_FACES = 12
MAX_SUGGESTIONS = 9


@dataclass(frozen=True)
class Key:
    """A key of the review surfaces: Textual key names, the action it runs, footer and help wording."""

    keys: tuple[str, ...]
    action: str
    label: str
    help: str
    # Shown in the footer as one entry per group (e.g. the four arrows as "←↓↑→ cursor").
    display: str = ""

    @property
    def names(self) -> list[str]:
        """The keys as people write them."""
        return [DISPLAY_NAMES.get(key, key) for key in self.keys]

    @property
    def shown(self) -> str:
        return self.display or "/".join(self.names)


# How Textual key names are written for people.
DISPLAY_NAMES = {
    "space": "space", "enter": "enter", "full_stop": ".", "tab": "tab", "shift+tab": "shift+tab",
    "left": "←", "right": "→", "up": "↑", "down": "↓", "pagedown": "pgdn", "pageup": "pgup",
    "right_square_bracket": "]", "left_square_bracket": "[", "question_mark": "?", "escape": "esc",
}

# Every key of both review surfaces. Actions with arguments are written as calls, as Textual does.
KEYS: tuple[Key, ...] = (
    Key(("a",), "accept", "accept", "the identity is one person: pin all its faces, go to the next item"),
    Key(("r",), "reject", "reject", "the selected faces (else the one under the cursor) are not this person"),
    Key(("m",), "merge", "merge", "merge with the highlighted suggestion (one person), go to the next item"),
    Key(("v",), "move", "move", "move the selected faces (else the cursor's) to an identity id you type"),
    Key(("s",), "split", "split", "the selected faces are another person: a new identity for them"),
    Key(("n",), "name", "name", "name or rename the identity (you type the name), go to the next item"),
    Key(("x",), "not_a_face", "no face", "the selected faces (else the cursor's) are not faces at all"),
    Key(("L",), "lock", "lock", "keep exactly these faces: nothing joins automatically, go to the next item"),
    Key(("u",), "undo", "undo", "undo the last decision still in effect and go back to its item"),
    Key(("F",), "force", "force", "make the decision just refused anyway, overriding the decisions it contradicts (logged)"),
    Key(("space",), "toggle", "select", "select or unselect the face under the cursor"),
    Key(("c",), "clear", "clear", "clear the selection"),
    Key(("enter", "full_stop"), "next_item", "skip", "leave this item for later: the next one"),
    Key(("tab",), "next_item", "next", "the next item"),
    Key(("shift+tab",), "previous_item", "back", "the previous item"),
    Key(("left", "h"), "cursor(-1, 0)", "cursor", "cursor left", display="←↓↑→/hjkl"),
    Key(("right", "l"), "cursor(1, 0)", "", "cursor right"),
    Key(("up", "k"), "cursor(0, -1)", "", "cursor up"),
    Key(("down", "j"), "cursor(0, 1)", "", "cursor down"),
    Key(("pagedown", "right_square_bracket"), "page(1)", "page", "next page of faces", display="pgdn/pgup/]/["),
    Key(("pageup", "left_square_bracket"), "page(-1)", "", "previous page of faces"),
    *(Key((str(k),), f"suggest({k})", "suggestion" if k == 1 else "", f"highlight merge suggestion {k}",
          display="1-9" if k == 1 else "") for k in range(1, MAX_SUGGESTIONS + 1)),
    Key(("question_mark",), "help", "help", "this list of keys"),
    Key(("q",), "quit", "quit", "quit (every decision is already saved)"),
)


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


class ReviewSession:
    """The queue, the item on screen and this session's decisions. Methods that decide return
    the decision, or None with `message` saying why nothing was done (`error` set)."""

    def __init__(self, store: Store, labeler: Labeler, queue_config: QueueConfig | None = None) -> None:
        self.store, self.labeler = store, labeler
        self.queue: ReviewQueue = build_queue(store, queue_config)
        self.index = 0
        self.view: ItemView | None = None
        self.decisions_made = 0
        # (decision id, item index) of this session's decisions still in effect, for undo.
        self.undo_stack: list[tuple[int, int]] = []
        self.message, self.error = "", False
        # The last decision refused for contradicting earlier ones, ready to be forced ("F").
        self.refused: tuple[Callable[[bool], DecisionRecord], bool] | None = None
        self.show(0)

    # ---- showing items -----------------------------------------------------------------------

    @property
    def item(self) -> QueueItem | None:
        return self.view.item if self.view else None

    @property
    def done(self) -> bool:
        return self.view is None

    def _load(self, item: QueueItem) -> ItemView | None:
        """The item's view, or None when decisions since the queue was built have settled it."""
        try:
            identity = self.labeler.identity(item.identity_id)
        except FacemineError:
            return None
        if not identity.faces or (item.other_id is not None and not self._has_faces(item.other_id)):
            return None
        faces = self.queue.face_order(list(identity.faces), item.faces)
        suggestions = self.queue.suggestions(identity.id, faces)
        if item.other_id is not None:
            suggestions = [(item.other_id, item.similarity or 0.0)] + [s for s in suggestions if s[0] != item.other_id]
        # The queue's centres are those of its build: a suggestion may have lost every face since.
        suggestions = [s for s in suggestions if self._has_faces(s[0])][:MAX_SUGGESTIONS]
        return ItemView(item, identity, faces, set(item.faces) & set(faces), 0, suggestions)

    def _has_faces(self, identity_id: int) -> bool:
        try:
            return bool(self.labeler.identity(identity_id).faces)
        except FacemineError:  # merged away or retired since the queue was built
            return False

    def show(self, index: int, step: int = 1) -> None:
        """Show the first item from `index` on (going `step`) that still needs review."""
        while 0 <= index < len(self.queue.items):
            view = self._load(self.queue.items[index])
            if view is not None:
                self.index, self.view = index, view
                return
            index += step
        if step > 0:
            self.index, self.view = len(self.queue.items), None

    def next_item(self) -> None:
        self.show(self.index + 1)

    def previous_item(self) -> None:
        self.show(self.index - 1, step=-1)

    def reload(self) -> None:
        """Re-read the current identity after a decision, keeping cursor and selection where possible."""
        assert self.view is not None
        view = self._load(self.view.item)
        if view is None:
            self.show(self.index + 1)
            return
        view.selected &= self.view.selected
        view.cursor = min(self.view.cursor, len(view.faces) - 1)
        view.highlighted = min(self.view.highlighted, max(len(view.suggestions) - 1, 0))
        self.view = view

    def progress(self) -> str:
        total = len(self.queue.items)
        return f"item {min(self.index + 1, total)}/{total} · {plural(self.decisions_made, 'decision')} this session"

    def compare_faces(self, limit: int = COMPARE_FACES) -> list[int]:
        """Faces of the highlighted suggestion, most typical first."""
        if self.view is None or not self.view.suggestions:
            return []
        other = self.view.suggestions[self.view.highlighted][0]
        return list(reversed(self.queue.face_order(list(self.labeler.identity(other).faces))))[:limit]

    # ---- cursor and selection ----------------------------------------------------------------

    def say(self, message: str, error: bool = False) -> None:
        self.message, self.error = message, error

    def move_cursor(self, delta: int) -> None:
        if self.view is not None:
            self.view.cursor = max(0, min(len(self.view.faces) - 1, self.view.cursor + delta))

    def set_cursor(self, face: int) -> None:
        if self.view is not None and face in self.view.faces:
            self.view.cursor = self.view.faces.index(face)

    def toggle(self) -> None:
        if self.view is not None:
            self.view.selected ^= {self.view.faces[self.view.cursor]}

    def clear(self) -> None:
        if self.view is not None:
            self.view.selected.clear()

    def suggest(self, number: int) -> bool:
        if self.view is None or not 1 <= number <= len(self.view.suggestions):
            self.say(f"no suggestion {number}", error=True)
            return False
        self.view.highlighted = number - 1
        return True

    def targets(self) -> list[int]:
        """Selected faces, else the face under the cursor."""
        assert self.view is not None
        return sorted(self.view.selected) or [self.view.faces[self.view.cursor]]

    # ---- decisions -------------------------------------------------------------------------

    def decide(self, act: Callable[[bool], DecisionRecord], advance: bool, force: bool = False) -> DecisionRecord | None:
        """Run one action (`act(force)`); report it; then move on or show the identity as it is now.
        A decision refused for contradicting earlier ones can then be forced with `force_refused`."""
        if self.view is None:
            return None
        self.refused = None
        try:
            record = act(force)
        except DecisionConflict as conflict:
            self.refused = (act, advance)
            self.say(f"{conflict} (F: force it)", error=True)
            return None
        except FacemineError as error:
            self.say(str(error), error=True)
            return None
        self.decisions_made += 1
        self.undo_stack.append((record.id, self.index))
        self.say(f"decision {record.id}: {record.summary}")
        if advance:
            self.show(self.index + 1)
        else:
            self.reload()
        return record

    def force(self) -> DecisionRecord | None:
        """Make the decision just refused anyway; the log records what it overrides."""
        if self.refused is None:
            self.say("nothing to force: no decision was just refused", error=True)
            return None
        act, advance = self.refused
        return self.decide(act, advance, force=True)

    def accept(self) -> DecisionRecord | None:
        if self.view is None:
            return None
        identity = self.view.identity.id
        return self.decide(lambda force: self.labeler.accept(identity, force=force), advance=True)

    def lock(self) -> DecisionRecord | None:
        if self.view is None:
            return None
        identity = self.view.identity.id
        return self.decide(lambda force: self.labeler.lock(identity, force=force), advance=True)

    def reject(self) -> DecisionRecord | None:
        if self.view is None:
            return None
        identity, faces = self.view.identity.id, self.targets()
        return self.decide(lambda force: self.labeler.reject(identity, faces, force=force), advance=False)

    def not_a_face(self) -> DecisionRecord | None:
        if self.view is None:
            return None
        faces = self.targets()
        return self.decide(lambda force: self.labeler.not_a_face(faces, force=force), advance=False)

    def split(self) -> DecisionRecord | None:
        if self.view is None:
            return None
        if not self.view.selected:
            self.say("select the faces to split off first (space)", error=True)
            return None
        identity, faces = self.view.identity.id, sorted(self.view.selected)
        return self.decide(lambda force: self.labeler.split(identity, faces, force=force), advance=False)

    def merge(self) -> DecisionRecord | None:
        if self.view is None:
            return None
        if not self.view.suggestions:
            self.say("no identity to merge with", error=True)
            return None
        identity, other = self.view.identity.id, self.view.suggestions[self.view.highlighted][0]
        return self.decide(lambda force: self.labeler.merge(identity, other, force=force), advance=True)

    def move_prompt(self) -> str:
        return f"Move {plural(len(self.targets()))} to identity id:"

    def move(self, answer: str | None) -> DecisionRecord | None:
        """Move the targets to the identity id typed in `answer` (None or blank: cancelled)."""
        if self.view is None or not answer or not answer.strip():
            return None
        if not answer.strip().isdigit():
            self.say(f"not an identity id: {answer!r}", error=True)
            return None
        faces, target = self.targets(), int(answer)
        return self.decide(lambda force: self.labeler.move(faces, target, force=force), advance=False)

    def name_prompt(self) -> tuple[str, str]:
        """The question and the current name, to edit."""
        assert self.view is not None
        return f"Name for {self.view.identity.label()}:", self.view.identity.name or ""

    def name(self, answer: str | None) -> DecisionRecord | None:
        """Name the identity `answer` (None or blank: cancelled)."""
        if self.view is None or answer is None or not answer.strip():
            return None
        identity = self.view.identity.id
        return self.decide(lambda force: self.labeler.name(identity, answer, force=force), advance=True)

    def undo(self) -> DecisionRecord | None:
        """Undo the latest decision in effect; back to its item when this session made it."""
        try:
            record = self.labeler.undo()
        except FacemineError as error:
            self.say(str(error), error=True)
            return None
        self.say(f"decision {record.id}: {record.summary}")
        back_to = next((index for decision, index in self.undo_stack if decision == record.undid), None)
        if back_to is not None:
            self.undo_stack = [(d, i) for d, i in self.undo_stack if d != record.undid]
            self.decisions_made -= 1
            self.show(back_to)
        elif self.view is not None:
            self.reload()
        return record
