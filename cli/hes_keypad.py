"""`hes keypad rotate`: move a keypad (STS) meter to new key data with a key change token
pair, which the customer keys in before the next credit token."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

import typer

from cli.common import console, handle_errors, print_json
from cli.hes_db import DbOption, with_db
from cli.hes_registry import operator
from headend.storage import Database
from headend.storage.ledger import KeyChange, rotate_keypad
from protocols.errors import DecodeError, ValidationError
from protocols.sts import parse_vending_key


def _vending_key(text: str) -> bytes:
    try:
        return parse_vending_key(text)
    except (ValidationError, DecodeError) as exc:
        raise ValidationError(f"--vending-key: {exc}") from exc


def keypad_rotate(
    meter_id: Annotated[str, typer.Argument(help="A keypad meter (one with key data).")],
    vending_key: Annotated[
        str,
        typer.Option(
            "--vending-key",
            help="The new vending key in hex (16 or 40 digits).",
            show_default=False,
        ),
    ],
    sgc: Annotated[
        int | None, typer.Option("--sgc", min=0, max=999_999, help="New supply group code.")
    ] = None,
    ti: Annotated[int | None, typer.Option("--ti", min=0, max=99, help="New tariff index.")] = None,
    krn: Annotated[
        int | None, typer.Option("--krn", min=1, max=15, help="New key revision number.")
    ] = None,
    kt: Annotated[int | None, typer.Option("--kt", min=0, max=3, help="New key type.")] = None,
    base_date: Annotated[
        Literal[1993, 2014, 2035] | None,
        typer.Option("--base-date", help="New TID base date (the next one: a rollover)."),
    ] = None,
    ken: Annotated[
        int | None, typer.Option("--ken", min=0, max=255, help="New key expiry number.")
    ] = None,
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Move a keypad meter to a new vending key (and the key data given; the rest stays):
    prints the two key change tokens, to be keyed in in order before the next credit token,
    which is vended under the new key."""
    key = _vending_key(vending_key)
    now = datetime.now(UTC)
    changes = {"sgc": sgc, "ti": ti, "krn": krn, "kt": kt, "base_date": base_date, "ken": ken}

    async def run(database: Database) -> KeyChange:
        return await rotate_keypad(database, meter_id, key, now, actor=operator(), **changes)

    change = with_db(db, run)
    new = change.key
    if as_json:
        print_json(
            {
                "meter_id": change.meter_id,
                "tokens": [change.first.digits, change.second.digits],
                "sgc": new.sgc,
                "krn": new.krn,
                "ti": new.ti,
                "kt": new.kt,
                "base_date": new.base_date,
                "ken": new.ken,
                "rollover": change.rollover,
            }
        )
        return
    console.print(f"{change.meter_id}: key change tokens (key them in in this order):")
    console.print(f"  1  {change.first.formatted}", markup=False, highlight=False)
    console.print(f"  2  {change.second.formatted}", markup=False, highlight=False)
    rollover = " (rollover: TIDs start again)" if change.rollover else ""
    console.print(
        f"new key data: SGC {new.sgc}, KRN {new.krn}, TI {new.ti}, KT {new.kt}, base date "
        f"{new.base_date}, KEN {new.ken}{rollover}",
        markup=False,
    )


def register(keypad_app: typer.Typer) -> None:
    keypad_app.command("rotate")(handle_errors(keypad_rotate))
