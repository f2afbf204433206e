"""Why a 20-digit token does not decode.

Every failure of :func:`protocols.sts.decode_token` is a :class:`TokenDecodeError`, a
:class:`protocols.errors.DecodeError`, whose ``reason`` says what was wrong::

    DecodeError
    └── TokenDecodeError      reason: FORMAT, CLASS, SUBCLASS, CRC or FIELD
"""

from __future__ import annotations

from enum import StrEnum

from protocols.errors import DecodeError


class TokenFault(StrEnum):
    """What was wrong with a token that did not decode."""

    FORMAT = "format"  # not 20 decimal digits, or a number of more than 66 bits
    CLASS = "class"  # token class 3 (reserved)
    SUBCLASS = "subclass"  # a subclass this codec does not carry
    CRC = "crc"  # the CRC does not match: a typing error, or a token made for another key
    FIELD = "field"  # a reserved bit is set


class TokenDecodeError(DecodeError):
    """A token that does not decode; ``reason`` is the :class:`TokenFault`."""

    def __init__(self, reason: TokenFault, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
