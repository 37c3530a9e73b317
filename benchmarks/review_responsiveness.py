"""Responsiveness of `facemine review` on one very large identity (headless, Textual Pilot).

Data: 64 real LFW photos mined into a temporary store, their faces copied (same chips,
slightly jittered embeddings) up to each size, all in one identity of a finished run.
Measured per size: building the review queue, first item on screen, one page down, one
cursor step, and accepting the whole identity (one decision pinning every face).

    .venv/bin/python benchmarks/review_responsiveness.py [--sizes 1000 5000]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from review_helpers import add_face_copies, lfw_paths, make_run, mine_into  # noqa: E402

from labeling.actions import Labeler  # noqa: E402
from labeling.app import ReviewApp  # noqa: E402
from labeling.queue import build_queue  # noqa: E402
from labeling.thumbnails import Thumbnails  # noqa: E402
from storage.identities import face_table  # noqa: E402
from storage.settings import Settings  # noqa: E402
from storage.store import Store  # noqa: E402


async def measure_app(store: Store) -> dict[str, float]:
    started = time.perf_counter()
    app = ReviewApp(store, Labeler(store, "benchmark"), Thumbnails(store.chips))
    timings = {}
    async with app.run_test(size=(160, 50)) as pilot:
        while not app.query_one("#grid").children:  # the first page of faces is on screen
            await pilot.pause(0.01)
        timings["first_screen_s"] = time.perf_counter() - started
        for key, name in (("pagedown", "page_down_s"), ("right", "cursor_step_s"), ("a", "accept_all_s")):
            started = time.perf_counter()
            await pilot.press(key)
            await pilot.pause()
            timings[name] = time.perf_counter() - started
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        template = Path(tmp) / "mined"
        mine_into(template, lfw_paths())
        for size in args.sizes:
            data = Path(tmp) / f"size-{size}"
            shutil.copytree(template, data)
            store = Store(Settings(data_dir=data))
            add_face_copies(store, size - len(face_table(store)))
            make_run(store, [face_table(store).face_id.tolist()])
            started = time.perf_counter()
            build_queue(store)
            row = {"faces_in_identity": size, "build_queue_s": time.perf_counter() - started}
            row |= asyncio.run(measure_app(store))
            print(json.dumps({key: round(value, 3) for key, value in row.items()}), flush=True)


if __name__ == "__main__":
    main()
