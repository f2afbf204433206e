"""What a payment buys under a tariff: the split of the money and the credit. Pure.

A payment of ``amount`` minor units is split, in this order:

1. **debt recovered**: ``debt_share_bp`` of the amount (rounded down), at most the debt;
2. **fee**: the tariff's fee per payment, at most what is left;
3. **service charge**: what is still due of the month's fixed charge, at most what is left
   (so the month's first payments collect it);
4. **energy**: the rest.

The fee, the service charge and the energy money each include VAT at the tariff's rate
(inclusive pricing). The VAT in an inclusive gross ``g`` at ``r`` basis points is
``g * r / (10000 + r)`` rounded half up to a whole minor unit, on integers alone:
``(2 * g * r + 10000 + r) // (2 * (10000 + r))``. Each part is taxed on its own, so every
line of a receipt adds up exactly.

The energy money net of VAT, plus any change held from earlier payments, buys energy at the
tariff's net unit prices: one price (flat); rate 1's price for a time-of-use tariff (the meter
applies its rates itself to a money credit); or, for a block tariff, each kWh at the price of
the block the month's energy bought so far has reached. Energy comes in whole Wh (a keypad
meter's token in whole 0.1 kWh steps), its cost rounded up to a whole minor unit; what is left
over stays as change, carried to the next payment. A meter whose credit is money is credited
with the whole energy money net of VAT (plus change); its energy figure says what that buys.

A quote is the same function with nothing stored: :func:`split` changes nothing.

Refusals carry a machine-readable :class:`Code` (what a payment channel is answered with)::

    PaymentRefused (ValidationError)     code, detail
    ├── AmountOutOfBounds                amount_out_of_bounds: below the minimum or above the
    │                                    maximum vend, not a positive integer, or more than a
    │                                    token carries
    └── NotPriceable                     not_vendable: energy credit on a tariff that gives
                                         energy away
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Literal

from headend.domain.registry import BASIS_POINTS, TariffRecord
from protocols.errors import ValidationError
from protocols.units import decimal_text

CreditUnit = Literal["money", "energy"]
WH_PER_KWH: Final = 1000


class Code(StrEnum):
    """Why a payment (or a quote) is refused."""

    UNKNOWN_ACCOUNT = "unknown_account"  # no such meter or account, retired, or none linked
    ACCOUNT_CLOSED = "account_closed"
    AMOUNT_OUT_OF_BOUNDS = "amount_out_of_bounds"
    CURRENCY_MISMATCH = "currency_mismatch"
    MALFORMED_FIELD = "malformed_field"
    UNKNOWN_CHANNEL = "unknown_channel"
    REFERENCE_CONFLICT = "reference_conflict"
    NOT_VENDABLE = "not_vendable"  # no tariff, or one that cannot price this meter's credit
    ALREADY_REVERSED = "already_reversed"
    IN_DELIVERY = "in_delivery"  # a reversal while the dispatcher holds the transfer
    UNKNOWN_PAYMENT = "unknown_payment"  # no payment of this channel under this reference
    UNKNOWN_RECEIPT = "unknown_receipt"


class PaymentRefused(ValidationError):
    """A payment, quote or reversal refused, with its :class:`Code`; nothing was stored."""

    def __init__(self, code: Code, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class AmountOutOfBounds(PaymentRefused):
    """The amount is not one this tariff sells."""

    def __init__(self, detail: str) -> None:
        super().__init__(Code.AMOUNT_OUT_OF_BOUNDS, detail)


class NotPriceable(PaymentRefused):
    """The tariff cannot turn money into energy (a price of zero with no limit)."""

    def __init__(self, detail: str) -> None:
        super().__init__(Code.NOT_VENDABLE, detail)


def vat_included(gross: int, rate_bp: int) -> int:
    """The VAT inside a VAT-inclusive ``gross`` at ``rate_bp`` basis points, rounded half up."""
    if rate_bp == 0 or gross == 0:
        return 0
    denominator = BASIS_POINTS + rate_bp
    return (2 * gross * rate_bp + denominator) // (2 * denominator)


@dataclass(frozen=True, slots=True)
class Situation:
    """What the split depends on besides the tariff and the amount, read from the ledger."""

    debt: int = 0  # the account's outstanding debt, minor units
    service_paid: int = 0  # of this month's service charge, already collected
    month_wh: int = 0  # energy bought this month so far (the block tariff's position)
    change: int = 0  # money held from earlier payments, not yet turned into credit
    credit_unit: CreditUnit = "money"
    step_wh: int = 1  # the smallest energy step the meter takes (100 for an STS token)

    def __post_init__(self) -> None:
        for name in ("debt", "service_paid", "month_wh", "change"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValidationError(f"{name} is a non-negative integer, got {value!r}")
        if type(self.step_wh) is not int or self.step_wh < 1:
            raise ValidationError(f"step_wh is a positive integer, got {self.step_wh!r}")


@dataclass(frozen=True, slots=True)
class Split:
    """Where a payment goes. ``amount = debt_recovered + fee + service_charge + energy_gross``;
    ``tax = fee_tax + service_tax + energy_tax``; the credit is ``credit_value`` minor units of
    the energy money (``energy_gross - energy_tax + change_in - change_out``), delivered as
    ``credit_amount`` in the meter's unit (minor units or Wh); ``wh`` is the energy it buys."""

    amount: int
    debt_recovered: int
    fee: int
    fee_tax: int
    service_charge: int
    service_tax: int
    energy_gross: int
    energy_tax: int
    change_in: int
    change_out: int
    credit_unit: CreditUnit
    credit_value: int
    credit_amount: int
    wh: int

    @property
    def tax(self) -> int:
        return self.fee_tax + self.service_tax + self.energy_tax

    @property
    def energy_net(self) -> int:
        return self.energy_gross - self.energy_tax

    def document(self) -> dict[str, int | str]:
        return {
            "amount": self.amount,
            "debt_recovered": self.debt_recovered,
            "fee": self.fee,
            "service_charge": self.service_charge,
            "tax": self.tax,
            "energy_gross": self.energy_gross,
            "energy_net": self.energy_net,
            "change_in": self.change_in,
            "change_out": self.change_out,
            "credit_unit": self.credit_unit,
            "credit_value": self.credit_value,
            "credit_amount": self.credit_amount,
            "wh": self.wh,
        }


