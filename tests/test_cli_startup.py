"""Start-up: `velodiff --help`, every subcommand's `--help` and the errors found before any model work
do not import torch, diffusers or transformers (a fresh interpreter each, since the test process has
torch loaded); the lazy package keeps its public names; the CLI's own exit keeps codes and output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import velodiff
from velodiff.commands.names import GRID_NAMES, SOLVER_NAMES
from velodiff.errors import VelodiffError

HEAVY = ("torch", "diffusers", "transformers")


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=120)


# Every command's --help (walked from the click tree, so new commands are covered), then the given
# early errors; prints, per case, the exit code, the last stderr line and the heavy modules loaded.
PROBE = """
import json, sys
import typer
from velodiff import cli

HEAVY = {heavy!r}
cli._register()
def walk(cmd, path):
    yield path + ["--help"]
    for name, sub in sorted(getattr(cmd, "commands", {{}}).items()):
        yield from walk(sub, path + [name])
cases = list(walk(typer.main.get_command(cli.app), [])) + json.loads(sys.argv[1])
out = []
for argv in cases:
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out.append({{"argv": argv, "code": code, "heavy": [m for m in HEAVY if m in sys.modules]}})
print(json.dumps(out), file=sys.__stdout__)
"""


def probe(cases: list[list[str]]) -> list[dict]:
    p = run_python(
        "import io, sys\nsys.stdout = io.StringIO()\n" + PROBE.format(heavy=HEAVY), json.dumps(cases)
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_help_and_early_errors_import_no_torch(tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    errors = [
        ["generate", "a red circle", "--out", str(tmp_path / "x.png"), "--solver", "nope"],
        ["generate", "  ", "--out", str(tmp_path / "x.png")],
        ["generate", "a red circle", "--out", str(tmp_path / "missing" / "a" / "x.png")],
        ["generate", "a red circle", "--out", str(tmp_path / "x.gif")],
        ["generate", "a red circle", "--out", str(tmp_path / "x.png"), "--guidance", "-1"],
        ["generate", "a red circle", "--out", str(tmp_path / "x.png"), "--plan", "agg"],
        ["generate", "a red circle", "--out", str(tmp_path / "x.png"), "--plan", "ag:threshold=2+pag"],
        ["generate-set", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "set"), "--plan", "ag+cfg"],
        ["eval", "shapes", "--json", str(tmp_path / "r.json"), "--plan", "pag:scale=x"],
        ["generate-set", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "set")],
        ["generate-set", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "set"), "--solver", "nope"],
        ["eval", "shapes", "--json", str(tmp_path / "missing" / "a" / "r.json")],
        ["report", str(tmp_path / "missing")],
    ]
    rows = probe(errors)
    helps = [r for r in rows if r["argv"][-1] == "--help"]
    assert len(helps) >= 12  # velodiff, generate, generate-set, eval, eval shapes, bench, train, ...
    assert {"generate", "bench", "train", "eval"} <= {r["argv"][0] for r in helps if len(r["argv"]) == 2}
    for r in rows:
        expected = 0 if r["argv"][-1] == "--help" else 2
        assert r["code"] == expected, r
        assert r["heavy"] == [], f"`velodiff {' '.join(r['argv'])}` imported {r['heavy']}"
    assert len(rows) == len(helps) + len(errors)


def test_early_errors_keep_their_messages(tmp_path):
    p = run_python(
        """
        import sys
        from velodiff.cli import main
        sys.exit(main(sys.argv[1:]))
        """,
        "generate", "a red circle", "--out", str(tmp_path / "x.png"), "--solver", "nope",
    )
    from velodiff.solvers import get_solver

    with pytest.raises(VelodiffError) as e:
        get_solver("nope")
    assert p.returncode == 2
    assert p.stderr.strip() == f"error: {e.value}"  # the registry's message, from the light name list


def test_solver_names_match_the_registry():
    from velodiff.solvers import SOLVERS

    assert SOLVER_NAMES == tuple(SOLVERS), (
        "velodiff/commands/names.py: SOLVER_NAMES must list velodiff.solvers.SOLVERS (the CLI checks "
        "--solver against it without importing torch)"
    )


def test_grid_names_match_the_registry():
    from velodiff.grids import GRIDS

    assert GRID_NAMES == tuple(GRIDS), (
        "velodiff/commands/names.py: GRID_NAMES must list velodiff.grids.GRIDS (the CLI checks --grid "
        "against it without importing torch)"
    )


def test_package_import_is_light_and_names_resolve():
    p = run_python(
        """
        import sys, velodiff
        assert not [m for m in ("torch", "diffusers", "transformers") if m in sys.modules]
        from velodiff import DiscreteVP, sample  # noqa: F401
        assert "torch" in sys.modules
        """
    )
    assert p.returncode == 0, p.stderr
    import importlib

    for name in velodiff.__all__:
        module = velodiff._EXPORTS[name]
        assert getattr(velodiff, name) is getattr(importlib.import_module(f"velodiff.{module}"), name)
    assert velodiff.sampling.sample is velodiff.sample
    assert set(velodiff.__all__) <= set(dir(velodiff))
    with pytest.raises(AttributeError):
        velodiff.no_such_name  # noqa: B018


@pytest.mark.parametrize("argv, code, stream, text", [
    (["--help"], 0, "stdout", "Usage: velodiff"),
    (["generate", "  ", "--out", "x.png"], 2, "stderr", "error: the prompt is empty"),
])
def test_console_exit_keeps_code_output_and_atexit(tmp_path, argv, code, stream, text):
    """With torch loaded the console entry ends the process with os._exit (skipping ~1 s of module
    teardown): the exit code, both streams and atexit handlers must come through unchanged."""
    marker = tmp_path / "atexit.txt"
    p = run_python(
        f"""
        import atexit, sys
        import torch  # noqa: F401  (the fast exit applies once torch is loaded)
        atexit.register(lambda: open({str(marker)!r}, "w").write("ran"))
        sys.argv = ["velodiff", *sys.argv[1:]]
        from velodiff.cli import main
        print("before", flush=False)  # buffered output must be flushed
        sys.exit(main())
        """,
        *argv,
    )
    assert p.returncode == code, p.stderr
    assert text in getattr(p, stream)
    assert p.stdout.startswith("before")
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("argv, text", [
    (["generate", "x", "--steps", "0"], "error: Invalid value for '--steps'"),
    (["generate", "x", "--guidance", "abc"], "error: Invalid value for '--guidance'"),
    (["generate"], "error: Missing argument"),
    (["generate", "x", "--no-such-option"], "error: No such option: --no-such-option"),
    (["generat", "x"], "error: No such command 'generat'"),
    (["bench", "solvers", "--nfe"], "error: Option '--nfe' requires an argument"),
    # more threads than CPUs: 100 000 crashed the OpenMP runtime (a segmentation fault)
    (["generate", "x", "--threads", str((os.cpu_count() or 1) + 1)], "error: Invalid value for '--threads'"),
    (["train", "ldm", "--threads", "100000"], "error: Invalid value for '--threads'"),
    # counts that allocated until memory ran out (velodiff.limits)
    (["bench", "solvers", "--samples", "100000000000"], "error: Invalid value for '--samples'"),
    (["train", "autoencoder", "--run", "r", "--batch", "100000000"], "error: Invalid value for '--batch'"),
    (["eval", "shapes", "--images-per-prompt", "1000000000"], "error: Invalid value for '--images-per"),
])
def test_usage_errors_print_one_line(capsys, argv, text):
    """click's usage errors (bad values, missing or unknown options and commands) print one line, as
    every other user error does, naming the help to read; exit status 2 as click's."""
    from velodiff import cli

    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith(text) and out.err.count("\n") == 1, out.err
    assert "--help'" in out.err


