"""User-facing errors: one clear line, no traceback from the CLI."""

from __future__ import annotations

from collections.abc import Iterable


class VelodiffError(Exception):
    """An error caused by the user's input or environment; the CLI prints it as one line."""


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> VelodiffError:
    """`unknown solver 'x'; valid: a, b, c`."""
    return VelodiffError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(valid))}")
