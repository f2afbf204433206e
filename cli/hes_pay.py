"""`hes channels`, `hes keypad`, `hes quote`, `hes pay`, `hes payments`: payments at the counter.

A refused payment, quote or reversal prints ``error: CODE: detail`` (the same codes a payment
channel is answered with) and exits 1; nothing is stored.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import typer
from rich.table import Table

from cli.common import console, err_console, fail, handle_errors, print_json
from cli.hes_db import DbOption, with_db
from cli.hes_registry import operator
from headend.domain.ledger import CHANNEL_KINDS, channel_kind, channel_name
from headend.domain.pricing import Code, PaymentRefused, receipt_text
from headend.storage.ledger import (
    ChannelView,
    PaymentRequest,
    PaymentView,
    add_channel,
    get_payment,
    list_attempts,
    list_channels,
    list_payments,
    pay,
    quote,
    reprint,
    reverse_payment,
    set_keypad,
)
from headend.vending import VendingKeyData
from protocols.errors import DecodeError, ValidationError
from protocols.sts import Pan, parse_vending_key
from protocols.units import Money, decimal_text

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
MeterOption = Annotated[str, typer.Option("--meter", help="The meter's id.", show_default=False)]
AmountOption = Annotated[
    str,
    typer.Option(
        "--amount",
        help="A decimal amount in the account's currency, e.g. 100.00 (no more decimals than "
        "the currency has).",
        show_default=False,
    ),
]
_AMOUNT = re.compile(r"\d{1,15}(?:\.\d{1,4})?")

channels_app = typer.Typer(help="Payment channels and their API keys.", no_args_is_help=True)
keypad_app = typer.Typer(help="Keypad (STS) meters' key data.", no_args_is_help=True)
payments_app = typer.Typer(
    help="Payments taken: list, show, reverse, reprint; refused attempts.", no_args_is_help=True
)


def _now() -> datetime:
    return datetime.now(UTC)


def _amount(text: str) -> str:
    if not _AMOUNT.fullmatch(text.strip()):
        raise PaymentRefused(
            Code.MALFORMED_FIELD, f"--amount is a positive decimal such as 100.00, got {text!r}"
        )
    return text.strip()


def _money(minor: int, scale: int, currency: str) -> str:
    return f"{decimal_text(minor, scale)} {currency}"


# -- channels -------------------------------------------------------------------------------------


def _channel_dict(view: ChannelView) -> dict[str, Any]:
    return {
        "name": view.name,
        "kind": view.kind,
        "key_prefix": view.key_prefix,
        "status": view.status,
        "created_at": view.created_at.isoformat(),
        "require_signature": view.require_signature,
    }


@channels_app.command("add")
@handle_errors
def channels_add(
    name: Annotated[str, typer.Argument(help="The channel's name: letters, digits, _ . -.")],
    kind: Annotated[
        str, typer.Option("--kind", help=f"One of {', '.join(CHANNEL_KINDS)}.", show_default=False)
    ],
    require_signature: Annotated[
        bool,
        typer.Option(
            "--require-signature",
            help="Every HTTP request of the channel is signed (HMAC-SHA256 with a signing "
            "secret printed once, after the key).",
        ),
    ] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Register a payment channel and print its API key (and with --require-signature its
    signing secret on the next line): shown this once."""
    channel_name(name)
    channel_kind(kind)
    view, key = with_db(
        db,
        lambda database: add_channel(
            database, name, kind, _now(), actor=operator(), require_signature=require_signature
        ),
    )
    if as_json:
        secret = {"signing_secret": view.signing_secret} if view.signing_secret else {}
        print_json(_channel_dict(view) | {"api_key": key} | secret)
        return
    console.print(key, markup=False, highlight=False)
    shown = "API key is"
    if view.signing_secret:
        console.print(view.signing_secret, markup=False, highlight=False)
        shown = "API key and (below it) its signing secret are"
    err_console.print(
        f"channel {name} ({kind}) registered; its {shown} above and not shown again",
        markup=False,
        highlight=False,
    )


@channels_app.command("list")
@handle_errors
def channels_list(db: DbOption = None, as_json: JsonOption = False) -> None:
    """The registered payment channels (never their keys)."""
    views = with_db(db, list_channels)
    if as_json:
        print_json([_channel_dict(view) for view in views])
        return
    table = Table("channel", "kind", "key", "signed", "status", "since")
    for view in views:
        table.add_row(
            view.name,
            view.kind,
            f"{view.key_prefix}…",
            "yes" if view.require_signature else "no",
            view.status,
            view.created_at.isoformat(timespec="seconds"),
        )
    console.print(table)


# -- keypad meters --------------------------------------------------------------------------------


