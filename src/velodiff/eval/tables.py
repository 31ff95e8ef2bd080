"""Markdown tables: the one helper behind every table velodiff writes (bench solvers / pipeline /
sweep / roofline, ``velodiff eval shapes``, ``velodiff report``, ``velodiff tune``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def markdown_row(cells: Sequence[object]) -> str:
    """``| a | b |``; cells as ``str()`` gives them (format numbers before)."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown_table(headers: Sequence[object], rows: Iterable[Sequence[object]], align: str = "") -> str:
    """A GitHub markdown table, no trailing newline. ``align`` has a letter per column, ``l`` (the
    default for missing letters) or ``r`` (numbers). A row may have fewer cells than there are headers
    (e.g. an error message where the measurements would be)."""
    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in align.ljust(len(headers), "l"))
    return "\n".join([markdown_row(headers), rule, *(markdown_row(r) for r in rows)])
