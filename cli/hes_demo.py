"""`hes demo`: the end-to-end demo on embedded defaults."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import typer
from rich.rule import Rule
from rich.table import Table

from cli.common import console, fail, handle_errors
from headend.demo import DemoOptions, run_demo
from protocols.mqtt import BrokerSettings


class RichReporter:
    def section(self, title: str) -> None:
        console.print(Rule(title, align="left"))

    def note(self, text: str) -> None:
        console.print(f"  {text}", markup=False, highlight=False)

    def table(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        table = Table(title=title, title_justify="left")
        for header in headers:
            table.add_column(header)
        for row in rows:
            table.add_row(*row)
        console.print(table)


@handle_errors
def demo(
    meters: int = typer.Option(4, min=1, max=200, help="Meters besides the two special ones."),
    speed: float = typer.Option(
        600.0, min=1.0, help="Simulated seconds per real second (until hes serve's day)."
    ),
    broker: str | None = typer.Option(
        None,
        help="MQTT broker URL, or 'local' to start a Mosquitto for the demo; default: the broker "
        "at 127.0.0.1:1883 if it accepts the fleet, else a local one.",
    ),
    no_mqtt: bool = typer.Option(False, "--no-mqtt", help="Modbus only: start no broker."),
    workdir: Path | None = typer.Option(
        None, help="Keep the demo's files (fleet, meter state, broker, store, logs) here."
    ),
    timeout: float = typer.Option(60.0, min=1.0, help="Longest wait of any one step (s)."),
) -> None:
    """Run a simulated fleet and work it from the head-end over Modbus and MQTT, checking
    every step: readings, a payment applied exactly once, remote disconnect and reconnect, an
    STS token, a meter running out of credit and a top-up restoring it, reconciliation. Then
    register the fleet in a fresh store (WORKDIR/hes.db) and run hes serve over it for a
    simulated day at 3600x real time, with one meter's line cut for a while and the meters and
    the ingest restarted, and check the store: contiguous intervals, the outage backfilled and
    its health changes, repeats seen and not stored, the audit chain."""
    if broker is not None and no_mqtt:
        raise fail("--broker and --no-mqtt contradict each other: give one")
    if broker is not None and broker != "local":
        BrokerSettings.parse_url(broker)  # a malformed URL is refused before anything starts
    if workdir is not None and workdir.exists() and not workdir.is_dir():
        raise fail(f"--workdir {workdir} is a file, not a directory")
    options = DemoOptions(meters, speed, broker, not no_mqtt, workdir, timeout)
    result = asyncio.run(run_demo(options, RichReporter()))
    passed = sum(ok for _, ok in result.checks)
    console.print(Rule())
    console.print(f"{passed} of {len(result.checks)} checks held.")
    if not result.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