def _steps(tariff: TariffRecord) -> list[tuple[int | None, int]]:
    """(the month's Wh where the step ends, None: never; price per kWh), in order."""
    if tariff.blocks:
        return [(b.upto_wh, b.price) for b in tariff.blocks] + [(None, tariff.prices[0])]
    return [(None, tariff.prices[0])]


def cost_milli(tariff: TariffRecord, month_wh: int, wh: int) -> int:
    """The cost of ``wh`` more Wh after ``month_wh`` this month, in thousandths of a minor
    unit (exact)."""
    total, position, left = 0, month_wh, wh
    for upto, price in _steps(tariff):
        if left == 0:
            break
        if upto is not None and position >= upto:
            continue
        room = left if upto is None else min(left, upto - position)
        total += room * price
        position += room
        left -= room
    return total


def energy_for(tariff: TariffRecord, month_wh: int, money: int) -> int:
    """The most whole Wh ``money`` minor units buy after ``month_wh`` this month."""
    budget, position, wh = money * WH_PER_KWH, month_wh, 0
    for upto, price in _steps(tariff):
        if upto is not None and position >= upto:
            continue
        if price == 0:
            if upto is None:
                raise NotPriceable(
                    f"tariff {tariff.tariff_id} gives energy away: it cannot price an energy credit"
                )
            wh += upto - position
            position = upto
            continue
        room = None if upto is None else upto - position
        affordable = budget // price
        if room is not None and affordable >= room:
            wh += room
            budget -= room * price
            position += room
            continue
        return wh + affordable
    raise AssertionError("the last step has no limit")  # pragma: no cover


