"""`hes meters`, `hes customers`, `hes tariffs`: the head-end's registry."""

from __future__ import annotations

import getpass
import os
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cli.common import console, fail, handle_errors, print_json
from cli.hes_db import DbOption, with_db
from cli.hes_views import load_story, print_story, story_dict
from headend.domain.policy import Calendar
from headend.domain.registry import (
    COLUMNS,
    LANGUAGES,
    NOTICE_CHANNELS,
    Block,
    CustomerRecord,
    MeterRecord,
    TariffRecord,
    account_id,
    calendar_document,
    notice_channel,
    parse_block,
    parse_friendly_hours,
    parse_percent,
    parse_utc_offset,
    record_from_row,
)
from headend.services.registry import records_from_csv, records_from_fleet, route_of
from headend.storage.registry import (
    ImportReport,
    add_customer,
    add_tariff,
    get_customer,
    get_tariff,
    import_meters,
    list_customers,
    list_meters,
    list_tariffs,
    meter_dict,
    retire_meter,
)
from protocols.units import decimal_text

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]

meters_app = typer.Typer(help="Register, list, show and retire meters.", no_args_is_help=True)
customers_app = typer.Typer(help="Register and list customers.", no_args_is_help=True)
tariffs_app = typer.Typer(help="Register and list tariffs.", no_args_is_help=True)


def _now() -> datetime:
    return datetime.now(UTC)


def operator() -> str:
    """Who is acting, for the audit trail: ``$HES_OPERATOR``, else the login name."""
    return os.environ.get("HES_OPERATOR") or getpass.getuser()


# -- meters ---------------------------------------------------------------------------------------

_COLUMN_HELP = "; ".join(f"{c.name}{' (required)' if c.required else ''}" for c in COLUMNS)


def _print_report(report: ImportReport, as_json: bool) -> None:
    if as_json:
        print_json(
            {
                "applied": report.applied,
                "added": report.added,
                "unchanged": report.unchanged,
                "refused": [
                    {"line": r.line, "meter_id": r.meter_id, "reason": r.reason}
                    for r in report.refused
                ],
            }
        )
        return
    for refusal in report.refused:
        console.print(
            f"line {refusal.line}: {refusal.meter_id or '(no id)'}: {refusal.reason}",
            markup=False,
            highlight=False,
        )
    verb = "registered" if report.applied else "would register"
    console.print(
        f"{verb} {len(report.added)}, unchanged {len(report.unchanged)}, "
        f"refused {len(report.refused)}",
        highlight=False,
    )


