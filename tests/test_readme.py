"""The README's Python names exist: every ``from velodiff... import ...`` line of its python blocks
imports, and every dotted ``velodiff.module.name`` it quotes resolves; every ``velodiff ...`` command line
that the README, the bench reports and the model cards quote parses (a renamed function, module or
option breaks this test, not a reader's first try)."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import typer

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_the_python_blocks_imports_import():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    lines = [ln.strip() for b in blocks for ln in b.splitlines() if ln.strip().startswith("from velodiff")]
    assert len(lines) >= 10
    for line in lines:
        exec(line, {})  # noqa: S102 - the README's own import lines


def test_every_quoted_dotted_name_resolves():
    names = set(re.findall(r"`(velodiff(?:\.[A-Za-z_]\w*)+)", README))
    assert len(names) >= 10
    missing = []
    for name in sorted(names):
        try:
            resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, missing


ROOT = Path(__file__).resolve().parents[1]
#: every page a user copies a command from: the README, the bench reports and the model cards
DOCS = [
    ROOT / "README.md",
    ROOT / "tests/README.md",
    *ROOT.glob("bench/**/*.md"),
    *ROOT.glob("src/velodiff/assets/*/*.md"),
]


def quoted_commands(text: str) -> list[str]:
    """The ``velodiff ...`` lines of a page's code blocks (fenced or indented, backslash continuations
    joined) and of its inline code spans."""
    found, fenced, line = [], False, ""
    for raw in text.splitlines():
        if raw.strip().startswith("```"):
            fenced, line = not fenced, ""
            continue
        if not (fenced or raw.startswith("    ")):
            line = ""
            continue
        line = f"{line} {raw.strip()}" if line else raw.strip()
        if line.endswith("\\"):
            line = line[:-1]
            continue
        found.append(line)
        line = ""
    found += re.findall(r"`(velodiff [^`]+)`", text)
    commands = [c.removeprefix("$ ") for c in found if re.match(r"(\$ )?velodiff ", c)]
    # a comment, a redirection or a second command ends the command line
    return [re.split(r" #| > | \| | && ", c)[0] for c in commands]


def arguments(command: str) -> list[str]:
    """The words after ``velodiff``; a placeholder ``...`` stands for an option's value or for nothing,
    and ``[--option value]`` (an optional part) is read as the option."""
    words: list[str] = []
    for word in shlex.split(command)[1:]:
        if word in ("...", "…"):
            if words and words[-1].startswith("--"):
                words.append("X")
            continue
        words.append(word.strip("[]"))
    return words


def test_every_quoted_command_line_parses():
    """A renamed or removed option, or a command a page still names, breaks this test rather than a
    reader's copy of the line: each quoted command is parsed by the CLI's own parser (command path,
    option names, option values present, no argument too many; values are not checked)."""
    from velodiff import cli

    cli._register()
    root = typer.main.get_command(cli.app)
    wrong, count = [], 0
    for page in DOCS:
        for command in quoted_commands(page.read_text()):
            words, cmd = arguments(command), root
            while hasattr(cmd, "commands") and words and words[0] in cmd.commands:
                cmd = cmd.commands[words.pop(0)]
            ctx = cmd.make_context("velodiff", [], resilient_parsing=True)
            ctx.resilient_parsing = False  # parse for real, without the values' conversion
            # prose names an option without its value ("`velodiff invert --json`"): try it with one
            tries = [words, [*words, "X"]] if words and words[-1].startswith("--") else [words]
            for attempt in tries:
                try:
                    _, left, _ = cmd.make_parser(ctx).parse_args(args=list(attempt))
                    break
                except Exception as e:  # click's usage errors (typer carries its own click)
                    error = e
            else:
                wrong.append(f"{page.relative_to(ROOT)}: {command}: {error}")
                continue
            if left:
                wrong.append(f"{page.relative_to(ROOT)}: {command}: unexpected {left}")
            count += 1
    assert count >= 250
    assert not wrong, "\n".join(wrong)
