"""Imports go one way: protocols/ is pure; meter_sim and headend do not import each other's
I/O; nothing imports the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IO_MODULES = {"asyncio", "serial", "paho", "aiomqtt", "pymodbus", "sqlalchemy", "socket", "typer"}


def _imports(package: str) -> dict[Path, set[str]]:
    found: dict[Path, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[path] = names
    return found


def test_protocols_do_no_io() -> None:
    for path, names in _imports("protocols").items():
        bad = names & (IO_MODULES | {"meter_sim", "headend", "cli"})
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_nothing_imports_the_cli() -> None:
    for package in ("protocols", "meter_sim", "headend"):
        for path, names in _imports(package).items():
            assert "cli" not in names, f"{path.relative_to(ROOT)} imports the CLI"


def test_simulator_and_head_end_are_separate() -> None:
    for path, names in _imports("meter_sim").items():
        assert "headend" not in names or path.name == "bench.py", path
