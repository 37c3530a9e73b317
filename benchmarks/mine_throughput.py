"""Mining throughput: facemine's `mine` flow against the naive loop a user would write.

Both sides run in their own subprocess (so each one's peak memory is its own) over the same
photos, on the same device:
- facemine: the full `mine` flow with default settings (ingest with EXIF/format handling,
  batched MTCNN, alignment, quality, batched embedding, chips and embeddings written to a fresh
  store; on a CPU one process detecting and embedding on a thread per core);
- naive: MTCNN (its defaults) on each photo, align and embed each face one at a time, nothing stored.
Each side's one-off start (loading models; for facemine also Prefect's ephemeral API and its
database) is timed apart from mining, and both speed-ups are printed. Peak memory sums every
process of a side (facemine's workers and Prefect server included).

    .venv/bin/python benchmarks/mine_throughput.py [--limit N] [--folder PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.measure import Measurement, measured  # noqa: E402

DEFAULT_FOLDER = REPO.parent / "shared" / "data" / "celeba" / "images"


def photo_paths(folder: Path, limit: int | None) -> list[str]:
    from pipeline.config import IngestConfig
    from pipeline.ingest import iter_image_files

    paths = [str(p) for p in iter_image_files([folder], IngestConfig().extensions)]
    return paths[:limit] if limit else paths


def side_result(photos: int, faces: int, start: Measurement, run: Measurement) -> dict:
    return {
        "photos": photos,
        "faces": faces,
        "seconds": run.seconds,
        "start_seconds": start.seconds,
        "peak_rss_mib": max(start.peak_rss_mib, run.peak_rss_mib),
    }


def run_facemine(paths: list[str]) -> dict:
    """The `mine` flow in a fresh store. A first run over an empty folder pays the one-off start
    (Prefect's ephemeral API server and its database, the store's schema), timed on its own."""
    with tempfile.TemporaryDirectory() as tmp:
        photos, empty = Path(tmp) / "photos", Path(tmp) / "empty"
        photos.mkdir()
        empty.mkdir()
        # The flow mines folders: link the selected photos into one.
        for index, path in enumerate(paths):
            (photos / f"{index:06d}_{Path(path).name}").symlink_to(path)
        os.environ["FACEMINE_DATA_DIR"] = str(Path(tmp) / "data")
        from flows.mine import mine

        with measured(process_tree=True) as start:
            mine(folders=[str(empty)], subset="benchmark")
        with measured(process_tree=True) as run:
            summary = mine(folders=[str(photos)], subset="benchmark")
    return side_result(len(paths), summary.faces_found, start, run)


def run_naive(paths: list[str]) -> dict:
    import numpy as np
    import torch
    from facenet_pytorch import MTCNN
    from PIL import Image

    from pipeline.align import align_face
    from pipeline.embed import create_embedder
    from storage.settings import Settings

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with measured(process_tree=True) as start:
        detector = MTCNN(keep_all=True, device=device)
        embedder = create_embedder("sface", weights=Settings().default_weights("sface"), device=device)
    faces = 0
    with measured(process_tree=True) as run:
        for path in paths:
            image = np.asarray(Image.open(path).convert("RGB"))
            boxes, _probs, landmarks = detector.detect(image, landmarks=True)
            if boxes is None:
                continue
            for points in landmarks:
                chip = align_face(image, points, "arcface_112")
                embedder.embed(chip[None])
                faces += 1
    return side_result(len(paths), faces, start, run)


def run_side(side: str, folder: Path, limit: int | None) -> dict:
    command = [sys.executable, __file__, "--side", side, "--folder", str(folder)]
    if limit:
        command += ["--limit", str(limit)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER)
    parser.add_argument("--limit", type=int, default=None, help="first N photos only")
    parser.add_argument("--side", choices=["facemine", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        paths = photo_paths(args.folder, args.limit)
        result = run_facemine(paths) if args.side == "facemine" else run_naive(paths)
        print(json.dumps(result))
        return
    import torch

    device = "cuda" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    results = {side: run_side(side, args.folder, args.limit) for side in ("naive", "facemine")}
    print(f"mine throughput on {args.folder} ({results['naive']['photos']} photos), device: {device}")
    sides = ("naive", "facemine")
    rows = {
        "photos/s": [results[side]["photos"] / results[side]["seconds"] for side in sides],
        "faces/s": [results[side]["faces"] / results[side]["seconds"] for side in sides],
        "faces found": [results[side]["faces"] for side in sides],
        "mining seconds": [results[side]["seconds"] for side in sides],
        "start seconds (once)": [results[side]["start_seconds"] for side in sides],
        "photos/s, start included": [
            results[side]["photos"] / (results[side]["seconds"] + results[side]["start_seconds"]) for side in sides
        ],
        "peak RSS MiB (all procs)": [results[side]["peak_rss_mib"] for side in sides],
    }
    print(f"{'':28}{'naive loop':>12}{'facemine':>12}")
    for label, (naive, facemine) in rows.items():
        digits = ".2f" if isinstance(naive, float) else ""
        print(f"{label:28}{naive:>12{digits}}{facemine:>12{digits}}")
    speedup = rows["photos/s"][1] / rows["photos/s"][0]
    with_start = rows["photos/s, start included"][1] / rows["photos/s, start included"][0]
    print(f"speed-up: {speedup:.2f}x mining, {with_start:.2f}x with the one-off start (target on 2 CPU cores: >= 2x)")
    print("start: models for the naive loop; Prefect's ephemeral API, its database and the store for facemine")


if __name__ == "__main__":
    main()
