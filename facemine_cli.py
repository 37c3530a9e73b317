"""`facemine` command line: parses arguments and calls flows or labeling; no logic of its own."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError

from labeling.cli import register as register_labeling_commands
from pipeline.errors import FacemineError, check_name

Handler = Callable[[argparse.Namespace], int]
# How `facemine identities` shows an identity nobody has named.
UNNAMED = "(unnamed)"


class OneLineParser(argparse.ArgumentParser):
    """A usage mistake is one line (`--help` has the rest) and exit status 2, as every user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def subset_name(text: str) -> str:
    """argparse type: a subset name (`pipeline.errors.check_name`)."""
    try:
        return check_name(text, "a subset name")
    except FacemineError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _clustering_run(store, run_id: int | None) -> int:  # noqa: ANN001 - storage.store.Store, imported lazily
    """`run_id`, or the newest finished clustering run; a user error when there is no such run."""
    from storage import identities as identity_store

    if run_id is None:
        run_id = identity_store.latest_run_id(store)
        if run_id is None:
            raise FacemineError("no clustering run yet: run `facemine cluster` first")
        return run_id
    identity_store.run_info(store, run_id)  # a user error when there is no such run
    return run_id


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
    """Absolute folders as flow parameters: `path_key`s, text that any API can carry; URLs
    (s3://bucket/photos) as given, checked by the flow's walk."""
    from pipeline.hashing import is_url
    from pipeline.ingest import path_key

    missing = [path for path in paths if not is_url(path) and not Path(path).exists()]
    if missing:
        raise FacemineError(f"folder not found: {path_key(missing[0])}")
    return [path if is_url(path) else path_key(Path(path).resolve()) for path in paths]


def cmd_mine(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from flows import progress
    from storage.settings import Settings

    folders = _existing_paths(args.paths)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns) as bar:
        task_id = bar.add_task("starting (Prefect API)", total=None)

        def on_progress(_stage: str, done: int, total: int) -> None:
            description = "mining photos" if done else "starting (loading models)"
            bar.update(task_id, completed=done, total=total, description=description)

        progress.add_listener(on_progress)
        try:
            with progress.logs_beside_bar(Settings().data_dir, bar.console if args.verbose else None):
                from flows.mine import mine

                summary = mine(folders=folders, subset=args.subset, shard_size=args.shard_size)
        finally:
            progress.remove_listener(on_progress)
    _print_table([{"": key, "value": value} for key, value in summary.model_dump().items()], title="mine summary")
    return 0


def cmd_status(_args: argparse.Namespace) -> int:
    from storage.reports import quality_by_subset, quality_rows
    from storage.settings import Settings
    from storage.store import Store

    store = Store(Settings())
    _print_table(store.status_counts(), title="photos and faces per subset")
    removed = [{"subset": subset, **row} for subset, report in quality_by_subset(store).items()
               for row in quality_rows(report)]
    if removed:
        _print_table(removed, title="faces removed per quality rule (a face can break several)")
    else:
        print("no face was removed by a quality rule")
    return 0


def cmd_subsets(args: argparse.Namespace) -> int:
    if args.subsets_command == "remove":
        removed = _store().remove_subset(args.name)
        print(f"removed subset {removed['subset']!r}: {removed['paths']} paths; "
              f"{removed['faces_removed']} faces no other subset holds went with them")
        return 0
    _print_table(_store().subsets(), title="subsets (a photo in two subsets counts in both)")
    return 0


def _store():  # noqa: ANN202 - storage.store.Store, imported lazily to keep --help fast
    from storage.settings import Settings
    from storage.store import Store

    return Store(Settings())


def cmd_cluster(args: argparse.Namespace) -> int:
    from flows.cluster import cluster

    result = cluster(subsets=args.subset or None, method=args.method, workers=args.workers)
    _print_table([{"": key, "value": value} for key, value in result.items()], title="clustering run")
    return 0