def _option(name: str, parse: Any) -> Any:
    try:
        return parse()
    except (ValidationError, DecodeError) as exc:
        raise ValidationError(f"{name}: {exc}") from exc


@keypad_app.command("add")
@handle_errors
def keypad_add(
    meter_id: Annotated[str, typer.Argument(help="A registered meter whose credit is energy.")],
    vending_key: Annotated[
        str,
        typer.Option(
            "--vending-key", help="Vending key in hex (16 or 40 digits).", show_default=False
        ),
    ],
    pan: Annotated[str, typer.Option("--pan", help="The meter's PAN or DRN.", show_default=False)],
    sgc: Annotated[
        int, typer.Option("--sgc", min=0, max=999_999, help="Supply group code.")
    ] = 123456,
    ti: Annotated[int, typer.Option("--ti", min=0, max=99, help="Tariff index.")] = 1,
    krn: Annotated[int, typer.Option("--krn", min=1, max=15, help="Key revision number.")] = 1,
    kt: Annotated[int, typer.Option("--kt", min=0, max=3, help="Key type (2 = unique).")] = 2,
    base_date: Annotated[
        Literal[1993, 2014, 2035], typer.Option("--base-date", help="TID base date.")
    ] = 2014,
    ken: Annotated[int, typer.Option("--ken", min=0, max=255, help="Key expiry number.")] = 255,
    last_tid: Annotated[
        int | None,
        typer.Option(
            "--last-tid",
            min=0,
            max=(1 << 24) - 1,
            help="The TID of the last token the meter accepted before (tokens go on from it).",
        ),
    ] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Keep a keypad meter's STS key data: its payments then vend 20-digit tokens."""
    key = VendingKeyData(
        _option("--vending-key", lambda: parse_vending_key(vending_key)),
        _option("--pan", lambda: Pan.parse(pan)),
        sgc=sgc,
        ti=ti,
        krn=krn,
        kt=kt,
        base_date=base_date,
        ken=ken,
    )
    changed = with_db(
        db,
        lambda database: set_keypad(
            database, meter_id, key, _now(), actor=operator(), last_tid=last_tid
        ),
    )
    if as_json:
        print_json({"meter_id": meter_id, "pan": key.pan.digits, "changed": changed})
        return
    console.print(f"{meter_id}: {'key data kept' if changed else 'unchanged'}")


# -- quote and pay --------------------------------------------------------------------------------


def _print_split(document: dict[str, Any]) -> None:
    parts = document["split"]
    scale, currency = int(document["currency_scale"]), str(document["currency"])
    table = Table(show_header=False, title_justify="left")
    for label, key in (
        ("amount", "amount"),
        ("debt recovered", "debt_recovered"),
        ("fee", "fee"),
        ("service charge", "service_charge"),
        ("VAT included", "tax"),
        ("energy, net of VAT", "energy_net"),
        ("change used", "change_in"),
        ("change held", "change_out"),
    ):
        table.add_row(label, _money(int(parts[key]), scale, currency))
    if parts["credit_unit"] == "energy":
        credit = f"{decimal_text(int(parts['credit_amount']), -3)} kWh"
    else:
        credit = _money(int(parts["credit_amount"]), scale, currency)
        credit += f" (buys {decimal_text(int(parts['wh']), -3)} kWh)"
    table.add_row("credit", credit)
    console.print(table)


def register(app: typer.Typer) -> None:
    @app.command("quote")
    @handle_errors
    def quote_command(
        meter: MeterOption,
        amount: AmountOption,
        db: DbOption = None,
        as_json: JsonOption = False,
    ) -> None:
        """What an amount buys a meter now, after debt, fee, service charge and VAT
        (changes nothing)."""
        text = _amount(amount)
        result = with_db(db, lambda database: quote(database, meter, text, _now()))
        document = result.document()
        if as_json:
            print_json(document)
            return
        console.print(
            f"quote for {meter} (account {result.account}, tariff {result.tariff.tariff_id}, "
            f"{result.tariff.kind}; {document['delivery']})"
        )
        _print_split(document)

    @app.command("pay")
    @handle_errors
    def pay_command(
        channel: Annotated[
            str, typer.Option("--channel", help="The channel taking it.", show_default=False)
        ],
        ref: Annotated[
            str,
            typer.Option(
                "--ref",
                help="The channel's own reference: the same again gives the first answer.",
                show_default=False,
            ),
        ],
        meter: MeterOption,
        amount: AmountOption,
        currency: Annotated[
            str | None,
            typer.Option("--currency", help="ISO 4217 code; refused if not the account's."),
        ] = None,
        payer: Annotated[str | None, typer.Option("--payer", help="Who paid.")] = None,
        db: DbOption = None,
        as_json: JsonOption = False,
    ) -> None:
        """Take a payment for a meter: split it, post it to the ledger, number its receipt
        and owe the meter its credit (a transfer to deliver, or an STS token)."""
        text = _amount(amount)
        if currency is not None:
            _option("--currency", lambda: Money(0, currency))
        channel_name(channel)
        request = PaymentRequest(channel, ref, meter, text, currency, payer)
        answer = with_db(db, lambda database: pay(database, request, _now(), actor=operator()))
        if as_json:
            print_json(answer.answer | {"replayed": answer.replayed})
            return
        if answer.replayed:
            err_console.print("the same payment again: its first answer", highlight=False)
        console.print(receipt_text(answer.answer), markup=False, highlight=False, end="")


# -- payments -------------------------------------------------------------------------------------


@payments_app.command("list")
@handle_errors
def payments_list(
    meter: Annotated[str | None, typer.Option("--meter", help="Only this meter's.")] = None,
    channel: Annotated[str | None, typer.Option("--channel", help="Only this channel's.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="The latest N payments.")] = 50,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """The latest payments, newest first."""
    if channel is not None:
        channel_name(channel)
    views = with_db(
        db, lambda database: list_payments(database, meter=meter, channel=channel, limit=limit)
    )
    if as_json:
        print_json([view.document() for view in views])
        return
    table = Table("id", "receipt", "paid at", "channel", "reference", "meter", "amount", "state")
    for view in views:
        table.add_row(
            str(view.payment_id),
            str(view.receipt),
            view.paid_at.isoformat(timespec="seconds"),
            view.channel,
            view.reference,
            view.meter_id,
            _money(view.amount, view.currency_scale, view.currency),
            view.state + (f" ({view.delivery_state})" if view.delivery_state else ""),
        )
    console.print(table)


def _print_payment(view: PaymentView) -> None:
    console.print(
        f"payment {view.payment_id}: {view.state}"
        + (f", credit {view.delivery_state}" if view.delivery_state else "")
        + (f" (reversed: {view.reversal_reason})" if view.reversal_reason else "")
    )
    console.print(receipt_text(view.answer, view.state), markup=False, highlight=False, end="")


@payments_app.command("show")
@handle_errors
def payments_show(
    payment_id: Annotated[int, typer.Argument(help="The payment's id.")],
    receipt: Annotated[bool, typer.Option("--receipt", help="Print only its receipt.")] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """One payment: its split, its credit and where that is, its receipt."""
    view = with_db(db, lambda database: get_payment(database, payment_id))
    if as_json:
        print_json(view.document())
    elif receipt:
        console.print(receipt_text(view.answer, view.state), markup=False, highlight=False, end="")
    else:
        _print_payment(view)


@payments_app.command("reverse")
@handle_errors
def payments_reverse(
    payment_id: Annotated[int, typer.Argument(help="The payment's id.")],
    reason: Annotated[str, typer.Option("--reason", help="Why.", show_default=False)],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Reverse a payment: credit not yet delivered is cancelled; credit the meter has (or a
    token) becomes the account's debt, recovered from its next payments."""
    if not reason.strip():
        raise fail("--reason: a reversal says why")
    view = with_db(
        db,
        lambda database: reverse_payment(database, payment_id, reason, _now(), actor=operator()),
    )
    if as_json:
        print_json(view.document())
        return
    _print_payment(view)


@payments_app.command("reprint")
@handle_errors
def payments_reprint(
    payment_id: Annotated[int, typer.Argument(help="The payment's id.")],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print a payment's receipt again, with the token first issued (never a new token); the
    reprint is on the audit trail."""
    view = with_db(db, lambda database: reprint(database, payment_id, _now(), actor=operator()))
    text = receipt_text(view.answer, view.state, reprint=True)
    if as_json:
        print_json(view.document() | {"text": text, "reprint": True})
        return
    console.print(text, markup=False, highlight=False, end="")


@payments_app.command("attempts")
@handle_errors
def payments_attempts(
    channel: Annotated[str | None, typer.Option("--channel", help="Only this channel's.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="The latest N attempts.")] = 50,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Refused payment attempts, newest first: no balance changed, the request and why it
    was refused are kept."""
    if channel is not None:
        channel_name(channel)
    views = with_db(db, lambda database: list_attempts(database, channel=channel, limit=limit))
    if as_json:
        print_json([view.document() for view in views])
        return
    table = Table("id", "at", "channel", "source", "reference", "code", "detail")
    for view in views:
        table.add_row(
            str(view.attempt_id),
            view.at.isoformat(timespec="seconds"),
            view.channel,
            view.source,
            view.reference or "",
            view.code,
            view.detail,
        )
    console.print(table)
