"""`hes bills`, `hes reconcile`, `hes mandates`: monthly bills and e-invoices, a channel's
settlement against the ledger and the meters, auto-debit mandates."""

from __future__ import annotations

import csv
import json
import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cli.common import console, err_console, fail, handle_errors, print_json
from cli.hes_db import DbOption, with_db
from cli.hes_registry import operator
from headend.api.pdf import bill_pdf
from headend.domain.billing import Month, bill_text
from headend.domain.ledger import channel_name
from headend.domain.mandates import MODES, mandate_mode
from headend.domain.reconcile import parse_settlement
from headend.domain.registry import account_id
from headend.storage.billing import BillView, get_bill, make_bills, queue_bill_notice
from headend.storage.mandates import add_mandate, cancel_mandate, list_charges, list_mandates
from headend.storage.reconcile import currency_exponents, reconcile_channel
from protocols.errors import ValidationError
from protocols.units import decimal_text

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
MonthOption = Annotated[
    str, typer.Option("--month", help="The calendar month, e.g. 2026-11.", show_default=False)
]
_AMOUNT = re.compile(r"\d{1,15}(?:\.\d{1,4})?")

bills_app = typer.Typer(help="Monthly bills and e-invoices.", no_args_is_help=True)
mandates_app = typer.Typer(help="Auto-debit mandates.", no_args_is_help=True)


def _now() -> datetime:
    return datetime.now(UTC)


def _month(text: str) -> Month:
    return Month.parse(text)


def _money(minor: int, document: dict[str, Any]) -> str:
    return f"{decimal_text(minor, int(document['currency_scale']))} {document['currency']}"


# -- bills ----------------------------------------------------------------------------------------


def _write(directory: Path, bill: BillView) -> list[str]:
    stem = f"{bill.kind}-{bill.account}-{bill.month}"
    json_path, pdf_path = directory / f"{stem}.json", directory / f"{stem}.pdf"
    json_path.write_text(json.dumps(bill.document, indent=2, sort_keys=True) + "\n")
    pdf_path.write_bytes(bill_pdf(bill.document))
    return [str(json_path), str(pdf_path)]


