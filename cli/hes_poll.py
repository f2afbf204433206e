"""`hes poll`: read the registered meters (once, or on their schedule until stopped)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from cli.common import console, err_console, handle_errors, print_json
from cli.hes_db import DbOption
from cli.hes_serve import ClockAtOption, ClockSpeedOption, ClockStartOption, make_clock
from headend.links.endpoint import LinkOptions
from headend.services.links import EndpointLinks
from headend.services.poller import Poller, PollPlan, ReadOutcome, RoundSummary
from headend.services.serve import clock_limits
from headend.storage import open_database
from headend.storage.polling import active_targets


def _summary_line(summary: RoundSummary) -> str:
    totals = summary.as_dict()
    return (
        f"{totals['meters']} meter(s): read {totals['read']}, failed {totals['failed']}, "
        f"backfilled {totals['backfilled']}, flagged {totals['flagged']}; "
        f"{totals['intervals']} interval(s), {totals['estimated']} estimated, "
        f"{totals['events']} event(s), {totals['gaps']} gap(s), "
        f"{totals['duplicates']} duplicate(s) skipped"
    )


@handle_errors
def poll(
    once: Annotated[
        bool, typer.Option("--once", help="Read every active meter once and exit.")
    ] = False,
    meter: Annotated[
        list[str] | None, typer.Option("--meter", help="Only this meter (repeatable).")
    ] = None,
    interval: Annotated[
        float, typer.Option(min=1.0, help="Seconds between two reads of a meter (scheduled).")
    ] = 900.0,
    deadline: Annotated[
        float, typer.Option(min=0.1, help="Longest one meter's read may take, retries included.")
    ] = 20.0,
    timeout: Annotated[float, typer.Option(min=0.05, help="Time-out of one request (s).")] = 2.0,
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    clock_speed: ClockSpeedOption = None,
    clock_start: ClockStartOption = None,
    clock_at: ClockAtOption = None,
) -> None:
    """Read the registered meters: validate and store readings, intervals and events; backfill
    what a meter still holds since the last read. Exit 1 if any read failed (--once)."""
    clock, speed = make_clock(clock_speed, clock_start, clock_at)
    plan = PollPlan(
        interval=interval,
        read_deadline=deadline,
        lease=max(120.0, 2 * deadline),
        limits=clock_limits(speed),
    )
    worker = f"{socket.gethostname()}-{os.getpid()}"

    async def run() -> RoundSummary | None:
        database = await open_database(db)
        links = EndpointLinks(LinkOptions(timeout=timeout, retries=1))
        poller = Poller(database, links, clock, plan=plan, worker=worker)
        try:
            if once:
                return await _once(poller, meter, show_progress=not as_json)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            err_console.print(f"polling every {interval:g} s; Ctrl-C stops")
            await poller.run(stop)
            return None
        finally:
            await links.close()
            await database.close()

    summary = asyncio.run(run())
    if summary is None:
        return
    if as_json:
        print_json(summary.as_dict())
    else:
        for outcome in summary.outcomes:
            if not outcome.ok:
                console.print(f"{outcome.meter_id}: {outcome.error}", markup=False, soft_wrap=True)
        console.print(_summary_line(summary), highlight=False, soft_wrap=True)
    if summary.failed:
        raise typer.Exit(1)


async def _once(poller: Poller, meters: list[str] | None, *, show_progress: bool) -> RoundSummary:
    total = len(await active_targets(poller.db, meters))
    progress = Progress(
        TextColumn("reading"), BarColumn(), MofNCompleteColumn(), console=err_console,
        transient=True, disable=not (show_progress and err_console.is_terminal),
    )  # fmt: skip
    with progress:
        task = progress.add_task("read", total=total)

        def advance(_: ReadOutcome) -> None:
            progress.advance(task)

        return await poller.poll_once(meters, advance)


def register(app: typer.Typer) -> None:
    app.command("poll")(poll)
