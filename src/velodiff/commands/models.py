"""`velodiff models`: the models shipped inside the package, with what each runs by default."""

from __future__ import annotations

import json

import typer


def models() -> None:
    """List the shipped models and what each runs by default."""
    from rich.table import Table

    from ..shipped import SHIPPED, asset_path
    from .options import print_table

    table = Table("name", "base", "solver", "steps", "guidance", "MB", "summary")  # MB: 10**6 bytes
    for name, entry in SHIPPED.items():
        own = asset_path(entry.folder)
        f = own / "sampling.json"
        d = json.loads(f.read_text()) if f.is_file() else {}
        size = sum(q.stat().st_size for q in own.rglob("*") if q.is_file()) / 1e6 if own.is_dir() else 0.0
        table.add_row(
            name,
            entry.base or "-",
            str(d.get("solver", "-")),
            str(d.get("steps", "-")),
            str(d.get("guidance", "-")),
            f"{size:.1f}",
            entry.summary,
        )
    print_table(table)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    from .options import example

    app.command("models", epilog=example("velodiff models"))(models)
