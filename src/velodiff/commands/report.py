"""`velodiff report DIR`: a bench or eval folder as one markdown page (DIR/report.md)."""

from __future__ import annotations

# ruff: noqa: B008  (typer declares arguments as defaults)
from pathlib import Path

import typer


def report(folder: Path = typer.Argument(..., help="a `velodiff bench` or `velodiff eval` output folder")):
    """Turn a bench or eval folder into one markdown page with tables, plots and a contact sheet."""
    from ..eval.report import build_report

    out = build_report(folder)
    typer.echo(f"wrote {out}")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    from .options import example

    epilog = example("velodiff report bench/run1")
    app.command("report", epilog=epilog, short_help="A bench or eval folder as one markdown page.")(report)
