"""Wording shared by the review commands and the app."""


def plural(count: int, word: str = "face") -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"
