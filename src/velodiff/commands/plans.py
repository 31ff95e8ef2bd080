"""`velodiff plans`: list the step-plan rules (guidance family, instruments) with their options and cost."""

from __future__ import annotations

import typer


def plans() -> None:
    """List plan rules: name, what it costs, options (default, help). Write a plan as
    name[:key=value,...] joined by '+', e.g. ag:threshold=0.99+pag:scale=3."""
    from rich.table import Table

    from ..plan import format_value, rule_table
    from .options import print_table

    table = Table("rule", "cost", "options (default)", "what it does", show_lines=True)
    for r in rule_table():
        opts = "\n".join(
            f"{o['name']}={'run' if o['default'] is None else format_value(o['default']) or '-'}"
            + (f" (alias {', '.join(o['aliases'])})" if o["aliases"] else "")
            + f": {o['help']}"
            for o in r["options"]
        )
        table.add_row(r["name"], r["cost"], opts or "-", r["summary"])
    print_table(table)
    import shutil
    import textwrap

    typer.echo(textwrap.fill(
        "Plan string: name[:key=value,...] joined by '+', e.g. ag:threshold=0.99+pag:scale=3; 'none' is the "
        "empty plan. 'run' defaults come from the run (--guidance).",
        shutil.get_terminal_size((160, 24)).columns, break_long_words=False, break_on_hyphens=False,
    ))


def register(app: typer.Typer, bench: typer.Typer) -> None:
    from .options import example

    epilog = example('velodiff generate "a red cube" --plan ag:threshold=0.99 --out cube.png')
    app.command("plans", epilog=epilog, short_help="List plan rules: name, cost, options.")(plans)
