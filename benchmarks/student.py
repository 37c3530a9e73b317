"""Student benchmark: how much accuracy does a distilled small model give up for how much speed?

SFace (the teacher) is distilled into `pipeline.student`'s network by the `student` recipe of
`pipeline.train` (the path the retrain flow takes), on CelebA chips of one part of the people;
teacher and student are judged on people training never saw:
- held-out CelebA people (largest face of each photo): BCubed F / P / R of the default clustering,
  each model at its own calibrated floor (pipeline.calibration on the held-out faces' embeddings,
  labels unread, as the gate calibrates each model);
- LFW pairs (../shared/data/lfw/pairs.csv, other people again): accuracy (10-fold), AUC, TAR at
  FAR 1e-3 (with a few hundred pairs that is the TAR at the first false accept);
- embedding speed: faces/s at batch 64 on the CPU, warm, both models traced for inference as the
  pipeline embeds, timed in interleaved passes in the same run (best pass), torch threads fixed.

The gain curve comes from one training run: after each epoch the student saved by training is
judged (evaluation time is not training time). The points before the last are mid-schedule
(learning rate still high), so they understate what a run of that length alone would reach.
Chips come from a store of mined CelebA/LFW photos (benchmarks/cluster_quality.py's, mined here
where photos are missing). The student trains on the other CelebA people's chips, and with
--extra-lfw N also on about N LFW faces of people in none of the judged pairs (distillation reads
no labels: any mined face teaches it).

    .venv/bin/python benchmarks/student.py [--epochs 3] [--pairs 300] [--holdout-fraction 0.33] [--extra-lfw 4000]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.closed_loop import LFW, RESULTS, every_nth_pair, split_celeba, write_json  # noqa: E402
from pipeline.calibration import calibrate  # noqa: E402
from pipeline.cluster import cluster  # noqa: E402
from pipeline.config import ClusterConfig, TrainConfig  # noqa: E402
from pipeline.embed import Embedder, create_embedder  # noqa: E402
from pipeline.evaluate import clustering_metrics  # noqa: E402
from pipeline.student import STUDENT_MOBILENET  # noqa: E402
from pipeline.train import STATE_FILE, train_embedder  # noqa: E402
from pipeline.verification import evaluate_pairs  # noqa: E402
from storage import identities as identity_store  # noqa: E402
from storage.settings import Settings  # noqa: E402
from storage.store import Store  # noqa: E402
from usecases.holdout import SPEED_BATCH, embedding_speed  # noqa: E402
from usecases.mining import mine_paths, shard_paths  # noqa: E402

SFACE = REPO.parent / "shared" / "models" / "sface_2021dec_fp32.onnx"
BATCH = 64
THREADS = 2
MAX_FLOOR = 0.99


def largest_chips(store_dir: Path, subset: str, paths: list[str]) -> dict[str, Path]:
    """Photo path -> chip file of its largest face, mining the photos the store lacks."""
    settings = Settings(data_dir=store_dir)
    store = Store(settings)
    known = set(identity_store.face_table(store).source_path)
    for shard in shard_paths([path for path in paths if path not in known], 100):
        mine_paths(subset, shard, settings)
    faces = identity_store.face_table(store)
    faces = faces[faces.source_path.isin(set(paths))]
    faces = faces.assign(area=(faces.x2 - faces.x1) * (faces.y2 - faces.y1))
    largest = faces.sort_values(["area", "face_id"], ascending=[False, True]).drop_duplicates("source_path")
    return {row.source_path: store_dir / row.chip_path for row in largest.itertuples()}


def other_lfw_samples(lfw_store: Path, pairs: pd.DataFrame, count: int) -> tuple[list[tuple[Path, str]], int]:
    """(chip, person) of about `count` LFW faces of people in none of `pairs`, and how many people.
    More mined faces to distil on: the loss reads no labels; the names only keep each person's
    faces apart in the data's bookkeeping."""
    if not count:
        return [], 0
    judged_people = {Path(path).parent.name for path in pd.concat([pairs.path_a, pairs.path_b])}
    others = pd.read_csv(LFW / "labels.csv")
    others = others[~others.identity.isin(judged_people)]
    others = others.iloc[:: max(1, len(others) // count)][:count].assign(path=lambda rows: [str(LFW / p) for p in rows.path])
    chips = largest_chips(lfw_store, "lfw", others.path.tolist())
    others = others[others.path.isin(chips)]
    return [(chips[path], f"lfw:{person}") for path, person in zip(others.path, others.identity)], others.identity.nunique()


def load_chips(files: list[Path]) -> np.ndarray:
    return np.stack([np.array(Image.open(path).convert("RGB")) for path in files])


def judge(embedder: Embedder, held_chips: np.ndarray, held_truth: np.ndarray, pair_chips: np.ndarray,
          same: np.ndarray) -> dict:
    fast = embedder.for_inference()
    held = fast.embed(held_chips, batch_size=BATCH)
    calibration = calibrate(held)  # no labels read
    # A barely trained student maps all faces close together: its floor can reach 1, where
    # clustering accepts no edge; cap it (the row then shows the cap and every face alone).
    floor = min(calibration["cluster_min_similarity"], MAX_FLOOR)
    clustering = identity_metrics(held_truth, cluster(held, ClusterConfig(min_similarity=floor)))
    pairs = fast.embed(pair_chips, batch_size=BATCH)
    report = evaluate_pairs(pairs[0::2], pairs[1::2], same).as_dict()
    return {"floor": floor, **clustering, "lfw_accuracy": report["accuracy"], "lfw_auc": report["auc"],
            "lfw_tar@far=1e-3": report["tar@far=0.001"]}


def identity_metrics(truth: np.ndarray, labels: np.ndarray) -> dict:
    metrics = clustering_metrics(truth, labels)
    return {"bcubed_f": metrics["bcubed_f"], "bcubed_p": metrics["bcubed_precision"],
            "bcubed_r": metrics["bcubed_recall"]}


def faces_per_second(embedders: dict[str, Embedder], chips: np.ndarray, passes: int = 3) -> dict[str, float]:
    """Best of `passes` interleaved passes per model, each timed as the gate times a model
    (usecases.holdout.embedding_speed: batch 64, first batch as warm-up); the machine is shared:
    the best pass is the one least disturbed."""
    fast = {name: embedder.for_inference() for name, embedder in embedders.items()}
    best = {name: 0.0 for name in fast}
    for _ in range(passes):
        for name, embedder in fast.items():
            best[name] = max(best[name], embedding_speed(embedder, chips)[1])
    return best


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(THREADS)
    source, held = split_celeba(args.holdout_fraction, None, None, args.seed)
    celeba = largest_chips(args.celeba_store, "celeba", source.path.tolist() + held.path.tolist())
    source, held = source[source.path.isin(celeba)], held[held.path.isin(celeba)]
    pairs = every_nth_pair(pd.read_csv(LFW / "pairs.csv"), args.pairs)
    pairs = pairs.assign(path_a=[str(LFW / p) for p in pairs.path_a], path_b=[str(LFW / p) for p in pairs.path_b])
    lfw = largest_chips(args.lfw_store, "lfw", sorted(set(pairs.path_a) | set(pairs.path_b)))
    pairs = pairs[pairs.path_a.isin(lfw) & pairs.path_b.isin(lfw)]
    held_chips = load_chips([celeba[path] for path in held.path])
    held_truth = pd.factorize(held.identity)[0]
    pair_chips = load_chips([lfw[path] for pair in pairs.itertuples() for path in (pair.path_a, pair.path_b)])
    same = pairs.same.to_numpy().astype(bool)

    teacher = create_embedder("sface", SFACE, device="cpu")
    # Speed depends on the architecture only: measured before training, on a fresh student.
    speed = faces_per_second({"teacher": teacher, "student": create_embedder(STUDENT_MOBILENET, device="cpu")},
                             held_chips[:4 * SPEED_BATCH])
    print(speed, flush=True)
    rows = [{"model": "sface (teacher)", "epochs": None, "train_cpu_min": None, "faces_per_s": round(speed["teacher"], 1),
             **judge(teacher, held_chips, held_truth, pair_chips, same)}]
    print(rows[-1], flush=True)
    out_dir = Path(args.out_dir)
    config = TrainConfig(recipe="student", epochs=args.epochs, batch_size=BATCH, base_lr=args.lr,
                         num_workers=0, seed=args.seed)
    samples = [(celeba[path], identity) for path, identity in zip(source.path, source.identity)]
    extra, extra_people = other_lfw_samples(args.lfw_store, pairs, args.extra_lfw)
    report = {"rows": rows, "speedup": round(speed["student"] / speed["teacher"], 2),
              "train_people": int(source.identity.nunique()) + int(extra_people),
              "train_chips": len(samples) + len(extra), "train_lfw_chips": len(extra),
              "held_out_people": int(held.identity.nunique()), "held_out_faces": len(held),
              "lfw_pairs": len(pairs), "config": config.model_dump()}
    cpu = {"seconds": 0.0, "since": time.process_time()}

    def judge_epoch(entry: dict) -> None:
        cpu["seconds"] += time.process_time() - cpu["since"]
        student = create_embedder(STUDENT_MOBILENET, device="cpu")
        student.module.load_state_dict(torch.load(out_dir / STATE_FILE, weights_only=True)["module"])
        rows.append({"model": "student", "epochs": entry["epoch"], "train_cpu_min": round(cpu["seconds"] / 60, 1),
                     "faces_per_s": round(speed["student"], 1), **judge(student, held_chips, held_truth, pair_chips, same)})
        print(rows[-1], flush=True)
        write_json(args.json, report)  # after each epoch: a run stopped early keeps its points
        cpu["since"] = time.process_time()

    result = train_embedder(teacher, samples + extra, None, config, out_dir, resume=False, progress=judge_epoch)
    return report | {"checkpoint": str(result.checkpoint_path)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="student training epochs (one run, judged after each)")
    parser.add_argument("--lr", type=float, default=TrainConfig().base_lr, help="base_lr at batch 256 (AdamW)")
    parser.add_argument("--holdout-fraction", type=float, default=0.33, help="share of CelebA people held out")
    parser.add_argument("--pairs", type=int, default=300, help="LFW pairs, half of each kind")
    parser.add_argument("--extra-lfw", type=int, default=0,
                        help="also train on about this many LFW faces of people outside the judged pairs")
    parser.add_argument("--celeba-store", type=Path, default=RESULTS / "store-celeba")
    parser.add_argument("--lfw-store", type=Path, default=RESULTS / "store-lfw")
    parser.add_argument("--out-dir", default="/tmp/student/run", help="training output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=RESULTS / "student.json")
    args = parser.parse_args()
    report = run(args)
    table = pd.DataFrame(report["rows"])
    print(f"\nteacher vs student on {report['held_out_people']} held-out CelebA people ({report['held_out_faces']} faces; "
          f"BCubed at each model's calibrated floor) and {report['lfw_pairs']} LFW pairs; trained on "
          f"{report['train_chips']} chips of {report['train_people']} other people\n")
    print(table.to_string(index=False, float_format=lambda value: f"{value:.4f}", na_rep="-"))
    print(f"\nstudent speed: {report['speedup']}x the teacher's (batch {SPEED_BATCH}, {THREADS} threads)")
    write_json(args.json, report)


if __name__ == "__main__":
    main()
