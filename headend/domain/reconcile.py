"""Reconciling a channel's settlement file with the ledger, and the ledger with the meters. Pure.

A settlement file is CSV with a header row; its columns (any order; others are ignored)::

    reference   the channel's own reference of the payment (1 to 128 printable characters)
    amount      a decimal in the currency, e.g. 500.00 (no more decimals than it has)
    currency    ISO 4217, e.g. KES
    paid_at     ISO 8601 with a time zone, e.g. 2026-11-03T09:15:00+03:00

A file with any malformed row is refused as a whole (:class:`BadSettlement`), naming each bad
row by its line number and why, so nothing is reconciled from half a file.

:func:`reconcile` compares the rows with the channel's payments: each reference the file and
the ledger share is **matched**, or an **amount_mismatch** / **currency_mismatch**, or
**reversed_in_ledger**; a reference only in the file is **missing_in_ledger**; a payment of the
day (by ``paid_at``) only in the ledger is **missing_in_file**; a reference the file repeats is
a **duplicate_in_file** for every repeat. The third leg, :func:`delivery_state`, says for each
payment of the day whether its meter reports the credit received (a transfer number at or below
the meter's last one) or the token accepted.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from typing import Any, Final

from protocols.errors import ValidationError
from protocols.units import Money

COLUMNS: Final = ("reference", "amount", "currency", "paid_at")
MAX_ROWS: Final = 1_000_000


class BadSettlement(ValidationError):
    """A settlement file that cannot be read (each bad row named)."""


class Finding(StrEnum):
    MATCHED = "matched"
    MISSING_IN_LEDGER = "missing_in_ledger"
    MISSING_IN_FILE = "missing_in_file"
    AMOUNT_MISMATCH = "amount_mismatch"
    CURRENCY_MISMATCH = "currency_mismatch"
    REVERSED_IN_LEDGER = "reversed_in_ledger"
    DUPLICATE_IN_FILE = "duplicate_in_file"


@dataclass(frozen=True, slots=True)
class SettlementRow:
    line: int  # the file's line number (the header is line 1)
    reference: str
    amount: int  # minor units
    currency: str
    paid_at: datetime


def parse_settlement(text: str, exponents: Mapping[str, int]) -> list[SettlementRow]:
    """The rows of a settlement file; ``exponents`` are the currencies the head-end prices in
    (code -> decimals). BadSettlement names every malformed row."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        raise BadSettlement("the settlement file is empty: it needs a header row")
    names = [name.strip().lower() for name in header]
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise BadSettlement(
            f"line 1: the header lacks {', '.join(missing)} (columns: {', '.join(COLUMNS)})"
        )
    repeated = sorted({n for n in names if names.count(n) > 1 and n in COLUMNS})
    if repeated:
        raise BadSettlement(f"line 1: the header repeats {', '.join(repeated)}")
    at = {c: names.index(c) for c in COLUMNS}
    rows: list[SettlementRow] = []
    bad: list[str] = []
    for number, fields in enumerate(reader, start=2):
        if not any(f.strip() for f in fields):
            continue  # a blank line
        if number > MAX_ROWS:
            raise BadSettlement(f"more than {MAX_ROWS} rows")
        try:
            rows.append(_row(number, fields, at, exponents))
        except ValidationError as exc:
            bad.append(f"line {number}: {exc}")
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise BadSettlement(f"{len(bad)} malformed row(s), nothing reconciled: {shown}")
    return rows


def _row(
    number: int, fields: Sequence[str], at: Mapping[str, int], exponents: Mapping[str, int]
) -> SettlementRow:
    if len(fields) <= max(at.values()):
        raise ValidationError(f"{len(fields)} field(s), the header has {max(at.values()) + 1}+")
    reference = fields[at["reference"]].strip()
    if not 1 <= len(reference) <= 128 or not reference.isprintable():
        raise ValidationError("reference is 1 to 128 printable characters")
    currency = fields[at["currency"]].strip()
    if currency not in exponents:
        known = ", ".join(sorted(exponents)) or "none yet"
        raise ValidationError(
            f"currency {currency!r} is not one the head-end's tariffs price in ({known})"
        )
    try:
        amount = Money.parse(fields[at["amount"]], currency, exponents[currency]).minor
    except ValidationError as exc:
        raise ValidationError(f"amount: {exc}") from exc
    if amount <= 0:
        raise ValidationError(f"amount: more than zero, got {fields[at['amount']].strip()!r}")
    text = fields[at["paid_at"]].strip()
    try:
        paid = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValidationError(f"paid_at: not an ISO 8601 time: {text!r}") from exc
    if paid.tzinfo is None:
        raise ValidationError(f"paid_at: give the time zone (e.g. Z): {text!r}")
    return SettlementRow(number, reference, amount, currency, paid)


