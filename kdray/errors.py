"""The errors kdray raises on purpose; the CLI turns them into a message and an exit code."""
from __future__ import annotations

import re
from typing import Any

SHOWN_CHARS = 200  # echoed values and field names are cut to this many characters in messages


def shorten(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` on one line, cut to ``limit`` characters with the full length said
    (a 5 MB string in a config must not become a 5 MB error message)."""
    text = re.sub(r"\s*[\r\n]+\s*", " ", text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class KdrayError(Exception):
    """Base class: a problem kdray explains to the user (exit code 1)."""

    exit_code = 1


class ConfigError(KdrayError):
    """Bad user input: names the field, the bad value and what is allowed (exit code 2)."""

    exit_code = 2

    def __init__(self, field: str, value: Any, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{shorten(field)}: got {shorten(repr(value))}; allowed: {shorten(allowed, 4 * SHOWN_CHARS)}")

    def __reduce__(self):  # picklable across Ray processes with its fields intact
        return (type(self), (self.field, self.value, self.allowed))


class DivergedError(KdrayError):
    """A loss term became NaN or infinite."""

    def __init__(self, epoch: int, term: str, value: float):
        self.epoch, self.term, self.value = epoch, term, value
        super().__init__(f"diverged: loss term {term!r} is {value} at epoch {epoch}")

    def __reduce__(self):
        return (type(self), (self.epoch, self.term, self.value))


def first_line(e: BaseException, n: int = 300) -> str:
    """The first line of an exception's message (its type's name when it has none), at most ``n`` characters."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:n]
