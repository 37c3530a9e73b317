"""Mining throughput: facemine's `mine` flow against the naive loop a user would write.

Both sides run in their own subprocess (so each one's peak memory is its own) over the same
photos, on the same device:
- facemine: the full `mine` flow (ingest with EXIF/format handling, batched MTCNN, alignment,
  quality, batched embedding, chips and embeddings written to a fresh store);
- naive: MTCNN on each photo, align and embed each face one at a time, nothing stored.

    .venv/bin/python benchmarks/mine_throughput.py [--limit N] [--folder PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_FOLDER = REPO.parent / "shared" / "data" / "celeba" / "images"


def photo_paths(folder: Path, limit: int | None) -> list[str]:
    from pipeline.config import IngestConfig
    from pipeline.ingest import iter_image_files

    paths = [str(p) for p in iter_image_files([folder], IngestConfig().extensions)]
    return paths[:limit] if limit else paths


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_facemine(paths: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        # The flow mines folders: link the selected photos into one.
        for index, path in enumerate(paths):
            (photos / f"{index:06d}_{Path(path).name}").symlink_to(path)
        os.environ["FACEMINE_DATA_DIR"] = str(Path(tmp) / "data")
        from flows.mine import mine

        started = time.perf_counter()
        summary = mine(folders=[str(photos)], subset="benchmark")
        seconds = time.perf_counter() - started
    return {"photos": len(paths), "faces": summary.faces_found, "seconds": seconds}


def run_naive(paths: list[str]) -> dict:
    import numpy as np
    import torch
    from facenet_pytorch import MTCNN
    from PIL import Image

    from pipeline.align import align_face
    from pipeline.embed import create_embedder
    from storage.settings import Settings

    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    detector = MTCNN(keep_all=True, device=device)
    embedder = create_embedder("sface", weights=Settings().default_weights("sface"), device=device)
    faces = 0
    for path in paths:
        image = np.asarray(Image.open(path).convert("RGB"))
        boxes, _probs, landmarks = detector.detect(image, landmarks=True)
        if boxes is None:
            continue
        for points in landmarks:
            chip = align_face(image, points, "arcface_112")
            embedder.embed(chip[None])
            faces += 1
    return {"photos": len(paths), "faces": faces, "seconds": time.perf_counter() - started}


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
        result["peak_rss_mib"] = peak_rss_mib()
        print(json.dumps(result))
        return
    import torch

    device = "cuda" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    results = {side: run_side(side, args.folder, args.limit) for side in ("naive", "facemine")}
    print(f"mine throughput on {args.folder} ({results['naive']['photos']} photos), device: {device}")
    print(f"{'':24}{'naive loop':>14}{'facemine':>14}")
    for label, key in (("photos/s", "photos"), ("faces/s", "faces")):
        row = [results[side][key] / results[side]["seconds"] for side in ("naive", "facemine")]
        print(f"{label:24}{row[0]:>14.2f}{row[1]:>14.2f}")
    print(f"{'faces found':24}{results['naive']['faces']:>14}{results['facemine']['faces']:>14}")
    print(f"{'wall seconds':24}{results['naive']['seconds']:>14.1f}{results['facemine']['seconds']:>14.1f}")
    print(f"{'peak RSS MiB':24}{results['naive']['peak_rss_mib']:>14.0f}{results['facemine']['peak_rss_mib']:>14.0f}")
    speedup = results["naive"]["seconds"] / results["facemine"]["seconds"]
    print(f"speed-up (photos/s): {speedup:.2f}x (target on 2 CPU cores: >= 2x)")


if __name__ == "__main__":
    main()
