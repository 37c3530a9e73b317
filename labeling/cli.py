"""`facemine review` and `facemine label ...`: argument parsing only; the work is in labeling.actions."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import FacemineError


def _store():  # noqa: ANN202 - storage.store.Store, imported lazily to keep `facemine --help` fast
    from storage.settings import Settings
    from storage.store import Store

    return Store(Settings())


def _labeler(args: argparse.Namespace):  # noqa: ANN202 - labeling.actions.Labeler
    from labeling.actions import Labeler

    return Labeler(_store(), args.who)


def face_ids(text: str) -> list[int]:
    """argparse type of --faces: comma-separated face ids."""
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated face ids, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("no face ids given")
    return ids


def _report(record) -> int:  # noqa: ANN001 - storage.decisions.DecisionRecord
    created = f" (new identity {', '.join(map(str, record.created_identities))})" if record.created_identities else ""
    print(f"decision {record.id}: {record.summary}{created}")
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    from labeling.actions import Labeler, current_run

    store = _store()
    if args.sheet is not None:
        from labeling.sheet import write_identity_sheet

        run_id = current_run(store)
        identity = Labeler(store, args.who).identity(args.sheet, run_id)
        out = write_identity_sheet(store, identity, run_id, args.out or Path(f"identity-{args.sheet}.png"), args.columns)
        print(f"wrote {out} ({len(identity.faces)} faces)")
        return 0
    if args.web:
        from labeling.session import ReviewSession
        from labeling.web import serve

        serve(ReviewSession(store, Labeler(store, args.who)), args.port, args.open)
        return 0
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise FacemineError(
            "facemine review needs an interactive terminal; use --web for the browser or --sheet ID to write a contact sheet"
        )
    from labeling.app import run_review
    from labeling.thumbnails import Thumbnails

    current_run(store)  # a clear error before the screen switches
    run_review(store, args.who, Thumbnails(store.chips, args.thumbnails, args.thumb_size))
    return 0


def cmd_accept(args: argparse.Namespace) -> int:
    return _report(_labeler(args).accept(args.identity, args.why, args.force))


def cmd_name(args: argparse.Namespace) -> int:
    return _report(_labeler(args).name(args.identity, args.name, args.why, args.force))


def cmd_lock(args: argparse.Namespace) -> int:
    return _report(_labeler(args).lock(args.identity, args.why, args.force))


def cmd_merge(args: argparse.Namespace) -> int:
    return _report(_labeler(args).merge(args.first, args.second, args.why, args.force))


def cmd_split(args: argparse.Namespace) -> int:
    return _report(_labeler(args).split(args.identity, args.faces, args.why, args.force))


def cmd_reject(args: argparse.Namespace) -> int:
    return _report(_labeler(args).reject(args.identity, args.faces, args.why, args.force))


def cmd_move(args: argparse.Namespace) -> int:
    return _report(_labeler(args).move(args.faces, args.to, args.why, args.force))


def cmd_not_a_face(args: argparse.Namespace) -> int:
    return _report(_labeler(args).not_a_face(args.faces, args.why, args.force))


def cmd_undo(args: argparse.Namespace) -> int:
    return _report(_labeler(args).undo(args.decision, args.why))


def cmd_history(args: argparse.Namespace) -> int:
    for record in _labeler(args).history(args.limit):
        why = f"  why: {record.why}" if record.why else ""
        undone = f"  [undone by {record.undone_by}]" if record.undone_by else ""
        print(f"{record.id:>6}  {record.at:%Y-%m-%d %H:%M:%S}  {record.who:<12} {record.action:<10} {record.summary}{why}{undone}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `review` and `label` to the facemine command line."""
    who = argparse.ArgumentParser(add_help=False)
    who.add_argument("--who", default=None, help="reviewer recorded with decisions (default: $USER)")
    reasoned = argparse.ArgumentParser(add_help=False, parents=[who])
    reasoned.add_argument("--why", default=None, help="reason recorded with the decision")
    decision = argparse.ArgumentParser(add_help=False, parents=[reasoned])
    decision.add_argument("--force", action="store_true",
                          help="override earlier decisions this one contradicts (recorded in the log)")

    review = subparsers.add_parser("review", parents=[who], help="review the queue of uncertain identities (terminal app, or --web)")
    review.add_argument("--sheet", type=int, metavar="ID", help="write a contact-sheet PNG of identity ID instead")
    review.add_argument("--out", type=Path, default=None, help="contact sheet file (default: identity-ID.png)")
    review.add_argument("--columns", type=int, default=10, help="faces per row of the contact sheet")
    review.add_argument("--web", action="store_true", help="review in the browser: serve the review page on 127.0.0.1")
    review.add_argument("--port", type=int, default=5151, help="port of the review page (--web)")
    review.add_argument("--open", action="store_true", help="open the review page in the default browser (--web)")
    review.add_argument("--thumbnails", default="auto",
                        help="auto: real images where the terminal has Sixel or Kitty graphics, else half blocks (default); "
                             "halfblock; graphics")
    review.add_argument("--thumb-size", type=int, default=32,
                        help="largest thumbnail width in terminal columns (even; smaller when the screen is)")
    review.set_defaults(handler=cmd_review)

    label = subparsers.add_parser("label", help="scriptable review decisions on the current labelling")
    actions = label.add_subparsers(dest="label_action", required=True, metavar="ACTION")

    def action(name: str, handler, help_text: str, parents=(decision,)) -> argparse.ArgumentParser:  # noqa: ANN001
        parser = actions.add_parser(name, parents=list(parents), help=help_text)
        parser.set_defaults(handler=handler)
        return parser

    accept = action("accept", cmd_accept, "the identity is one person: pin all its faces")
    accept.add_argument("identity", type=int)
    name = action("name", cmd_name, "name or rename an identity (pins its faces)")
    name.add_argument("identity", type=int)
    name.add_argument("name")
    lock = action("lock", cmd_lock, "freeze an identity: no face joins it automatically any more")
    lock.add_argument("identity", type=int)
    merge = action("merge", cmd_merge, "two identities are one person (the named, else larger, one survives)")
    merge.add_argument("first", type=int)
    merge.add_argument("second", type=int)
    split = action("split", cmd_split, "these faces of an identity are another person: new identity")
    split.add_argument("identity", type=int)
    split.add_argument("--faces", type=face_ids, required=True, help="comma-separated face ids")
    reject = action("reject", cmd_reject, "these faces are not this person: never put back automatically")
    reject.add_argument("identity", type=int)
    reject.add_argument("--faces", type=face_ids, required=True, help="comma-separated face ids")
    move = action("move", cmd_move, "these faces belong to another identity")
    move.add_argument("--faces", type=face_ids, required=True, help="comma-separated face ids")
    move.add_argument("--to", type=int, required=True, help="target identity id")
    not_a_face = action("not-a-face", cmd_not_a_face, "detector false positives: out of every identity")
    not_a_face.add_argument("--faces", type=face_ids, required=True, help="comma-separated face ids")
    history = action("history", cmd_history, "decisions, newest first", parents=(who,))
    history.add_argument("--limit", type=int, default=None)
    undo = action("undo", cmd_undo, "revert a decision (default: the latest in effect)", parents=(reasoned,))
    undo.add_argument("decision", type=int, nargs="?", default=None)
