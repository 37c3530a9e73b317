"""Process-local progress listeners (the CLI's progress bar). Tasks running on other
workers simply have no listener; the flow's returned summary stays the source of truth."""
from __future__ import annotations

from collections.abc import Callable

_listeners: list[Callable[[str, int, int], None]] = []


def add_listener(listener: Callable[[str, int, int], None]) -> None:
    _listeners.append(listener)


def remove_listener(listener: Callable[[str, int, int], None]) -> None:
    _listeners.remove(listener)


def report(stage: str, done: int, total: int) -> None:
    for listener in list(_listeners):
        listener(stage, done, total)
