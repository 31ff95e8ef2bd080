"""User-facing errors: one clear line, no traceback from the CLI."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class VelodiffError(Exception):
    """An error caused by the user's input or environment; the CLI prints it as one line."""


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> VelodiffError:
    """`unknown solver 'x'; valid: a, b, c; did you mean 'y'?` (the hint when there are near matches)."""
    valid = sorted(valid)
    near = difflib.get_close_matches(str(name), valid, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
    return VelodiffError(f"unknown {kind} {name!r}; valid: {', '.join(valid)}{hint}")
