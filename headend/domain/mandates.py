"""Auto-debit mandates: how much one crossing of the low threshold charges. Pure.

A mandate pays either a **fixed** amount, or (mode **topup**) what brings the meter's money
credit up to its amount; never more than what is left of its monthly cap. A charge of nothing
(the cap reached, or a credit already at the top-up level) is recorded and pays nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal

from protocols.errors import ValidationError

Mode = Literal["fixed", "topup"]
MODES: Final = ("fixed", "topup")


def mandate_mode(text: str) -> Mode:
    for mode in MODES:
        if mode == text:
            return mode
    raise ValidationError(f"--mode is one of {', '.join(MODES)}, got {text!r}")


@dataclass(frozen=True, slots=True)
class MandateTerms:
    mode: Mode
    amount: int  # minor units: the payment (fixed) or the credit to top up to (topup)
    monthly_cap: int  # minor units paid in a calendar month at most

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValidationError(f"--mode is one of {', '.join(MODES)}")
        if type(self.amount) is not int or self.amount <= 0:
            raise ValidationError(f"--amount is more than zero, got {self.amount!r}")
        if type(self.monthly_cap) is not int or self.monthly_cap < self.amount:
            raise ValidationError(
                f"--cap is at least the amount ({self.amount}), got {self.monthly_cap!r}"
            )


def charge_amount(terms: MandateTerms, credit: int, paid_this_month: int) -> int:
    """What one crossing charges, given the meter's credit (minor units, for a top-up) and
    what the mandate paid this month already."""
    wanted = terms.amount if terms.mode == "fixed" else max(0, terms.amount - max(0, credit))
    return max(0, min(wanted, terms.monthly_cap - paid_this_month))


def month_of(at: datetime) -> str:
    """The calendar month (UTC) a charge counts against its cap in."""
    return at.strftime("%Y-%m")


def charge_reference(mandate_id: int, meter_id: str, meter_time: int) -> str:
    """The payment reference of the charge for the crossing seen at ``meter_time``: one
    crossing, one reference, so a charge is never made twice."""
    return f"AD-{mandate_id}-{meter_id}-{meter_time}"


__all__ = [
    "MODES",
    "MandateTerms",
    "Mode",
    "charge_amount",
    "charge_reference",
    "mandate_mode",
    "month_of",
]
