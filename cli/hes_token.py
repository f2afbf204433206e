"""`hes token …`: issue and decode STS tokens for keypad meters.

Every input can be given, so a token is reproducible: the meter's key data (``--vending-key``,
``--sgc``, ``--ti``, ``--krn``, ``--kt``, ``--base-date``, ``--pan``), the issue time
(``--issued-at``) and the random nibble (``--random``). The token goes to stdout on one line;
``--json`` prints every field instead.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Literal, TypeVar

import typer
from rich.table import Table

from cli.common import console, err_console, handle_errors, print_json
from headend.vending import (
    VendedToken,
    VendingKeyData,
    read_token,
    vend_clear_credit,
    vend_clear_tamper,
    vend_credit,
    vend_key_change,
    vend_meter_test,
    vend_phase_unbalance_limit,
    vend_power_limit,
)
from protocols.errors import DecodeError, ValidationError
from protocols.sts import CLEAR_ALL_REGISTERS, KeyData, Pan, parse_vending_key
from protocols.sts.amount import AMOUNT_MAX
from protocols.units import Energy, decimal_text

T = TypeVar("T")
TID_MAX = (1 << 24) - 1  # a TID is 24 bits of minutes since the base date

token_app = typer.Typer(
    help="Issue and decode STS (IEC 62055-41) tokens for keypad meters.",
    no_args_is_help=True,
    add_completion=False,
)

VendingKeyOpt = Annotated[
    str,
    typer.Option(
        "--vending-key",
        help="Vending key in hex: 16 digits (DKGA02) or 40 digits (DKGA04).",
        show_default=False,
    ),
]
PanOpt = Annotated[
    str,
    typer.Option(
        "--pan",
        help="The meter's 18-digit PAN, or its 11/13-digit meter number (DRN).",
        show_default=False,
    ),
]
BaseDate = Literal[1993, 2014, 2035]
SgcOpt = Annotated[
    int, typer.Option("--sgc", min=0, max=999_999, help="Supply group code (6 digits).")
]
TiOpt = Annotated[int, typer.Option("--ti", min=0, max=99, help="Tariff index (0..99).")]
KrnOpt = Annotated[int, typer.Option("--krn", min=1, max=15, help="Key revision number (1..15).")]
KtOpt = Annotated[int, typer.Option("--kt", min=0, max=3, help="Key type (0..3; 2 = unique).")]
BaseDateOpt = Annotated[
    BaseDate, typer.Option("--base-date", help="TID base date: 1993, 2014 or 2035.")
]
IssuedAtOpt = Annotated[
    str | None,
    typer.Option(
        "--issued-at",
        help="Issue time, ISO-8601 (a time without a zone is UTC). Default: now.",
        show_default=False,
    ),
]
RandomOpt = Annotated[
    int | None,
    typer.Option(
        "--random",
        help="The token's random nibble, 0..15. Default: drawn at random.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print every field as JSON.")]
LastTidOpt = Annotated[
    int | None,
    typer.Option(
        "--last-tid",
        min=0,
        max=TID_MAX,
        help=(
            "The TID of the last token issued to this meter (printed on stderr with every "
            "token): this token gets a later one, the next minute if need be, so the meter "
            "never refuses it as used."
        ),
    ),
]


def _option(name: str, parse: Callable[[], T]) -> T:
    """``parse()``, its refusal named by the option it came from."""
    try:
        return parse()
    except (ValidationError, DecodeError) as exc:
        raise ValidationError(f"{name}: {exc}") from exc


def _key(
    vending_key: str, pan: str, sgc: int, ti: int, krn: int, kt: int, base_date: int
) -> KeyData:
    return KeyData(
        _option("--vending-key", lambda: parse_vending_key(vending_key)),
        _option("--pan", lambda: Pan.parse(pan)),
        sgc=sgc,
        ti=ti,
        krn=krn,
        kt=kt,
        base_date=base_date,
    )


def _issued_at(text: str | None) -> datetime:
    if text is None:
        return datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValidationError(f"--issued-at is not an ISO-8601 time: {text!r}") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _print(vended: VendedToken, as_json: bool, extra: dict[str, object] | None = None) -> None:
    if as_json:
        print_json({**vended.fields(), **(extra or {})})
    else:
        console.print(vended.digits, markup=False, highlight=False)
        if vended.tid is not None:
            err_console.print(f"TID {vended.tid}", markup=False, highlight=False)


@token_app.command("credit")
@handle_errors
def credit(
    amount: Annotated[
        str,
        typer.Option(
            "--amount",
            help=(
                "Electricity in kWh, a decimal such as 12.5 (up to 3 decimals). A token carries "
                "0.1 kWh steps up to 1638.3 kWh and 1, 10, 100 kWh steps above: the amount is "
                "rounded UP to the next step, as STS vending does, and the amount encoded is "
                "reported (on stderr, or in --json as kwh and wh)."
            ),
            show_default=False,
        ),
    ],
    vending_key: VendingKeyOpt,
    pan: PanOpt,
    sgc: SgcOpt = 123456,
    ti: TiOpt = 1,
    krn: KrnOpt = 1,
    kt: KtOpt = 2,
    base_date: BaseDateOpt = 2014,
    issued_at: IssuedAtOpt = None,
    random: RandomOpt = None,
    last_tid: LastTidOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Issue an electricity credit token (class 0)."""
    key = _key(vending_key, pan, sgc, ti, krn, kt, base_date)
    requested = _option("--amount", lambda: Energy.parse_kwh(amount).wh)
    vended = vend_credit(key, requested, _issued_at(issued_at), rnd=random, last_tid=last_tid)
    if as_json:
        _print(vended, True, {"requested_wh": requested})
        return
    _print(vended, False)
    if vended.wh != requested:
        err_console.print(
            f"note: {decimal_text(requested, -3)} kWh is not a token step; "
            f"the token carries {decimal_text(vended.wh or 0, -3)} kWh",
            markup=False,
            highlight=False,
        )


