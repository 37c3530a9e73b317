"""End to end: the real `facemine review` in a real terminal (tmux), real LFW faces, keys in, store out."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from review_helpers import Scenario, mined_store_copy, scenario_run

from storage import decisions
from storage.store import Store

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
FACEMINE = REPO / ".venv" / "bin" / "facemine"
# Starting Python with torch and faiss takes a while on a busy machine; this only bounds a hang.
SCREEN_WAIT_SECONDS = 180


class Terminal:
    """One tmux session on a private tmux server."""

    def __init__(self, socket: str, session: str) -> None:
        self.socket, self.session = socket, session

    def tmux(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=check)

    def alive(self) -> bool:
        return self.tmux("has-session", "-t", self.session, check=False).returncode == 0

    def screen(self, colours: bool = False) -> str:
        """The pane's text; with `colours`, with its colour escape sequences."""
        return self.tmux("capture-pane", "-p", *(["-e"] if colours else []), "-t", self.session).stdout

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", self.session, *keys)

    def wait_for(self, condition: Callable[[str], bool], what: str) -> str:
        deadline = time.monotonic() + SCREEN_WAIT_SECONDS
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"facemine review exited while waiting for {what}")
            text = self.screen()
            if condition(text):
                return text
            time.sleep(0.3)
        raise AssertionError(f"screen never showed {what}; last screen:\n{self.screen()}")


@pytest.fixture
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return Store(mined_store_copy(tmp_path_factory, "review-tmux"))


@pytest.fixture
def scenario(store: Store) -> Scenario:
    return scenario_run(store)


@pytest.fixture
def terminal(store: Store, scenario: Scenario, tmp_path: Path) -> Iterator[Terminal]:
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed: apt-get install tmux (scripts/test.sh installs it)")
    term = Terminal(f"facemine-test-{os.getpid()}", "review")
    env = {
        "FACEMINE_DATA_DIR": str(store.data_dir),
        "FACEMINE_CONFIG": os.devnull,  # no config file: an empty one (a missing one is an error)
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "TERM": "xterm-256color",
        "COLORTERM": "truecolor",
    }
    command = " ".join([*(f"{k}={v}" for k, v in env.items()), str(FACEMINE), "review", "--who", "tmux-reviewer"])
    # COLUMNS/LINES (set under pytest) would override the terminal's real size.
    term.tmux("new-session", "-d", "-s", term.session, "-x", "200", "-y", "50", f"env -u COLUMNS -u LINES {command}")
    try:
        yield term
    finally:
        term.tmux("kill-server", check=False)


def test_review_in_a_real_terminal(store, scenario, terminal):
    first = terminal.wait_for(lambda text: "item 1/" in text and "[x]" in text, "the first queue item")
    identity = int(re.search(r"identity (\d+): (\d+) faces", first).group(1))
    assert identity == scenario.mixed and "two groups" in first  # the most pressing item comes first
    assert "a accept" in first and "q quit" in first and "? help" in first  # key help in the footer
    # Six faces a row, each 32 half blocks wide (32x32 pixels), in true colour.
    assert max(line.count("▄") for line in first.splitlines()) == 6 * 32
    assert re.search(r"\x1b\[[0-9;]*48;2;\d+;\d+;\d+", terminal.screen(colours=True))
    terminal.keys("?")
    terminal.wait_for(lambda text: "Keys (escape, ? or q closes this)" in text, "the help screen")
    terminal.keys("Escape")
    terminal.wait_for(lambda text: "Keys (escape" not in text, "the help screen closed")

    terminal.keys("s")  # split off the pre-selected half
    terminal.wait_for(lambda text: re.search(r"decision \d+: split 8 faces off", text), "the split")
    terminal.keys(".")
    second = terminal.wait_for(lambda text: "item 2/" in text, "the second item")
    assert "merge?" in second and f"1:#{scenario.halves[1]}" in second
    terminal.keys("m")
    terminal.wait_for(lambda text: "item 3/" in text and "merged identity" in text, "the merge")
    terminal.keys("a")
    terminal.wait_for(lambda text: "item 4/" in text and "accepted identity" in text, "the accept")
    terminal.keys("u")
    terminal.wait_for(lambda text: "item 3/" in text and "undid decision" in text, "the undo")
    terminal.keys("q")
    deadline = time.monotonic() + 30
    while terminal.alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not terminal.alive(), "q did not quit the app"

    history = decisions.history(store)
    assert [record.action for record in history] == ["undo", "accept", "merge", "split"]
    assert {record.who for record in history} == {"tmux-reviewer"}
    assert history[1].undone_by == history[0].id
    assert scenario.halves[1] in decisions.load_review_state(store).retired
