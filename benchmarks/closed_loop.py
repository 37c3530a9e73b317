"""Closed-loop benchmark: does retraining on mined identities improve the embedder?

Starting from SFace, on CelebA photos (the training source) in a fresh store:

    mine ─▶ closed_loop: cluster ─▶ export ─▶ fine-tune ─▶ gate ─▶ re-embed + re-cluster (x N)

Held-out evaluation, never mined or trained on:
- LFW verification pairs (../shared/data/lfw/pairs.csv): accuracy (10-fold), TAR at FAR 1e-2/1e-3;
- clustering of CelebA photos of identities kept out of the training source (BCubed F, ...).
Also scored: the loop's own labelling of the mined CelebA photos against their labels.

Iteration 0 is the store's current model (SFace in a fresh store). The gate promotes a candidate
only when it beats the current model on --gate-metric (default verification_accuracy). On CPU
only the last layers train (--freeze); on a GPU use --freeze 0 for the full fine-tune. --workers
defaults to 0: on two CPU cores, loader processes only compete with training for them.

    .venv/bin/python benchmarks/closed_loop.py [--limit 500] [--iterations 2] [--epochs 2] [--freeze 0.8]
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
REPORTED = ("verification_accuracy", "verification_tar@far=0.01", "verification_tar@far=0.001",
            "clustering_bcubed_f", "clustering_nmi")


def split_celeba(holdout_fraction: float, limit: int | None, holdout_limit: int | None, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training source, held-out) CelebA photos with absolute paths, split by identity."""
    labels = pd.read_csv(CELEBA / "labels.csv")
    labels["path"] = [str(CELEBA / path) for path in labels.path]
    people = np.random.default_rng(seed).permutation(sorted(labels.identity.unique()))
    held_people = set(people[: round(holdout_fraction * len(people))])
    source = _whole_identities(labels[~labels.identity.isin(held_people)], people, limit)
    held = _whole_identities(labels[labels.identity.isin(held_people)], people, holdout_limit)
    return source, held


def _whole_identities(photos: pd.DataFrame, order: np.ndarray, limit: int | None) -> pd.DataFrame:
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
    from flows.evaluate import evaluate_run
    from flows.loop import closed_loop
    from flows.mine import mine
    from pipeline.config import TrainConfig
    from storage import registry
    from storage.exports import export_info
    from storage.settings import Settings
    from storage.store import Store

    with measured() as mining:
        mined = mine(folders=source.path.tolist(), subset="celeba")  # files are roots of their own
    config = TrainConfig(epochs=args.epochs, freeze_fraction=args.freeze, batch_size=args.batch_size,
                         base_lr=args.lr, num_workers=args.workers)
    with measured() as looping:
        result = closed_loop(iterations=args.iterations, loop_name=args.loop_name, config=config, min_churn=args.min_churn)

    store = Store(Settings())
    iterations = registry.loop_iterations(store, args.loop_name)[-len(result["iterations"]):]
    first_run = export_info(store, iterations[0]["export_id"])["run_id"]
    mined_quality = lambda run_id: evaluate_run(store, files["mined_truth"], run_id)  # noqa: E731
    baseline = store.model(registry.training_run(store, iterations[0]["training_run_id"])["parent_model_id"]).name
    rows = [{
        "iteration": 0, "model": baseline,
        **{name: iterations[0]["metrics"]["current"].get(name) for name in REPORTED},
        "mined_bcubed_f": mined_quality(first_run)["bcubed_f"],
        "identities": iterations[0]["metrics"]["identities_before"], "churn": None, "promoted": None,
        "gate": f"baseline ({baseline})", "seconds": None,
    }]
    for stored in iterations:
        metrics = stored["metrics"]
        rows.append({
            "iteration": stored["iteration"],
            "model": f"candidate {metrics['candidate_model_id']}",
            **{name: metrics["candidate"].get(name) for name in REPORTED},
            "mined_bcubed_f": mined_quality(stored["run_id"])["bcubed_f"] if stored["promoted"] else None,
            "identities": metrics["identities"], "churn": metrics["churn"], "promoted": stored["promoted"],
            "gate": metrics["gate_reason"], "seconds": metrics["seconds"],
            "train_loss": metrics["training"].get("loss"), "export_faces": metrics["export"]["train_faces"],
        })
    return {
        "photos_mined": len(source), "photos_already_in_store": mined.photos_unchanged,
        "faces_found": mined.faces_found, "faces_passed": mined.faces_passed, "gate_metric": args.gate_metric,
        "held_out_celeba_photos": len(held), "lfw_pairs": int(pd.read_csv(files["pairs"]).shape[0]),
        "config": config.model_dump(), "device": args.device,
        "mine_seconds": round(mining.seconds, 1), "mine_peak_rss_mib": round(mining.peak_rss_mib),
        "loop_seconds": round(looping.seconds, 1), "loop_peak_rss_mib": round(looping.peak_rss_mib),
        "stop_reason": result["stop_reason"], "iterations": rows, "data_dir": str(root),
    }


def print_report(report: dict) -> None:
    columns = ["iteration", "model", *REPORTED, "mined_bcubed_f", "identities", "churn", "promoted"]
    table = pd.DataFrame(report["iterations"])[columns].rename(
        columns=lambda name: name.replace("verification_", "lfw_").replace("clustering_", "heldout_celeba_")
    )
    print("closed loop on CelebA; held out: LFW pairs (lfw_*), CelebA identities never mined (heldout_celeba_*);")
    print("mined_bcubed_f: the loop's own labelling of the mined photos against their CelebA labels\n")
    print(table.to_string(index=False, float_format=lambda value: f"{value:.4f}", na_rep="-"))
    for row in report["iterations"][1:]:
        print(f"\niteration {row['iteration']}: {row['gate']}\n  seconds: {row['seconds']}")
    summary = {key: value for key, value in report.items() if key not in ("iterations", "config")}
    print("\n" + json.dumps(summary, indent=1, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=500, help="CelebA photos to mine (whole identities); 0: all")
    parser.add_argument("--holdout-fraction", type=float, default=0.3, help="share of CelebA identities held out")
    parser.add_argument("--holdout-limit", type=int, default=400, help="held-out CelebA photos (whole identities); 0: all")
    parser.add_argument("--pairs-limit", type=int, default=0, help="LFW pairs to use (0: all 2,200)")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--freeze", type=float, default=0.8, help="share of parameter tensors kept frozen")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01, help="base learning rate at batch size 256")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--min-churn", type=float, default=0.01)
    parser.add_argument("--gate-metric", default="verification_accuracy", help="settings.gate.metric")
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