@meters_app.command("import")
@handle_errors
def meters_import(
    csv_file: Annotated[
        Path | None, typer.Argument(help=f"A CSV file with a header row: {_COLUMN_HELP}.")
    ] = None,
    from_fleet: Annotated[
        Path | None,
        typer.Option("--from-fleet", help="Register the meters of a meter-sim fleet file."),
    ] = None,
    endpoint_base: Annotated[
        str | None,
        typer.Option(
            "--endpoint-base",
            help="With --from-fleet: tcp://host:port (each meter at its unit id) or "
            "mqtt://host:port (each by its id).",
        ),
    ] = None,
    skip_bad_rows: Annotated[
        bool,
        typer.Option("--skip-bad-rows", help="Register the good rows even if some are refused."),
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check, change nothing.")] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Register meters from a CSV file (all rows or none, unless --skip-bad-rows) or from a
    fleet file. Importing the same file again changes nothing."""
    if (csv_file is None) == (from_fleet is None):
        raise fail("give a CSV file or --from-fleet FLEET (one of them)")
    if from_fleet is not None:
        if endpoint_base is None:
            raise fail("--from-fleet needs --endpoint-base (e.g. tcp://127.0.0.1:5020)")
        rows, refused = records_from_fleet(from_fleet, endpoint_base)
    else:
        assert csv_file is not None
        if endpoint_base is not None:
            raise fail("--endpoint-base goes with --from-fleet")
        rows, refused = records_from_csv(csv_file)
    report = with_db(
        db,
        lambda database: import_meters(
            database,
            rows,
            refused,
            _now(),
            actor=operator(),
            skip_bad_rows=skip_bad_rows,
            dry_run=dry_run,
        ),
    )
    _print_report(report, as_json)
    if report.refused and not skip_bad_rows:
        if not as_json:
            console.print("nothing was registered: fix the rows above or use --skip-bad-rows")
        raise typer.Exit(1)


@meters_app.command("add")
@handle_errors
def meters_add(
    meter_id: Annotated[str, typer.Argument(help="The meter's id.")],
    endpoint: Annotated[str, typer.Option("--endpoint", help="How to reach it (hes read --help).")],
    serial: Annotated[str, typer.Option(help="Serial number (default: the id).")] = "",
    customer: Annotated[str, typer.Option(help="The customer's name, with --account.")] = "",
    account: Annotated[str, typer.Option(help="Account id (created if new).")] = "",
    tariff: Annotated[str, typer.Option(help="A registered tariff id.")] = "",
    control_mode: Annotated[int, typer.Option(min=0, max=6, help="Control mode 0..6.")] = 6,
    credit_unit: Annotated[str, typer.Option(help="money or energy.")] = "money",
    currency: Annotated[str, typer.Option(help="ISO 4217 code.")] = "KES",
    currency_scale: Annotated[
        int, typer.Option(min=-4, max=0, help="Power of ten of the minor unit (-2: cents).")
    ] = -2,
    poll_group: Annotated[str, typer.Option(help="Poll group.")] = "default",
    profile_period: Annotated[
        int, typer.Option(min=60, max=86400, help="Load-profile period, s.")
    ] = 900,
    auth_key: Annotated[str, typer.Option(help="Command key, hex.")] = "",
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Register one meter."""
    values = {
        "meter_id": meter_id,
        "endpoint": endpoint,
        "serial": serial,
        "customer": customer,
        "account": account,
        "tariff": tariff,
        "control_mode": str(control_mode),
        "credit_unit": credit_unit,
        "currency": currency,
        "currency_scale": str(currency_scale),
        "poll_group": poll_group,
        "profile_period": str(profile_period),
        "auth_key": auth_key,
    }
    record: MeterRecord = record_from_row(values, route_of)
    report = with_db(
        db, lambda database: import_meters(database, [(1, record)], [], _now(), actor=operator())
    )
    if report.refused:
        raise fail(f"{meter_id}: {report.refused[0].reason}")
    if as_json:
        print_json({"meter_id": meter_id, "added": bool(report.added)})
        return
    console.print(f"{meter_id}: {'registered' if report.added else 'unchanged'}")


@meters_app.command("list")
@handle_errors
def meters_list(
    include_retired: Annotated[bool, typer.Option("--all", help="Retired meters too.")] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """The registered meters."""
    meters = with_db(db, lambda database: list_meters(database, include_retired=include_retired))
    if as_json:
        print_json([meter_dict(meter) for meter in meters])
        return
    table = Table("meter", "endpoint", "account", "tariff", "mode", "credit", "status")
    for meter in meters:
        table.add_row(
            meter.id,
            meter.endpoint,
            meter.account_id or "",
            meter.tariff_id or "",
            str(meter.control_mode),
            meter.credit_unit if meter.credit_unit == "energy" else meter.currency,
            meter.status,
        )
    console.print(table)
    console.print(f"{len(meters)} meter(s)")


@meters_app.command("show")
@handle_errors
def meters_show(
    meter_id: Annotated[str, typer.Argument(help="The meter's id.")],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """One meter's story: identity, customer and account, latest reading, health, recent
    events and flags, and daily consumption for the last two weeks."""
    story = load_story(db, meter_id)
    if as_json:
        print_json(story_dict(story))
        return
    print_story(story)


@meters_app.command("retire")
@handle_errors
def meters_retire(
    meter_id: Annotated[str, typer.Argument(help="The meter's id.")],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Retire a meter: no longer read or commanded; its history is kept."""
    changed = with_db(
        db, lambda database: retire_meter(database, meter_id, _now(), actor=operator())
    )
    if as_json:
        print_json({"meter_id": meter_id, "retired": True, "changed": changed})
        return
    console.print(f"{meter_id}: {'retired' if changed else 'already retired'}")


# -- customers ------------------------------------------------------------------------------------


def _customer_dict(view: Any) -> dict[str, Any]:
    return {
        "customer_id": view.customer_id,
        "name": view.record.name,
        "email": view.record.email,
        "phone": view.record.phone,
        "notice_channel": view.record.notice_channel,
        "language": view.record.language,
        "tax_id": view.record.tax_id,
        "accounts": list(view.accounts),
        "meters": list(view.meters),
        "created_at": view.created_at.isoformat(),
    }


@customers_app.command("add")
@handle_errors
def customers_add(
    name: Annotated[str, typer.Argument(help="The customer's name.")],
    email: Annotated[str | None, typer.Option(help="E-mail address.")] = None,
    phone: Annotated[str | None, typer.Option(help="Phone number, digits, + first.")] = None,
    channel: Annotated[
        str, typer.Option(help=f"How notices reach them: {', '.join(NOTICE_CHANNELS)}.")
    ] = "sms",
    language: Annotated[str, typer.Option(help=f"Notice language: {', '.join(LANGUAGES)}.")] = "en",
    account: Annotated[str | None, typer.Option(help="Open an account with this id.")] = None,
    tax_id: Annotated[
        str | None,
        typer.Option("--tax-id", help="A business customer's tax id: their bills are e-invoices."),
    ] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Register a customer (and an account of theirs); prints the customer's id."""
    record = CustomerRecord(name, email, phone, notice_channel(channel), language, tax_id)
    if account is not None:
        account_id(account)
    customer_id = with_db(
        db, lambda database: add_customer(database, record, account, _now(), actor=operator())
    )
    if as_json:
        print_json({"customer_id": customer_id, "account": account})
        return
    console.print(f"customer {customer_id}" + (f", account {account}" if account else ""))


@customers_app.command("list")
@handle_errors
def customers_list(db: DbOption = None, as_json: JsonOption = False) -> None:
    """The registered customers with their accounts and meters."""
    views = with_db(db, list_customers)
    if as_json:
        print_json([_customer_dict(view) for view in views])
        return
    table = Table("id", "name", "notices", "accounts", "meters")
    for view in views:
        table.add_row(
            str(view.customer_id),
            view.record.name,
            f"{view.record.notice_channel} ({view.record.language})",
            ", ".join(view.accounts),
            ", ".join(view.meters),
        )
    console.print(table)


@customers_app.command("show")
@handle_errors
def customers_show(
    customer_id: Annotated[int, typer.Argument(help="The customer's id.")],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """One customer."""
    view = _customer_dict(with_db(db, lambda database: get_customer(database, customer_id)))
    if as_json:
        print_json(view)
        return
    table = Table(show_header=False, title=f"customer {customer_id}", title_justify="left")
    for key, value in view.items():
        shown = ", ".join(value) if isinstance(value, list) else value
        table.add_row(key, "" if shown is None else str(shown))
    console.print(table)


# -- tariffs --------------------------------------------------------------------------------------


def _tariff_dict(tariff: TariffRecord) -> dict[str, Any]:
    return {
        "tariff_id": tariff.tariff_id,
        "kind": tariff.kind,
        "currency": tariff.currency,
        "currency_scale": tariff.currency_scale,
        "prices": list(tariff.prices),
        "low_threshold": tariff.low_threshold,
        "critical_threshold": tariff.critical_threshold,
        "calendar": calendar_document(tariff.calendar),
        "blocks": [[block.upto_wh, block.price] for block in tariff.blocks],
        "fee": tariff.fee,
        "service_charge": tariff.service_charge,
        "vat_bp": tariff.vat_bp,
        "debt_share_bp": tariff.debt_share_bp,
        "min_vend": tariff.min_vend,
        "max_vend": tariff.max_vend,
    }


@tariffs_app.command("add")
@handle_errors
def tariffs_add(
    tariff_id: Annotated[str, typer.Argument(help="The tariff's id.")],
    price: Annotated[
        list[int],
        typer.Option(
            "--price",
            min=0,
            help="Unit price per kWh in minor units, rate 1 first; once for a flat tariff, "
            "up to 4 times for time-of-use.",
        ),
    ],
    currency: Annotated[str, typer.Option(help="ISO 4217 code.")] = "KES",
    scale: Annotated[
        int, typer.Option(min=-4, max=0, help="Power of ten of the minor unit (-2: cents).")
    ] = -2,
    low: Annotated[
        int,
        typer.Option(
            min=0,
            help="Low-balance threshold, minor units (an energy-credit meter: the energy it buys).",
        ),
    ] = 5000,
    critical: Annotated[
        int,
        typer.Option(
            min=0,
            help="Critical threshold, minor units (an energy-credit meter: the energy it buys).",
        ),
    ] = 1000,
    friendly_hours: Annotated[
        list[str] | None,
        typer.Option(
            "--friendly-hours",
            help="HH:MM-HH:MM when supply is never cut for credit (may cross midnight; "
            "repeatable).",
        ),
    ] = None,
    friendly_day: Annotated[
        list[int] | None,
        typer.Option(
            "--friendly-day", min=1, max=7, help="ISO weekday never cut (7 = Sunday; repeatable)."
        ),
    ] = None,
    holiday: Annotated[
        list[str] | None,
        typer.Option("--holiday", help="A date never cut, YYYY-MM-DD (repeatable)."),
    ] = None,
    utc_offset: Annotated[
        str, typer.Option(help="The tariff's local time, e.g. +03:00.")
    ] = "+00:00",
    block: Annotated[
        list[str] | None,
        typer.Option(
            "--block",
            help="KWH:PRICE: the month's energy up to KWH costs PRICE minor units per kWh "
            "(repeatable, limits rising; --price then applies beyond the last block).",
        ),
    ] = None,
    fee: Annotated[int, typer.Option(min=0, help="Fee per payment, minor units.")] = 0,
    service_charge: Annotated[
        int,
        typer.Option(
            min=0, help="Fixed monthly charge, minor units, from the month's first payments."
        ),
    ] = 0,
    vat: Annotated[
        str, typer.Option(help="VAT in percent (e.g. 16 or 7.5), included in what is paid.")
    ] = "0",
    debt_share: Annotated[
        str, typer.Option(help="Percent of each payment that goes to the account's debt.")
    ] = "0",
    min_vend: Annotated[int, typer.Option(min=0, help="Smallest payment, minor units.")] = 0,
    max_vend: Annotated[
        int | None, typer.Option(min=1, help="Largest payment, minor units (default: none).")
    ] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Register a tariff (a repeat with the same values changes nothing). Unit prices are
    net of VAT; docs/payments.md says how a payment is split."""
    try:
        days = frozenset(date.fromisoformat(text) for text in holiday or [])
    except ValueError as exc:
        raise fail(f"--holiday is YYYY-MM-DD: {exc}") from exc
    calendar = Calendar(
        tuple(span for text in friendly_hours or [] for span in parse_friendly_hours(text)),
        frozenset(friendly_day or []),
        days,
        parse_utc_offset(utc_offset),
    )
    blocks = tuple(Block(*parse_block(text)) for text in block or [])
    record = TariffRecord(
        tariff_id,
        currency,
        scale,
        tuple(price),
        low,
        critical,
        calendar,
        blocks,
        fee,
        service_charge,
        parse_percent(vat, "--vat"),
        parse_percent(debt_share, "--debt-share"),
        min_vend,
        max_vend,
    )
    added = with_db(db, lambda database: add_tariff(database, record, _now(), actor=operator()))
    if as_json:
        print_json(_tariff_dict(record) | {"added": added})
        return
    console.print(f"tariff {tariff_id}: {'registered' if added else 'unchanged'}")


@tariffs_app.command("list")
@handle_errors
def tariffs_list(db: DbOption = None, as_json: JsonOption = False) -> None:
    """The registered tariffs with how many meters are on each."""
    tariffs = with_db(db, list_tariffs)
    if as_json:
        print_json([_tariff_dict(t) | {"meters": n} for t, n in tariffs])
        return
    table = Table("tariff", "kind", "prices per kWh", "low", "critical", "meters")
    for tariff, meters in tariffs:
        table.add_row(
            tariff.tariff_id,
            tariff.kind,
            " / ".join(
                f"{decimal_text(p, tariff.currency_scale)} {tariff.currency}" for p in tariff.prices
            ),
            str(tariff.low_threshold),
            str(tariff.critical_threshold),
            str(meters),
        )
    console.print(table)


@tariffs_app.command("show")
@handle_errors
def tariffs_show(
    tariff_id: Annotated[str, typer.Argument(help="The tariff's id.")],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """One tariff."""
    tariff = _tariff_dict(with_db(db, lambda database: get_tariff(database, tariff_id)))
    if as_json:
        print_json(tariff)
        return
    table = Table(show_header=False, title=f"tariff {tariff_id}", title_justify="left")
    for key, value in tariff.items():
        table.add_row(key, str(value))
    console.print(table)