def _limit_command(vend: Callable[..., VendedToken], doc: str) -> Callable[..., None]:
    """A command that issues a limit token (power limit, phase unbalance limit) with ``vend``."""

    @handle_errors
    def command(
        value: Annotated[
            int,
            typer.Option(
                "--value",
                min=0,
                max=AMOUNT_MAX,
                help="The limit in W (rounded up to a step the token carries, like amounts).",
                show_default=False,
            ),
        ],
        vending_key: VendingKeyOpt,
        pan: PanOpt,
        sgc: SgcOpt = 123456,
        ti: TiOpt = 1,
        krn: KrnOpt = 1,
        kt: KtOpt = 2,
        base_date: BaseDateOpt = 2014,
        issued_at: IssuedAtOpt = None,
        random: RandomOpt = None,
        last_tid: LastTidOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        key = _key(vending_key, pan, sgc, ti, krn, kt, base_date)
        _print(vend(key, value, _issued_at(issued_at), rnd=random, last_tid=last_tid), as_json)

    command.__doc__ = doc
    return command


token_app.command("power-limit")(
    _limit_command(vend_power_limit, "Issue a set-maximum-power-limit token (class 2, subclass 0).")
)
token_app.command("phase-unbalance-limit")(
    _limit_command(
        vend_phase_unbalance_limit,
        "Issue a set-maximum-phase-power-unbalance-limit token (class 2, subclass 6).",
    )
)


@token_app.command("clear-credit")
@handle_errors
def clear_credit(
    vending_key: VendingKeyOpt,
    pan: PanOpt,
    value: Annotated[
        str,
        typer.Option("--value", help="Register mask, decimal or 0x hex (0xFFFF: all registers)."),
    ] = f"{CLEAR_ALL_REGISTERS:#06x}",
    sgc: SgcOpt = 123456,
    ti: TiOpt = 1,
    krn: KrnOpt = 1,
    kt: KtOpt = 2,
    base_date: BaseDateOpt = 2014,
    issued_at: IssuedAtOpt = None,
    random: RandomOpt = None,
    last_tid: LastTidOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Issue a clear-credit token (class 2, subclass 1)."""
    try:
        mask = int(value, 0)
    except ValueError as exc:
        raise ValidationError(f"--value is a register mask, got {value!r}") from exc
    if not 0 <= mask <= 0xFFFF:
        raise ValidationError(f"--value is a 16-bit register mask, got {value!r}")
    key = _key(vending_key, pan, sgc, ti, krn, kt, base_date)
    _print(
        vend_clear_credit(key, _issued_at(issued_at), register=mask, rnd=random, last_tid=last_tid),
        as_json,
    )


@token_app.command("clear-tamper")
@handle_errors
def clear_tamper(
    vending_key: VendingKeyOpt,
    pan: PanOpt,
    sgc: SgcOpt = 123456,
    ti: TiOpt = 1,
    krn: KrnOpt = 1,
    kt: KtOpt = 2,
    base_date: BaseDateOpt = 2014,
    issued_at: IssuedAtOpt = None,
    random: RandomOpt = None,
    last_tid: LastTidOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Issue a clear-tamper token (class 2, subclass 5)."""
    key = _key(vending_key, pan, sgc, ti, krn, kt, base_date)
    _print(vend_clear_tamper(key, _issued_at(issued_at), rnd=random, last_tid=last_tid), as_json)


@token_app.command("test")
@handle_errors
def meter_test(
    control: Annotated[
        str,
        typer.Option(
            "--control",
            help="The tests or displays asked for, a bit field, decimal or 0x hex "
            "(36 bits; 28 with --four-digit-manufacturer).",
            show_default=False,
        ),
    ],
    manufacturer: Annotated[
        int,
        typer.Option(
            "--manufacturer",
            min=0,
            max=9999,
            help="Manufacturer code the token is for (2 digits; 4 with --four-digit-manufacturer).",
        ),
    ] = 0,
    four_digit_manufacturer: Annotated[
        bool,
        typer.Option(
            "--four-digit-manufacturer",
            help="A 4-digit manufacturer code (subclass 1) instead of a 2-digit one (subclass 0).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Issue a test/display token (class 1). It is not encrypted and fits every meter of the
    manufacturer, so it needs no key data."""
    try:
        bits = int(control, 0)
    except ValueError as exc:
        raise ValidationError(f"--control is a bit field, got {control!r}") from exc
    vended = vend_meter_test(bits, manufacturer, four_digit_manufacturer=four_digit_manufacturer)
    _print(vended, as_json)


@token_app.command("key-change")
@handle_errors
def key_change(
    vending_key: VendingKeyOpt,
    pan: PanOpt,
    sgc: SgcOpt = 123456,
    ti: TiOpt = 1,
    krn: KrnOpt = 1,
    kt: KtOpt = 2,
    base_date: BaseDateOpt = 2014,
    new_vending_key: Annotated[
        str | None,
        typer.Option("--new-vending-key", help="Default: the current vending key."),
    ] = None,
    new_sgc: Annotated[
        int | None, typer.Option("--new-sgc", min=0, max=999_999, help="Default: the current SGC.")
    ] = None,
    new_ti: Annotated[
        int | None, typer.Option("--new-ti", min=0, max=99, help="Default: the current TI.")
    ] = None,
    new_krn: Annotated[
        int | None, typer.Option("--new-krn", min=1, max=15, help="Default: the current KRN.")
    ] = None,
    new_kt: Annotated[
        int | None, typer.Option("--new-kt", min=0, max=3, help="Default: the current KT.")
    ] = None,
    new_base_date: Annotated[
        BaseDate | None,
        typer.Option(
            "--new-base-date",
            help="The next base date sets the rollover bit (the meter clears its TID memory).",
        ),
    ] = None,
    new_ken: Annotated[
        int,
        typer.Option(
            "--new-ken", min=0, max=255, help="Key expiry number of the new key (255: never)."
        ),
    ] = 255,
    as_json: JsonOpt = False,
) -> None:
    """Issue the two key change tokens (class 2, subclasses 3 and 4), under the current key.

    The current key data are the usual options; --new-* give the new key data (each defaults to
    the current value). Enter the first token, then the second.
    """
    old = _key(vending_key, pan, sgc, ti, krn, kt, base_date)
    new = VendingKeyData(
        _option("--new-vending-key", lambda: parse_vending_key(new_vending_key))
        if new_vending_key
        else old.vending_key,
        old.pan,
        sgc=old.sgc if new_sgc is None else new_sgc,
        ti=old.ti if new_ti is None else new_ti,
        krn=old.krn if new_krn is None else new_krn,
        kt=old.kt if new_kt is None else new_kt,
        base_date=old.base_date if new_base_date is None else new_base_date,
        ken=new_ken,
    )
    first, second = vend_key_change(old, new)
    if as_json:
        print_json({"tokens": [first.fields(), second.fields()]})
        return
    _print(first, False)
    _print(second, False)


@token_app.command("decode")
@handle_errors
def decode(
    token: Annotated[str, typer.Argument(help="The 20-digit token (spaces and dashes allowed).")],
    vending_key: VendingKeyOpt,
    pan: PanOpt,
    sgc: SgcOpt = 123456,
    ti: TiOpt = 1,
    krn: KrnOpt = 1,
    kt: KtOpt = 2,
    base_date: BaseDateOpt = 2014,
    as_json: JsonOpt = False,
) -> None:
    """Decode a token with a meter's key data and show every field."""
    key = _key(vending_key, pan, sgc, ti, krn, kt, base_date)
    fields = read_token(key, token).fields()
    if as_json:
        print_json(fields)
        return
    table = Table("field", "value", title="STS token")
    for name, item in fields.items():
        table.add_row(name, str(item))
    console.print(table)
