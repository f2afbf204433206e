"""`hes disconnect|reconnect METER` through the command store, and `hes commands`.

A command is queued in the store with its reason and the operator's name (an audit entry);
`hes serve` dispatches it. With ``--wait`` this command dispatches it itself (unless a running
worker has it already) and waits until it is verified or has failed: exit 0 only when the
meter's relay was read back where the command asked for.
"""

from __future__ import annotations

import asyncio
import getpass
import os
from datetime import UTC, datetime, timedelta
from typing import Annotated, Final

import typer
from rich.table import Table

from cli.common import console, fail, handle_errors, parse_duration, print_json
from cli.hes_db import DbOption, with_db
from headend.domain.commands import IN_FLIGHT, TERMINAL, CommandState, Kind
from headend.links.endpoint import LinkOptions
from headend.services.dispatcher import Dispatcher, DispatchSettings
from headend.services.links import EndpointLinks
from headend.storage import Database
from headend.storage.commands import CommandView, cancel_command, get_command, list_commands
from protocols.clock import SystemClock

#: the exit status of --wait when the command is still on its way at the time-out
EXIT_STILL_IN_FLIGHT: Final = 4

commands_app = typer.Typer(
    help="Commands to meters: their state and history; cancel one not yet sent.",
    no_args_is_help=True,
)

