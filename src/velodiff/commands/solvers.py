"""`velodiff solvers`: list the registered solvers with their orders and NFE per step."""

from __future__ import annotations

import typer


def solvers() -> None:
    """List solvers: name, order, NFE per step, noise, options."""
    from rich.console import Console
    from rich.table import Table

    from ..solvers import SOLVERS

    table = Table("solver", "order", "NFE/step", "stochastic", "options", "description")
    for s in SOLVERS.values():
        opts = ", ".join(f"{k}={v}" for k, v in s.defaults.items())
        table.add_row(
            s.name, str(s.order), str(s.nfe_per_step), "yes" if s.stochastic else "no", opts, s.description
        )
    Console(width=200).print(table)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    from .options import example

    app.command("solvers", epilog=example("velodiff solvers"))(solvers)
