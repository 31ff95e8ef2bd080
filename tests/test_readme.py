"""The README's Python names exist: every ``from velodiff... import ...`` line of its python blocks
imports, and every dotted ``velodiff.module.name`` it quotes resolves (a renamed function or module
breaks this test, not a reader's first try)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

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
