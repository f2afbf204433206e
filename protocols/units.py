"""Units, scalers and money. Energy is integer Wh; money is integer minor units of a currency."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Self

from protocols.errors import ValidationError


class Unit(IntEnum):
    """DLMS unit enumeration values (IEC 62056-6-2, the subset a prepaid meter uses)."""

    SECOND = 7
    WATT = 27
    VOLT_AMPERE = 28
    WATT_HOUR = 30
    AMPERE = 33
    VOLT = 35
    HERTZ = 44
    CURRENCY = 10  # "local currency" in the DLMS unit table
    COUNT = 255  # "other unit"; used for dimensionless counters and ratios
    NONE = 0

    @property
    def symbol(self) -> str:
        return _SYMBOLS[self]


_SYMBOLS = {
    Unit.SECOND: "s",
    Unit.WATT: "W",
    Unit.VOLT_AMPERE: "VA",
    Unit.WATT_HOUR: "Wh",
    Unit.AMPERE: "A",
    Unit.VOLT: "V",
    Unit.HERTZ: "Hz",
    Unit.CURRENCY: "currency",
    Unit.COUNT: "",
    Unit.NONE: "",
}


@dataclass(frozen=True, slots=True)
class ScalerUnit:
    """A register's scaler (power of ten, int8) and unit: physical value = value * 10**scaler."""

    scaler: int
    unit: Unit

    def __post_init__(self) -> None:
        if type(self.scaler) is not int or not -128 <= self.scaler <= 127:
            raise ValidationError(f"a scaler is an int8, got {self.scaler!r}")

    def render(self, value: int) -> str:
        """Exact decimal text of ``value * 10**scaler`` with the unit symbol; no float involved."""
        text = decimal_text(value, self.scaler)
        symbol = self.unit.symbol
        return f"{text} {symbol}" if symbol else text


def decimal_text(value: int, scaler: int) -> str:
    """``value * 10**scaler`` as exact decimal text."""
    if scaler >= 0:
        return str(value * 10**scaler)
    sign = "-" if value < 0 else ""
    digits = str(abs(value)).rjust(-scaler + 1, "0")
    return f"{sign}{digits[:scaler]}.{digits[scaler:]}"


_CURRENCY = re.compile(r"^[A-Z]{3}$")


@dataclass(frozen=True, slots=True, order=True)
class Money:
    """An amount in integer minor units (cents) of an ISO 4217 currency. Never a float."""

    minor: int
    currency: str
    exponent: int = 2

    def __post_init__(self) -> None:
        if type(self.minor) is not int:
            raise ValidationError(f"money is an integer of minor units, got {self.minor!r}")
        if not isinstance(self.currency, str) or not _CURRENCY.match(self.currency):
            raise ValidationError(f"a currency is a 3-letter ISO 4217 code, got {self.currency!r}")
        if type(self.exponent) is not int or not 0 <= self.exponent <= 4:
            raise ValidationError(f"a currency exponent is 0..4, got {self.exponent!r}")

    @classmethod
    def parse(cls, text: str, currency: str, exponent: int = 2) -> Self:
        """Parse a decimal amount such as ``"12.50"`` exactly; too many decimals is an error."""
        match = re.fullmatch(r"(-?)(\d+)(?:\.(\d+))?", text.strip())
        if match is None:
            raise ValidationError(f"not an amount: {text!r}")
        sign, whole, frac = match.groups()
        frac = frac or ""
        if len(frac) > exponent:
            raise ValidationError(f"{text!r} has more than {exponent} decimals for {currency}")
        minor = int(whole) * 10**exponent + int(frac.ljust(exponent, "0") or "0")
        return cls(-minor if sign else minor, currency, exponent)

    def _check(self, other: Money) -> None:
        if (other.currency, other.exponent) != (self.currency, self.exponent):
            raise ValidationError(f"cannot combine {self.currency} with {other.currency}")

    def __add__(self, other: Money) -> Money:
        self._check(other)
        return Money(self.minor + other.minor, self.currency, self.exponent)

    def __sub__(self, other: Money) -> Money:
        self._check(other)
        return Money(self.minor - other.minor, self.currency, self.exponent)

    def __neg__(self) -> Money:
        return Money(-self.minor, self.currency, self.exponent)

    def __str__(self) -> str:
        amount = decimal_text(self.minor, -self.exponent) if self.exponent else str(self.minor)
        return f"{amount} {self.currency}"


@dataclass(frozen=True, slots=True, order=True)
class Energy:
    """An amount of active energy in integer Wh."""

    wh: int

    def __post_init__(self) -> None:
        if type(self.wh) is not int:
            raise ValidationError(f"energy is an integer of Wh, got {self.wh!r}")

    @classmethod
    def parse_kwh(cls, text: str) -> Self:
        """Parse ``"12.5"`` kWh exactly into Wh; more than 3 decimals is an error."""
        match = re.fullmatch(r"(\d+)(?:\.(\d{1,3}))?", text.strip())
        if match is None:
            raise ValidationError(f"not an amount of kWh: {text!r}")
        whole, frac = match.groups()
        return cls(int(whole) * 1000 + int((frac or "").ljust(3, "0")))

    def __str__(self) -> str:
        return f"{decimal_text(self.wh, -3)} kWh"
