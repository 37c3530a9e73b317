"""Closed-loop benchmark: does retraining on mined identities improve the embedder on people it never saw?

Starting from SFace, on CelebA photos (the training source) in a fresh store. The split is by
identity: the loop mines and trains on one part of the CelebA people (unlabelled as far as the
loop knows) and is judged on people it never saw:
- clustering of CelebA photos of the held-out identities: BCubed F / P / R, each model at its own
  calibrated floor (pipeline.calibration, found on the mined faces without labels);
- LFW verification pairs (../shared/data/lfw/pairs.csv, other people): accuracy (10-fold), ROC
  AUC, TAR at FAR 1e-3.

    mine ─▶ cluster ─▶ export ─▶ per recipe: fine-tune ─▶ gate vs SFace (nothing promoted)
         ─▶ closed_loop with the best recipe: export ─▶ fine-tune ─▶ gate ─▶ re-embed + re-cluster (x N)

The first part compares the recipes (--recipes) on the same export and held-out data, each
candidate gated against SFace; the second runs --iterations rounds of the loop with the recipe
that scored best on the gate metric. On CPU only the last layers train (--freeze); on a GPU use
--freeze 0 for the full fine-tune. --workers defaults to 0: on two CPU cores, loader processes
only compete with training for them.

    .venv/bin/python benchmarks/closed_loop.py [--limit 500] [--recipes distill distill_pairs margin]
        [--iterations 2] [--epochs 1] [--freeze 0.8] [--pairs-limit 1000]

`--curve PHOTOS:EPOCHS ...` measures instead the gain over SFace against data and training time:
one retrain per point and recipe, each judged against SFace (`curve`). On a GPU,
scripts/gpu_closed_loop.sh runs both at full scale.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.measure import measured  # noqa: E402

# The shared photos; FACEMINE_BENCH_DATA points elsewhere (a machine where ../shared is not beside the checkout).
SHARED = Path(os.environ.get("FACEMINE_BENCH_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results"
CELEBA, LFW = SHARED / "celeba", SHARED / "lfw"
# clustering_best_bcubed_f: at the model's best held-out floor near its calibrated one (the gate's
# floor-free check; it reads the held-out labels, so it is no operating point).
REPORTED = ("clustering_floor", "clustering_bcubed_f", "clustering_bcubed_precision", "clustering_bcubed_recall",
            "clustering_best_bcubed_f", "verification_accuracy", "verification_auc", "verification_tar@far=0.001")


def split_celeba(holdout_fraction: float, limit: int | None, holdout_limit: int | None, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training source, held-out) CelebA photos with absolute paths, split by identity."""
    labels = pd.read_csv(CELEBA / "labels.csv")
    labels["path"] = [str(CELEBA / path) for path in labels.path]
    people = np.random.default_rng(seed).permutation(sorted(labels.identity.unique()))
    held_people = set(people[: round(holdout_fraction * len(people))])
    source = whole_identities(labels[~labels.identity.isin(held_people)], people, limit)
    held = whole_identities(labels[labels.identity.isin(held_people)], people, holdout_limit)
    return source, held


def whole_identities(photos: pd.DataFrame, order: np.ndarray, limit: int | None) -> pd.DataFrame:
    """All photos of identities taken in `order` until `limit` photos are reached."""
    rank = {person: index for index, person in enumerate(order)}
    photos = photos.assign(rank=photos.identity.map(rank)).sort_values(["rank", "path"])
    if limit:
        sizes = photos.groupby("rank", sort=True).size().cumsum()
        photos = photos[photos["rank"].isin(sizes[sizes.shift(fill_value=0) < limit].index)]
    return photos.drop(columns="rank").reset_index(drop=True)


