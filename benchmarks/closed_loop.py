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
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.measure import measured  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
CELEBA, LFW = SHARED / "celeba", SHARED / "lfw"
REPORTED = ("clustering_floor", "clustering_bcubed_f", "clustering_bcubed_precision", "clustering_bcubed_recall",
            "verification_accuracy", "verification_auc", "verification_tar@far=0.001")


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
    os.environ["FACEMINE_DATA_DIR"] = str(root / "data")
    os.environ["FACEMINE_GATE__VALIDATION_PAIRS"] = str(files["pairs"])
    os.environ["FACEMINE_GATE__VALIDATION_TRUTH"] = str(files["held_truth"])
    os.environ["FACEMINE_EMBED__DEVICE"] = args.device
    os.environ["FACEMINE_GATE__METRIC"] = args.gate_metric
    os.environ["FACEMINE_GATE__PATIENCE"] = str(args.patience)
    from flows.loop import closed_loop, embed_and_cluster
    from flows.mine import mine
    from flows.train import retrain
    from pipeline.config import TrainConfig
    from storage import registry
    from storage.exports import export_dataset
    from storage.settings import Settings
    from storage.store import Store

    with measured() as mining:
        mined = mine(folders=source.path.tolist(), subset="celeba")  # files are roots of their own
    settings = Settings()
    store = Store(settings)
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
    loop_recipe = max(candidates)[1] if candidates else args.loop_recipe
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
    parser.add_argument("--json", type=Path, default=RESULTS / "closed_loop.json", help="also write the report here")
    args = parser.parse_args()
    report = run(args)
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