@dataclass(frozen=True, slots=True)
class LedgerPayment:
    """A payment of the channel as the ledger has it."""

    payment_id: int
    transaction_id: int
    reference: str
    amount: int
    currency: str
    currency_scale: int
    state: str  # accepted reversed
    paid_at: datetime
    meter_id: str


@dataclass(frozen=True, slots=True)
class Item:
    finding: Finding
    reference: str
    file_amount: int | None = None
    ledger_amount: int | None = None
    currency: str | None = None
    payment_id: int | None = None
    line: int | None = None
    detail: str = ""

    def document(self) -> dict[str, Any]:
        return {
            "finding": str(self.finding),
            "reference": self.reference,
            "file_amount": self.file_amount,
            "ledger_amount": self.ledger_amount,
            "currency": self.currency,
            "payment_id": self.payment_id,
            "line": self.line,
            "detail": self.detail,
        }


def _item(finding: Finding, row: SettlementRow, payment: LedgerPayment | None, detail: str) -> Item:
    return Item(
        finding,
        row.reference,
        file_amount=row.amount,
        ledger_amount=None if payment is None else payment.amount,
        currency=row.currency,
        payment_id=None if payment is None else payment.payment_id,
        line=row.line,
        detail=detail,
    )


def reconcile(
    rows: Sequence[SettlementRow], ledger: Sequence[LedgerPayment], day: date
) -> list[Item]:
    """The findings (see the module), file order first, then the ledger's unmatched payments
    of ``day`` (UTC) by id."""
    by_reference = {p.reference: p for p in ledger}
    seen: Counter[str] = Counter()
    items: list[Item] = []
    for row in rows:
        seen[row.reference] += 1
        if seen[row.reference] > 1:
            detail = f"repeat {seen[row.reference]} of the reference in the file"
            items.append(_item(Finding.DUPLICATE_IN_FILE, row, None, detail))
            continue
        payment = by_reference.get(row.reference)
        if payment is None:
            items.append(_item(Finding.MISSING_IN_LEDGER, row, None, ""))
        elif payment.state == "reversed":
            items.append(
                _item(Finding.REVERSED_IN_LEDGER, row, payment, "the payment was reversed")
            )
        elif payment.currency != row.currency:
            detail = f"the ledger has {payment.currency}, the file {row.currency}"
            items.append(_item(Finding.CURRENCY_MISMATCH, row, payment, detail))
        elif payment.amount != row.amount:
            detail = f"the file says {row.amount - payment.amount:+d} minor units more"
            items.append(_item(Finding.AMOUNT_MISMATCH, row, payment, detail))
        else:
            items.append(_item(Finding.MATCHED, row, payment, ""))
    for payment in sorted(ledger, key=lambda p: p.payment_id):
        in_day = payment.paid_at.date() == day
        if in_day and payment.state == "accepted" and payment.reference not in seen:
            items.append(
                Item(
                    Finding.MISSING_IN_FILE,
                    payment.reference,
                    ledger_amount=payment.amount,
                    currency=payment.currency,
                    payment_id=payment.payment_id,
                )
            )
    return items


def delivery_state(
    kind: str | None, state: str | None, number: int | None, reported: int | None
) -> tuple[str, bool]:
    """The third leg for one payment: (what the meter says, whether the ledger agrees).
    ``kind`` is transfer or token (None: no credit owed), ``reported`` the last transfer
    number the meter reported in a reading."""
    if kind is None:
        return "no credit owed", True
    if kind == "token":
        return ("token accepted", True) if state == "accepted" else ("token not yet entered", True)
    received = reported is not None and number is not None and reported >= number
    if state == "cancelled":
        return ("cancelled", not received)
    if state == "delivered":
        return ("received", True) if received else ("delivered, not reported by the meter", False)
    return ("received before it was confirmed", True) if received else ("pending", True)


__all__ = [
    "COLUMNS",
    "BadSettlement",
    "Finding",
    "Item",
    "LedgerPayment",
    "SettlementRow",
    "delivery_state",
    "parse_settlement",
    "reconcile",
]
