"""`hes read` and `hes direct disconnect|reconnect|credit`: one meter, given an endpoint.

The `direct` commands go straight to the meter and bypass the head-end: nothing is stored, no
policy is asked and no audit entry is written (lab and commissioning use). In operation,
`hes disconnect METER` and `hes reconnect METER` go through the command store and dispatcher.

An endpoint is ``tcp://host:port/unit``, ``rtu:///dev/ttyUSB0?baud=9600&unit=3`` or
``mqtt://host:1883/MTR-0001`` (see :mod:`headend.links.endpoint`). A command is sent with the
sequence number after the meter's last one and the confirmed result is printed; a refused
command exits with status 1, a credit transfer the meter had applied before with status 3
(:data:`EXIT_NOTHING_APPLIED`). ``--timeout`` bounds the whole command, retries included.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Final, TypeVar

import typer
from rich.table import Table

from cli.common import console, fail, handle_errors, jsonable, print_json
from headend.links.base import MeterLink, send_command
from headend.links.endpoint import LinkOptions, masked_endpoint, open_link
from headend.links.pool import LinkPool
from meter_sim.describe import snapshot_rows
from protocols.commands import Command, CommandCode, CommandResult, ResultCode
from protocols.errors import ConfigError, LinkTimeout
from protocols.readings import MeterSnapshot

T = TypeVar("T")

#: the exit status of `hes direct credit` when the meter had applied this transfer before
EXIT_NOTHING_APPLIED: Final = 3

EndpointArg = Annotated[
    str,
    typer.Argument(
        help=(
            "tcp://host:port/unit, rtu:///dev/ttyUSB0?baud=9600&unit=3, "
            "mqtt://user:password@host:1883/METER-ID or "
            "mqtts://user:password@host:8883/METER-ID?ca=/path/ca.pem"
        ),
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
TimeoutOpt = Annotated[
    float,
    typer.Option(
        "--timeout", min=0.01, help="Seconds the whole command may take, retries included."
    ),
]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--key",
        help="The meter's command key in hex (omit for a meter configured without one).",
        show_default=False,
    ),
]


async def _with_link(endpoint: str, timeout: float, work: Callable[[MeterLink], Awaitable[T]]) -> T:
    """Open a link in a pool of this command's own and run ``work`` on it, both within
    ``timeout`` seconds (LinkTimeout after); the pool closes its connections afterwards."""
    async with LinkPool() as pool:  # closed outside the deadline: closing is not cut short
        try:
            async with asyncio.timeout(timeout):
                options = LinkOptions(timeout=timeout, deadline=timeout)
                link = await open_link(endpoint, options, pool=pool)
                return await work(link)
        except TimeoutError as exc:
            raise LinkTimeout(
                f"{masked_endpoint(endpoint)}: no answer within {timeout:g} s"
            ) from exc


def _key_bytes(key: str | None) -> bytes | None:
    if key is None:
        return None
    try:
        return bytes.fromhex(key)
    except ValueError as exc:
        raise ConfigError(f"--key is hex, got {key!r}") from exc


def read(endpoint: EndpointArg, as_json: JsonOpt = False, timeout: TimeoutOpt = 2.0) -> None:
    """Read one meter's standard registers."""

    async def work(link: MeterLink) -> MeterSnapshot:
        return await link.read_snapshot()

    snapshot = asyncio.run(_with_link(endpoint, timeout, work))
    if as_json:
        print_json({**jsonable(snapshot), "output_state": snapshot.relay_closed})
        return
    table = Table(title=f"{snapshot.meter_id} at {masked_endpoint(endpoint)}", show_header=False)
    table.add_column("reading")
    table.add_column("value", justify="right")
    for label, value in snapshot_rows(snapshot):
        table.add_row(label, value)
    console.print(table)


def _relay(snapshot: MeterSnapshot) -> str:
    output = "closed (supply on)" if snapshot.relay_closed else "open (supply off)"
    return f"{output}, {snapshot.control_state.name.lower()}"


def _command(
    endpoint: str, command: Command, key: str | None, as_json: bool, timeout: float
) -> None:
    secret = _key_bytes(key)

    async def work(link: MeterLink) -> tuple[str, CommandResult, MeterSnapshot]:
        result = await send_command(link, command, secret, timeout=timeout)
        return link.meter_id, result, await link.read_snapshot()

    meter_id, result, after = asyncio.run(_with_link(endpoint, timeout, work))
    name = command.code.name.lower()
    if as_json:
        print_json(
            {
                "meter_id": meter_id,
                "command": name,
                "result": result,
                "output_state": after.relay_closed,
                "control_state": int(after.control_state),
            }
        )
    else:
        table = Table(title=f"{name} on {meter_id}", show_header=False)
        table.add_column("field")
        table.add_column("value")
        table.add_row("sequence", str(result.sequence))
        table.add_row("result", f"{result.code.name.lower()} ({int(result.code)})")
        table.add_row("last transfer", str(result.last_transfer))
        table.add_row("relay", _relay(after))
        console.print(table)
    if not result.accepted:
        raise fail(f"meter {meter_id} refused {name}: {result.code.name.lower()}")
    if command.code is CommandCode.CREDIT_TRANSFER and result.code is ResultCode.DUPLICATE:
        raise fail(
            f"nothing applied: meter {meter_id} had applied transfer {command.args[0]} "
            "before; it acknowledged it again and added no credit",
            EXIT_NOTHING_APPLIED,
        )


def disconnect(
    endpoint: EndpointArg,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
    timeout: TimeoutOpt = 5.0,
) -> None:
    """Open the meter's relay (remote disconnect) and print the confirmed result."""
    _command(endpoint, Command.remote_disconnect(), key, as_json, timeout)


def reconnect(
    endpoint: EndpointArg,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
    timeout: TimeoutOpt = 5.0,
) -> None:
    """Reconnect the meter's relay remotely (or make it ready for the customer's button, as the
    control mode says) and print the confirmed result."""
    _command(endpoint, Command.remote_reconnect(), key, as_json, timeout)


def credit(
    endpoint: EndpointArg,
    transfer: Annotated[
        int,
        typer.Option(
            "--transfer", min=1, help="Transfer number, greater than the last transfer applied."
        ),
    ],
    amount: Annotated[
        int,
        typer.Option("--amount", min=1, help="Credit in the account's unit (minor units or Wh)."),
    ],
    key: KeyOpt = None,
    as_json: JsonOpt = False,
    timeout: TimeoutOpt = 5.0,
) -> None:
    """Transfer credit to the meter (applied once per transfer number) and print the result.

    Exits 0 when the credit was applied, 3 when the meter had applied this transfer number
    before (acknowledged again, nothing added: a repeat is not a second payment), 1 when the
    meter refused it or could not be reached."""
    _command(endpoint, Command.credit_transfer(transfer, amount), key, as_json, timeout)


direct_app = typer.Typer(
    help=(
        "Commands straight to a meter by endpoint, bypassing the head-end: nothing stored, no "
        "policy, no audit (lab use). In operation use `hes disconnect|reconnect METER`."
    ),
    no_args_is_help=True,
)
for _func in (disconnect, reconnect, credit):
    direct_app.command(_func.__name__)(handle_errors(_func))


def register_link_commands(app: typer.Typer) -> None:
    """Add `read` and the `direct` group to the `hes` app."""
    app.command("read")(handle_errors(read))
    app.add_typer(direct_app, name="direct")
