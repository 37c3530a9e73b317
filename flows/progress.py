"""Progress of long stages for the process that shows it (the CLI's progress bar), and where
Prefect's log lines go meanwhile.

A stage is started, with its total, in the process that shows it. Work is reported per part (a
shard) as an absolute count, so a retried shard never counts twice, and a shard that runs in this
process (reporting its chunks as it goes) and the flow that reports it when it finishes agree.
Parts running in other processes (the process pool's workers) have no started stage there: they
send their reports to this process through a relay (below); where they cannot reach it (another
machine), the flow's report when they finish still moves the bar. The flow's returned summary
stays the source of truth.
"""
from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path

ProgressListener = Callable[[str, int, int], None]

_listeners: list[ProgressListener] = []
_lock = threading.Lock()
_totals: dict[str, int] = {}
_parts: dict[str, dict[str, int]] = {}


def add_listener(listener: ProgressListener) -> None:
    _listeners.append(listener)


def remove_listener(listener: ProgressListener) -> None:
    _listeners.remove(listener)


def start(stage: str, total: int) -> None:
    """Begin counting `stage` in this process: listeners hear (stage, 0, total)."""
    with _lock:
        _totals[stage], _parts[stage] = total, {}
        if _listeners:
            _open_relay()
    _notify(stage)


def update(stage: str, part: str, done: int) -> None:
    """`done` items of `part` are finished (an absolute count). Where `stage` was not started (a
    worker), the report goes to the relay of the process that started it, if there is one."""
    with _lock:
        here = stage in _parts
        if here:
            _parts[stage][part] = done
    if here:
        _notify(stage)
    else:
        _send(stage, part, done)


def finish(stage: str) -> None:
    """Stop counting `stage`: late reports (a task thread still winding down) do nothing."""
    with _lock:
        _totals.pop(stage, None)
        _parts.pop(stage, None)
        if not _parts:
            _close_relay()


def _notify(stage: str) -> None:
    with _lock:
        if stage not in _totals:
            return
        total = _totals[stage]
        done = min(sum(_parts[stage].values()), total)
    for listener in list(_listeners):
        listener(stage, done, total)


# ---- reports from worker processes ---------------------------------------------------------------
# Spawned workers inherit the environment, which names a local authenticated connection
# (multiprocessing.connection) to the process showing the bar; each report is one small message.

RELAY = "FACEMINE_PROGRESS_RELAY"  # host:port:authkey (hex)
_relay: Listener | None = None
_sender: tuple[str, Connection | None] | None = None  # (the relay it was made for, its connection)
_sender_lock = threading.Lock()


def _open_relay() -> None:
    global _relay
    if _relay is not None:
        return
    key = secrets.token_bytes(16)
    _relay = Listener(("127.0.0.1", 0), authkey=key)
    host, port = _relay.address
    os.environ[RELAY] = f"{host}:{port}:{key.hex()}"
    threading.Thread(target=_accept, args=(_relay,), name="progress-relay", daemon=True).start()


def _close_relay() -> None:
    global _relay
    if _relay is None:
        return
    relay, _relay = _relay, None
    key = os.environ.pop(RELAY).rsplit(":", 1)[1]
    try:  # wake the accepting thread: it sees the relay is gone and ends
        Client(relay.address, authkey=bytes.fromhex(key)).close()
    except (OSError, AuthenticationError):
        pass
    relay.close()


def _accept(relay: Listener) -> None:
    while True:
        try:
            connection = relay.accept()
        except AuthenticationError:
            continue
        except OSError:
            return
        if _relay is not relay:
            connection.close()
            return
        threading.Thread(target=_receive, args=(connection,), name="progress-report", daemon=True).start()


def _receive(connection: Connection) -> None:
    with connection:
        while True:
            try:
                stage, part, done = connection.recv()
            except (EOFError, OSError):
                return
            update(stage, part, done)


def _send(stage: str, part: str, done: int) -> None:
    global _sender
    relay = os.environ.get(RELAY)
    if relay is None or _relay is not None:  # no relay, or this process holds it: a stage it never started
        return
    with _sender_lock:
        if _sender is None or _sender[0] != relay:
            host, port, key = relay.split(":")
            try:
                _sender = (relay, Client((host, int(port)), authkey=bytes.fromhex(key)))
            except (OSError, AuthenticationError):
                _sender = (relay, None)  # not reachable from here: the flow reports the shard at its end
        connection = _sender[1]
        if connection is None:
            return
        try:
            connection.send((stage, part, done))
        except OSError:
            _sender = (relay, None)


# ---- Prefect's log lines while a bar is shown ------------------------------------------------------

LOG_FILE = "logs/facemine.log"
_LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s - %(message)s"


@contextmanager
def logs_beside_bar(data_dir: Path, console=None) -> Iterator[Path]:  # noqa: ANN001 - rich.console.Console
    """While a progress bar is shown, log lines never print through it: every record goes to
    `data_dir/logs/facemine.log`, and, when `console` is given (`-v`), through that console too,
    which Rich prints above the bar. Prefect's own console handlers (root, uvicorn, fastapi) are
    set aside meanwhile and restored after. Prefect still sends run logs to its API (the UI).
    Task worker processes are told through the environment to keep their console quiet
    (`PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL`); their logs reach the UI the same way."""
    from prefect.logging.handlers import PrefectConsoleHandler
    from rich.logging import RichHandler

    log_file = data_dir / LOG_FILE
    log_file.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(log_file, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    added: list[logging.Handler] = [file_handler]
    if console is not None:
        added.append(RichHandler(console=console, show_path=False, log_time_format="%H:%M:%S"))
    set_aside: list[tuple[logging.Logger, logging.Handler]] = []
    for logger in _loggers_with_console():
        for handler in list(logger.handlers):
            if isinstance(handler, PrefectConsoleHandler):
                logger.removeHandler(handler)
                set_aside.append((logger, handler))
        if logger is logging.getLogger() or not logger.propagate:
            for handler in added:
                logger.addHandler(handler)
    previous_level = os.environ.get(_WORKER_CONSOLE_LEVEL)
    os.environ[_WORKER_CONSOLE_LEVEL] = "CRITICAL"
    try:
        yield log_file
    finally:
        if previous_level is None:
            os.environ.pop(_WORKER_CONSOLE_LEVEL, None)
        else:
            os.environ[_WORKER_CONSOLE_LEVEL] = previous_level
        for logger in _loggers_with_console():
            for handler in added:
                logger.removeHandler(handler)
        for logger, handler in set_aside:
            logger.addHandler(handler)
        file_handler.close()


# Prefect reads logging overrides from the environment (`PREFECT_LOGGING_[PATH]_[KEY]`) when a
# process sets up its logging; the process-pool workers a flow spawns do so at start.
_WORKER_CONSOLE_LEVEL = "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"


def _loggers_with_console() -> list[logging.Logger]:
    """The root logger and the non-propagating loggers Prefect gives a console handler."""
    return [logging.getLogger(), logging.getLogger("uvicorn"), logging.getLogger("fastapi")]
