"""The README's demo, end to end: simulator process, broker, head-end; every check holds."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from headend.broker import find_mosquitto
from headend.demo import DemoOptions, run_demo


class ListReporter:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def section(self, title: str) -> None:
        self.lines.append(f"## {title}")

    def note(self, text: str) -> None:
        self.lines.append(text)

    def table(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.lines.append(f"table {title}: {len(rows)} rows")


@pytest.mark.slow
@pytest.mark.mqtt
def test_demo_holds_every_check(tmp_path: Path) -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    reporter = ListReporter()
    options = DemoOptions(meters=2, broker_url="local", workdir=tmp_path)
    result = asyncio.run(run_demo(options, reporter))
    failed = [what for what, ok in result.checks if not ok]
    assert result.mqtt
    assert not failed, "\n".join(reporter.lines)
    assert len(result.checks) >= 18
    assert (tmp_path / "simulator.log").exists()
    assert any("a local broker was asked for" in line for line in reporter.lines)


@pytest.mark.slow
def test_demo_runs_on_modbus_alone(tmp_path: Path) -> None:
    reporter = ListReporter()
    result = asyncio.run(run_demo(DemoOptions(meters=1, mqtt=False, workdir=tmp_path), reporter))
    failed = [what for what, ok in result.checks if not ok]
    assert not result.mqtt
    assert not failed, "\n".join(reporter.lines)
    assert "## Remote disconnect and reconnect (Modbus)" in reporter.lines
    assert any(line.startswith("## Reconciliation") for line in reporter.lines)


@pytest.mark.slow
def test_demo_runs_again_on_its_kept_workdir(tmp_path: Path) -> None:
    """A second run on the same work directory tells the same story and holds every check,
    in about the time of the first (the old meters' spent credit and top-ups do not carry)."""
    options = DemoOptions(meters=1, mqtt=False, workdir=tmp_path)
    first = asyncio.run(run_demo(options, ListReporter()))
    assert first.ok
    reporter = ListReporter()
    second = asyncio.run(run_demo(options, reporter))
    failed = [what for what, ok in second.checks if not ok]
    assert not failed, "\n".join(reporter.lines)
    assert len(second.checks) == len(first.checks)
    assert any("a fresh fleet" in line for line in reporter.lines)
