"""Register map data types and value codecs: how one value sits in 16-bit registers.

A :class:`Row` names one exposed value (table, address, :class:`DataType`, scaler, unit, access,
COSEM attribute); :func:`encode_value` and :func:`decode_value` turn a value into the row's
registers and back, in either word order. The table itself is in
:mod:`protocols.registermap.table`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any, Final, Literal

from protocols.errors import DecodeError, ValidationError
from protocols.obis import Obis

#: bumped whenever an address, type or meaning in the table changes
MAP_VERSION: Final = 2
#: the constant in the ``order_probe`` register pair
ORDER_PROBE: Final = 0x0102_0304

WordOrder = Literal["big", "little"]
WORD_ORDERS: Final[tuple[WordOrder, ...]] = ("big", "little")

#: most registers one read (03/04) may return
MAX_READ: Final = 125
#: most registers one write (16) may carry
MAX_WRITE: Final = 123


class Table(StrEnum):
    INPUT = "input"  # function 04, read-only
    HOLDING = "holding"  # functions 03, 06, 16, 23

    @property
    def read_function(self) -> int:
        return 4 if self is Table.INPUT else 3


class Access(StrEnum):
    READ = "r"
    READ_WRITE = "rw"


class DataType(StrEnum):
    U16 = "u16"
    U32 = "u32"
    U64 = "u64"
    I16 = "i16"
    I32 = "i32"
    I64 = "i64"
    F32 = "f32"
    STRING = "string"  # UTF-8, NUL padded, two characters per register, first in the high byte
    DEC20 = "dec20"  # 20 decimal digits: five registers of four digits, most significant first
    OCTETS = "octets"  # raw bytes, two per register, first in the high byte

    @property
    def fixed_size(self) -> int | None:
        return _FIXED_SIZE.get(self)


_FIXED_SIZE: dict[DataType, int] = {
    DataType.U16: 1,
    DataType.U32: 2,
    DataType.U64: 4,
    DataType.I16: 1,
    DataType.I32: 2,
    DataType.I64: 4,
    DataType.F32: 2,
    DataType.DEC20: 5,
}
INTEGER_TYPES = frozenset(
    {DataType.U16, DataType.U32, DataType.U64, DataType.I16, DataType.I32, DataType.I64}
)
_SIGNED = frozenset({DataType.I16, DataType.I32, DataType.I64})
DEC20_MAX: Final = 10**20 - 1


class Block(StrEnum):
    """Groups of adjacent rows that a master reads (or writes) in one request."""

    IDENTIFICATION = "identification"
    MEASUREMENTS = "measurements"
    ACCOUNT = "account"
    STATUS = "status"
    FLOATS = "floats"
    SETTINGS = "settings"
    COMMAND = "command"
    RESULT = "result"
    PROFILE_WINDOW = "profile_window"
    EVENT_WINDOW = "event_window"
    TOKEN_GATEWAY = "token_gateway"


@dataclass(frozen=True, slots=True)
class Row:
    """One exposed value."""

    name: str
    block: Block
    table: Table
    address: int
    dtype: DataType
    description: str
    unit: str = ""
    scaler: int = 0
    access: Access = Access.READ
    obis: Obis | None = None
    attribute: int | None = None
    element: int | None = None  # index into a structure-valued attribute
    length: int = 0  # registers of a STRING or OCTETS row
    minimum: int | None = None  # accepted range of a written value (beyond the type's)
    maximum: int | None = None
    enum: type[IntEnum] | None = None
    optional: bool = False  # may read as the "not implemented" sentinel

    def __post_init__(self) -> None:
        fixed = self.dtype.fixed_size
        if fixed is None and self.length < 1:
            raise ValidationError(f"row {self.name}: a {self.dtype} row needs a length")
        if fixed is not None and self.length not in (0, fixed):
            raise ValidationError(f"row {self.name}: a {self.dtype} has {fixed} registers")
        if not 0 <= self.address <= 0xFFFF - self.size + 1:
            raise ValidationError(f"row {self.name}: address {self.address} out of range")
        if self.dtype is DataType.F32 and (
            self.block is not Block.FLOATS or self.access is not Access.READ
        ):
            raise ValidationError(f"row {self.name}: f32 is for read-only measurements only")
        if self.access is Access.READ_WRITE and self.table is Table.INPUT:
            raise ValidationError(f"row {self.name}: input registers are read-only")
        if (self.obis is None) != (self.attribute is None):
            raise ValidationError(f"row {self.name}: OBIS code and attribute go together")

    @property
    def size(self) -> int:
        """Registers the row occupies."""
        fixed = self.dtype.fixed_size
        return fixed if fixed is not None else self.length

    @property
    def end(self) -> int:
        """First address after the row."""
        return self.address + self.size

    @property
    def writable(self) -> bool:
        return self.access is Access.READ_WRITE


# -- the value codecs -----------------------------------------------------------------------------


def _int_range(dtype: DataType) -> tuple[int, int]:
    bits = 16 * _FIXED_SIZE[dtype]
    if dtype in _SIGNED:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def sentinel(dtype: DataType) -> int | float | None:
    """The "not implemented" value of a type (None for strings and octets, which have none)."""
    if dtype in INTEGER_TYPES:
        low, high = _int_range(dtype)
        return low if dtype in _SIGNED else high
    if dtype is DataType.F32:
        return math.nan
    if dtype is DataType.DEC20:
        return None
    return None


def _words(data: bytes) -> list[int]:
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


def _ordered(registers: list[int], order: WordOrder) -> list[int]:
    return registers if order == "big" else registers[::-1]


def check_order(order: str) -> WordOrder:
    if order == "big":
        return "big"
    if order == "little":
        return "little"
    raise ValidationError(f"word order is big or little, got {order!r}")


def encode_value(row: Row, value: Any, order: WordOrder = "big") -> list[int]:
    """The registers of ``value`` in ``row``; ``None`` encodes the "not implemented" sentinel of
    an optional row. Raises ValidationError for a value the row cannot carry."""
    order = check_order(order)
    dtype = row.dtype
    if value is None:
        if not row.optional:
            raise ValidationError(f"{row.name} is required")
        if dtype is DataType.DEC20:
            return [0xFFFF] * 5
        if dtype is DataType.F32:
            return _ordered(_words(struct.pack(">f", math.nan)), order)
        filler = sentinel(dtype)
        if filler is None:
            raise ValidationError(f"{row.name}: a {dtype} has no sentinel")
        return encode_value(_required(row), filler, order)
    if dtype in INTEGER_TYPES:
        number = _as_int(row, value)
        low, high = _int_range(dtype)
        if row.optional:
            if dtype in _SIGNED:
                low += 1
            else:
                high -= 1
        if not low <= number <= high:
            raise ValidationError(f"{row.name} is a {dtype} {low}..{high}, got {number}")
        size = _FIXED_SIZE[dtype]
        raw = number.to_bytes(2 * size, "big", signed=dtype in _SIGNED)
        return _ordered(_words(raw), order)
    if dtype is DataType.F32:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValidationError(f"{row.name} is a number, got {value!r}")
        number_f = float(value)
        if not math.isfinite(number_f):
            raise ValidationError(f"{row.name} must be finite, got {value!r}")
        try:
            raw = struct.pack(">f", number_f)
        except OverflowError as exc:
            raise ValidationError(f"{row.name}: {value!r} does not fit an f32") from exc
        return _ordered(_words(raw), order)
    if dtype is DataType.DEC20:
        number = _as_int(row, value)
        if not 0 <= number <= DEC20_MAX:
            raise ValidationError(f"{row.name} has 20 decimal digits, got {number}")
        digits = f"{number:020d}"
        return [int(digits[i : i + 4]) for i in range(0, 20, 4)]
    if dtype is DataType.STRING:
        if not isinstance(value, str):
            raise ValidationError(f"{row.name} is text, got {value!r}")
        if "\0" in value:
            raise ValidationError(f"{row.name} cannot hold a NUL character")
        data = value.encode("utf-8")
        if len(data) > 2 * row.length:
            raise ValidationError(f"{row.name} holds {2 * row.length} bytes, got {len(data)}")
        return _words(data.ljust(2 * row.length, b"\0"))
    # octets
    if not isinstance(value, bytes):
        raise ValidationError(f"{row.name} is bytes, got {value!r}")
    if value == b"":
        return [0] * row.length
    if len(value) != 2 * row.length:
        raise ValidationError(f"{row.name} holds {2 * row.length} bytes, got {len(value)}")
    return _words(value)


def _required(row: Row) -> Row:
    return Row(
        row.name, row.block, row.table, row.address, row.dtype, row.description, length=row.length
    )


def _as_int(row: Row, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{row.name} is an integer, got {value!r}")
    return int(value)


def decode_value(row: Row, registers: Sequence[int], order: WordOrder = "big") -> Any:
    """The value in ``registers`` (exactly ``row.size`` of them, each 0..65535).

    Returns an int (an enum member for enum rows), a float, a str or bytes, or None for the
    sentinel of an optional row. Raises DecodeError for anything else; never another exception.
    """
    order = check_order(order)
    regs = _check_registers(row, registers)
    dtype = row.dtype
    if dtype in INTEGER_TYPES:
        raw = b"".join(r.to_bytes(2, "big") for r in _ordered(regs, order))
        number = int.from_bytes(raw, "big", signed=dtype in _SIGNED)
        if row.optional and number == sentinel(dtype):
            return None
        if row.enum is not None:
            try:
                return row.enum(number)
            except ValueError as exc:
                raise DecodeError(f"{row.name}: {number} is no {row.enum.__name__}") from exc
        return number
    if dtype is DataType.F32:
        raw = b"".join(r.to_bytes(2, "big") for r in _ordered(regs, order))
        (number_f,) = struct.unpack(">f", raw)
        if math.isnan(number_f):
            if row.optional:
                return None
            raise DecodeError(f"{row.name} reads as not implemented")
        if not math.isfinite(number_f):
            raise DecodeError(f"{row.name} is not finite")
        return float(number_f)
    if dtype is DataType.DEC20:
        if row.optional and all(r == 0xFFFF for r in regs):
            return None
        if any(r > 9999 for r in regs):
            raise DecodeError(f"{row.name}: a digit group is 0..9999, got {list(regs)}")
        return int("".join(f"{r:04d}" for r in regs))
    data = b"".join(r.to_bytes(2, "big") for r in regs)
    if dtype is DataType.STRING:
        text = data.rstrip(b"\0")
        if b"\0" in text:
            raise DecodeError(f"{row.name}: NUL inside the text")
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"{row.name} is not UTF-8") from exc
    return b"" if not any(data) else data


def _check_registers(row: Row, registers: Sequence[int]) -> list[int]:
    regs = list(registers)
    if len(regs) != row.size:
        raise DecodeError(f"{row.name} has {row.size} registers, got {len(regs)}")
    for reg in regs:
        if type(reg) is not int or not 0 <= reg <= 0xFFFF:
            raise DecodeError(f"{row.name}: a register is 0..65535, got {reg!r}")
    return regs


def check_written(row: Row, registers: Sequence[int], order: WordOrder = "big") -> Any:
    """The value a master writes to ``row``, or ValidationError (exception 03) when the row's
    range or enumeration refuses it. Decoding problems are ValidationError too."""
    try:
        value = decode_value(row, registers, order)
    except DecodeError as exc:
        raise ValidationError(str(exc)) from exc
    if isinstance(value, int) and not isinstance(value, bool):
        if row.minimum is not None and value < row.minimum:
            raise ValidationError(f"{row.name} is at least {row.minimum}, got {value}")
        if row.maximum is not None and value > row.maximum:
            raise ValidationError(f"{row.name} is at most {row.maximum}, got {value}")
    return value