@bills_app.command("make")
@handle_errors
def bills_make(
    month: MonthOption,
    account: Annotated[
        str | None, typer.Option("--account", help="Only this account's bill.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Write each bill as JSON and PDF into this directory."),
    ] = None,
    send: Annotated[
        bool,
        typer.Option(
            "--send",
            help="Queue each bill as an e-mail with its PDF attached, for the notifier of "
            "`hes serve` (once per bill; customers without an e-mail address are skipped).",
        ),
    ] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Make the month's bills (e-invoices for customers with a tax id): each is made once,
    numbered, and kept as issued; a bill made before is shown as it was."""
    period = _month(month)
    if account is not None:
        account_id(account)
    if out is not None and out.exists() and not out.is_dir():
        raise fail(f"--out {out} is not a directory")
    now = _now()
    bills = with_db(
        db, lambda database: make_bills(database, period, now, actor=operator(), account=account)
    )
    files: dict[int, list[str]] = {}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        files = {bill.number: _write(out, bill) for bill in bills}
    queued: dict[int, bool] = {}
    if send:

        async def queue(database: Any) -> dict[int, bool]:
            return {
                bill.number: await queue_bill_notice(
                    database, bill, bill_pdf(bill.document), now, expires=timedelta(days=7)
                )
                for bill in bills
            }

        queued = with_db(db, queue)
    if as_json:
        print_json(
            [
                {
                    "number": bill.number,
                    "account": bill.account,
                    "month": bill.month,
                    "kind": bill.kind,
                    "new": bill.new,
                    "files": files.get(bill.number, []),
                    "queued": queued.get(bill.number, False),
                    "bill": bill.document,
                }
                for bill in bills
            ]
        )
        return
    table = Table("bill", "account", "kind", "payments", "closing balance", "", "sent")
    for bill in bills:
        doc = bill.document
        table.add_row(
            f"{bill.number:08d}",
            bill.account,
            bill.kind,
            _money(int(doc["payments"]["total"]), doc),
            _money(int(doc["closing"]["balance"]), doc),
            "new" if bill.new else "issued before",
            ("queued" if queued.get(bill.number) else "no e-mail or queued before") if send else "",
        )
    console.print(table)
    for paths in files.values():
        err_console.print("wrote " + ", ".join(paths), markup=False, highlight=False)


@bills_app.command("show")
@handle_errors
def bills_show(
    account: Annotated[str, typer.Argument(help="The account.")],
    month: MonthOption,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """An account's bill of a month, as issued."""
    period = _month(month)
    account_id(account)
    bill = with_db(db, lambda database: get_bill(database, account, period))
    if as_json:
        print_json(bill.document)
        return
    console.print(bill_text(bill.document), markup=False, highlight=False, end="")


# -- reconciliation -------------------------------------------------------------------------------

REPORT_COLUMNS = (
    "finding", "reference", "line", "file_amount", "ledger_amount", "currency", "payment_id",
    "detail",
)  # fmt: skip


def register(app: typer.Typer) -> None:
    @app.command("reconcile")
    @handle_errors
    def reconcile_command(
        settlement: Annotated[
            Path, typer.Argument(help="The channel's settlement file (CSV; docs/payments.md).")
        ],
        channel: Annotated[
            str, typer.Option("--channel", help="The channel that settled.", show_default=False)
        ],
        day: Annotated[
            str,
            typer.Option(
                "--date", help="The settlement's day (UTC), e.g. 2026-11-03.", show_default=False
            ),
        ],
        out: Annotated[
            Path | None,
            typer.Option("--out", help="Also write the findings as CSV to this new file."),
        ] = None,
        apply: Annotated[
            bool,
            typer.Option(
                "--apply",
                help="Post the findings that can be placed (to suspense), each a ledger "
                "transaction on the audit trail, once.",
            ),
        ] = False,
        db: DbOption = None,
        as_json: JsonOption = False,
    ) -> None:
        """Reconcile a channel's settlement file with the ledger and the ledger with the
        meters; nothing changes without --apply."""
        try:
            when = date.fromisoformat(day)
        except ValueError as exc:
            raise ValidationError(f"--date is a day such as 2026-11-03, got {day!r}") from exc
        if out is not None and out.exists():
            raise fail(f"--out {out} exists already: a report is written to a new file")
        channel_name(channel)
        try:
            text = settlement.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise fail(f"cannot read {settlement}: {exc}") from exc

        async def run(database: Any) -> Any:
            rows = parse_settlement(text, await currency_exponents(database))
            return await reconcile_channel(
                database, channel, when, rows, _now(), actor=operator(), apply=apply
            )

        report = with_db(db, run)
        if out is not None:
            with out.open("x", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, REPORT_COLUMNS)
                writer.writeheader()
                for item in report.items:
                    writer.writerow(item.document())
        if as_json:
            print_json(report.document())
            return
        counts = report.counts()
        console.print(
            f"{channel} {when.isoformat()}: "
            + ", ".join(f"{n} {name}" for name, n in counts.items() if n or name == "matched")
        )
        table = Table("finding", "reference", "line", "file", "ledger", "currency", "detail")
        for item in report.items:
            if item.finding == "matched":
                continue
            table.add_row(
                str(item.finding), item.reference, str(item.line or ""),
                str(item.file_amount or ""), str(item.ledger_amount or ""),
                item.currency or "", item.detail,
            )  # fmt: skip
        if table.row_count:
            console.print(table)
        wrong = [d for d in report.deliveries if not d.agrees]
        console.print(
            f"meters: {len(report.deliveries)} payment(s) of the day, "
            f"{sum(d.meter_says in ('received', 'token accepted') for d in report.deliveries)} "
            f"confirmed by the meter, {len(wrong)} where the ledger and the meter disagree"
        )
        for delivery in wrong:
            console.print(
                f"  payment {delivery.payment_id} ({delivery.meter_id}): {delivery.meter_says}"
            )
        for applied in report.applied:
            console.print(
                f"applied {applied['finding']} {applied['reference']}: ledger transaction "
                f"{applied['transaction']}" + ("" if applied["new"] else " (before)")
            )


# -- mandates -------------------------------------------------------------------------------------


def _amount(option: str, text: str) -> str:
    if not _AMOUNT.fullmatch(text.strip()):
        raise ValidationError(f"{option} is a positive decimal such as 100.00, got {text!r}")
    return text.strip()


@mandates_app.command("add")
@handle_errors
def mandates_add(
    account: Annotated[str, typer.Argument(help="The account paying.")],
    channel: Annotated[
        str,
        typer.Option("--channel", help="A channel of kind autodebit.", show_default=False),
    ],
    amount: Annotated[
        str,
        typer.Option(
            "--amount",
            help="The payment (fixed) or the credit to top up to (topup), a decimal in the "
            "account's currency.",
            show_default=False,
        ),
    ],
    cap: Annotated[
        str,
        typer.Option("--cap", help="The most paid in a calendar month.", show_default=False),
    ],
    mode: Annotated[str, typer.Option("--mode", help=f"One of {', '.join(MODES)}.")] = "fixed",
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Give an account an auto-debit mandate: a crossing of its low threshold makes one
    payment, never above the monthly cap."""
    account_id(account)
    kind = mandate_mode(mode)
    amounts = (_amount("--amount", amount), _amount("--cap", cap))
    channel_name(channel)
    view = with_db(
        db,
        lambda database: add_mandate(
            database, account, channel, mode=kind, amounts=amounts, now=_now(), actor=operator()
        ),
    )
    if as_json:
        print_json(view.document())
        return
    console.print(f"mandate {view.mandate_id} for account {account}: {kind}, active")


@mandates_app.command("list")
@handle_errors
def mandates_list(
    account: Annotated[str | None, typer.Option("--account", help="Only this account's.")] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """The mandates, with what each paid this month."""
    if account is not None:
        account_id(account)
    views = with_db(db, lambda database: list_mandates(database, _now(), account=account))
    if as_json:
        print_json([view.document() for view in views])
        return
    table = Table("id", "account", "channel", "mode", "amount", "cap", "paid this month", "status")
    for view in views:
        table.add_row(
            str(view.mandate_id), view.account, view.channel, view.terms.mode,
            str(view.terms.amount), str(view.terms.monthly_cap), str(view.paid_this_month),
            view.status,
        )  # fmt: skip
    console.print(table)


@mandates_app.command("show")
@handle_errors
def mandates_show(
    mandate_id: Annotated[int, typer.Argument(help="The mandate's id.")],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """A mandate's charges: one per crossing, paid, capped or refused."""
    charges = with_db(db, lambda database: list_charges(database, mandate_id))
    if as_json:
        print_json(charges)
        return
    table = Table("at", "reference", "meter", "credit", "amount", "state", "payment", "detail")
    for c in charges:
        table.add_row(
            c["at"], c["reference"], c["meter"], str(c["credit"]), str(c["amount"]), c["state"],
            str(c["payment_id"] or ""), c["detail"] or "",
        )  # fmt: skip
    console.print(table)


@mandates_app.command("cancel")
@handle_errors
def mandates_cancel(
    mandate_id: Annotated[int, typer.Argument(help="The mandate's id.")],
    reason: Annotated[str, typer.Option("--reason", help="Why.", show_default=False)],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Cancel a mandate: later crossings charge nothing."""
    if not reason.strip():
        raise fail("--reason: a cancellation says why")
    changed = with_db(
        db,
        lambda database: cancel_mandate(database, mandate_id, reason, _now(), actor=operator()),
    )
    if as_json:
        print_json({"mandate_id": mandate_id, "changed": changed})
        return
    console.print(f"mandate {mandate_id}: {'cancelled' if changed else 'already cancelled'}")
