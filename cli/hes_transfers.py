"""`hes transfers list|show|deliver`: the credit owed to meters (remote transfers and STS
tokens), and one delivery pass now (what `hes serve` does all along)."""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta
from typing import Annotated, Final

import typer
from rich.table import Table

from cli.common import console, fail, handle_errors, print_json
from cli.hes_db import DbOption, with_db
from headend.domain.delivery import WORKABLE, TransferState
from headend.links.endpoint import LinkOptions
from headend.services.delivery import Deliverer, DeliverySettings
from headend.services.links import EndpointLinks
from headend.storage import Database
from headend.storage.delivery import TransferView, get_transfer, list_transfers
from protocols.clock import SystemClock

#: the exit status of `deliver` when a transfer is still on its way at the time-out
EXIT_STILL_IN_FLIGHT: Final = 4

transfers_app = typer.Typer(
    help="Credit owed to meters: remote transfers (delivered by `hes serve`) and STS tokens.",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
_STATES = ", ".join(s.value for s in TransferState)


def _print(view: TransferView) -> None:
    what = f"token (TID {view.number})" if view.kind == "token" else f"transfer {view.number}"
    amount = f"{view.amount} {'Wh' if view.unit == 'energy' else 'minor units'}"
    line = f"{view.id}: {what} to {view.meter_id}, {amount}, payment {view.payment_id}: "
    line += view.state
    if view.state == TransferState.DELIVERED.value and view.delivered_at is not None:
        line += f" at {view.delivered_at.isoformat(timespec='seconds')}"
    if view.last_error and view.state != TransferState.DELIVERED.value:
        line += f" ({view.last_error})"
    console.print(line, markup=False, soft_wrap=True)


@transfers_app.command("list")
@handle_errors
def transfers_list(
    meter: Annotated[str | None, typer.Option("--meter", help="Only this meter's.")] = None,
    state: Annotated[
        list[str] | None, typer.Option("--state", help=f"Only these states ({_STATES}).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="The latest N.")] = 50,
    db: DbOption = None,
    as_json: JsonOpt = False,
) -> None:
    """The latest transfers and tokens, newest first."""
    for value in state or []:
        if value not in {s.value for s in TransferState}:
            raise typer.BadParameter(f"--state is one of {_STATES}, got {value!r}")
    rows = with_db(
        db, lambda database: list_transfers(database, meter_id=meter, states=state, limit=limit)
    )
    if as_json:
        print_json([view.as_dict() for view in rows])
        return
    table = Table("id", "meter", "kind", "number", "amount", "unit", "state", "tries", "updated")
    for view in rows:
        table.add_row(
            str(view.id),
            view.meter_id,
            view.kind,
            str(view.number),
            str(view.amount),
            view.unit,
            view.state,
            str(view.attempts),
            view.updated_at.isoformat(timespec="seconds"),
        )
    console.print(table)


@transfers_app.command("show")
@handle_errors
def transfers_show(
    transfer_id: Annotated[
        int, typer.Argument(min=1, help="The transfer's id.", show_default=False)
    ],
    db: DbOption = None,
    as_json: JsonOpt = False,
) -> None:
    """One transfer or token: its state, attempts, envelope sequence and last error."""
    view = with_db(db, lambda database: get_transfer(database, transfer_id))
    if as_json:
        print_json(view.as_dict())
        return
    _print(view)
    if view.sequence is not None:
        console.print(f"envelope sequence {view.sequence}, attempts {view.attempts}")
    if view.token is not None:
        console.print(f"token {view.token}")


def _settings(timeout: float) -> DeliverySettings:
    """A one-off deliverer's settings: attempts within ``timeout``, a lease just long enough
    for one transfer's send and read-back (a killed run holds its transfer no longer)."""
    attempt = min(timeout, 5.0)
    return DeliverySettings(
        attempt_timeout=attempt,
        lease=2 * attempt + 2.0,
        retry_base=timedelta(seconds=1),
        retry_most=timedelta(seconds=30),
        busy_wait=timedelta(seconds=1),
    )


@transfers_app.command("deliver")
@handle_errors
def transfers_deliver(
    meter: Annotated[
        list[str] | None, typer.Option("--meter", help="Only these meters' transfers.")
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds to keep at it at most.")
    ] = 30.0,
    db: DbOption = None,
    as_json: JsonOpt = False,
) -> None:
    """Deliver the transfers that are due now (what `hes serve` does), until none is left
    or the time-out. Exit 0 when every one was delivered, 1 when one failed, 4 when one is
    still on its way."""
    meters = list(meter) if meter else None
    workable = [s.value for s in WORKABLE]

    async def run(database: Database) -> list[TransferView]:
        if meters is not None:
            for meter_id in meters:
                await list_transfers(database, meter_id=meter_id, limit=1)  # known meters only
        links = EndpointLinks(LinkOptions(timeout=min(timeout, 5.0)))
        deliverer = Deliverer(
            database, links, SystemClock(), worker=f"cli-{os.getpid()}", settings=_settings(timeout)
        )

        async def pending() -> list[TransferView]:
            views = await list_transfers(database, states=workable, limit=100_000)
            return [v for v in views if meters is None or v.meter_id in meters]

        seen: set[int] = set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            left = await pending()
            while left:
                seen.update(view.id for view in left)
                await deliverer.deliver_once(meters)
                left = await pending()
                if not left or loop.time() >= deadline:
                    break
                await asyncio.sleep(min(0.2, max(0.0, deadline - loop.time())))
        finally:
            await links.close()
        return [await get_transfer(database, transfer_id) for transfer_id in sorted(seen)]

    views = with_db(db, run)
    if as_json:
        print_json([view.as_dict() for view in views])
    elif not views:
        console.print("no transfer was due")
    else:
        for view in views:
            _print(view)
    states = {view.state for view in views}
    if states & set(workable):
        raise fail(
            "a transfer is still on its way; `hes serve` goes on with it", EXIT_STILL_IN_FLIGHT
        )
    if states - {TransferState.DELIVERED.value}:
        raise fail("a transfer did not end delivered: see `hes transfers show ID`")
