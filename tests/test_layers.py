"""Imports go one way: protocols/ is pure; meter_sim and headend do not import each other's
I/O; nothing imports the CLI."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize(
    "module", ["protocols", "protocols.mqtt", "protocols.registermap", "protocols.sts"]
)
def test_importing_the_protocols_loads_no_io_library(module: str) -> None:
    """What an import pulls in at run time, transitively, beyond the static check above."""
    watched = IO_MODULES | {"ssl"}
    code = f"import sys, {module}; print(sorted({watched!r} & set(sys.modules)))"
    # without the coverage hook, which would load I/O modules of its own into the child
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


def test_documents_are_rendered_by_the_doc_generator_not_by_protocols() -> None:
    """protocols/ holds the tables; turning them into Markdown is cli.docs' job."""
    for path in (ROOT / "protocols").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert "render_markdown" not in defined, path.relative_to(ROOT)