def check_amount(tariff: TariffRecord, amount: int) -> None:
    if type(amount) is not int or amount <= 0:
        raise AmountOutOfBounds(f"an amount is a positive integer of minor units, got {amount!r}")
    if amount < tariff.min_vend:
        raise AmountOutOfBounds(
            f"{amount} is below tariff {tariff.tariff_id}'s minimum vend {tariff.min_vend}"
        )
    if tariff.max_vend is not None and amount > tariff.max_vend:
        raise AmountOutOfBounds(
            f"{amount} is above tariff {tariff.tariff_id}'s maximum vend {tariff.max_vend}"
        )


def split(tariff: TariffRecord, amount: int, situation: Situation) -> Split:
    """Split ``amount`` (minor units, in the tariff's currency) as the module says."""
    check_amount(tariff, amount)
    debt_recovered = min(situation.debt, amount * tariff.debt_share_bp // BASIS_POINTS)
    left = amount - debt_recovered
    fee = min(left, tariff.fee)
    left -= fee
    service = min(left, max(0, tariff.service_charge - situation.service_paid))
    energy_gross = left - service
    energy_tax = vat_included(energy_gross, tariff.vat_bp)
    money = energy_gross - energy_tax + situation.change
    if situation.credit_unit == "money":
        # what the money buys, for the record and the block position (0 where energy is free)
        free = _steps(tariff)[-1][1] == 0
        wh = 0 if free else energy_for(tariff, situation.month_wh, money)
        value, credit, change_out = money, money, 0
    else:
        wh = energy_for(tariff, situation.month_wh, money)
        wh -= wh % situation.step_wh
        value = -(-cost_milli(tariff, situation.month_wh, wh) // WH_PER_KWH)
        credit, change_out = wh, money - value
    return Split(
        amount=amount,
        debt_recovered=debt_recovered,
        fee=fee,
        fee_tax=vat_included(fee, tariff.vat_bp),
        service_charge=service,
        service_tax=vat_included(service, tariff.vat_bp),
        energy_gross=energy_gross,
        energy_tax=energy_tax,
        change_in=situation.change,
        change_out=change_out,
        credit_unit=situation.credit_unit,
        credit_value=value,
        credit_amount=credit,
        wh=wh,
    )


__all__ = [
    "AmountOutOfBounds",
    "Code",
    "NotPriceable",
    "PaymentRefused",
    "Situation",
    "Split",
    "check_amount",
    "cost_milli",
    "energy_for",
    "receipt_text",
    "split",
    "vat_included",
]


def receipt_text(payment: dict[str, Any], state: str = "accepted", *, reprint: bool = False) -> str:
    """A payment's receipt as plain text, from its stored answer (see the storage's
    ``pay``): every line of the split, the credit, the token, the receipt number."""
    scale = int(payment["currency_scale"])
    currency = str(payment["currency"])
    parts = payment["split"]

    def money(minor: int) -> str:
        return f"{decimal_text(int(minor), scale)} {currency}"

    lines = [
        f"RECEIPT {int(payment['receipt']):08d}",
        f"date        {payment['paid_at']}",
        f"channel     {payment['channel']}   reference {payment['reference']}",
        f"account     {payment['account']}   meter {payment['meter']}",
        f"tariff      {payment['tariff']}",
        f"amount paid {money(parts['amount'])}",
        f"fee         {money(parts['fee'])}",
        f"service     {money(parts['service_charge'])}",
        f"debt        {money(parts['debt_recovered'])}",
        f"VAT incl.   {money(parts['tax'])}",
    ]
    if parts["credit_unit"] == "energy":
        lines.append(
            f"credit      {decimal_text(int(parts['credit_amount']), -3)} kWh"
            f" ({money(parts['credit_value'])})"
        )
    else:
        lines.append(f"credit      {money(parts['credit_amount'])}")
    if parts["change_out"]:
        lines.append(f"change held {money(parts['change_out'])}")
    token = payment.get("token")
    if token:
        lines.append(f"TOKEN       {' '.join(token[i : i + 4] for i in range(0, 20, 4))}")
    delivery = payment.get("delivery")
    if delivery and delivery["kind"] == "transfer":
        lines.append(f"transfer    no. {delivery['number']} to the meter")
    if state == "reversed":
        lines.append("REVERSED")
    if reprint:
        lines.append("REPRINT (the same token: no new one was issued)")
    return "\n".join(lines) + "\n"
