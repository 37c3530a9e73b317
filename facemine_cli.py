"""`facemine` command line: parses arguments and calls flows or labeling; no logic of its own."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from labeling.cli import register as register_labeling_commands
from pipeline.errors import FacemineError

Handler = Callable[[argparse.Namespace], int]


def _print_table(rows: list[dict], title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in rows[0] if rows else ["(empty)"]:
        table.add_column(str(column))
    for row in rows:
        table.add_row(*(str(value) for value in row.values()))
    Console().print(table)


def _existing_paths(paths: list[str]) -> list[str]:
    missing = [path for path in paths if not Path(path).exists()]
    if missing:
        raise FacemineError(f"folder not found: {missing[0]}")
    return [str(Path(path).resolve()) for path in paths]


def cmd_mine(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from flows import progress
    from flows.mine import mine

    with Progress() as bar:
        task_id = bar.add_task("mining photos", total=None)

        def on_progress(_stage: str, done: int, total: int) -> None:
            bar.update(task_id, completed=done, total=total)

        progress.add_listener(on_progress)
        try:
            summary = mine(folders=_existing_paths(args.paths), subset=args.subset, shard_size=args.shard_size)
        finally:
            progress.remove_listener(on_progress)
    _print_table([{"": key, "value": value} for key, value in summary.model_dump().items()], title="mine summary")
    return 0


def cmd_status(_args: argparse.Namespace) -> int:
    from storage.settings import Settings
    from storage.store import Store

    rows = Store(Settings()).status_counts()
    _print_table(rows, title="photos and faces per subset")
    return 0


def _store():  # noqa: ANN202 - storage.store.Store, imported lazily to keep --help fast
    from storage.settings import Settings
    from storage.store import Store

    return Store(Settings())


def cmd_cluster(args: argparse.Namespace) -> int:
    from flows.cluster import cluster

    result = cluster(subsets=args.subset or None, method=args.method)
    _print_table([{"": key, "value": value} for key, value in result.items()], title="clustering run")
    return 0


def cmd_identities(args: argparse.Namespace) -> int:
    from storage import identities as identity_store

    store = _store()
    run_id = args.run or identity_store.latest_run_id(store)
    if run_id is None:
        raise FacemineError("no clustering run yet: run `facemine cluster` first")
    table = identity_store.identities_summary(store, run_id).head(args.limit)
    _print_table(table.round(3).to_dict("records"), title=f"identities of clustering run {run_id}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from storage.exports import export_dataset

    store = _store()
    updates = {
        key: value
        for key, value in {
            "min_faces_per_identity": args.min_faces,
            "max_faces_per_identity": args.max_faces,
            "val_fraction": args.val_fraction,
        }.items()
        if value is not None
    }
    config = store.settings.export.model_validate(store.settings.export.model_dump() | updates)
    result = export_dataset(store, args.name, config, run_id=args.run)
    keys = ("export_id", "path", "version", "run_id", "identities", "faces", "train_faces", "val_faces")
    _print_table([{"": key, "value": result[key]} for key in keys], title="dataset export")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from flows.evaluate import evaluate_run

    result = evaluate_run(_store(), args.truth, run_id=args.run)
    _print_table([{"metric": key, "value": round(value, 4) if isinstance(value, float) else value}
                  for key, value in result.items()], title="clustering quality")
    return 0


def cmd_serve(_args: argparse.Namespace) -> int:
    from flows.serve import build_deployments, describe_schedule, serve_deployments, server_api_url, ui_url
    from storage.settings import Settings

    settings = Settings()
    server_api_url()
    plan = build_deployments(settings)
    _print_table(
        [{"deployment": f"{d.flow_name}/{d.name}", "schedule": describe_schedule(d)} for d in plan.deployments],
        title=f"serving; Prefect UI at {ui_url()} (Ctrl-C stops)",
    )
    for name, reason in plan.skipped.items():
        print(f"not serving {name}: {reason}")
    serve_deployments(plan, settings)
    return 0


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=None, help="passes over the training split")
    parser.add_argument("--freeze", type=float, default=None, help="share of parameter tensors kept frozen (0..1)")
    parser.add_argument("--loss", choices=["arcface", "cosface"], default=None, help="margin softmax loss")
    parser.add_argument("--margin", type=float, default=None, help="loss margin")
    parser.add_argument("--lr", type=float, default=None, help="base learning rate (for the reference batch size)")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch size")
    parser.add_argument("--base", choices=["current", "fresh"], default=None,
                        help="fine-tune the current model, or train its architecture from scratch")
    parser.add_argument("--workers", type=int, default=None, help="data loading processes")


def _train_config(args: argparse.Namespace):  # noqa: ANN202 - pipeline.config.TrainConfig, imported lazily
    from storage.settings import Settings

    defaults = Settings().train
    options = {"epochs": args.epochs, "freeze_fraction": args.freeze, "loss": args.loss, "margin": args.margin,
               "base_lr": args.lr, "batch_size": args.batch_size, "base_model": args.base, "num_workers": args.workers}
    return defaults.model_validate(defaults.model_dump() | {k: v for k, v in options.items() if v is not None})


def _metric_rows(current: dict, candidate: dict) -> list[dict]:
    return [
        {"metric": name, "current": round(current.get(name, float("nan")), 4), "candidate": round(candidate[name], 4)}
        for name in candidate
        if isinstance(candidate[name], float)
    ]


def cmd_train(args: argparse.Namespace) -> int:
    from flows.train import retrain

    result = retrain(config=_train_config(args), export_id=args.export, promote=not args.no_promote,
                     validation_pairs=args.validation_pairs)
    _print_table(_metric_rows(result["current_metrics"], result["candidate_metrics"]),
                 title=f"model {result['parent_model_id']} (current) vs model {result['model_id']} (candidate)")
    keys = ("training_run_id", "model_id", "export_id", "gate_metric", "promoted", "reason", "checkpoint")
    _print_table([{"": key, "value": result[key]} for key in keys], title="training run")
    return 0


def _print_loop(name: str, plot: Path | None = None) -> None:
    from flows.loop import loop_table, plot_loop

    table = loop_table(_store(), name)
    if table.empty:
        raise FacemineError(f"loop {name!r} has no iterations yet: run `facemine loop run --name {name}`")
    shown = table.drop(columns=["gate_metric", "gate_reason"]).round(4)
    _print_table(shown.to_dict("records"), title=f"closed loop {name!r}, gate metric {table.gate_metric.iloc[-1]}")
    for iteration, reason in zip(table.iteration, table.gate_reason):
        print(f"iteration {iteration}: {reason}")
    if plot is not None:
        print(f"plot written to {plot_loop(table, plot, f'closed loop {name!r}')}")


def cmd_loop_run(args: argparse.Namespace) -> int:
    from flows.loop import closed_loop

    result = closed_loop(iterations=args.iterations, loop_name=args.name, config=_train_config(args),
                         min_churn=args.min_churn, export_name=args.export_name)
    if result["stop_reason"]:
        print(f"loop stopped: {result['stop_reason']}")
    _print_loop(args.name, args.plot)
    return 0


def cmd_loop_report(args: argparse.Namespace) -> int:
    _print_loop(args.name, args.plot)
    return 0


def cmd_models(_args: argparse.Namespace) -> int:
    from storage.registry import models_table

    table = models_table(_store()).drop(columns=["created_at"])
    _print_table(table.astype(object).where(table.notna(), "").to_dict("records"), title="models")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facemine", description="Mine, cluster, review and retrain face datasets.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mine = commands.add_parser("mine", help="detect, align, score and embed the faces of photo folders")
    mine.add_argument("paths", nargs="+", help="photo folders (searched recursively) or files")
    mine.add_argument("--subset", default="default", help="name of the group these photos belong to")
    mine.add_argument("--shard-size", type=int, default=None, help="photos per Prefect task")
    mine.set_defaults(handler=cmd_mine)

    status = commands.add_parser("status", help="photo and face counts per subset, status and failure reason")
    status.set_defaults(handler=cmd_status)

    cluster = commands.add_parser("cluster", help="embed new faces and cluster them into identities")
    cluster.add_argument("--subset", action="append", help="only these subsets (repeatable); default all")
    cluster.add_argument("--method", default=None, help="infomap (default), components, hac, dbscan, hdbscan")
    cluster.set_defaults(handler=cmd_cluster)

    identities = commands.add_parser("identities", help="identities of a clustering run: sizes, names, confidence")
    identities.add_argument("--run", type=int, default=None, help="clustering run id (default: newest)")
    identities.add_argument("--limit", type=int, default=50, help="show the N largest")
    identities.set_defaults(handler=cmd_identities)

    export = commands.add_parser("export", help="write a versioned labeled dataset of a clustering run")
    export.add_argument("name", help="dataset name (letters, digits, '_' and '-')")
    export.add_argument("--run", type=int, default=None, help="clustering run id (default: newest)")
    export.add_argument("--min-faces", type=int, default=None, help="drop identities with fewer faces")
    export.add_argument("--max-faces", type=int, default=None, help="keep at most N best-quality faces each")
    export.add_argument("--val-fraction", type=float, default=None, help="share of each identity in val")
    export.set_defaults(handler=cmd_export)

    evaluate = commands.add_parser("evaluate", help="score clustering against ground truth (path,identity CSV)")
    evaluate.add_argument("--truth", type=Path, required=True, help="labels.csv with columns path,identity")
    evaluate.add_argument("--run", type=int, default=None, help="clustering run id (default: newest)")
    evaluate.set_defaults(handler=cmd_evaluate)

    serve = commands.add_parser(
        "serve", help="register the Prefect deployments (scheduled mine and cluster, retrain) and run them"
    )
    serve.set_defaults(handler=cmd_serve)

    train = commands.add_parser("train", help="fine-tune the current model on a dataset export; promote it if it is better")
    train.add_argument("--export", type=int, default=None, help="dataset export id (default: newest)")
    train.add_argument("--no-promote", action="store_true", help="evaluate and register only, never promote")
    train.add_argument("--validation-pairs", default=None, help="held-out pairs CSV path_a,path_b,same")
    _add_train_options(train)
    train.set_defaults(handler=cmd_train)

    loop = commands.add_parser("loop", help="closed loop: cluster, export, retrain, gate, re-cluster")
    loop_commands = loop.add_subparsers(dest="loop_command", required=True, metavar="LOOP_COMMAND")
    loop_run = loop_commands.add_parser("run", help="run iterations of the closed loop")
    loop_run.add_argument("--iterations", type=int, default=2, help="at most this many iterations")
    loop_run.add_argument("--name", default="default", help="loop name (its iterations are numbered on)")
    loop_run.add_argument("--min-churn", type=float, default=0.01, help="stop when fewer labels change")
    loop_run.add_argument("--export-name", default="loop", help="name of the dataset exports it writes")
    loop_run.add_argument("--plot", type=Path, default=None, help="also write the report plot (PNG)")
    _add_train_options(loop_run)
    loop_run.set_defaults(handler=cmd_loop_run)
    loop_report = loop_commands.add_parser("report", help="table and plot of a loop's iterations")
    loop_report.add_argument("--name", default="default", help="loop name")
    loop_report.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")
    loop_report.set_defaults(handler=cmd_loop_report)

    models = commands.add_parser("models", help="registered models: status, parent, training run, gate reason")
    models.set_defaults(handler=cmd_models)
    register_labeling_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except FacemineError as error:
        print(f"facemine: error: {error}", file=sys.stderr)
        return 2
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        print(f"facemine: error: invalid setting or parameter {where}: {first['msg']}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("facemine: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
