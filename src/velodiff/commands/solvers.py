"""`velodiff solvers`: list the registered solvers with their orders and NFE per step; with
``--aliases``, the table of other tools' sampler and scheduler names (``velodiff.aliases``)."""

from __future__ import annotations

import typer


def solvers(
    aliases: bool = typer.Option(
        False, "--aliases", help="list k-diffusion / ComfyUI / A1111 / diffusers names and what they map to"
    ),
) -> None:
    """List solvers: name, order, NFE per step, noise, options."""
    from rich.table import Table

    from .options import print_table

    if aliases:
        from ..aliases import ALIASES

        table = Table("name", "from", "kind", "velodiff", "note")
        for a in ALIASES:
            table.add_row(a.name, a.source, a.kind, a.target(), a.note)
        print_table(table)
        return

    from ..solvers import SOLVERS

    table = Table("solver", "order", "NFE/step", "stochastic", "options", "description")
    for s in SOLVERS.values():
        opts = ", ".join(f"{k}={v}" for k, v in s.defaults.items())
        table.add_row(
            s.name, str(s.order), str(s.nfe_per_step), "yes" if s.stochastic else "no", opts, s.description
        )
    print_table(table)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    from .options import example

    app.command("solvers", epilog=example("velodiff solvers --aliases"))(solvers)