def cmd_identities(args: argparse.Namespace) -> int:
    from storage import identities as identity_store

    store = _store()
    run_id = _clustering_run(store, args.run)
    table = identity_store.identities_summary(store, run_id)
    shown = table.head(args.limit).round(3).astype(object)
    shown["name"] = [name if isinstance(name, str) and name else UNNAMED for name in shown.name]
    _print_table(shown.to_dict("records"), title=f"identities of clustering run {run_id}")
    more = " (largest first; --limit N shows more)" if len(shown) < len(table) else ""
    print(f"{len(shown)} of {len(table)} identities{more}")
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
    result = export_dataset(store, args.name, config, run_id=_clustering_run(store, args.run))
    keys = ("export_id", "path", "version", "run_id", "identities", "faces", "train_faces", "val_faces")
    _print_table([{"": key, "value": result[key]} for key in keys], title="dataset export")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from usecases.evaluation import evaluate_run

    store = _store()
    result = evaluate_run(store, args.truth, run_id=_clustering_run(store, args.run))
    _print_table([{"metric": key, "value": round(value, 4) if isinstance(value, float) else value}
                  for key, value in result.items()], title="clustering quality")
    print(f"coverage: {result['photos_mined']} of {result['photos']} truth paths are mined photos "
          f"({result['coverage']:.1%}); scored on those")
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
    keys = ("training_run_id", "model_id", "export_id", "judged_by_description", "gate_metric", "promoted", "reason",
            "checkpoint")
    _print_table([{"": key, "value": result[key]} for key in keys], title="training run")
    return 0


def _print_loop(name: str, plot: Path | None = None) -> None:
    from usecases.loop import loop_table, plot_loop

    table = loop_table(_store(), name)
    if table.empty:
        raise FacemineError(f"loop {name!r} has no iterations yet: run `facemine loop run --name {name}`")
    shown = table.drop(columns=["gate_metric", "gate_reason"]).round(4)
    _print_table(shown.to_dict("records"), title=f"closed loop {name!r}, gate metric {table.gate_metric.iloc[-1]}")
    for iteration, judged_by, reason in zip(table.iteration, table.judged_by, table.gate_reason):
        print(f"iteration {iteration} (judged on {judged_by}): {reason}")
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
    from pipeline.gate import EMBEDDING_SPEED
    from storage.registry import models_table
    from storage.reports import model_details

    models = models_table(_store())
    table = models.drop(columns=["created_at", "metrics", "train_params"])
    # Quality beside speed, as the gate's evaluations stored them on each model's row (a candidate:
    # all its figures; a current model: faces/s, and quality where configured validation data judged).
    for column, metric, places in (("bcubed_f", "clustering_bcubed_f", 4), ("auc", "verification_auc", 4),
                                   ("faces/s", EMBEDDING_SPEED, 1)):
        figures = [entry.get(metric) for entry in models.metrics]
        table.insert(table.columns.get_loc("gate_reason"), column,
                     [None if figure is None else round(figure, places) for figure in figures])
    _print_table(table.astype(object).where(table.notna(), "").to_dict("records"), title="models")
    for model_id, name, train_params, metrics in zip(models.id, models.name, models.train_params, models.metrics):
        details = model_details(train_params, metrics)
        if details:
            _print_table(details, title=f"model {model_id} ({name}): training parameters and metrics")
        else:
            print(f"model {model_id} ({name}): no training run, no metrics yet")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from storage.maintenance import doctor

    if args.grace_minutes < 0:
        raise FacemineError("--grace-minutes cannot be negative")
    report = doctor(_store(), fix=args.fix, grace_seconds=args.grace_minutes * 60)
    _print_table(report.rows(), title="doctor: orphans and dangling references")
    return 1 if report.problems() and not report.fixed else 0


