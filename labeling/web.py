"""`facemine review --web`: the review queue in a browser, served on 127.0.0.1 only.

Like FiftyOne's `launch_app`: print the address, optionally open a browser, Ctrl-C stops. The page
(labeling/web/, plain HTML and JavaScript, no build step) draws the state of a
`labeling.session.ReviewSession` and sends it the keys of `labeling.session.KEYS`, so the queue,
the keys and every decision are those of the terminal app. A change to the store needs a key or
a click on a button that names the action.
"""
from __future__ import annotations

import socket
import threading
import webbrowser
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware
from pydantic import BaseModel

from labeling.session import KEYS, ReviewSession
from pipeline.errors import FacemineError
from storage.files import encode_png

PAGE = Path(__file__).with_name("web")
HOST = "127.0.0.1"
DEFAULT_PORT = 5151

# Textual key names as the browser's KeyboardEvent.key writes them (shift+tab: "shift+Tab").
BROWSER_KEYS = {
    "left": "ArrowLeft", "right": "ArrowRight", "up": "ArrowUp", "down": "ArrowDown",
    "pagedown": "PageDown", "pageup": "PageUp", "enter": "Enter", "tab": "Tab", "shift+tab": "shift+Tab",
    "space": " ", "full_stop": ".", "question_mark": "?", "escape": "Escape",
    "right_square_bracket": "]", "left_square_bracket": "[",
}


class Act(BaseModel):
    """One key's action, as the page sends it (cursor keys and pages as a cursor step)."""

    action: str
    delta: int = 0  # cursor: faces to move by
    number: int = 0  # suggest: which suggestion
    face: int | None = None  # set_cursor: the clicked face
    text: str | None = None  # move, name: what was typed (None: cancelled)


class Quit(BaseModel):
    """A JSON body, so that no other web site's plain form can stop the review (FastAPI refuses
    non-JSON bodies, and a cross-site JSON request needs a CORS permission this server never gives)."""

    quit: bool


# The page's actions, each one call of the session: no decision logic here.
ACTIONS = {
    "accept": lambda s, act: s.accept(),
    "reject": lambda s, act: s.reject(),
    "merge": lambda s, act: s.merge(),
    "move": lambda s, act: s.move(act.text),
    "split": lambda s, act: s.split(),
    "name": lambda s, act: s.name(act.text),
    "not_a_face": lambda s, act: s.not_a_face(),
    "lock": lambda s, act: s.lock(),
    "undo": lambda s, act: s.undo(),
    "force": lambda s, act: s.force(),
    "toggle": lambda s, act: s.toggle(),
    "clear": lambda s, act: s.clear(),
    "next_item": lambda s, act: s.next_item(),
    "previous_item": lambda s, act: s.previous_item(),
    "cursor": lambda s, act: s.move_cursor(act.delta),
    "set_cursor": lambda s, act: s.set_cursor(act.face),
    "suggest": lambda s, act: s.suggest(act.number),
}


def key_table() -> list[dict[str, Any]]:
    return [
        {
            "keys": [BROWSER_KEYS.get(key, key) for key in entry.keys],
            "names": entry.names,
            "action": entry.action, "label": entry.label, "shown": entry.shown, "help": entry.help,
        }
        for entry in KEYS
    ]


def state(session: ReviewSession) -> dict[str, Any]:
    view = session.view
    item = None
    if view is not None:
        item = {
            "kind": view.item.kind, "reason": view.item.reason, "label": view.identity.label(),
            "identity": view.identity.id, "faces": view.faces, "selected": sorted(view.selected), "cursor": view.cursor,
            "suggestions": [[identity, round(similarity, 2)] for identity, similarity in view.suggestions],
            "highlighted": view.highlighted, "compare": session.compare_faces(),
            "move_prompt": session.move_prompt(), "name_prompt": list(session.name_prompt()),
        }
    return {"progress": session.progress(), "item": item, "message": session.message, "error": session.error}


def create_app(session: ReviewSession, on_quit: Any = None) -> FastAPI:
    """The review page's server; `on_quit` is called when the reviewer presses q."""
    app = FastAPI(title="facemine review", docs_url=None, redoc_url=None, openapi_url=None)
    # Only this machine's names: a web page whose own domain resolves to 127.0.0.1 gets nothing.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=[HOST, "localhost"])
    # One reviewer, one session: requests change it one at a time.
    lock = threading.Lock()

    @app.get("/")
    def page() -> FileResponse:
        return FileResponse(PAGE / "index.html")

    @app.get("/api/keys")
    def keys() -> list[dict[str, Any]]:
        return key_table()

    @app.get("/api/state")
    def current() -> dict[str, Any]:
        with lock:
            return state(session)

    @app.post("/api/act")
    def act(request: Act) -> dict[str, Any]:
        handler = ACTIONS.get(request.action)
        if handler is None:
            raise HTTPException(404, f"unknown action {request.action!r}")
        with lock:
            handler(session, request)
            return state(session)

    @app.post("/api/quit")
    def quit_review(request: Quit) -> dict[str, str]:
        if request.quit and on_quit is not None:
            on_quit()
        return {"message": "review ended: every decision is saved; the server has stopped"}

    @app.get("/chip/{face_id}.png")
    def chip(face_id: int) -> Response:
        path = session.queue.chip_paths.get(face_id)
        if path is None:
            raise HTTPException(404, f"no face {face_id} in this labelling")
        # A face's chip never changes: the browser may keep it.
        return Response(encode_png(session.store.chips.get(path)), media_type="image/png",
                        headers={"Cache-Control": "max-age=86400, immutable"})

    app.mount("/static", StaticFiles(directory=PAGE), name="static")
    return app


def serve(session: ReviewSession, port: int = DEFAULT_PORT, open_browser: bool = False) -> None:
    """Serve the review page on 127.0.0.1:`port` until Ctrl-C or q on the page."""
    import uvicorn

    with socket.socket() as probe:  # uvicorn would log a traceback-like error and exit 1
        try:
            probe.bind((HOST, port))
        except OSError:
            raise FacemineError(f"port {port} on {HOST} is in use: choose another with --port") from None
    server: uvicorn.Server | None = None

    def stop() -> None:
        assert server is not None
        server.should_exit = True

    config = uvicorn.Config(create_app(session, stop), host=HOST, port=port, log_level="warning")
    server = uvicorn.Server(config)
    url = f"http://{HOST}:{port}/"
    print(f"review page: {url}  ({len(session.queue.items)} items; Ctrl-C or q on the page stops)", flush=True)
    if open_browser:
        threading.Timer(1.0, webbrowser.open, (url,)).start()
    server.run()
