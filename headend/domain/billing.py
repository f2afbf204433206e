"""A monthly bill's arithmetic, its e-invoice tax lines and its text. Pure.

A bill covers one account and one calendar month (by the tariff's UTC offset). Its balance is
the customer's standing with the utility: the prepaid balance (money paid for credit not yet
delivered, and change) less the debt, both read from the ledger. Every movement of those two
accounts in the month is one of the ledger's transaction kinds, so::

    closing = opening + Σ payments (energy net + debt recovered) + Σ deliveries
              + Σ reversals + Σ adjustments

and a payment's share is ``amount - fee - service charge - VAT on energy``, every part
VAT-inclusive as the receipt shows it. :func:`make_bill` refuses (:class:`BillMismatch`) a bill
whose lines do not add up: that would mean the ledger and the payments disagree.

Consumption comes from the stored readings: per meter, the difference of each register (rate 1
to 4 and the total) between the last reading before the month and the last reading in it, and
the month's load-profile intervals (actual and estimated apart); the account's total is spread
over the tariff's blocks (a block tariff) or its rates (time of use) at their net prices.

Errors (all :class:`~protocols.errors.ValidationError`)::

    BillError
    ├── BadMonth        not a month such as 2026-11
    └── BillMismatch    the lines do not add up to the closing balance
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from headend.domain.registry import TariffRecord
from protocols.errors import ValidationError
from protocols.units import decimal_text

RATES: Final = 4
_MONTH: Final = re.compile(r"(\d{4})-(\d{2})")


class BillError(ValidationError):
    """A bill that cannot be made."""


class BadMonth(BillError):
    """Not a calendar month."""


class BillMismatch(BillError):
    """The bill's lines do not add up."""


