"""tests/slow_tests.txt names real tests, and the ``slow`` marker they get is registered in pyproject.toml."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from conftest import SLOW_LIST, slow_tests

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = None

TESTS = Path(__file__).resolve().parent


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        n.name
        for n in ast.walk(tree)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test")
    }


def test_every_entry_names_an_existing_test():
    entries = slow_tests()
    assert entries, f"{SLOW_LIST} lists no test"
    stale = []
    for entry in sorted(entries):
        file, _, name = entry.partition("::")
        path = TESTS / file
        if not path.is_file() or (name and name not in _test_names(path)):
            stale.append(entry)
    assert not stale, f"{SLOW_LIST.name} names tests that do not exist (renamed or removed?): {stale}"


def test_slow_marker_is_registered():
    text = (TESTS.parent / "pyproject.toml").read_text()
    if tomllib is None:
        assert '"slow:' in text
        return
    markers = tomllib.loads(text)["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("slow:") for m in markers), markers