@pytest.mark.parametrize("argv, where", [
    (["bench", "solvers", "--nfe"], "velodiff bench solvers"),  # (click gives no context for these)
    (["generate", "x", "-o"], "velodiff generate"),
    (["generate", "x", "--no-such-option"], "velodiff generate"),
    (["--no-such-option"], "velodiff"),
])
def test_a_usage_error_names_the_help_of_its_command(capsys, argv, where):
    from velodiff import cli

    with pytest.raises(SystemExit):
        cli.main(argv)
    assert capsys.readouterr().err.rstrip().endswith(f"(see '{where} --help')")


def test_commands_are_registered_once_per_process(capsys):
    """`main` called again in one process (tests, scripts) does not add every command again: typer would
    rebuild them all on each call, and the help would list each twice."""
    from velodiff import cli

    counts = []
    for _ in range(2):
        with pytest.raises(SystemExit):
            cli.main(["--help"])
        counts.append((len(cli.app.registered_commands), len(cli.app.registered_groups)))
    assert counts[0] == counts[1], counts
    assert capsys.readouterr().out.count("  generate ") == 2  # one listing per call, each command once


def test_load_in_python_is_quiet_and_leaves_logging_as_it_was():
    """`velodiff.load` in a script: diffusers' import of torchao (installed with velodiff[quant]) printed
    torchao's notes on GPU kernels and torch's enum deprecations; they stay below ERROR while the
    family builds, and the loggers' levels are the user's again afterwards."""
    p = run_python(
        """
        import logging
        import velodiff
        velodiff.load("default")
        print([logging.getLogger(n).level for n in ("torchao", "torch.utils._pytree")])
        """
    )
    assert p.returncode == 0, p.stderr
    assert "Failed to load" not in p.stderr and "_pytree" not in p.stderr, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "[0, 0]"



def test_an_output_path_that_cannot_be_written_is_one_line(tmp_path, capsys):
    """A path under a regular file (or a read-only folder, a full disk: the OS's error) is one line and
    status 2, not a traceback, in every command that writes (here a training run's folder)."""
    from velodiff.cli import main

    (tmp_path / "afile").write_text("")
    code = main(["train", "autoencoder", "--run", str(tmp_path / "afile" / "r"), "--steps", "1", "--size",
                 "micro", "--threads", "1", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: Not a directory: {tmp_path / 'afile' / 'r'}"
