"""Errors a user can meet. The CLI prints them as one line and exits non-zero."""


class FacemineError(Exception):
    """A problem the user can fix (bad path, missing weights, bad parameter)."""
