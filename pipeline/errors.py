"""Errors a user can meet. The CLI prints them as one line and exits with status 2; Prefect
tasks never retry them (`flows.runtime.retry_unless_user_error`): they fail the same way again."""
from __future__ import annotations

import unicodedata

# Names people give (subsets, identities) are stored in columns of this many characters.
NAME_MAX_LENGTH = 255


class FacemineError(Exception):
    """A problem the user can fix (bad path, missing weights, bad parameter)."""


def check_name(text: str, what: str, max_length: int = NAME_MAX_LENGTH) -> str:
    """`text` if it can name something: not blank, one line without control characters (NUL,
    newline, escape sequences that would rewrite a terminal), at most `max_length` characters."""
    if not text.strip():
        raise FacemineError(f"{what} cannot be empty")
    if len(text) > max_length:
        raise FacemineError(f"{what} is {len(text)} characters long; at most {max_length} fit")
    control = next((character for character in text if unicodedata.category(character) == "Cc"), None)
    if control is not None:
        raise FacemineError(f"{what} cannot hold control characters such as NUL or newline (found {control!r})")
    return text
