"""End to end: `facemine review --web` in headless Chromium, real LFW faces, keys in, store out."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from review_helpers import make_run, mined_store_copy

from storage import decisions
from storage.identities import face_table, identity_rows
from storage.store import Store

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
FACEMINE = REPO / ".venv" / "bin" / "facemine"
CHROMIUM = "/usr/bin/chromium"
# Starting Python with torch and faiss takes a while on a busy machine; this only bounds a hang.
START_SECONDS = 180
KEY_SECONDS = 30
MIN_CHIP_PIXELS = 112


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`facemine review --web` as a user starts it, on a free port."""

    def __init__(self, store: Store, tmp_path: Path, min_faces: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {
            **{k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")},
            "FACEMINE_DATA_DIR": str(store.data_dir),
            "FACEMINE_CONFIG": os.devnull,  # no config file: an empty one (a missing one is an error)
            "PREFECT_HOME": str(tmp_path / "prefect"),
            "FACEMINE_REVIEW__UNNAMED_MIN_FACES": str(min_faces),
        }
        command = [str(FACEMINE), "review", "--web", "--port", str(self.port), "--who", "web-reviewer"]
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        banner = self.process.stdout.readline()
        assert banner.startswith(f"review page: {self.url}"), banner + self.process.stdout.read()
        deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                urllib.request.urlopen(self.url + "api/keys", timeout=5).read()
                return
            except OSError:
                assert self.process.poll() is None and time.monotonic() < deadline, "the review server did not start"
                time.sleep(0.3)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)


@pytest.fixture
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return Store(mined_store_copy(tmp_path_factory, "review-web"))


@pytest.fixture
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("Debian chromium is not installed: apt-get install chromium (scripts/test.sh installs it)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


def serve(store: Store, tmp_path: Path, min_faces: int) -> Iterator[Server]:
    server = Server(store, tmp_path, min_faces)
    try:
        yield server
    finally:
        server.stop()


# The page's item number and count of this session's decisions, as JavaScript reads them.
ITEM_NUMBER = "parseInt(document.getElementById('progress').textContent.slice(5))"
DECISIONS_MADE = "parseInt(document.getElementById('progress').textContent.split(' · ')[1])"


def item_number(page) -> int:  # noqa: ANN001 - playwright Page
    return int(re.match(r"item (\d+)/", page.inner_text("#progress")).group(1))


def press_and_wait(page, key: str, done: str) -> None:  # noqa: ANN001
    """Press `key`, then wait until the page's JavaScript condition `done` holds."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.keyboard.press(key)
    try:
        page.wait_for_function(done, timeout=KEY_SECONDS * 1000)
    except PlaywrightTimeout:
        raise AssertionError(f"after {key!r} the page shows {page.inner_text('#progress')!r}, "
                             f"status {page.inner_text('#status')!r}") from None


def shown_item(page) -> dict:  # noqa: ANN001
    """What the page shows of the current item: kind, identity, first suggestion, cursor face."""
    heading = page.inner_text("#identity")
    suggestion = page.locator(".suggestion").first
    other = re.search(r"#(\d+)", suggestion.inner_text()).group(1) if suggestion.count() else None
    return {
        "number": item_number(page),
        "kind": page.inner_text("#reason b"),
        "identity": int(re.match(r"identity (\d+)", heading).group(1)),
        "faces": re.match(r"identity \d+: (\d+ faces?)", heading).group(1),
        "other": int(other) if other else None,
        "cursor_face": int(page.get_attribute(".face.cursor", "data-face")),
    }


def test_fifty_items_with_keys_then_undo(store, browser, tmp_path):
    """Every face its own identity: 50 items cleared with single keys (accept, merge, not a face,
    skip); the decision log holds exactly what the keys said; u undoes the last one."""
    faces = face_table(store).face_id.tolist()
    make_run(store, [[face] for face in faces])
    expected = []  # (action, identities or face) per decision, oldest first
    for server in serve(store, tmp_path, min_faces=1):
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server.url)
        page.wait_for_selector(".face.cursor img")
        total = int(re.match(r"item \d+/(\d+)", page.inner_text("#progress")).group(1))
        assert total >= 50
        visited, step = set(), 0
        while len(visited) < 50:
            item = shown_item(page)
            visited.add(item["number"])
            key = "x" if step % 10 == 3 else "." if step % 10 == 7 else "m" if item["kind"] == "merge?" else "a"
            step += 1
            if key == ".":
                press_and_wait(page, key, f"{ITEM_NUMBER} > {item['number']}")
                continue
            last_decided = item
            if key == "a":
                expected.append(("accept", f"accepted identity {item['identity']} ({item['faces']})"))
            elif key == "m":
                expected.append(("merge", {item["identity"], item["other"]}))
            else:
                expected.append(("not_a_face", item["cursor_face"]))
            press_and_wait(page, key, f"{DECISIONS_MADE} == {len(expected)}")
        history = list(reversed(decisions.history(store)))
        assert len(history) == len(expected) >= 40
        for record, (action, what) in zip(history, expected):
            assert record.action == action and record.who == "web-reviewer"
            if action == "accept":
                assert record.summary == what
            elif action == "merge":
                assert set(map(int, re.findall(r"identity (\d+)", record.summary))) == what
        excluded = decisions.load_review_state(store).excluded
        assert {what for action, what in expected if action == "not_a_face"} == set(excluded)
        assert f"· {len(expected)} decisions this session" in page.inner_text("#progress")

        # Undo: the last decision is reverted and its item is back on screen.
        last = history[-1]
        press_and_wait(page, "u", f"document.getElementById('status').textContent.includes('undid decision {last.id}')")
        assert item_number(page) == last_decided["number"]
        undo = decisions.history(store)[0]
        assert undo.action == "undo" and undo.undid == last.id
        action, what = expected[-1]
        if action == "accept":
            assert not identity_rows(store, [last_decided["identity"]]).accepted.iloc[0]
        elif action == "merge":
            assert set(identity_rows(store, sorted(what)).status) == {"active"}
        else:
            assert what not in decisions.load_review_state(store).excluded
        assert decisions.history(store)[1].undone_by == undo.id
        assert f"· {len(expected) - 1} decisions this session" in page.inner_text("#progress")


def test_real_clusters_help_name_click_and_screenshot(store, browser, tmp_path):
    """Real clustering of 64 LFW photos: faces at 112+ px, every key in the footer and on the
    help screen, a name typed in the prompt, a labelled button, q stops the server."""
    from usecases.clustering import run_cluster

    run_cluster(store, store.settings)
    for server in serve(store, tmp_path, min_faces=2):
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server.url)
        page.wait_for_selector(".face.cursor img")
        page.wait_for_function("[...document.images].every((img) => img.complete && img.naturalWidth > 0)")
        page.screenshot(path=str(tmp_path / "review-web.png"))  # for a person to look at
        sizes = page.eval_on_selector_all(".face img", "images => images.map(i => [i.getBoundingClientRect().width, i.naturalWidth])")
        assert len(sizes) >= 2 and all(shown >= MIN_CHIP_PIXELS and natural >= MIN_CHIP_PIXELS for shown, natural in sizes)

        from labeling.session import KEYS

        footer = page.inner_text("#keys")
        assert all(key.label in footer for key in KEYS if key.label)
        rightmost = page.eval_on_selector_all("#keys .entry", "entries => Math.max(...entries.map(e => e.getBoundingClientRect().right))")
        assert rightmost <= 1280  # wrapped, none cut off
        page.keyboard.press("?")
        assert page.is_visible("#help")
        assert page.locator("#help-keys tr").count() == len(KEYS)
        page.keyboard.press("a")  # swallowed by the help screen
        page.keyboard.press("Escape")
        assert not page.is_visible("#help")
        assert decisions.history(store) == []

        # Another web site's plain form post (no JSON) changes nothing, nor does a foreign host name.
        for path, body in (("api/act", b'{"action": "accept"}'), ("api/quit", b'{"quit": true}')):
            refused = urllib.request.Request(server.url + path, body, {"Content-Type": "text/plain"})
            with pytest.raises(urllib.error.HTTPError, match="422"):
                urllib.request.urlopen(refused, timeout=10)
        foreign = urllib.request.Request(server.url + "api/state", headers={"Host": "evil.example"})
        with pytest.raises(urllib.error.HTTPError, match="400"):
            urllib.request.urlopen(foreign, timeout=10)
        assert decisions.history(store) == [] and server.process.poll() is None

        identity = shown_item(page)["identity"]
        page.keyboard.press("n")
        page.wait_for_selector("#prompt:not([hidden])")
        page.keyboard.type("Hans Blix")
        page.keyboard.press("Enter")
        page.wait_for_function("document.getElementById('status').textContent.includes('named identity')")
        assert identity_rows(store, [identity]).name.iloc[0] == "Hans Blix"

        accepted = shown_item(page)["identity"]
        page.click("button[data-action=accept]")  # the button reads "accept (a)"
        page.wait_for_function("document.getElementById('status').textContent.includes('accepted identity')")
        assert page.inner_text("button[data-action=accept]") == "accept (a)"
        assert bool(identity_rows(store, [accepted]).accepted.iloc[0])

        page.keyboard.press("q")
        assert server.process.wait(30) == 0
    assert [r.action for r in decisions.history(store)] == ["accept", "name"]
