"""OBIS codes (IEC 62056-6-1): six value groups A-B:C.D.E*F, each 0..255."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Self

from protocols.errors import ValidationError

_DOTTED = re.compile(r"^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$")
_REDUCED = re.compile(r"^(\d{1,3})-(\d{1,3}):(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?:\*(\d{1,3}))?$")


@dataclass(frozen=True, slots=True, order=True)
class Obis:
    """A logical name. Ordered by its groups, hashable, printed as ``1.0.1.8.0.255``."""

    a: int
    b: int
    c: int
    d: int
    e: int
    f: int = 255

    def __post_init__(self) -> None:
        for name in ("a", "b", "c", "d", "e", "f"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= 255:
                raise ValidationError(
                    f"OBIS group {name.upper()} must be an int 0..255, got {value!r}"
                )

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse ``1.0.1.8.0.255``, ``1-0:1.8.0*255`` or ``1-0:1.8.0`` (F defaults to 255)."""
        if not isinstance(text, str):
            raise ValidationError(f"an OBIS code is text, got {type(text).__name__}")
        stripped = text.strip()
        match = _DOTTED.match(stripped) or _REDUCED.match(stripped)
        if match is None:
            raise ValidationError(f"not an OBIS code: {text!r}")
        groups = [int(g) if g is not None else 255 for g in match.groups()]
        return cls(*groups)

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """The 6-byte octet-string form used on the wire."""
        if len(data) != 6:
            raise ValidationError(f"an OBIS octet string has 6 bytes, got {len(data)}")
        return cls(*data)

    def to_bytes(self) -> bytes:
        return bytes((self.a, self.b, self.c, self.d, self.e, self.f))

    def reduced(self) -> str:
        """The IEC 62056-21 form ``A-B:C.D.E*F``."""
        return f"{self.a}-{self.b}:{self.c}.{self.d}.{self.e}*{self.f}"

    def __str__(self) -> str:
        return f"{self.a}.{self.b}.{self.c}.{self.d}.{self.e}.{self.f}"