MeterArg = Annotated[str, typer.Argument(help="The registered meter's id.", show_default=False)]
ReasonOpt = Annotated[
    str,
    typer.Option("--reason", help="Why (kept with the command and in the audit trail)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _actor(actor: str | None) -> str:
    if actor is not None:
        if not actor.strip():
            raise typer.BadParameter("--actor is a name, not empty")
        return actor.strip()
    try:
        return f"operator:{getpass.getuser()}"
    except (KeyError, OSError):
        return "operator"


def _settings(timeout: float, deadline: timedelta | None = None) -> DispatchSettings:
    """A one-off dispatcher's settings: attempts within ``timeout``, and a lease just long
    enough for one command's send and read-back (a killed run holds its command no longer)."""
    attempt = min(timeout, 5.0)
    return DispatchSettings(
        attempt_timeout=attempt,
        lease=2 * attempt + 2.0,
        deadline=deadline or DispatchSettings().deadline,
        retry_base=timedelta(seconds=1),
        retry_most=timedelta(seconds=30),
    )


def _worker() -> str:
    """A name of this run's own: two runs never pass each other's lease fences."""
    return f"cli-{os.getpid()}"


def _print(view: CommandView, as_json: bool, *, history: bool = True) -> None:
    if as_json:
        print_json(view.as_dict())
        return
    console.print(
        f"command {view.id}: {view.kind} {view.meter_id} (sequence {view.sequence}): "
        f"{view.state}" + (f" ({view.last_error})" if view.last_error else ""),
        markup=False,
        soft_wrap=True,
    )
    if history and view.transitions:
        table = Table("at", "from", "to", "by", "reason")
        for t in view.transitions:
            table.add_row(t.at.isoformat(timespec="seconds"), t.old, t.new, t.actor, t.reason)
        console.print(table)


async def _wait(dispatcher: Dispatcher, command_id: int, meter_id: str, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        await dispatcher.dispatch_once([meter_id])
        view = await get_command(dispatcher.db, command_id)
        if CommandState(view.state) in TERMINAL:
            return
        await asyncio.sleep(min(0.2, max(0.0, deadline - loop.time())))


def _supply(
    kind: Kind,
    meter_id: str,
    reason: str,
    wait: bool,
    timeout: float,
    deadline: str,
    actor: str | None,
    db: str | None,
    as_json: bool,
) -> None:
    who = _actor(actor)
    expiry = timedelta(seconds=parse_duration(deadline, "--deadline"))
    if expiry <= timedelta(0):
        raise typer.BadParameter("--deadline is a positive duration")

    async def run(database: Database) -> tuple[CommandView, bool]:
        links = EndpointLinks(LinkOptions(timeout=min(timeout, 5.0)))
        dispatcher = Dispatcher(
            database, links, SystemClock(), worker=_worker(), settings=_settings(timeout, expiry)
        )
        try:
            queued = await dispatcher.queue(meter_id, kind, reason, who)
            if wait:
                await _wait(dispatcher, queued.command_id, meter_id, timeout)
        finally:
            await links.close()
        return await get_command(database, queued.command_id), queued.created

    view, created = with_db(db, run)
    if not created and not as_json:
        console.print(f"a {kind} of {meter_id} is on its way already: command {view.id}")
    _print(view, as_json, history=wait)
    state = CommandState(view.state)
    if not wait:
        if not as_json and state in IN_FLIGHT:
            console.print("queued: `hes serve` sends it (or run this with --wait)")
        return
    if state is CommandState.VERIFIED:
        return
    if state in IN_FLIGHT:
        raise fail(
            f"command {view.id} is still {state} after {timeout:g} s; `hes serve` goes on with it",
            EXIT_STILL_IN_FLIGHT,
        )
    raise fail(f"command {view.id} {state}: {view.last_error or 'see hes commands show'}")


WaitOpt = Annotated[
    bool, typer.Option("--wait", help="Send it now and wait until verified or failed.")
]
TimeoutOpt = Annotated[
    float,
    typer.Option("--timeout", min=0.1, help="With --wait: seconds to wait at most."),
]
DeadlineOpt = Annotated[
    str, typer.Option("--deadline", help="Give the command up if unconfirmed after this (1h).")
]
ActorOpt = Annotated[
    str | None,
    typer.Option("--actor", help="Who asks, for the audit trail (default: operator:$USER)."),
]


def disconnect(
    meter_id: MeterArg,
    reason: ReasonOpt,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 30.0,
    deadline: DeadlineOpt = "1h",
    actor: ActorOpt = None,
    db: DbOption = None,
    as_json: JsonOpt = False,
) -> None:
    """Cut the meter's supply through the head-end (stored, audited, verified by read-back);
    a pending reconnect of the meter is superseded."""
    _supply(Kind.DISCONNECT, meter_id, reason, wait, timeout, deadline, actor, db, as_json)


def reconnect(
    meter_id: MeterArg,
    reason: ReasonOpt,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 30.0,
    deadline: DeadlineOpt = "1h",
    actor: ActorOpt = None,
    db: DbOption = None,
    as_json: JsonOpt = False,
) -> None:
    """Restore the meter's supply through the head-end: connected where its control mode
    allows, else ready for the customer's button; a pending disconnect is superseded."""
    _supply(Kind.RECONNECT, meter_id, reason, wait, timeout, deadline, actor, db, as_json)


_STATES = ", ".join(s.value for s in CommandState)


@commands_app.command("list")
@handle_errors
def commands_list(
    meter: Annotated[str | None, typer.Option("--meter", help="Only this meter's.")] = None,
    state: Annotated[
        list[str] | None, typer.Option("--state", help=f"Only these states ({_STATES}).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="The latest N.")] = 50,
    db: DbOption = None,
    as_json: JsonOpt = False,
) -> None:
    """The latest commands, newest first."""
    for value in state or []:
        if value not in {s.value for s in CommandState}:
            raise typer.BadParameter(f"--state is one of {_STATES}, got {value!r}")
    rows = with_db(
        db, lambda database: list_commands(database, meter_id=meter, states=state, limit=limit)
    )
    if as_json:
        print_json([view.as_dict() for view in rows])
        return
    table = Table("id", "meter", "kind", "seq", "state", "tries", "by", "reason", "updated")
    for view in rows:
        table.add_row(
            str(view.id),
            view.meter_id,
            view.kind,
            str(view.sequence),
            view.state,
            str(view.attempts),
            view.actor,
            view.reason,
            view.updated_at.isoformat(timespec="seconds"),
        )
    console.print(table)


IdArg = Annotated[int, typer.Argument(min=1, help="The command's id.", show_default=False)]


@commands_app.command("show")
@handle_errors
def commands_show(command_id: IdArg, db: DbOption = None, as_json: JsonOpt = False) -> None:
    """One command and every transition of its life."""
    _print(with_db(db, lambda database: get_command(database, command_id)), as_json)


@commands_app.command("cancel")
@handle_errors
def commands_cancel(
    command_id: IdArg,
    reason: ReasonOpt,
    actor: ActorOpt = None,
    db: DbOption = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel a command that has not been sent (queued, or waiting to retry)."""
    now = datetime.now(UTC)
    who = _actor(actor)
    view = with_db(
        db,
        lambda database: cancel_command(database, command_id, actor=who, reason=reason, now=now),
    )
    _print(view, as_json, history=False)


@commands_app.command("dispatch")
@handle_errors
def commands_dispatch(
    meter: Annotated[
        list[str] | None, typer.Option("--meter", help="Only these meters' commands.")
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds to keep at it at most.")
    ] = 30.0,
    db: DbOption = None,
    as_json: JsonOpt = False,
) -> None:
    """Send the commands that are due now and see each through (what `hes serve` does; no
    policy), until none is left in flight or the time-out. Exit 0 when every one ended
    verified, 1 when one failed or expired, 4 when one is still on its way."""
    meters = list(meter) if meter else None

    async def run(database: Database) -> list[CommandView]:
        links = EndpointLinks(LinkOptions(timeout=min(timeout, 5.0)))
        dispatcher = Dispatcher(
            database, links, SystemClock(), worker=_worker(), settings=_settings(timeout)
        )
        if meters is not None:
            for meter_id in meters:
                await list_commands(database, meter_id=meter_id, limit=1)  # known meters only
        seen: dict[int, CommandView] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        async def in_flight() -> list[CommandView]:
            views = await list_commands(
                database, states=[s.value for s in IN_FLIGHT], limit=100_000
            )
            return [v for v in views if meters is None or v.meter_id in meters]

        try:
            pending = await in_flight()
            while pending:
                seen.update((view.id, view) for view in pending)
                await dispatcher.dispatch_once(meters)
                pending = await in_flight()
                if not pending or loop.time() >= deadline:
                    break
                await asyncio.sleep(min(0.2, max(0.0, deadline - loop.time())))
        finally:
            await links.close()
        return [await get_command(database, command_id) for command_id in sorted(seen)]

    views = with_db(db, run)
    if as_json:
        print_json([view.as_dict() for view in views])
    elif not views:
        console.print("no command was due")
    else:
        for view in views:
            _print(view, False, history=False)
    states = {CommandState(view.state) for view in views}
    if states & IN_FLIGHT:
        raise fail(
            "a command is still on its way; `hes serve` goes on with it", EXIT_STILL_IN_FLIGHT
        )
    if states - {CommandState.VERIFIED}:
        raise fail("a command did not end verified: see `hes commands show ID`")


def register(app: typer.Typer) -> None:
    app.command("disconnect")(handle_errors(disconnect))
    app.command("reconnect")(handle_errors(reconnect))
