"""The token CRC: CRC-16, reflected polynomial 0xA001, initial 0xFFFF, result bytes swapped.

It covers the 50 bits CLASS | SUBCLASS | RND | TID | AMOUNT (or the class and the 48 data bits of
any other token), taken as 7 bytes big-endian.
"""

from __future__ import annotations

from protocols.errors import ValidationError


def _table() -> tuple[int, ...]:
    rows = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        rows.append(crc)
    return tuple(rows)


_TABLE = _table()


def token_crc(bits50: int) -> int:
    """The 16-bit CRC of the 50 bits CLASS | data (the class in bits 49..48)."""
    if not 0 <= bits50 < 1 << 50:
        raise ValidationError(f"the CRC covers 50 bits, got {bits50:#x}")
    crc = 0xFFFF
    for byte in bits50.to_bytes(7, "big"):
        crc = (crc >> 8) ^ _TABLE[(crc ^ byte) & 0xFF]
    return (crc & 0xFF) << 8 | crc >> 8
