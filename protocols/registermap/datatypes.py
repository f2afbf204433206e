"""Register map data types and value codecs: how one value sits in 16-bit registers.

A :class:`Row` names one exposed value (table, address, :class:`DataType`, scaler, unit, access,
COSEM attribute); :func:`encode_value` and :func:`decode_value` turn a value into the row's
registers and back, in either word order. The table itself is in
:mod:`protocols.registermap.table`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
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
#
# One codec per data type (:data:`TYPE_CODECS`): the ``struct`` format of a row's registers, and
# the two conversions between a value and the items ``struct`` packs. encode_value/decode_value
# (one row) and messages.RowsCodec (a block compiled to one struct format) both use them.


def _int_range(dtype: DataType) -> tuple[int, int]:
    bits = 16 * _FIXED_SIZE[dtype]
    if dtype in _SIGNED:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def plain_int_bounds(row: Row) -> tuple[int, int]:
    """The ints a row of an integer type carries as they are: its type's range, less the
    "not implemented" sentinel when the row is optional (what its codec's to_raw accepts)."""
    low, high = _int_range(row.dtype)
    if row.optional:
        return (low + 1, high) if row.dtype in _SIGNED else (low, high - 1)
    return low, high


def sentinel(dtype: DataType) -> int | float | None:
    """The "not implemented" value of a type (None for strings and octets, which have none)."""
    if dtype in INTEGER_TYPES:
        low, high = _int_range(dtype)
        return low if dtype in _SIGNED else high
    if dtype is DataType.F32:
        return math.nan
    return None


def check_order(order: str) -> WordOrder:
    if order == "big":
        return "big"
    if order == "little":
        return "little"
    raise ValidationError(f"word order is big or little, got {order!r}")


def _as_int(row: Row, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{row.name} is an integer, got {value!r}")
    return int(value)


def _missing(row: Row) -> None:
    if not row.optional:
        raise ValidationError(f"{row.name} is required")


@dataclass(frozen=True, slots=True)
class TypeCodec:
    """How values of one data type sit in registers.

    ``code(row)`` is the row's ``struct`` format (big-endian), ``to_raw(row, value)`` the items
    it packs (ValidationError for a value the row cannot carry; ``None`` is the "not
    implemented" sentinel of an optional row), ``from_raw(row, items)`` the value back
    (DecodeError for anything else). ``swapped``: a little-endian meter reverses the row's words.
    """

    code: Callable[[Row], str]
    items: int
    swapped: bool
    to_raw: Callable[[Row, Any], tuple[Any, ...]]
    from_raw: Callable[[Row, tuple[Any, ...]], Any]


def _integer_codec(dtype: DataType) -> TypeCodec:
    low, high = _int_range(dtype)
    filler = low if dtype in _SIGNED else high
    # an optional row keeps the sentinel for "not implemented"
    optional_low, optional_high = (low + 1, high) if dtype in _SIGNED else (low, high - 1)
    code = {1: "h", 2: "i", 4: "q"}[_FIXED_SIZE[dtype]]
    code = code if dtype in _SIGNED else code.upper()

    def to_raw(row: Row, value: Any) -> tuple[Any, ...]:
        if value is None:
            _missing(row)
            return (filler,)
        number = _as_int(row, value)
        lo, hi = (optional_low, optional_high) if row.optional else (low, high)
        if not lo <= number <= hi:
            raise ValidationError(f"{row.name} is a {dtype} {lo}..{hi}, got {number}")
        return (number,)

    def from_raw(row: Row, items: tuple[Any, ...]) -> Any:
        (number,) = items
        if row.optional and number == filler:
            return None
        if row.enum is not None:
            try:
                return row.enum(number)
            except ValueError as exc:
                raise DecodeError(f"{row.name}: {number} is no {row.enum.__name__}") from exc
        return number

    return TypeCodec(lambda row: code, 1, True, to_raw, from_raw)


def _f32_to_raw(row: Row, value: Any) -> tuple[Any, ...]:
    if value is None:
        _missing(row)
        return (math.nan,)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(f"{row.name} is a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValidationError(f"{row.name} must be finite, got {value!r}")
    try:
        struct.pack(">f", number)
    except OverflowError as exc:
        raise ValidationError(f"{row.name}: {value!r} does not fit an f32") from exc
    return (number,)


def _f32_from_raw(row: Row, items: tuple[Any, ...]) -> Any:
    (number,) = items
    if math.isnan(number):
        if row.optional:
            return None
        raise DecodeError(f"{row.name} reads as not implemented")
    if not math.isfinite(number):
        raise DecodeError(f"{row.name} is not finite")
    return float(number)


_DEC20_NONE: Final = (0xFFFF,) * 5


def _dec20_to_raw(row: Row, value: Any) -> tuple[Any, ...]:
    if value is None:
        _missing(row)
        return _DEC20_NONE
    number = _as_int(row, value)
    if not 0 <= number <= DEC20_MAX:
        raise ValidationError(f"{row.name} has 20 decimal digits, got {number}")
    digits = f"{number:020d}"
    return tuple(int(digits[i : i + 4]) for i in range(0, 20, 4))


def _dec20_from_raw(row: Row, items: tuple[Any, ...]) -> Any:
    if row.optional and items == _DEC20_NONE:
        return None
    if any(group > 9999 for group in items):
        raise DecodeError(f"{row.name}: a digit group is 0..9999, got {list(items)}")
    return int("".join(f"{group:04d}" for group in items))


def _no_sentinel(row: Row) -> None:
    if row.optional:
        raise ValidationError(f"{row.name}: a {row.dtype} has no sentinel")
    raise ValidationError(f"{row.name} is required")


def _string_to_raw(row: Row, value: Any) -> tuple[Any, ...]:
    if value is None:
        _no_sentinel(row)
    if not isinstance(value, str):
        raise ValidationError(f"{row.name} is text, got {value!r}")
    if "\0" in value:
        raise ValidationError(f"{row.name} cannot hold a NUL character")
    data = value.encode("utf-8")
    if len(data) > 2 * row.length:
        raise ValidationError(f"{row.name} holds {2 * row.length} bytes, got {len(data)}")
    return (data,)  # struct pads with NUL


def _string_from_raw(row: Row, items: tuple[Any, ...]) -> Any:
    text = items[0].rstrip(b"\0")
    if b"\0" in text:
        raise DecodeError(f"{row.name}: NUL inside the text")
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"{row.name} is not UTF-8") from exc


def _octets_to_raw(row: Row, value: Any) -> tuple[Any, ...]:
    if value is None:
        _no_sentinel(row)
    if not isinstance(value, bytes):
        raise ValidationError(f"{row.name} is bytes, got {value!r}")
    if value and len(value) != 2 * row.length:
        raise ValidationError(f"{row.name} holds {2 * row.length} bytes, got {len(value)}")
    return (value,)  # b"": struct pads with zero bytes


def _octets_from_raw(row: Row, items: tuple[Any, ...]) -> Any:
    data: bytes = items[0]
    return data if any(data) else b""


def _bytes_code(row: Row) -> str:
    return f"{2 * row.length}s"


#: the one codec of each data type
TYPE_CODECS: Final[dict[DataType, TypeCodec]] = {
    **{dtype: _integer_codec(dtype) for dtype in sorted(INTEGER_TYPES)},
    DataType.F32: TypeCodec(lambda row: "f", 1, True, _f32_to_raw, _f32_from_raw),
    DataType.DEC20: TypeCodec(lambda row: "5H", 5, False, _dec20_to_raw, _dec20_from_raw),
    DataType.STRING: TypeCodec(_bytes_code, 1, False, _string_to_raw, _string_from_raw),
    DataType.OCTETS: TypeCodec(_bytes_code, 1, False, _octets_to_raw, _octets_from_raw),
}


def encode_value(row: Row, value: Any, order: WordOrder = "big") -> list[int]:
    """The registers of ``value`` in ``row``; ``None`` encodes the "not implemented" sentinel of
    an optional row. Raises ValidationError for a value the row cannot carry."""
    order = check_order(order)
    codec = TYPE_CODECS[row.dtype]
    data = struct.pack(">" + codec.code(row), *codec.to_raw(row, value))
    registers = list(struct.unpack(f">{row.size}H", data))
    return registers[::-1] if order == "little" and codec.swapped else registers


def decode_value(row: Row, registers: Sequence[int], order: WordOrder = "big") -> Any:
    """The value in ``registers`` (exactly ``row.size`` of them, each 0..65535).

    Returns an int (an enum member for enum rows), a float, a str or bytes, or None for the
    sentinel of an optional row. Raises DecodeError for anything else; never another exception.
    """
    order = check_order(order)
    regs = _check_registers(row, registers)
    codec = TYPE_CODECS[row.dtype]
    if order == "little" and codec.swapped:
        regs.reverse()
    items = struct.unpack(">" + codec.code(row), struct.pack(f">{row.size}H", *regs))
    return codec.from_raw(row, items)


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