@dataclass(frozen=True, slots=True, order=True)
class Month:
    year: int
    month: int

    def __post_init__(self) -> None:
        if not (1970 <= self.year <= 9998 and 1 <= self.month <= 12):
            raise BadMonth(f"--month is a month such as 2026-11, got {self}")

    @classmethod
    def parse(cls, text: str) -> Month:
        match = _MONTH.fullmatch(text.strip())
        if match is None:
            raise BadMonth(f"--month is a month such as 2026-11, got {text!r}")
        return cls(int(match[1]), int(match[2]))

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"

    def next(self) -> Month:
        return Month(self.year + self.month // 12, self.month % 12 + 1)

    def bounds(self, utc_offset_minutes: int = 0) -> tuple[datetime, datetime]:
        """The month's first instant and the next month's, as UTC datetimes, for a calendar
        ``utc_offset_minutes`` ahead of UTC."""
        offset = timedelta(minutes=utc_offset_minutes)
        following = self.next()
        start = datetime(self.year, self.month, 1, tzinfo=UTC) - offset
        end = datetime(following.year, following.month, 1, tzinfo=UTC) - offset
        return start, end


def money_at(wh: int, price: int) -> int:
    """The net cost of ``wh`` Wh at ``price`` minor units per kWh, rounded half up."""
    return (2 * wh * price + 1000) // 2000


@dataclass(frozen=True, slots=True)
class Registers:
    """A reading's energy registers: the total and rates 1 to 4, Wh."""

    total: int
    rates: tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class MeterUsage:
    meter_id: str
    first: Registers | None  # the last reading before the month (else the month's first)
    last: Registers | None  # the last reading in the month
    interval_wh: int = 0  # the month's load-profile energy, actual
    estimated_wh: int = 0  # and estimated (kept apart)

    def consumed(self) -> tuple[int, tuple[int, ...]]:
        """(total Wh, Wh per rate) between the two readings; a register that went back
        (a replaced meter, a rollback) is refused rather than billed negative."""
        if self.first is None or self.last is None:
            return 0, (0,) * RATES
        total = self.last.total - self.first.total
        rates = tuple(b - a for a, b in zip(self.first.rates, self.last.rates, strict=True))
        if total < 0 or min(rates) < 0:
            raise BillError(
                f"meter {self.meter_id}'s registers went back during the month: a bill is "
                "not made from them"
            )
        return total, rates


@dataclass(frozen=True, slots=True)
class PaymentLine:
    """A payment posted in the month, each part VAT-inclusive with its VAT."""

    payment_id: int
    receipt: int
    channel: str
    reference: str
    paid_at: datetime
    state: str  # accepted reversed
    amount: int
    debt_recovered: int
    fee: int
    fee_tax: int
    service_charge: int
    service_tax: int
    energy_gross: int
    energy_tax: int

    def __post_init__(self) -> None:
        parts = self.debt_recovered + self.fee + self.service_charge + self.energy_gross
        if parts != self.amount:
            raise BillMismatch(
                f"payment {self.payment_id}: its parts add up to {parts}, not {self.amount}"
            )

    @property
    def to_balance(self) -> int:
        """What the payment added to the customer's balance."""
        return self.amount - self.fee - self.service_charge - self.energy_tax


@dataclass(frozen=True, slots=True)
class BillInputs:
    account: str
    customer: str
    tax_id: str | None
    month: Month
    tariff: TariffRecord
    opening: tuple[int, int]  # (prepaid, debt) as they read, at the month's start
    closing: tuple[int, int]  # and at its end
    #: what each kind of ledger transaction moved the balance (prepaid less debt) by
    movements: dict[str, int]
    payments: Sequence[PaymentLine]
    meters: Sequence[MeterUsage]
    addresses: tuple[str | None, str | None] = (None, None)  # e-mail, phone


def _tax_line(what: str, gross: int, tax: int, rate_bp: int) -> dict[str, Any]:
    return {"line": what, "net": gross - tax, "vat_rate_bp": rate_bp, "vat": tax, "gross": gross}


def make_bill(inputs: BillInputs, *, number: int, issued_at: datetime) -> dict[str, Any]:
    """The bill (an e-invoice when the customer has a tax id) as a JSON-ready document;
    BillMismatch if its lines do not add up."""
    tariff = inputs.tariff
    payments = list(inputs.payments)
    paid = sum(p.amount for p in payments)
    by_channel: dict[str, dict[str, int]] = {}
    for p in payments:
        line = by_channel.setdefault(p.channel, {"count": 0, "amount": 0})
        line["count"] += 1
        line["amount"] += p.amount
    fee = sum(p.fee for p in payments)
    fee_tax = sum(p.fee_tax for p in payments)
    service = sum(p.service_charge for p in payments)
    service_tax = sum(p.service_tax for p in payments)
    energy = sum(p.energy_gross for p in payments)
    energy_tax = sum(p.energy_tax for p in payments)
    recovered = sum(p.debt_recovered for p in payments)
    moved = {kind: int(n) for kind, n in sorted(inputs.movements.items()) if n}
    by_payments = moved.get("payment", 0)
    if by_payments != sum(p.to_balance for p in payments):
        raise BillMismatch(
            f"account {inputs.account}, {inputs.month}: the ledger's payments moved the "
            f"balance by {by_payments}, the payments say {sum(p.to_balance for p in payments)}"
        )
    opening = inputs.opening[0] - inputs.opening[1]
    closing = inputs.closing[0] - inputs.closing[1]
    if opening + sum(moved.values()) != closing:
        raise BillMismatch(
            f"account {inputs.account}, {inputs.month}: opening {opening} and the month's "
            f"movements {sum(moved.values())} do not make the closing balance {closing}"
        )
    summary = [
        ("opening balance", opening),
        ("payments received", paid),
        ("fees", -fee),
        ("service charges", -service),
        ("VAT on energy", -energy_tax),
        ("credit delivered to meters", moved.get("delivery", 0)),
        ("reversals", moved.get("reversal", 0)),
        ("adjustments", sum(n for k, n in moved.items() if k not in _OWN_LINES)),
        ("closing balance", closing),
    ]
    assert sum(n for _, n in summary[:-1]) == closing  # the checks above make it so
    meters, total_wh, rate_wh = [], 0, [0] * RATES
    for usage in inputs.meters:
        wh, rates = usage.consumed()
        total_wh += wh
        rate_wh = [a + b for a, b in zip(rate_wh, rates, strict=True)]
        meters.append(
            {
                "meter": usage.meter_id,
                "wh": wh,
                "rates_wh": list(rates),
                "interval_wh": usage.interval_wh,
                "estimated_wh": usage.estimated_wh,
            }
        )
    document: dict[str, Any] = {
        "kind": "e-invoice" if inputs.tax_id else "bill",
        "number": number,
        "issued_at": issued_at.isoformat(),
        "account": inputs.account,
        "customer": inputs.customer,
        "tax_id": inputs.tax_id,
        "month": str(inputs.month),
        "tariff": tariff.tariff_id,
        "currency": tariff.currency,
        "currency_scale": tariff.currency_scale,
        "opening": {"balance": opening, "prepaid": inputs.opening[0], "debt": inputs.opening[1]},
        "closing": {"balance": closing, "prepaid": inputs.closing[0], "debt": inputs.closing[1]},
        "summary": [{"line": what, "amount": n} for what, n in summary],
        "consumption": {
            "wh": total_wh,
            "by_rate": _by_rate(tariff, rate_wh),
            "by_block": _by_block(tariff, total_wh),
            "meters": meters,
        },
        "charges": {
            "energy": {"gross": energy, "vat": energy_tax, "net": energy - energy_tax},
            "fees": {"gross": fee, "vat": fee_tax, "net": fee - fee_tax},
            "service_charge": {"gross": service, "vat": service_tax, "net": service - service_tax},
            "vat": energy_tax + fee_tax + service_tax,
            "debt_recovered": recovered,
        },
        "payments": {
            "total": paid,
            "by_channel": [{"channel": c, **v} for c, v in sorted(by_channel.items())],
            "items": [
                {
                    "payment_id": p.payment_id,
                    "receipt": p.receipt,
                    "channel": p.channel,
                    "reference": p.reference,
                    "paid_at": p.paid_at.isoformat(),
                    "amount": p.amount,
                    "state": p.state,
                }
                for p in payments
            ],
        },
    }
    if inputs.tax_id:
        rate = tariff.vat_bp
        lines = [
            _tax_line("energy", energy, energy_tax, rate),
            _tax_line("fees", fee, fee_tax, rate),
            _tax_line("service charge", service, service_tax, rate),
        ]
        document["tax_lines"] = [line for line in lines if line["gross"]]
        document["tax_total"] = {
            "net": sum(int(line["net"]) for line in lines),
            "vat": sum(int(line["vat"]) for line in lines),
            "gross": sum(int(line["gross"]) for line in lines),
        }
    return document


_OWN_LINES: Final = frozenset({"payment", "delivery", "reversal"})


def _by_rate(tariff: TariffRecord, rate_wh: Sequence[int]) -> list[dict[str, int]]:
    out = []
    for n, wh in enumerate(rate_wh, start=1):
        if not wh and n > len(tariff.prices):
            continue
        price = tariff.prices[min(n, len(tariff.prices)) - 1]
        out.append({"rate": n, "wh": wh, "price": price, "net": money_at(wh, price)})
    return out


def _by_block(tariff: TariffRecord, wh: int) -> list[dict[str, int | None]]:
    """The month's consumption spread over the tariff's blocks (one line beyond the last)."""
    if not tariff.blocks:
        return []
    out: list[dict[str, int | None]] = []
    lower, left = 0, wh
    steps: list[tuple[int | None, int]] = [(b.upto_wh, b.price) for b in tariff.blocks]
    for upto, price in [*steps, (None, tariff.prices[0])]:
        room = left if upto is None else min(left, upto - lower)
        out.append(
            {"from_wh": lower, "upto_wh": upto, "wh": room, "price": price,
             "net": money_at(room, price)}
        )  # fmt: skip
        left -= room
        if upto is not None:
            lower = upto
    return out


def vat_rate_text(rate_bp: int) -> str:
    return f"{decimal_text(rate_bp, -2)}%"


def bill_text(document: dict[str, Any]) -> str:
    """The bill (or e-invoice) as plain text: what its PDF prints, line for line."""
    scale, currency = int(document["currency_scale"]), str(document["currency"])

    def money(minor: int) -> str:
        return f"{decimal_text(int(minor), scale):>14} {currency}"

    title = "E-INVOICE" if document["kind"] == "e-invoice" else "BILL"
    lines = [
        f"{title} {int(document['number']):08d}   month {document['month']}",
        f"issued      {document['issued_at']}",
        f"account     {document['account']}   customer {document['customer']}",
    ]
    if document.get("tax_id"):
        lines.append(f"tax id      {document['tax_id']}")
    lines += [f"tariff      {document['tariff']}", "", "SUMMARY"]
    lines += [f"  {line['line']:<28}{money(line['amount'])}" for line in document["summary"]]
    lines += ["", "CONSUMPTION"]
    consumption = document["consumption"]
    lines.append(f"  {'total':<28}{decimal_text(int(consumption['wh']), -3):>14} kWh")
    for line in consumption["by_rate"]:
        lines.append(
            f"  rate {line['rate']:<23}{decimal_text(int(line['wh']), -3):>14} kWh"
            f"  at {decimal_text(int(line['price']), scale)}/kWh {money(line['net'])}"
        )
    for line in consumption["by_block"]:
        upto = line["upto_wh"]
        span = f"{int(line['from_wh']) // 1000}-{'' if upto is None else int(upto) // 1000} kWh"
        lines.append(
            f"  block {span:<22}{decimal_text(int(line['wh']), -3):>14} kWh"
            f"  at {decimal_text(int(line['price']), scale)}/kWh {money(line['net'])}"
        )
    for meter in consumption["meters"]:
        lines.append(
            f"  meter {meter['meter']:<22}{decimal_text(int(meter['wh']), -3):>14} kWh"
            f"  (profile {decimal_text(int(meter['interval_wh']), -3)} kWh"
            f", estimated {decimal_text(int(meter['estimated_wh']), -3)} kWh)"
        )
    charges = document["charges"]
    lines += ["", "CHARGES (VAT included)"]
    for label, key in (
        ("energy", "energy"),
        ("fees", "fees"),
        ("service charge", "service_charge"),
    ):
        lines.append(f"  {label:<28}{money(charges[key]['gross'])}")
    lines.append(f"  {'of which VAT':<28}{money(charges['vat'])}")
    lines.append(f"  {'debt recovered':<28}{money(charges['debt_recovered'])}")
    lines += ["", "PAYMENTS"]
    for line in document["payments"]["by_channel"]:
        lines.append(
            f"  {line['channel'] + ' (' + str(line['count']) + ')':<28}{money(line['amount'])}"
        )
    for item in document["payments"]["items"]:
        state = "" if item["state"] == "accepted" else f" {item['state'].upper()}"
        lines.append(
            f"    receipt {int(item['receipt']):08d} {item['paid_at'][:10]} {item['channel']}"
            f" {item['reference']} {decimal_text(int(item['amount']), scale)}{state}"
        )
    if document["kind"] == "e-invoice":
        lines += ["", "TAX LINES"]
        for line in document["tax_lines"]:
            rate = vat_rate_text(int(line["vat_rate_bp"]))
            lines.append(
                f"  {line['line']:<16}net {decimal_text(int(line['net']), scale)}"
                f"  VAT {rate} {decimal_text(int(line['vat']), scale)}"
                f"  gross {decimal_text(int(line['gross']), scale)}"
            )
        total = document["tax_total"]
        lines.append(
            f"  {'total':<16}net {decimal_text(int(total['net']), scale)}"
            f"  VAT {decimal_text(int(total['vat']), scale)}"
            f"  gross {decimal_text(int(total['gross']), scale)} {currency}"
        )
    return "\n".join(lines) + "\n"


__all__ = [
    "BadMonth",
    "BillError",
    "BillInputs",
    "BillMismatch",
    "MeterUsage",
    "Month",
    "PaymentLine",
    "Registers",
    "bill_text",
    "make_bill",
    "money_at",
]
