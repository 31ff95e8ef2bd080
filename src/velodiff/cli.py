"""The `velodiff` command. Each area registers its subcommands from its own module
(listed in COMMAND_MODULES, each exposing ``register(app, bench)``); user errors print one line."""

from __future__ import annotations

import importlib
import sys

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fast, measurable diffusion generation.",
)
bench = typer.Typer(no_args_is_help=True, help="Measure quality and speed.")
app.add_typer(bench, name="bench")

#: modules that add subcommands; each defines register(app, bench)
COMMAND_MODULES = [
    "velodiff.commands.solvers",
    "velodiff.commands.plans",
    "velodiff.commands.bench_solvers",
    "velodiff.commands.bench_pipeline",
    "velodiff.commands.train",
    "velodiff.commands.generate",
    "velodiff.commands.eval_shapes",
    "velodiff.commands.generate_set",
    "velodiff.commands.bench_sweep",
    "velodiff.commands.report",
]


def _register() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app, bench)


def main(argv: list[str] | None = None) -> int:
    from .errors import VelodiffError

    _register()
    try:
        app(args=argv, prog_name="velodiff")  # standalone: usage errors print themselves and exit
    except VelodiffError as e:
        typer.echo(f"error: {e}", err=True)
        return 2
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except FileNotFoundError as e:
        typer.echo(f"error: file not found: {e.filename or e}", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
