"""The Standard Transfer Algorithm (STA, EA07): a 64-bit block cipher with a 64-bit key.

Sixteen rounds; each round passes the 16 nibbles of the block through one of two 4-bit S-boxes
(chosen per nibble by a bit of the round key) and then permutes the 64 bits. The round key starts
as the complemented decoder key rotated right by 12 bits and rotates left by one bit per round.

The S-boxes and the permutation are data: :class:`StaTables` holds them, validated, with
lookup tables precomputed; pass your own to :func:`sta_encrypt` / :func:`sta_decrypt` to replace
the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocols.errors import ValidationError

MASK64 = (1 << 64) - 1

DEFAULT_S1 = (14, 10, 7, 9, 12, 3, 2, 5, 13, 0, 15, 1, 4, 8, 6, 11)
DEFAULT_S2 = (12, 8, 2, 13, 7, 6, 1, 3, 11, 5, 9, 15, 0, 4, 10, 14)
#: input bit j goes to output bit DEFAULT_PERMUTATION[j]
DEFAULT_PERMUTATION = (
    55, 42, 10, 18, 24, 21, 44, 35, 2, 22, 56, 43, 27, 58, 9, 50,
    6, 36, 12, 61, 37, 38, 53, 16, 62, 3, 7, 4, 32, 20, 63, 25,
    51, 52, 54, 33, 49, 19, 46, 29, 48, 31, 23, 30, 41, 28, 13, 5,
    40, 60, 39, 11, 15, 17, 1, 0, 57, 34, 59, 8, 47, 14, 45, 26,
)  # fmt: skip

_ByteTable = tuple[tuple[int, ...], ...]


def _inverse(table: tuple[int, ...]) -> tuple[int, ...]:
    result = [0] * len(table)
    for index, value in enumerate(table):
        result[value] = index
    return tuple(result)


def _substitution_tables(low: tuple[int, ...], high: tuple[int, ...]) -> tuple[int, ...]:
    """For one byte: the low nibble through ``low`` and the high nibble through ``high``."""
    return tuple(high[b >> 4] << 4 | low[b & 15] for b in range(256))


def _permutation_tables(permutation: tuple[int, ...]) -> _ByteTable:
    """For each byte position: the permuted bits of each byte value, as a 64-bit mask."""
    tables = []
    for position in range(8):
        row = []
        for value in range(256):
            out = 0
            for bit in range(8):
                if value >> bit & 1:
                    out |= 1 << permutation[position * 8 + bit]
            row.append(out)
        tables.append(tuple(row))
    return tuple(tables)


@dataclass(frozen=True, slots=True)
class StaTables:
    """The cipher's two S-boxes and bit permutation. Nibble i uses ``s2`` when bit 4i+3 of the
    round key is set, ``s1`` otherwise; bit j of the block moves to bit ``permutation[j]``."""

    s1: tuple[int, ...] = DEFAULT_S1
    s2: tuple[int, ...] = DEFAULT_S2
    permutation: tuple[int, ...] = DEFAULT_PERMUTATION
    # precomputed: substitution per byte for the 4 choices of the two key bits, and their inverses
    _sub: _ByteTable = field(init=False, repr=False, compare=False)
    _inv_sub: _ByteTable = field(init=False, repr=False, compare=False)
    _perm: _ByteTable = field(init=False, repr=False, compare=False)
    _inv_perm: _ByteTable = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("s1", "s2"):
            box = tuple(getattr(self, name))
            if sorted(box) != list(range(16)):
                raise ValidationError(f"STA {name} must be a permutation of 0..15")
            object.__setattr__(self, name, box)
        permutation = tuple(self.permutation)
        if sorted(permutation) != list(range(64)):
            raise ValidationError("the STA permutation must be a permutation of 0..63")
        object.__setattr__(self, "permutation", permutation)
        boxes = (self.s1, self.s2)
        inverse_boxes = (_inverse(self.s1), _inverse(self.s2))
        # choice bit 0 picks the low nibble's box, bit 1 the high nibble's
        sub = tuple(_substitution_tables(boxes[c & 1], boxes[c >> 1]) for c in range(4))
        inv_sub = tuple(
            _substitution_tables(inverse_boxes[c & 1], inverse_boxes[c >> 1]) for c in range(4)
        )
        object.__setattr__(self, "_sub", sub)
        object.__setattr__(self, "_inv_sub", inv_sub)
        object.__setattr__(self, "_perm", _permutation_tables(permutation))
        object.__setattr__(self, "_inv_perm", _permutation_tables(_inverse(permutation)))


DEFAULT_TABLES = StaTables()


def _rotate_right(value: int, count: int) -> int:
    count %= 64
    return (value >> count | value << (64 - count)) & MASK64


def _rotate_left(value: int, count: int) -> int:
    return _rotate_right(value, 64 - count % 64)


def _check(name: str, value: int) -> None:
    if type(value) is not int or not 0 <= value <= MASK64:
        raise ValidationError(f"the STA {name} is a 64-bit unsigned integer, got {value!r}")


def _substitute(block: int, key: int, tables: _ByteTable) -> int:
    out = 0
    for position in range(8):
        shift = position * 8
        choice = (key >> (shift + 3) & 1) | (key >> (shift + 7) & 1) << 1
        out |= tables[choice][block >> shift & 0xFF] << shift
    return out


def _permute(block: int, tables: _ByteTable) -> int:
    out = 0
    for position in range(8):
        out |= tables[position][block >> (position * 8) & 0xFF]
    return out


def sta_encrypt(key: int, block: int, tables: StaTables = DEFAULT_TABLES) -> int:
    """Encrypt a 64-bit block with the 64-bit decoder key."""
    _check("key", key)
    _check("block", block)
    round_key = _rotate_right(~key & MASK64, 12)
    for _ in range(16):
        block = _permute(_substitute(block, round_key, tables._sub), tables._perm)
        round_key = _rotate_left(round_key, 1)
    return block


def sta_decrypt(key: int, block: int, tables: StaTables = DEFAULT_TABLES) -> int:
    """Decrypt a 64-bit block with the 64-bit decoder key (the inverse of :func:`sta_encrypt`)."""
    _check("key", key)
    _check("block", block)
    round_key = _rotate_left(_rotate_right(~key & MASK64, 12), 15)
    for _ in range(16):
        block = _substitute(_permute(block, tables._inv_perm), round_key, tables._inv_sub)
        round_key = _rotate_right(round_key, 1)
    return block
