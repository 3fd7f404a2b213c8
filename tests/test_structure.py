"""The house rules of ``src/repavit`` (README, Development), checked on the source itself.

- imports flow one way, from the foundation up to the command line (``LEVELS``);
- no package imports another package's private module or name;
- ``cli/`` only parses and prints: each subcommand module stays short, and nothing below it imports it;
- every function stays under 80 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "repavit"

# A part may import its own modules and the parts of strictly lower levels, nothing else.
LEVELS = {
    "errors": 0,
    "utils": 0,
    "measure": 1,
    "layers": 1,
    "data": 1,
    "quantize": 2,
    "models": 2,
    "export": 3,
    "train": 4,
    "bench": 4,
    "dense": 5,
    "demo": 5,
    "cli": 6,
}
ENTRY_POINTS = {"__init__.py", "__main__.py", "bench/__main__.py"}  # they expose what is below them
MAX_FUNCTION_LINES = 80
MAX_CLI_MODULE_LINES = 150


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        part = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        yield rel, part, ast.parse(path.read_text(), filename=str(path))


def _imports(rel: Path, tree: ast.AST):
    """``(line, [package parts], [names])`` of every import of repavit inside ``tree``."""
    here = ["repavit", *rel.with_suffix("").parts]
    if here[-1] == "__init__":
        here = here[:-1]
    else:
        here = here[:-1]  # the package holding this module
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
            else:
                target = (node.module or "").split(".")
            if target[0] == "repavit":
                yield node.lineno, target, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "repavit":
                    yield node.lineno, a.name.split("."), []


def test_every_part_has_a_level():
    parts = {part for _, part, _ in _modules()} - {"__init__", "__main__"}
    assert parts <= set(LEVELS), f"new top-level part(s) {parts - set(LEVELS)}: give them a level here and in README"


def test_imports_flow_one_way():
    bad = []
    for rel, part, tree in _modules():
        if rel.as_posix() in ENTRY_POINTS:
            continue
        for line, target, _ in _imports(rel, tree):
            other = target[1] if len(target) > 1 else None
            if other is None or other == part:
                continue
            if LEVELS[other] >= LEVELS[part]:
                bad.append(f"{rel}:{line} ({part}, level {LEVELS[part]}) imports {'.'.join(target)}")
    assert not bad, "imports against the direction:\n" + "\n".join(bad)


def test_no_package_imports_another_packages_private_parts():
    bad = []
    for rel, part, tree in _modules():
        for line, target, names in _imports(rel, tree):
            if len(target) > 1 and target[1] != part:
                private = [p for p in target[2:] if p.startswith("_")] + [n for n in names if n.startswith("_")]
                if private:
                    bad.append(f"{rel}:{line} imports {'.'.join(target)} {private}")
    assert not bad, "\n".join(bad)


def test_only_entry_points_import_the_cli():
    bad = [
        f"{rel}:{line}"
        for rel, part, tree in _modules()
        if part != "cli" and rel.as_posix() not in ENTRY_POINTS
        for line, target, _ in _imports(rel, tree)
        if len(target) > 1 and target[1] == "cli"
    ]
    assert not bad, bad


@pytest.mark.parametrize("path", sorted((SRC / "cli").glob("*.py")), ids=lambda p: p.name)
def test_cli_modules_stay_thin(path):
    """A subcommand module parses arguments and calls the library; its logic lives below."""
    n = len(path.read_text().splitlines())
    assert n <= MAX_CLI_MODULE_LINES, f"{path.name} has {n} lines; move library logic out of cli/"


def test_functions_read_in_one_sitting():
    long = [
        f"{rel}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for rel, _, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "\n".join(long)