def every_nth_pair(pairs: pd.DataFrame, limit: int | None) -> pd.DataFrame:
    """About `limit` pairs, half of each kind, spread over the list (LFW's is sorted by name)."""
    if not limit:
        return pairs
    kinds = [rows for _, rows in pairs.groupby("same")]
    return pd.concat([rows.iloc[:: max(1, len(rows) // (limit // 2))] for rows in kinds])


def write_inputs(folder: Path, source: pd.DataFrame, held: pd.DataFrame, pairs_limit: int | None) -> dict[str, Path]:
    """CSVs of the mined photos' labels, the held-out CelebA labels and the LFW pairs (absolute paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = every_nth_pair(pd.read_csv(LFW / "pairs.csv"), pairs_limit)
    pairs = pairs.assign(path_a=[str(LFW / p) for p in pairs.path_a], path_b=[str(LFW / p) for p in pairs.path_b])
    files = {"mined_truth": folder / "mined_labels.csv", "held_truth": folder / "held_labels.csv",
             "pairs": folder / "pairs.csv"}
    source[["path", "identity"]].to_csv(files["mined_truth"], index=False)
    held[["path", "identity"]].to_csv(files["held_truth"], index=False)
    pairs.to_csv(files["pairs"], index=False)
    return files


def figures(metrics: dict) -> dict:
    return {name: metrics.get(name) for name in REPORTED}


def run(args: argparse.Namespace) -> dict:
    source, held = split_celeba(args.holdout_fraction, args.limit, args.holdout_limit, args.seed)
    root = Path(args.data_dir or tempfile.mkdtemp(prefix="facemine-loop-"))
    files = write_inputs(root / "inputs", source, held, args.pairs_limit)
    settings, store = configure(args, root, files)
    from flows.loop import closed_loop, embed_and_cluster
    from flows.mine import mine
    from flows.train import retrain
    from pipeline.config import TrainConfig
    from storage import registry
    from storage.exports import export_dataset

    with measured() as mining:
        mined = mine(folders=source.path.tolist(), subset="celeba")  # files are roots of their own
    config = lambda recipe: TrainConfig(  # noqa: E731
        recipe=recipe, epochs=args.epochs, freeze_fraction=args.freeze, batch_size=args.batch_size, base_lr=args.lr,
        num_workers=args.workers)
    sface = store.current_model()
    rows, candidates = [], []
    if args.recipes:
        export = export_dataset(store, "recipes", settings.export, run_id=embed_and_cluster(settings))
        for recipe in args.recipes:
            with measured() as training:
                result = retrain(config=config(recipe), export_id=export["export_id"], promote=False)
            if not rows:
                rows.append({"stage": "baseline", "recipe": "-", "model": sface.name,
                             **figures(result["current_metrics"]), "gate": "-", "minutes": None})
            rows.append({"stage": "recipes", "recipe": recipe, "model": f"candidate {result['model_id']}",
                         **figures(result["candidate_metrics"]),
                         "gate": "would promote" if result["gate_passed"] else "keeps SFace",
                         "minutes": round(training.seconds / 60, 1), "reason": result["reason"]})
            candidates.append((result["candidate_metrics"].get(result["gate_metric"], float("-inf")), recipe))
    # The best gate metric; the first recipe of equals (max keeps the first).
    loop_recipe = max(candidates, key=lambda scored: scored[0])[1] if candidates else args.loop_recipe
    stop_reason = ""
    if args.iterations:
        result = closed_loop(iterations=args.iterations, loop_name=args.loop_name, config=config(loop_recipe),
                             min_churn=args.min_churn)
        stop_reason = result["stop_reason"]
        for stored in registry.loop_iterations(store, args.loop_name)[-len(result["iterations"]):]:
            metrics = stored["metrics"]
            if not rows:
                rows.append({"stage": "baseline", "recipe": "-", "model": sface.name, **figures(metrics["current"]),
                             "gate": "-", "minutes": None})
            rows.append({"stage": f"loop {stored['iteration']}", "recipe": loop_recipe,
                         "model": f"candidate {metrics['candidate_model_id']}", **figures(metrics["candidate"]),
                         "gate": "promoted" if stored["promoted"] else "kept current",
                         "minutes": round(metrics["seconds"]["retrain"] / 60, 1), "reason": metrics["gate_reason"]})
    return {
        "photos_mined": len(source), "photos_already_in_store": mined.photos_unchanged,
        "faces_found": mined.faces_found, "faces_passed": mined.faces_passed, "gate_metric": args.gate_metric,
        "held_out_celeba_photos": len(held), "held_out_celeba_people": int(held.identity.nunique()),
        "lfw_pairs": int(pd.read_csv(files["pairs"]).shape[0]),
        "config": config(loop_recipe).model_dump(), "device": args.device,
        "mine_seconds": round(mining.seconds, 1), "mine_peak_rss_mib": round(mining.peak_rss_mib),
        "stop_reason": stop_reason, "rows": rows, "data_dir": str(root),
    }


def parse_point(text: str) -> tuple[int, int]:
    """'PHOTOS:EPOCHS' (PHOTOS 0: all source photos) as (photos, epochs)."""
    photos, _, epochs = text.partition(":")
    return int(photos), int(epochs or 1)


def curve(args: argparse.Namespace) -> dict:
    """Held-out gain over SFace against data and training time.

    For each data size (whole identities, smallest first) the store mines the photos it lacks,
    clusters them with SFace and exports them; then each recipe x epochs point is one retrain run
    (promote=False, so SFace stays the current model and judges every candidate) on that export,
    judged against SFace on the same held-out people and pairs. Rows go to --json as they come, so
    a run stopped early keeps its measured points."""
    import torch

    torch.set_num_threads(args.threads)
    points = sorted({parse_point(text) for text in args.points}, key=lambda point: (point[0] or 10**9, point[1]))
    source, held = split_celeba(args.holdout_fraction, None, args.holdout_limit, args.seed)
    root = Path(args.data_dir or tempfile.mkdtemp(prefix="facemine-curve-"))
    files = write_inputs(root / "inputs", source, held, args.pairs_limit)
    settings, store = configure(args, root, files)
    current = store.current_model()  # none before the first mining
    if current is not None and current.parent_id is not None:
        sys.exit(f"{root}: its current model was trained (a loop promoted it); the curve judges against the "
                 "base model: give a fresh --data-dir")
    from flows.loop import embed_and_cluster
    from flows.mine import mine
    from pipeline.config import TrainConfig
    from storage.exports import export_dataset
    from storage.reports import mined_paths
    from usecases.training import RetrainSteps, retrain, train_candidate

    cpu = {"train": 0.0}

    def timed_train(*train_args, **train_kwargs) -> dict:
        started = time.process_time()  # this process, all threads (workers 0: the whole training)
        try:
            return train_candidate(*train_args, **train_kwargs)
        finally:
            cpu["train"] = time.process_time() - started

    report = {"rows": [], "data_dir": str(root), "device": args.device, "threads": args.threads,
              "held_out_celeba_photos": len(held), "held_out_celeba_people": int(held.identity.nunique()),
              "lfw_pairs": int(pd.read_csv(files["pairs"]).shape[0]), "gate": settings.gate.model_dump()}
    for limit in sorted({photos for photos, _ in points}, key=lambda photos: photos or 10**9):
        photos, _ = split_celeba(args.holdout_fraction, limit or None, args.holdout_limit, args.seed)
        with measured() as mining:
            mine(folders=photos.path.tolist(), subset="celeba")
        export = export_dataset(store, f"curve-{limit or 'all'}", settings.export, run_id=embed_and_cluster(settings))
        # The export holds every photo the store mined: a store given again may hold more than `limit`.
        in_store = source[source.path.isin(mined_paths(store, source.path.tolist()))]
        size = {"photos": len(in_store), "people": int(in_store.identity.nunique()), "chips": export_chips(export),
                "mine_minutes": round(mining.seconds / 60, 1)}
        for recipe in args.recipes:
            for epochs in [epochs for photos_limit, epochs in points if photos_limit == limit]:
                config = TrainConfig(recipe=recipe, epochs=epochs, freeze_fraction=args.freeze,
                                     batch_size=args.batch_size, base_lr=args.lr, num_workers=args.workers,
                                     seed=args.seed)
                with measured() as wall:
                    result = retrain(settings, config, export["export_id"], promote=False,
                                     steps=RetrainSteps(train=timed_train))
                sface, candidate = result["current_metrics"], result["candidate_metrics"]
                report["rows"].append({
                    **size, "recipe": recipe, "epochs": epochs, "train_cpu_min": round(cpu["train"] / 60, 1),
                    "train_wall_min": round(result["seconds"]["train"] / 60, 1),
                    "run_wall_min": round(wall.seconds / 60, 1), "sface": figures(sface),
                    "candidate": figures(candidate),
                    "gain": gain(candidate, sface), "gate": "would promote" if result["gate_passed"] else "keeps SFace",
                    "reason": result["reason"]})
                print_curve(report, header=False)
                if args.json:
                    write_json(args.json, report)
    return report


def gain(candidate: dict, sface: dict) -> float | None:
    if candidate.get("clustering_bcubed_f") is None or sface.get("clustering_bcubed_f") is None:
        return None
    return candidate["clustering_bcubed_f"] - sface["clustering_bcubed_f"]


def export_chips(export: dict) -> int:
    from storage import registry

    return sum(len(split) for split in registry.export_samples(export["path"]).values())


def configure(args: argparse.Namespace, root: Path, files: dict[str, Path]) -> tuple:
    """Settings of a store under `root` judged on the held-out files (environment, as a user sets them)."""
    os.environ["FACEMINE_DATA_DIR"] = str(root / "data")
    os.environ["FACEMINE_GATE__VALIDATION_PAIRS"] = str(files["pairs"])
    os.environ["FACEMINE_GATE__VALIDATION_TRUTH"] = str(files["held_truth"])
    os.environ["FACEMINE_EMBED__DEVICE"] = args.device
    os.environ["FACEMINE_GATE__METRIC"] = args.gate_metric
    os.environ["FACEMINE_GATE__PATIENCE"] = str(args.patience)
    from storage.settings import Settings
    from storage.store import Store

    settings = Settings()
    return settings, Store(settings)


CURVE_COLUMNS = ("photos", "chips", "recipe", "epochs", "train_cpu_min", "train_wall_min")


def curve_table(report: dict) -> pd.DataFrame:
    rows = []
    for row in report["rows"]:
        for model in ("sface", "candidate"):
            figures_ = row[model]
            rows.append({**{name: row[name] for name in CURVE_COLUMNS},
                         "model": "SFace" if model == "sface" else "candidate",
                         "floor": figures_["clustering_floor"], "bcubed_f": figures_["clustering_bcubed_f"],
                         "p": figures_["clustering_bcubed_precision"], "r": figures_["clustering_bcubed_recall"],
                         "best_floor_f": figures_["clustering_best_bcubed_f"],
                         "lfw_acc": figures_["verification_accuracy"], "lfw_auc": figures_["verification_auc"],
                         "tar@1e-3": figures_["verification_tar@far=0.001"],
                         "gain_f": None if model == "sface" else row["gain"],
                         "gate": "-" if model == "sface" else row["gate"]})
    return pd.DataFrame(rows)


def print_curve(report: dict, header: bool = True) -> None:
    if header:
        print(f"Gain curve: candidates vs SFace on {report['held_out_celeba_people']} held-out CelebA people "
              f"({report['held_out_celeba_photos']} photos; BCubed at each model's calibrated floor) and "
              f"{report['lfw_pairs']} LFW pairs; train_cpu_min: CPU minutes of training "
              f"({report['threads']} threads)\n")
    print(curve_table(report).to_string(index=False, float_format=lambda value: f"{value:.4f}", na_rep="-"), flush=True)
    if header:
        for row in report["rows"]:
            print(f"{row['photos']} photos, {row['recipe']}, {row['epochs']} epoch(s): {row['reason']}")


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def print_report(report: dict) -> None:
    columns = ["stage", "recipe", "model", *REPORTED, "gate", "minutes"]
    table = pd.DataFrame(report["rows"])[columns].rename(
        columns=lambda name: name.replace("verification_", "lfw_").replace("clustering_", "heldout_celeba_")
    )
    print("CelebA mined and trained on; judged on held-out CelebA people (heldout_celeba_*, each model at its own")
    print("calibrated floor) and LFW pairs (lfw_*); 'minutes': wall time of the retrain flow (train + judge)\n")
    print(table.to_string(index=False, float_format=lambda value: f"{value:.4f}", na_rep="-"))
    for row in report["rows"][1:]:
        print(f"{row['stage']} {row['recipe']}: {row['reason']}")
    summary = {key: value for key, value in report.items() if key not in ("rows", "config")}
    print("\n" + json.dumps(summary, indent=1, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=500, help="CelebA photos to mine (whole identities); 0: all")
    parser.add_argument("--holdout-fraction", type=float, default=0.3, help="share of CelebA identities held out")
    parser.add_argument("--holdout-limit", type=int, default=400, help="held-out CelebA photos (whole identities); 0: all")
    parser.add_argument("--pairs-limit", type=int, default=0, help="LFW pairs to use (0: all 2,200)")
    parser.add_argument("--recipes", nargs="*", default=["distill", "distill_pairs", "margin"],
                        help="recipes compared on one export, each gated against SFace (none: skip)")
    parser.add_argument("--loop-recipe", default="distill", help="loop recipe when no recipes are compared")
    parser.add_argument("--iterations", type=int, default=2, help="closed-loop rounds with the best recipe (0: none)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--freeze", type=float, default=0.8, help="share of parameter tensors kept frozen")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01, help="base learning rate at batch size 256")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--min-churn", type=float, default=0.01)
    parser.add_argument("--gate-metric", default="auto", help="settings.gate.metric")
    parser.add_argument("--patience", type=int, default=1, help="iterations without promotion before stopping")
    parser.add_argument("--loop-name", default="benchmark", help="a store given again keeps its photos and caches")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None,
                        help="store folder (default: a new temporary one, kept); an existing one is reused")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the report here (default: benchmarks/results/closed_loop[_curve].json)")
    parser.add_argument("--curve", nargs="*", metavar="PHOTOS:EPOCHS", dest="points", default=None,
                        help="instead of the loop: the gain curve, one retrain of each --recipes per point "
                             "(PHOTOS 0: all source photos), e.g. --curve 250:1 500:1 1000:1 0:1")
    parser.add_argument("--threads", type=int, default=torch_threads(), help="torch CPU threads (curve)")
    args = parser.parse_args()
    if args.points is not None:
        args.json = args.json or RESULTS / "closed_loop_curve.json"
        print_curve(curve(args))
        return
    args.json = args.json or RESULTS / "closed_loop.json"
    report = run(args)
    print_report(report)
    write_json(args.json, report)


def torch_threads() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
