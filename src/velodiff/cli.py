"""The `velodiff` command. Each area registers its subcommands from its own module
(listed in COMMAND_MODULES, each exposing ``register(app, bench)``); user errors print one line."""

from __future__ import annotations

import atexit
import importlib
import os
import sys
import threading
from typing import NoReturn

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # click's plain help: rich's panels cut long option names (--images-per-pro…) at 80 columns
    rich_markup_mode=None,
    help="Fast, measurable diffusion generation.",
    epilog='\b\nExample:\n  velodiff generate "a red circle above a blue square" --out circle.png',
)
bench = typer.Typer(no_args_is_help=True, help="Measure quality and speed.")
app.add_typer(bench, name="bench")

#: modules that add subcommands; each defines register(app, bench)
COMMAND_MODULES = [
    "velodiff.commands.solvers",
    "velodiff.commands.models",
    "velodiff.commands.plans",
    "velodiff.commands.bench_solvers",
    "velodiff.commands.bench_pipeline",
    "velodiff.commands.bench_roofline",
    "velodiff.commands.bench_quantize",
    "velodiff.commands.train",
    "velodiff.commands.distill",
    "velodiff.commands.generate",
    "velodiff.commands.img2img",
    "velodiff.commands.inpaint",
    "velodiff.commands.parameters",
    "velodiff.commands.invert",
    "velodiff.commands.edit",
    "velodiff.commands.brush",
    "velodiff.commands.erase",
    "velodiff.commands.classify",
    "velodiff.commands.eval_shapes",
    "velodiff.commands.generate_set",
    "velodiff.commands.bench_sweep",
    "velodiff.commands.report",
    "velodiff.commands.tune",
    "velodiff.commands.calibrate",
    "velodiff.commands.serve",
]

_registered = False


def _register() -> None:
    """Add every module's subcommands, once per process (calling ``main`` again in the same process,
    as tests and scripts do, must not register them twice: typer would build every command again)."""
    global _registered
    if _registered:
        return
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app, bench)
    _registered = True


#: the exit status of a command stopped by Ctrl-C (128 + SIGINT, as a shell reports it)
INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv``: a command that ends raises SystemExit with its code, as typer's
    standalone mode does; a user error prints one line (``error: ...``) and returns (or, for a usage
    error, exits with) status 2. With ``argv=None`` (the console script, ``python -m velodiff.cli``)
    it reads ``sys.argv`` and ends the process itself (see :func:`_exit`)."""
    if argv is not None:
        return _run(argv)
    try:
        code: object = _run(None)
    except SystemExit as e:
        code = e.code
    _exit(code)


def _run(argv: list[str] | None) -> int:
    from .errors import Stopped, VelodiffError

    # click's exceptions, from the click typer uses (recent typers carry their own copy of it)
    click = importlib.import_module(typer.BadParameter.__module__)
    no_args_help = getattr(click, "NoArgsIsHelpError", ())  # click >= 8.2
    _register()
    try:
        # not standalone: click's usage errors come here, to be printed as one line
        result = app(args=argv, prog_name="velodiff", standalone_mode=False)
    except no_args_help as e:  # `velodiff bench` alone: its help, as click does
        e.show()
        raise SystemExit(e.exit_code) from None
    except click.UsageError as e:
        args = sys.argv[1:] if argv is None else argv
        where = e.ctx.command_path if e.ctx is not None else _command_path(args)
        message = _not_finite(e, args) or e.format_message()
        typer.echo(f"error: {message} (see '{where} --help')", err=True)
        raise SystemExit(e.exit_code) from None
    except click.ClickException as e:  # a bad file for a click.Path / click.File argument
        typer.echo(f"error: {e.format_message()}", err=True)
        raise SystemExit(e.exit_code) from None
    except typer.Abort:
        typer.echo("interrupted", err=True)
        raise SystemExit(INTERRUPTED) from None
    except VelodiffError as e:
        typer.echo(f"error: {e}", err=True)
        return 2
    except Stopped as e:
        typer.echo(str(e), err=True)
        return 128 + e.signum
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return INTERRUPTED
    except FileNotFoundError as e:
        typer.echo(f"error: file not found: {e.filename or e}", err=True)
        return 2
    except OSError as e:  # an unwritable folder, a path under a file, a full disk: one line, as above
        where = f": {e.filename}" if e.filename else ""
        typer.echo(f"error: {e.strerror or e}{where}", err=True)
        return 2
    if result == INTERRUPTED:  # typer turns Ctrl-C in a command into this status, silently
        command = (sys.argv[1:] if argv is None else argv)[:1]
        resume = " (the set resumes: run the same command again)" if command == ["generate-set"] else ""
        typer.echo(f"interrupted{resume}", err=True)
    # as click's standalone mode: the end of a command (or its typer.Exit / --help) exits the process
    raise SystemExit(result if isinstance(result, int) else 0)


def _command_path(argv: list[str]) -> str:
    """``velodiff generate``: the command the words name (click leaves the context out of an option that
    lacks its value, whose help is the command's, not the top level's)."""
    words, cmd = ["velodiff"], typer.main.get_command(app)
    for arg in argv:
        sub = getattr(cmd, "commands", {}).get(arg)
        if sub is None:
            break
        words.append(arg)
        cmd = sub
    return " ".join(words)


def _not_finite(error: Exception, argv: list[str]) -> str | None:
    """A range-checked number given as nan or inf: typer's range message ("should be greater than or
    equal to 0") hides that the value is no number at all; say so, as the unchecked options do."""
    opts = getattr(getattr(error, "param", None), "opts", ())
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in opts:
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
                return f"{name} must be a finite number, got {value}"
    return None


def _exit(code: object) -> NoReturn:
    """End the process with ``code``. Once torch is imported (diffusers and transformers with it),
    Python's teardown of those modules takes about 1 s of a 5 s `velodiff generate` (measured,
    bench/startup): after the same atexit handlers and stream flushes, ``os._exit`` skips it.
    Only when nothing else could still be running (no other non-daemon thread), else sys.exit."""
    fast = (
        "torch" in sys.modules
        and (code is None or isinstance(code, int))
        and hasattr(atexit, "_run_exitfuncs")
        and all(t.daemon or t is threading.main_thread() for t in threading.enumerate())
    )
    if fast:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):  # a closed pipe: let Python report it as it would
            fast = False
    if not fast:
        sys.exit(code)
    atexit._run_exitfuncs()  # logging.shutdown, weakref finalizers, multiprocessing, Ray, coverage
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code or 0)


if __name__ == "__main__":
    sys.exit(main())