def cmd_forget(args: argparse.Namespace) -> int:
    from labeling.actions import default_who
    from storage import maintenance

    store = _store()
    if args.identity is not None:
        selection = maintenance.select_identity(store, args.identity)
    elif args.path is not None:
        selection = maintenance.select_path(store, args.path)
    elif args.content is not None:
        selection = maintenance.select_content(store, args.content)
    else:
        selection = maintenance.select_subset(store, args.subset)
    plan = maintenance.forget_summary(store, selection)
    print(f"forget {selection.description}: {plan['faces']} faces, {plan['photos']} photo records and "
          f"{plan['paths']} paths, with their chips, vectors, decisions' face data and every export holding them")
    if not args.yes:
        if not sys.stdin.isatty():
            raise FacemineError("forget needs --yes when not run from a terminal")
        if input("type 'yes' to erase them for good: ").strip() != "yes":
            print("nothing forgotten")
            return 1
    counts = maintenance.forget_faces(store, selection, who=args.who or default_who(), why=args.why)
    _print_table([{"": key, "value": value} for key, value in counts.items()], title="forgotten")
    if store.url.startswith("sqlite") and not counts["sqlite_log_cleared"]:
        print("SQLite's log was busy and still holds old pages: run `facemine doctor --fix` when no run is going")
    elif not store.url.startswith("sqlite"):
        print("PostgreSQL keeps deleted rows' bytes until VACUUM: run VACUUM on the database")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="facemine", description="Mine, cluster, review and retrain face datasets.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mine = commands.add_parser("mine", help="detect, align, score and embed the faces of photo folders")
    mine.add_argument("paths", nargs="+", help="photo folders (searched recursively) or files")
    mine.add_argument("--subset", type=subset_name, default="default", help="name of the group these photos belong to")
    mine.add_argument("--shard-size", type=positive_int, default=None, help="photos per Prefect task")
    mine.add_argument("-v", "--verbose", action="store_true",
                      help="print Prefect's log lines above the progress bar (always in DATA_DIR/logs/facemine.log)")
    mine.set_defaults(handler=cmd_mine)

    status = commands.add_parser("status", help="photo and face counts per subset, status and failure reason")
    status.set_defaults(handler=cmd_status)

    subsets = commands.add_parser("subsets", help="subsets with their path, photo and face counts; `subsets remove NAME`")
    subsets.set_defaults(handler=cmd_subsets, subsets_command=None)
    subsets_commands = subsets.add_subparsers(dest="subsets_command", metavar="SUBSETS_COMMAND")
    remove = subsets_commands.add_parser(
        "remove", help="remove a subset's memberships; faces of photos no other subset holds go with them"
    )
    remove.add_argument("name", help="subset name")

    cluster = commands.add_parser("cluster", help="embed new faces and cluster them into identities")
    cluster.add_argument("--subset", type=subset_name, action="append",
                         help="only these subsets (repeatable); default all")
    cluster.add_argument("--method", default=None, help="infomap (default), components, hac, dbscan, hdbscan")
    cluster.add_argument("--workers", type=positive_int, default=1,
                         help="subsets clustered side by side, a process each (default 1; on Dask its workers)")
    cluster.set_defaults(handler=cmd_cluster)

    identities = commands.add_parser("identities", help="identities of a clustering run: sizes, names, confidence")
    identities.add_argument("--run", type=positive_int, default=None, help="clustering run id (default: newest)")
    identities.add_argument("--limit", type=positive_int, default=50, help="show the N largest")
    identities.set_defaults(handler=cmd_identities)

    export = commands.add_parser("export", help="write a versioned labeled dataset of a clustering run")
    export.add_argument("name", help="dataset name (letters, digits, '_' and '-')")
    export.add_argument("--run", type=positive_int, default=None, help="clustering run id (default: newest)")
    export.add_argument("--min-faces", type=positive_int, default=None, help="drop identities with fewer faces")
    export.add_argument("--max-faces", type=positive_int, default=None, help="keep at most N best-quality faces each")
    export.add_argument("--val-fraction", type=float, default=None, help="share of each identity in val")
    export.set_defaults(handler=cmd_export)

    evaluate = commands.add_parser("evaluate", help="score clustering against ground truth (path,identity CSV)")
    evaluate.add_argument("--truth", type=Path, required=True, help="labels.csv with columns path,identity")
    evaluate.add_argument("--run", type=positive_int, default=None, help="clustering run id (default: newest)")
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

    doctor = commands.add_parser(
        "doctor", help="report orphan files and dangling references (exit 1 if any is left unfixed)",
        description="Report orphans and dangling references; --fix removes them, safely beside running mines. "
        "Exit status: 0 when nothing is wrong (or all was fixed), 1 when problems were found and not fixed.",
    )
    doctor.add_argument("--fix", action="store_true", help="remove what was found")
    doctor.add_argument("--grace-minutes", type=float, default=60.0,
                        help="leave files younger than this alone: a running mine may still commit them")
    doctor.set_defaults(handler=cmd_doctor)

    forget = commands.add_parser(
        "forget", help="erase faces for good: rows, chips, vectors, exports; the decision log keeps a stripped record"
    )
    target = forget.add_mutually_exclusive_group(required=True)
    target.add_argument("--identity", type=int, help="the faces of this identity (current labelling)")
    target.add_argument("--path", help="the photo mined from this path")
    target.add_argument("--content", help="the photo with this SHA-256 content hash")
    target.add_argument("--subset", help="every photo of this subset")
    forget.add_argument("--yes", action="store_true", help="do not ask for confirmation (for scripts)")
    forget.add_argument("--who", default=None, help="recorded in the audit line (default: $USER)")
    forget.add_argument("--why", default=None, help="reason recorded in the audit line")
    forget.set_defaults(handler=cmd_forget)
    register_labeling_commands(commands)
    return parser


def _check_settings() -> None:
    """Read the settings once before any command: a bad config file or setting is reported
    here, in one line, rather than from inside a flow run."""
    from storage.settings import Settings

    Settings()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_settings()
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
