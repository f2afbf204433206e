"""`meter-sim rig`: hardware-in-the-loop scenarios on a serial line (docs/hil.md)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Literal

import typer
from rich.live import Live
from rich.table import Table

from cli.common import console, handle_errors
from meter_sim.rig.expect import Verdict, judge
from meter_sim.rig.reports import write_capture, write_junit
from meter_sim.rig.runner import Record, SerialSettings, run_scenario
from meter_sim.rig.scenario import Scenario, load_scenario
from protocols.errors import ConfigError

rig_app = typer.Typer(
    help="Hardware-in-the-loop rigs: scripted meters on a serial line (docs/hil.md).",
    no_args_is_help=True,
)

ParityChoice = Literal["N", "E", "O"]
ScenarioArgument = typer.Argument(..., help="The scenario file (TOML, docs/hil.md).")


@rig_app.command("check")
@handle_errors
def rig_check(scenario_path: Path = ScenarioArgument) -> None:
    """Validate a scenario without running it."""
    scenario = load_scenario(scenario_path)
    console.print(
        f"{scenario_path}: scenario {scenario.name!r} is valid: {len(scenario.meters)} meter(s), "
        f"{len(scenario.steps)} step(s), {len(scenario.expectations)} expectation(s), "
        f"{scenario.rig.duration.value:g} s"
    )


def _summary(verdicts: list[Verdict]) -> Table:
    table = Table(title="expectations")
    for column in ("", "expectation", "what was seen"):
        table.add_column(column)
    for verdict in verdicts:
        mark = "[green]pass[/green]" if verdict.passed else "[red]FAIL[/red]"
        table.add_row(mark, verdict.name, verdict.message)
    return table


def _progress_table(scenario: Scenario, lines: list[str]) -> Table:
    table = Table(title=f"scenario {scenario.name}", show_header=False)
    table.add_column("progress")
    for line in lines[-15:]:
        table.add_row(line)
    return table


async def _run(scenario: Scenario, serial: SerialSettings) -> Record:
    if not console.is_terminal:
        return await run_scenario(scenario, serial, lambda text: console.print(text, markup=False))
    lines: list[str] = []
    with Live(_progress_table(scenario, lines), console=console, refresh_per_second=8) as live:

        def progress(text: str) -> None:
            lines.append(text)
            live.update(_progress_table(scenario, lines))

        return await run_scenario(scenario, serial, progress)


@rig_app.command("run")
@handle_errors
def rig_run(
    scenario_path: Path = ScenarioArgument,
    serial: str = typer.Option(
        ..., "--serial", help="The line: a serial device or a pyserial URL (a socat pty)."
    ),
    baud: int = typer.Option(9600, min=50, max=4_000_000, help="Serial baud rate."),
    parity: ParityChoice = typer.Option("N", help="Serial parity: N, E or O."),
    stopbits: int = typer.Option(1, min=1, max=2, help="Serial stop bits: 1 or 2."),
    junit: Path | None = typer.Option(
        None, "--junit", help="Write JUnit XML here: one test case per expectation."
    ),
    capture: Path | None = typer.Option(
        None,
        "--capture",
        help="Write every frame in both directions here: CSV, or pcap when the name ends in "
        ".pcap (docs/hil.md#captures).",
    ),
) -> None:
    """Run a scenario against whatever master is on the line; exit 0 only if every
    expectation held."""
    scenario = load_scenario(scenario_path)
    for path, option in ((junit, "--junit"), (capture, "--capture")):
        if path is not None and not path.parent.is_dir():
            raise ConfigError(f"{option} {path}: no directory {path.parent}")
    settings = SerialSettings(serial, baud, parity, stopbits)
    record = asyncio.run(_run(scenario, settings))
    verdicts = judge(record)
    if junit is not None:
        write_junit(junit, record, verdicts)
    if capture is not None:
        write_capture(capture, record)
    console.print(_summary(verdicts))
    failed = sum(not v.passed for v in verdicts)
    injected = ", ".join(f"{k} {v}" for k, v in sorted(record.line.injected.items()))
    console.print(
        f"{len(verdicts) - failed} of {len(verdicts)} expectation(s) held; "
        f"{len(record.line.exchanges)} request(s) seen; faults injected: {injected or 'none'}",
        markup=False,
    )
    if failed:
        raise typer.Exit(1)
