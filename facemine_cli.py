"""`facemine` command line: parses arguments and calls flows or labeling; no logic of its own."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

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
