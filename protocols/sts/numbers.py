"""Meter numbers (DRN), the Luhn check digit, the PAN and the 16-digit PAN block.

* An 11-digit meter number = manufacturer code (2) + serial (8) + Luhn check digit; a 13-digit one
  = manufacturer code (4) + serial (8) + Luhn check digit.
* PAN = IIN + DRN + Luhn check digit: IIN "600727" for an 11-digit DRN, "0000" for a 13-digit one.
* The PAN block used for key derivation: the last 5 digits of a 6-digit IIN + the 11-digit DRN,
  or the last 3 digits of "0000" + the 13-digit DRN; that is always digits 2..17 of the PAN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

from protocols.errors import ValidationError

IIN_11 = "600727"
IIN_13 = "0000"


def luhn_check_digit(payload: str) -> str:
    """The Luhn check digit that completes ``payload`` (a string of decimal digits)."""
    if not payload.isascii() or not payload.isdigit():
        raise ValidationError(f"a Luhn payload is decimal digits, got {payload!r}")
    total = 0
    for index, char in enumerate(reversed(payload)):
        digit = int(char)
        if index % 2 == 0:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return str((10 - total % 10) % 10)


def luhn_valid(digits: str) -> bool:
    """True when the last digit of ``digits`` is the Luhn check digit of the others."""
    if len(digits) < 2 or not digits.isascii() or not digits.isdigit():
        return False
    return luhn_check_digit(digits[:-1]) == digits[-1]


@dataclass(frozen=True, slots=True)
class MeterNumber:
    """A decoder reference number (DRN): 11 or 13 digits, the last one a Luhn check digit."""

    digits: str

    def __post_init__(self) -> None:
        if len(self.digits) not in (11, 13) or not luhn_valid(self.digits):
            raise ValidationError(f"not a meter number (11 or 13 digits, Luhn): {self.digits!r}")

    @classmethod
    def make(cls, manufacturer: str, serial: str) -> Self:
        """A DRN from a 2- or 4-digit manufacturer code and an 8-digit serial."""
        if len(manufacturer) not in (2, 4) or len(serial) != 8:
            raise ValidationError("a DRN is a 2- or 4-digit manufacturer code and 8 serial digits")
        payload = manufacturer + serial
        return cls(payload + luhn_check_digit(payload))

    @property
    def manufacturer_code(self) -> str:
        return self.digits[: len(self.digits) - 9]

    @property
    def serial(self) -> str:
        return self.digits[-9:-1]

    @property
    def iin(self) -> str:
        """The issuer identification number this DRN takes in a PAN."""
        return IIN_11 if len(self.digits) == 11 else IIN_13

    def __str__(self) -> str:
        return self.digits


@dataclass(frozen=True, slots=True)
class Pan:
    """An 18-digit primary account number: IIN + DRN + Luhn check digit."""

    digits: str

    def __post_init__(self) -> None:
        if len(self.digits) != 18 or not luhn_valid(self.digits):
            raise ValidationError(f"not a PAN (18 digits, Luhn): {self.digits!r}")

    @classmethod
    def from_drn(cls, drn: MeterNumber | str, iin: str | None = None) -> Self:
        """The PAN of a meter number; ``iin`` defaults to "600727" (11 digits) or "0000" (13)."""
        number = drn if isinstance(drn, MeterNumber) else MeterNumber(drn)
        iin = number.iin if iin is None else iin
        if len(iin) + len(number.digits) != 17 or not iin.isascii() or not iin.isdigit():
            raise ValidationError(
                "the IIN is 6 digits with an 11-digit DRN and 4 digits with a 13-digit DRN"
            )
        payload = iin + number.digits
        return cls(payload + luhn_check_digit(payload))

    @classmethod
    def parse(cls, text: str) -> Self:
        """An 18-digit PAN, or an 11- or 13-digit DRN (which gets its standard IIN)."""
        digits = text.strip()
        if len(digits) == 18:
            return cls(digits)
        if len(digits) in (11, 13):
            return cls.from_drn(digits)
        raise ValidationError(f"a PAN is 18 digits or a DRN 11 or 13 digits, got {text!r}")

    @property
    def block(self) -> str:
        """The 16-digit PAN block used by DKGA02."""
        return self.digits[1:17]

    def __str__(self) -> str:
        return self.digits
