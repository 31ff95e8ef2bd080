"""User-facing errors: one clear line, no traceback from the CLI."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class VelodiffError(Exception):
    """An error caused by the user's input or environment; the CLI prints it as one line."""


class Stopped(Exception):
    """A long run (training) stopped by a signal after saving what resumes it: the CLI says so in one
    line and exits with 128 + the signal's number, as a process the signal ended would, so a scheduler
    (Slurm, a Kubernetes Job) sees an interrupted run to start again, not a finished one."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none): how a foreign
    library's error is quoted inside velodiff's one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def shorten(text: str, width: int = 80) -> str:
    """``text`` quoted, cut after ``width`` characters with how many were left out (a message about a
    long prompt stays one readable line)."""
    if len(text) <= width:
        return repr(text)
    return f"{text[:width]!r}... ({len(text) - width} more characters)"


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> VelodiffError:
    """`unknown solver 'x'; valid: a, b, c; did you mean 'y'?` (the hint when there are near matches)."""
    valid = sorted(valid)
    near = difflib.get_close_matches(str(name)[:200], valid, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
    shown = shorten(name) if isinstance(name, str) else repr(name)  # (a 10 000-character name: cut)
    return VelodiffError(f"unknown {kind} {shown}; valid: {', '.join(valid)}{hint}")


def check_text(texts: Any, what: str) -> None:
    """Refuse text that is not valid Unicode (a command-line argument with bytes that are not UTF-8
    reaches Python as lone surrogates, which the tokenizers reject with a TypeError)."""
    for t in [texts] if isinstance(texts, str) else list(texts or []):
        if isinstance(t, str):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:
                raise VelodiffError(
                    f"the {what} {t.encode('utf-8', 'replace').decode()!r} is not UTF-8 text "
                    f"(character {e.start})"
                ) from None
