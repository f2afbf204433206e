"""The Modbus register map: one declarative table, and pure codecs driven by it.

Every value a meter exposes over Modbus is one :class:`Row` of :data:`ROWS`: its table (input
registers, read with function 04, or holding registers, read with 03 and written with 06/16/23),
its address, data type, scaler, unit, access, and the COSEM object (OBIS code + attribute) it
stands for. The simulator's datastore, the head-end's link, ``docs/register-map.md`` and
``meter-sim register-map --json`` are all generated from this table.

Conventions
-----------
* Addresses are PDU addresses, starting at 0 (``mbpoll -0``).
* Integers only for cumulative energy and money: amounts are ``u64`` (Wh, or minor currency units
  of the account), counters and sequence numbers ``u32``. ``f32`` appears only in the
  ``floats`` block, a convenience copy of the instantaneous measurements.
* Word order of multi-register numbers is big-endian (most significant word first) by default and
  little-endian for a meter configured with ``word_order = "little"``; the ``word_order``
  register (input 1) says which, and reads the same in both. Bytes inside a register are always
  big-endian, as Modbus prescribes. Strings, the 20-digit token and the tag are not word-swapped.
* "Not implemented": an ``optional`` row of a meter that lacks the feature reads as the
  sentinel of its type (all ones for unsigned, the minimum for signed, NaN for f32), which the
  decoders turn into ``None``.

Refused writes
--------------
* **Exception 02** (illegal data address): a write that touches an unmapped or read-only
  register (of any table), or a read that touches an unmapped register. Nothing is written.
* **Exception 03** (illegal data value): a write whose value no meter could accept, whatever its
  state: a ``go``/``enter`` register other than 0 or 1, a command code other than 0..9, a token
  digit group above 9999, or a command block that does not decode to a well-formed command when
  ``go`` is written (sequence 0, unknown code, an argument outside the command's range). Nothing
  is written, nothing is executed, the result block is unchanged, no event is logged.
* **A result code** in the result block (and an event in the log): everything that depends on
  the meter's keys or state: a forged or missing tag (``AUTH_FAILED``), a sequence number already
  used (``REPLAYED``), an old or repeated credit transfer, an amount outside the meter's limits,
  a transition the control mode refuses.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any, Final, Literal

from protocols.commands import (
    COMMAND_ARGS,
    TAG_BYTES,
    Command,
    CommandCode,
    CommandEnvelope,
    CommandResult,
    ResultCode,
)
from protocols.cosem import (
    OBIS_ACCOUNT,
    OBIS_CHARGE,
    OBIS_CLOCK,
    OBIS_CURRENT,
    OBIS_DISCONNECT,
    OBIS_EMERGENCY_CREDIT,
    OBIS_ENERGY_IMPORT,
    OBIS_ENERGY_RATES,
    OBIS_EVENT_LOG,
    OBIS_FREQUENCY,
    OBIS_LIMITER,
    OBIS_LOAD_PROFILE,
    OBIS_POWER,
    OBIS_POWER_FACTOR,
    OBIS_SERIAL,
    OBIS_TOKEN_CREDIT,
    OBIS_TOKEN_GATEWAY,
    OBIS_VOLTAGE,
    CreditStatus,
    CurrencyUnit,
    TokenStatus,
)
from protocols.disconnect import ControlState, output_state
from protocols.errors import DecodeError, ValidationError
from protocols.obis import Obis
from protocols.readings import Event, EventCode, MeterSnapshot, ProfileRow, StatusFlag

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
_INTEGER_TYPES = frozenset(
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
    if dtype in _INTEGER_TYPES:
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


def _check_order(order: str) -> WordOrder:
    if order == "big":
        return "big"
    if order == "little":
        return "little"
    raise ValidationError(f"word order is big or little, got {order!r}")


def encode_value(row: Row, value: Any, order: WordOrder = "big") -> list[int]:
    """The registers of ``value`` in ``row``; ``None`` encodes the "not implemented" sentinel of
    an optional row. Raises ValidationError for a value the row cannot carry."""
    order = _check_order(order)
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
    if dtype in _INTEGER_TYPES:
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
    order = _check_order(order)
    regs = _check_registers(row, registers)
    dtype = row.dtype
    if dtype in _INTEGER_TYPES:
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


# -- the table ------------------------------------------------------------------------------------

_T_IN = Table.INPUT
_T_HOLD = Table.HOLDING
_RW = Access.READ_WRITE


class _Layout:
    """Lays rows out one after the other from a start address (no gaps inside a block)."""

    def __init__(self, block: Block, table: Table, start: int) -> None:
        self.block = block
        self.table = table
        self.next = start
        self.rows: list[Row] = []

    def add(self, name: str, dtype: DataType, description: str, **extra: Any) -> Row:
        row = Row(name, self.block, self.table, self.next, dtype, description, **extra)
        self.rows.append(row)
        self.next = row.end
        return row


def _identification() -> list[Row]:
    lay = _Layout(Block.IDENTIFICATION, _T_IN, 0)
    u16, u32, text = DataType.U16, DataType.U32, DataType.STRING
    lay.add("map_version", u16, "version of this register map")
    lay.add("word_order", u16, "word order of this meter: 0 big-endian, 1 little-endian")
    lay.add("order_probe", u32, f"the constant {ORDER_PROBE:#010x} in this meter's word order")
    lay.add("manufacturer", text, "manufacturer (8 bytes)", length=4)
    lay.add("model", text, "model (16 bytes)", length=8)
    lay.add("firmware", text, "firmware version (16 bytes)", length=8)
    lay.add(
        "serial",
        text,
        "meter serial number (32 bytes)",
        length=16,
        obis=OBIS_SERIAL,
        attribute=2,
    )
    lay.add("meter_id", text, "meter id, the name the head-end uses (64 bytes)", length=32)
    return lay.rows


def _snapshot() -> list[Row]:
    u16, u32, u64, i16, i32, text = (
        DataType.U16,
        DataType.U32,
        DataType.U64,
        DataType.I16,
        DataType.I32,
        DataType.STRING,
    )
    rows: list[Row] = []
    lay = _Layout(Block.MEASUREMENTS, _T_IN, 100)
    lay.add(
        "time",
        u64,
        "meter clock, seconds since 1970-01-01 UTC",
        unit="s",
        obis=OBIS_CLOCK,
        attribute=2,
    )
    lay.add(
        "energy_import_wh",
        u64,
        "active energy import, total",
        unit="Wh",
        obis=OBIS_ENERGY_IMPORT,
        attribute=2,
    )
    for rate, obis in enumerate(OBIS_ENERGY_RATES, start=1):
        lay.add(
            f"energy_rate{rate}_wh",
            u64,
            f"active energy import, tariff rate {rate}",
            unit="Wh",
            obis=obis,
            attribute=2,
        )
    lay.add(
        "power_w", i32, "instantaneous active power import", unit="W", obis=OBIS_POWER, attribute=2
    )
    lay.add("voltage_dv", u16, "voltage L1", unit="V", scaler=-1, obis=OBIS_VOLTAGE, attribute=2)
    lay.add("current_ma", u32, "current L1", unit="A", scaler=-3, obis=OBIS_CURRENT, attribute=2)
    lay.add(
        "power_factor_milli",
        i16,
        "power factor",
        scaler=-3,
        obis=OBIS_POWER_FACTOR,
        attribute=2,
    )
    lay.add(
        "frequency_chz", u16, "frequency", unit="Hz", scaler=-2, obis=OBIS_FREQUENCY, attribute=2
    )
    rows += lay.rows
    lay = _Layout(Block.ACCOUNT, _T_IN, lay.next)
    account_unit = "account unit"
    lay.add(
        "credit",
        u64,
        "available token credit",
        unit=account_unit,
        obis=OBIS_TOKEN_CREDIT,
        attribute=2,
    )
    lay.add(
        "emergency_credit",
        u64,
        "emergency credit left while it is in use",
        unit=account_unit,
        obis=OBIS_EMERGENCY_CREDIT,
        attribute=2,
    )
    lay.add(
        "debt",
        u64,
        "owed (friendly-period use, overshoot, unpaid emergency credit), repaid by a top-up",
        unit=account_unit,
    )
    lay.add(
        "credit_unit",
        u16,
        "account unit: 1 consumption (Wh), 2 monetary (minor currency units)",
        obis=OBIS_ACCOUNT,
        attribute=11,
        element=2,
        enum=CurrencyUnit,
    )
    lay.add(
        "currency",
        text,
        'ISO 4217 code of a monetary account, "Wh" for a consumption account',
        length=2,
        obis=OBIS_ACCOUNT,
        attribute=11,
        element=0,
    )
    lay.add(
        "currency_scale",
        i16,
        "power of ten of the account unit: -2 when credit is in cents, 0 for Wh",
        obis=OBIS_ACCOUNT,
        attribute=11,
        element=1,
        minimum=-4,
        maximum=0,
    )
    lay.add(
        "low_credit_threshold",
        u64,
        "low-credit warning threshold",
        unit=account_unit,
        obis=OBIS_ACCOUNT,
        attribute=9,
    )
    rows += lay.rows
    lay = _Layout(Block.STATUS, _T_IN, lay.next)
    lay.add(
        "output_state",
        u16,
        "relay output: 1 on (supply connected), 0 off",
        obis=OBIS_DISCONNECT,
        attribute=2,
    )
    lay.add(
        "control_state",
        u16,
        "disconnect control state: 0 disconnected, 1 connected, 2 ready for reconnection",
        obis=OBIS_DISCONNECT,
        attribute=3,
        enum=ControlState,
    )
    lay.add(
        "control_mode",
        u16,
        "disconnect control mode 0..6",
        obis=OBIS_DISCONNECT,
        attribute=4,
    )
    lay.add("status", u32, "status bits, see the status bits table")
    lay.add("last_event_seq", u32, "sequence number of the newest event in the log")
    lay.add("last_transfer", u32, "number of the last credit transfer applied")
    lay.add(
        "last_command_seq",
        u32,
        "sequence of the last command executed (applied or refused by state, argument or "
        "transfer number; not auth failures or replays)",
    )
    rows += lay.rows
    return rows


def _floats() -> list[Row]:
    lay = _Layout(Block.FLOATS, _T_IN, 200)
    f32 = DataType.F32
    lay.add(
        "power_w_f32",
        f32,
        "instantaneous active power (float copy)",
        unit="W",
        obis=OBIS_POWER,
        attribute=2,
    )
    lay.add(
        "voltage_v_f32", f32, "voltage L1 (float copy)", unit="V", obis=OBIS_VOLTAGE, attribute=2
    )
    lay.add(
        "current_a_f32", f32, "current L1 (float copy)", unit="A", obis=OBIS_CURRENT, attribute=2
    )
    lay.add(
        "power_factor_f32", f32, "power factor (float copy)", obis=OBIS_POWER_FACTOR, attribute=2
    )
    lay.add(
        "frequency_hz_f32",
        f32,
        "frequency (float copy)",
        unit="Hz",
        obis=OBIS_FREQUENCY,
        attribute=2,
    )
    return lay.rows


def _settings() -> list[Row]:
    lay = _Layout(Block.SETTINGS, _T_HOLD, 1000)
    u16, u32, u64, i16 = DataType.U16, DataType.U32, DataType.U64, DataType.I16
    account_unit = "account unit"
    lay.add(
        "max_credit",
        u64,
        "most credit the meter holds",
        unit=account_unit,
        obis=OBIS_TOKEN_CREDIT,
        attribute=6,
    )
    lay.add(
        "max_topup",
        u64,
        "largest credit transfer accepted",
        unit=account_unit,
        obis=OBIS_ACCOUNT,
        attribute=10,
    )
    lay.add(
        "emergency_credit_amount",
        u64,
        "emergency credit granted when invoked (0: none)",
        unit=account_unit,
        obis=OBIS_EMERGENCY_CREDIT,
        attribute=8,
    )
    lay.add(
        "emergency_credit_status",
        u16,
        "0 enabled, 1 selectable, 2 invoked, 3 in use, 4 consumed",
        obis=OBIS_EMERGENCY_CREDIT,
        attribute=7,
        enum=CreditStatus,
    )
    lay.add(
        "limiter_threshold_w",
        u32,
        "load limiter threshold in force (0: off)",
        unit="W",
        obis=OBIS_LIMITER,
        attribute=3,
    )
    lay.add(
        "profile_period_s",
        u32,
        "load-profile capture period",
        unit="s",
        obis=OBIS_LOAD_PROFILE,
        attribute=4,
    )
    lay.add(
        "profile_entries_in_use",
        u32,
        "load-profile rows held",
        obis=OBIS_LOAD_PROFILE,
        attribute=7,
    )
    lay.add(
        "event_entries_in_use",
        u32,
        "event-log rows held",
        obis=OBIS_EVENT_LOG,
        attribute=7,
    )
    for rate in range(1, 5):
        lay.add(
            f"unit_charge_rate{rate}",
            u32,
            f"price of tariff rate {rate}, minor units per kWh (not implemented: no such rate)",
            obis=OBIS_CHARGE,
            attribute=5,
            element=rate - 1,
            optional=True,
        )
    lay.add(
        "time_zone_min",
        i16,
        "time zone, minutes east of UTC",
        unit="min",
        obis=OBIS_CLOCK,
        attribute=3,
    )
    lay.add(
        "total_amount_paid",
        u64,
        "everything charged for energy since the meter was made",
        unit=account_unit,
        obis=OBIS_CHARGE,
        attribute=2,
    )
    return lay.rows


#: command arguments live in ``arg1``/``arg2`` in order, except the token of ENTER_TOKEN
ARG_SLOTS: Final = 2


def _command() -> list[Row]:
    lay = _Layout(Block.COMMAND, _T_HOLD, 1100)
    u16, u32, u64 = DataType.U16, DataType.U32, DataType.U64
    lay.add(
        "cmd_sequence",
        u32,
        "command sequence number: strictly greater than `last_command_seq`",
        access=_RW,
    )
    lay.add(
        "cmd_code",
        u16,
        "command code, see the command table",
        access=_RW,
        minimum=0,
        maximum=max(CommandCode),
    )
    lay.add("cmd_arg1", u64, "first argument (see the command table)", access=_RW)
    lay.add("cmd_arg2", u64, "second argument (see the command table)", access=_RW)
    lay.add("cmd_token", DataType.DEC20, "the 20-digit token of enter_token", access=_RW)
    lay.add(
        "cmd_tag",
        DataType.OCTETS,
        "authentication tag: HMAC-SHA256, first 16 bytes; all zero: none",
        length=TAG_BYTES // 2,
        access=_RW,
    )
    lay.add(
        "cmd_go",
        u16,
        "write 1 to execute the block once (0: only store it)",
        access=_RW,
        minimum=0,
        maximum=1,
    )
    return lay.rows


def _result() -> list[Row]:
    lay = _Layout(Block.RESULT, _T_HOLD, 1125)
    lay.add("result_sequence", DataType.U32, "sequence number of the last command received")
    lay.add("result_code", DataType.U16, "its result, see the result codes", enum=ResultCode)
    lay.add("result_last_transfer", DataType.U32, "number of the last credit transfer applied")
    return lay.rows


PROFILE_WINDOW_ROWS: Final = 6
EVENT_WINDOW_ROWS: Final = 8

_PROFILE_FIELDS: tuple[tuple[str, DataType, str, str], ...] = (
    ("time", DataType.U64, "s", "end of the interval, meter clock"),
    ("energy_import_wh", DataType.U64, "Wh", "energy register at capture"),
    ("interval_wh", DataType.U64, "Wh", "energy in the interval"),
    ("credit", DataType.U64, "account unit", "available credit at capture"),
    ("status", DataType.U32, "", "status bits at capture"),
)
_EVENT_FIELDS: tuple[tuple[str, DataType, str, str], ...] = (
    ("seq", DataType.U32, "", "event sequence number"),
    ("time", DataType.U64, "s", "meter clock"),
    ("code", DataType.U16, "", "event code, see the event table"),
    ("a", DataType.I64, "", "first detail value"),
    ("b", DataType.I64, "", "second detail value"),
)


def _profile_window() -> list[Row]:
    lay = _Layout(Block.PROFILE_WINDOW, _T_HOLD, 1200)
    lay.add(
        "profile_start",
        DataType.U64,
        "write: the window shows rows with time >= this (meter clock)",
        unit="s",
        access=_RW,
    )
    lay.add(
        "profile_count",
        DataType.U16,
        f"rows in the window (0..{PROFILE_WINDOW_ROWS}); fewer than "
        f"{PROFILE_WINDOW_ROWS}: no more rows",
    )
    for index in range(PROFILE_WINDOW_ROWS):
        for field, dtype, unit, text in _PROFILE_FIELDS:
            obis = {"obis": OBIS_LOAD_PROFILE, "attribute": 2} if field == "time" else {}
            lay.add(f"profile[{index}].{field}", dtype, text, unit=unit, **obis)
    return lay.rows


def _event_window() -> list[Row]:
    lay = _Layout(Block.EVENT_WINDOW, _T_HOLD, 1400)
    lay.add(
        "event_since",
        DataType.U32,
        "write: the window shows events with seq > this",
        access=_RW,
    )
    lay.add(
        "event_count",
        DataType.U16,
        f"events in the window (0..{EVENT_WINDOW_ROWS}); fewer than "
        f"{EVENT_WINDOW_ROWS}: no more events",
    )
    for index in range(EVENT_WINDOW_ROWS):
        for field, dtype, unit, text in _EVENT_FIELDS:
            obis = {"obis": OBIS_EVENT_LOG, "attribute": 2} if field == "seq" else {}
            lay.add(f"event[{index}].{field}", dtype, text, unit=unit, **obis)
    return lay.rows


def _token_gateway() -> list[Row]:
    lay = _Layout(Block.TOKEN_GATEWAY, _T_HOLD, 1600)
    lay.add("token", DataType.DEC20, "20-digit STS token, four digits per register", access=_RW)
    lay.add(
        "token_enter",
        DataType.U16,
        "write 1 to enter the token (delivery method: remote; 0: only store it)",
        access=_RW,
        minimum=0,
        maximum=1,
    )
    lay.add(
        "token_status",
        DataType.U16,
        "token gateway status of the last token (not implemented: no keypad decoder)",
        obis=OBIS_TOKEN_GATEWAY,
        attribute=6,
        enum=TokenStatus,
        optional=True,
    )
    lay.add(
        "token_time",
        DataType.U64,
        "when the last token was entered, meter clock",
        unit="s",
        obis=OBIS_TOKEN_GATEWAY,
        attribute=3,
        optional=True,
    )
    lay.add(
        "token_result",
        DataType.U16,
        "result code of the last entry through this block since the simulator started",
        enum=ResultCode,
    )
    return lay.rows


ROWS: Final[tuple[Row, ...]] = (
    *_identification(),
    *_snapshot(),
    *_floats(),
    *_settings(),
    *_command(),
    *_result(),
    *_profile_window(),
    *_event_window(),
    *_token_gateway(),
)
ROW: Final[dict[str, Row]] = {row.name: row for row in ROWS}


@dataclass(frozen=True, slots=True)
class BlockSpec:
    block: Block
    table: Table
    start: int
    size: int
    rows: tuple[Row, ...]

    @property
    def end(self) -> int:
        return self.start + self.size

    def offset(self, name: str) -> int:
        return ROW[name].address - self.start


def _blocks() -> dict[Block, BlockSpec]:
    specs: dict[Block, BlockSpec] = {}
    for block in Block:
        rows = tuple(row for row in ROWS if row.block is block)
        start = rows[0].address
        specs[block] = BlockSpec(block, rows[0].table, start, rows[-1].end - start, rows)
    return specs


BLOCKS: Final[dict[Block, BlockSpec]] = _blocks()


def _check_table() -> None:
    """Import-time sanity: unique names, no overlaps, contiguous blocks, reads fit one request."""
    if len(ROW) != len(ROWS):
        raise ValidationError("two rows share a name")
    for table in Table:
        rows = sorted((r for r in ROWS if r.table is table), key=lambda r: r.address)
        for before, after in itertools.pairwise(rows):
            if after.address < before.end:
                raise ValidationError(f"{before.name} overlaps {after.name}")
    for spec in BLOCKS.values():
        addresses = [r.address for r in spec.rows]
        if addresses != sorted(addresses) or any(
            a.end != b.address for a, b in itertools.pairwise(spec.rows)
        ):
            raise ValidationError(f"block {spec.block} is not contiguous")
    if SNAPSHOT_SIZE > MAX_READ or BLOCKS[Block.PROFILE_WINDOW].size > MAX_READ:
        raise ValidationError("a window or the snapshot does not fit one read")
    if BLOCKS[Block.EVENT_WINDOW].size > MAX_READ or COMMAND_SIZE > MAX_WRITE:
        raise ValidationError("the event window or the command block does not fit one request")


#: the snapshot is MEASUREMENTS + ACCOUNT + STATUS, adjacent: one read of SNAPSHOT_SIZE registers
SNAPSHOT_START: Final = BLOCKS[Block.MEASUREMENTS].start
SNAPSHOT_SIZE: Final = BLOCKS[Block.STATUS].end - SNAPSHOT_START
#: the command block, then the result block right after it
COMMAND_START: Final = BLOCKS[Block.COMMAND].start
COMMAND_SIZE: Final = BLOCKS[Block.COMMAND].size
RESULT_START: Final = BLOCKS[Block.RESULT].start
RESULT_SIZE: Final = BLOCKS[Block.RESULT].size
_check_table()


def rows_of(table: Table) -> tuple[Row, ...]:
    return tuple(sorted((r for r in ROWS if r.table is table), key=lambda r: r.address))


def table_size(table: Table) -> int:
    """One past the highest mapped address of ``table``."""
    return max(row.end for row in ROWS if row.table is table)


# -- block codecs ---------------------------------------------------------------------------------


def encode_rows(
    rows: Sequence[Row], values: Mapping[str, Any], order: WordOrder = "big"
) -> list[int]:
    """Registers of adjacent ``rows`` from ``values`` by row name."""
    registers: list[int] = []
    for row in rows:
        if row.name not in values:
            raise ValidationError(f"no value for {row.name}")
        registers += encode_value(row, values[row.name], order)
    return registers


def decode_rows(
    rows: Sequence[Row], registers: Sequence[int], order: WordOrder = "big"
) -> dict[str, Any]:
    """Values by row name from the registers of adjacent ``rows``; DecodeError otherwise."""
    regs = list(registers)
    expected = sum(row.size for row in rows)
    if len(regs) != expected:
        raise DecodeError(f"{expected} registers expected, got {len(regs)}")
    values: dict[str, Any] = {}
    position = 0
    for row in rows:
        values[row.name] = decode_value(row, regs[position : position + row.size], order)
        position += row.size
    return values


_STRUCT_CODE: dict[DataType, str] = {
    DataType.U16: "H",
    DataType.U32: "I",
    DataType.U64: "Q",
    DataType.I16: "h",
    DataType.I32: "i",
    DataType.I64: "q",
    DataType.F32: "f",
    DataType.DEC20: "5H",
}


class _Slow(Exception):
    """A value the compiled encoder leaves to the generic one (which explains the problem)."""


class RowsCodec:
    """:func:`encode_rows` and :func:`decode_rows` for one fixed group of rows, compiled to one
    ``struct`` format: the same registers, values and errors, several times faster (the
    simulator encodes and the head-end decodes on every poll)."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = tuple(rows)
        self.size = sum(row.size for row in self.rows)
        self.words = struct.Struct(f">{self.size}H")
        codes = []
        swap: list[int] = []
        for row in self.rows:
            code = _STRUCT_CODE.get(row.dtype)
            codes.append(code if code is not None else f"{2 * row.size}s")
            span = list(range(len(swap), len(swap) + row.size))
            swappable = row.dtype in _INTEGER_TYPES or row.dtype is DataType.F32
            swap += span[::-1] if swappable else span
        self.values = struct.Struct(">" + "".join(codes))
        self.little = swap  # reversing each number's words is its own inverse

    def encode(self, values: Mapping[str, Any], order: WordOrder = "big") -> list[int]:
        order = _check_order(order)
        args: list[Any] = []
        try:
            for row in self.rows:
                value = values[row.name]
                dtype = row.dtype
                if dtype in _INTEGER_TYPES:
                    if (
                        isinstance(value, bool)
                        or not isinstance(value, int)
                        or (row.optional and value == sentinel(dtype))
                    ):
                        raise _Slow
                    args.append(int(value))
                elif dtype is DataType.F32:
                    if isinstance(value, bool) or not isinstance(value, int | float):
                        raise _Slow
                    if not math.isfinite(value):
                        raise _Slow
                    args.append(float(value))
                elif dtype is DataType.DEC20:
                    args += encode_value(row, value, order)
                elif dtype is DataType.STRING:
                    if not isinstance(value, str) or "\0" in value:
                        raise _Slow
                    data = value.encode("utf-8")
                    if len(data) > 2 * row.length:
                        raise _Slow
                    args.append(data)  # struct pads with NUL
                else:
                    if not isinstance(value, bytes) or (value and len(value) != 2 * row.length):
                        raise _Slow
                    args.append(value)  # b"": all zero
            packed = self.values.pack(*args)
        except (_Slow, KeyError, ValidationError, struct.error, OverflowError):
            return encode_rows(self.rows, values, order)
        registers = list(self.words.unpack(packed))
        if order == "little":
            registers = [registers[index] for index in self.little]
        return registers

    def decode(self, registers: Sequence[int], order: WordOrder = "big") -> dict[str, Any]:
        order = _check_order(order)
        regs = list(registers)
        if len(regs) != self.size:
            raise DecodeError(f"{self.size} registers expected, got {len(regs)}")
        if order == "little":
            regs = [regs[index] for index in self.little]
        try:
            data = self.words.pack(*regs)
        except struct.error:
            # not all registers are ints 0..65535: let the generic decoder name the culprit
            return decode_rows(self.rows, registers, order)
        raw = iter(self.values.unpack(data))
        values: dict[str, Any] = {}
        for row in self.rows:
            dtype = row.dtype
            if dtype is DataType.DEC20:
                groups = [next(raw) for _ in range(5)]
                values[row.name] = decode_value(row, groups, order)
                continue
            value = next(raw)
            if dtype in _INTEGER_TYPES:
                if row.optional and value == sentinel(dtype):
                    value = None
                elif row.enum is not None:
                    try:
                        value = row.enum(value)
                    except ValueError as exc:
                        raise DecodeError(f"{row.name}: {value} is no {row.enum.__name__}") from exc
            elif dtype is DataType.F32:
                if math.isnan(value):
                    if not row.optional:
                        raise DecodeError(f"{row.name} reads as not implemented")
                    value = None
                elif not math.isfinite(value):
                    raise DecodeError(f"{row.name} is not finite")
                else:
                    value = float(value)
            elif dtype is DataType.STRING:
                text = value.rstrip(b"\0")
                if b"\0" in text:
                    raise DecodeError(f"{row.name}: NUL inside the text")
                try:
                    value = text.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DecodeError(f"{row.name} is not UTF-8") from exc
            elif not any(value):  # octets
                value = b""
            values[row.name] = value
        return values


def encode_block(block: Block, values: Mapping[str, Any], order: WordOrder = "big") -> list[int]:
    return _CODECS[block].encode(values, order)


def decode_block(
    block: Block, registers: Sequence[int], order: WordOrder = "big"
) -> dict[str, Any]:
    return _CODECS[block].decode(registers, order)


_CODECS: Final[dict[Block, RowsCodec]] = {
    block: RowsCodec(spec.rows) for block, spec in BLOCKS.items()
}


# identification


@dataclass(frozen=True, slots=True)
class Identification:
    meter_id: str
    manufacturer: str
    model: str
    firmware: str
    serial: str
    word_order: WordOrder = "big"
    map_version: int = MAP_VERSION


def encode_identification(ident: Identification) -> list[int]:
    order = _check_order(ident.word_order)
    values = {
        "map_version": ident.map_version,
        "word_order": WORD_ORDERS.index(order),
        "order_probe": ORDER_PROBE,
        "manufacturer": ident.manufacturer,
        "model": ident.model,
        "firmware": ident.firmware,
        "serial": ident.serial,
        "meter_id": ident.meter_id,
    }
    return encode_block(Block.IDENTIFICATION, values, order)


def decode_identification(registers: Sequence[int]) -> Identification:
    """The identification block; the word order comes from the block itself."""
    spec = BLOCKS[Block.IDENTIFICATION]
    regs = list(registers)
    if len(regs) != spec.size:
        raise DecodeError(f"the identification block has {spec.size} registers, got {len(regs)}")
    order_index = decode_value(ROW["word_order"], regs[1:2])
    if order_index not in (0, 1):
        raise DecodeError(f"word_order is 0 or 1, got {order_index}")
    order = WORD_ORDERS[order_index]
    values = decode_rows(spec.rows, regs, order)
    if values["order_probe"] != ORDER_PROBE:
        raise DecodeError(f"order probe reads {values['order_probe']:#x}, not {ORDER_PROBE:#x}")
    if not values["meter_id"]:
        raise DecodeError("the meter id is empty")
    return Identification(
        meter_id=values["meter_id"],
        manufacturer=values["manufacturer"],
        model=values["model"],
        firmware=values["firmware"],
        serial=values["serial"],
        word_order=order,
        map_version=values["map_version"],
    )


# snapshot

_SNAPSHOT_ROWS: Final = (
    BLOCKS[Block.MEASUREMENTS].rows + BLOCKS[Block.ACCOUNT].rows + BLOCKS[Block.STATUS].rows
)
_SNAPSHOT_CODEC: Final = RowsCodec(_SNAPSHOT_ROWS)


def encode_snapshot(snapshot: MeterSnapshot, order: WordOrder = "big") -> list[int]:
    """The MEASUREMENTS, ACCOUNT and STATUS blocks (``SNAPSHOT_SIZE`` registers from
    ``SNAPSHOT_START``). The meter id lives in the identification block."""
    values: dict[str, Any] = {
        row.name: getattr(snapshot, row.name)
        for row in _SNAPSHOT_ROWS
        if hasattr(snapshot, row.name)
    }
    for rate, value in enumerate(snapshot.energy_rates_wh, start=1):
        values[f"energy_rate{rate}_wh"] = value
    values["output_state"] = int(output_state(snapshot.control_state))
    values["control_state"] = int(snapshot.control_state)
    values["status"] = int(snapshot.status)
    return _SNAPSHOT_CODEC.encode(values, order)


def decode_snapshot(
    registers: Sequence[int], meter_id: str, order: WordOrder = "big"
) -> MeterSnapshot:
    values = _SNAPSHOT_CODEC.decode(registers, order)
    control_state = values["control_state"]
    if values["output_state"] != int(output_state(control_state)):
        raise DecodeError(
            f"output_state {values['output_state']} contradicts control_state {control_state}"
        )
    if values["control_mode"] > 6:
        raise DecodeError(f"control mode is 0..6, got {values['control_mode']}")
    if not -4 <= values["currency_scale"] <= 0:
        raise DecodeError(f"currency scale is -4..0, got {values['currency_scale']}")
    try:
        return MeterSnapshot(
            meter_id=meter_id,
            time=values["time"],
            energy_import_wh=values["energy_import_wh"],
            energy_rates_wh=(
                values["energy_rate1_wh"],
                values["energy_rate2_wh"],
                values["energy_rate3_wh"],
                values["energy_rate4_wh"],
            ),
            power_w=values["power_w"],
            voltage_dv=values["voltage_dv"],
            current_ma=values["current_ma"],
            power_factor_milli=values["power_factor_milli"],
            frequency_chz=values["frequency_chz"],
            credit=values["credit"],
            emergency_credit=values["emergency_credit"],
            debt=values["debt"],
            credit_unit=int(values["credit_unit"]),
            currency=values["currency"],
            currency_scale=values["currency_scale"],
            low_credit_threshold=values["low_credit_threshold"],
            control_state=control_state,
            control_mode=values["control_mode"],
            status=StatusFlag(values["status"]),
            last_event_seq=values["last_event_seq"],
            last_transfer=values["last_transfer"],
            last_command_seq=values["last_command_seq"],
        )
    except (TypeError, ValueError) as exc:  # pragma: no cover - every field is checked above
        raise DecodeError(f"not a snapshot: {exc}") from exc


def float_values(snapshot: MeterSnapshot) -> dict[str, float]:
    """The FLOATS block's values: the snapshot's measurements in SI units."""
    return {
        "power_w_f32": float(snapshot.power_w),
        "voltage_v_f32": snapshot.voltage_dv / 10,
        "current_a_f32": snapshot.current_ma / 1000,
        "power_factor_f32": snapshot.power_factor_milli / 1000,
        "frequency_hz_f32": snapshot.frequency_chz / 100,
    }


def cosem_values(rows: Sequence[Row], read: Callable[[Obis, int], Any]) -> dict[str, Any]:
    """Values of ``rows`` read straight from the meter's COSEM objects by OBIS code, attribute
    and structure element (``read`` is the meter's attribute reader). An element beyond the
    structure is "not implemented" (None)."""
    values: dict[str, Any] = {}
    for row in rows:
        if row.obis is None or row.attribute is None:
            raise ValidationError(f"{row.name} has no COSEM attribute")
        value = read(row.obis, row.attribute)
        if row.element is not None:
            value = value[row.element] if row.element < len(value) else None
        if isinstance(value, bool):
            value = int(value)
        values[row.name] = value
    return values


# command and result


def command_registers(envelope: CommandEnvelope, go: bool = True) -> list[int]:
    """The command block for ``envelope`` (``COMMAND_SIZE`` registers from ``COMMAND_START``).

    Word order: big. Use :func:`encode_command` for a meter with another word order.
    """
    return encode_command(envelope, "big", go)


def encode_command(
    envelope: CommandEnvelope, order: WordOrder = "big", go: bool = True
) -> list[int]:
    command = envelope.command
    args = [0] * ARG_SLOTS
    token = 0
    if command.code is CommandCode.ENTER_TOKEN:
        (token,) = command.args
    else:
        args[: len(command.args)] = command.args
    values = {
        "cmd_sequence": envelope.sequence,
        "cmd_code": int(command.code),
        "cmd_arg1": args[0],
        "cmd_arg2": args[1],
        "cmd_token": token,
        "cmd_tag": envelope.tag,
        "cmd_go": int(go),
    }
    return encode_block(Block.COMMAND, values, order)


def decode_command(
    registers: Sequence[int], meter_id: str, order: WordOrder = "big"
) -> CommandEnvelope:
    """The envelope in a command block addressed to ``meter_id``. Arguments a command does not
    take are ignored. Raises ValidationError (exception 03) for a malformed command."""
    try:
        values = decode_block(Block.COMMAND, registers, order)
    except DecodeError as exc:
        raise ValidationError(f"malformed command block: {exc}") from exc
    code = values["cmd_code"]
    if code not in CommandCode._value2member_map_:
        raise ValidationError(f"unknown command code {code}")
    command_code = CommandCode(code)
    arity = len(COMMAND_ARGS[command_code])
    if command_code is CommandCode.ENTER_TOKEN:
        args: tuple[int, ...] = (values["cmd_token"],)
    else:
        args = (values["cmd_arg1"], values["cmd_arg2"])[:arity]
    command = Command(command_code, args)
    return CommandEnvelope(meter_id, values["cmd_sequence"], command, values["cmd_tag"])


def encode_result(result: CommandResult, order: WordOrder = "big") -> list[int]:
    values = {
        "result_sequence": result.sequence,
        "result_code": int(result.code),
        "result_last_transfer": result.last_transfer,
    }
    return encode_block(Block.RESULT, values, order)


def decode_result(registers: Sequence[int], order: WordOrder = "big") -> CommandResult:
    values = decode_block(Block.RESULT, registers, order)
    return CommandResult(
        values["result_sequence"], values["result_code"], values["result_last_transfer"]
    )


# windows


def encode_profile_window(
    start: int, rows: Sequence[ProfileRow], order: WordOrder = "big"
) -> list[int]:
    if len(rows) > PROFILE_WINDOW_ROWS:
        raise ValidationError(f"a profile window shows at most {PROFILE_WINDOW_ROWS} rows")
    values: dict[str, Any] = {"profile_start": start, "profile_count": len(rows)}
    for index in range(PROFILE_WINDOW_ROWS):
        row = rows[index] if index < len(rows) else ProfileRow(0, 0, 0, 0, 0)
        for field, *_ in _PROFILE_FIELDS:
            values[f"profile[{index}].{field}"] = getattr(row, field)
    return encode_block(Block.PROFILE_WINDOW, values, order)


def decode_profile_window(
    registers: Sequence[int], order: WordOrder = "big"
) -> tuple[int, list[ProfileRow]]:
    """(the window's start, its rows)."""
    values = decode_block(Block.PROFILE_WINDOW, registers, order)
    count = values["profile_count"]
    if count > PROFILE_WINDOW_ROWS:
        raise DecodeError(f"profile_count is 0..{PROFILE_WINDOW_ROWS}, got {count}")
    rows = [
        ProfileRow(*(values[f"profile[{index}].{field}"] for field, *_ in _PROFILE_FIELDS))
        for index in range(count)
    ]
    return values["profile_start"], rows


def encode_event_window(since: int, events: Sequence[Event], order: WordOrder = "big") -> list[int]:
    if len(events) > EVENT_WINDOW_ROWS:
        raise ValidationError(f"an event window shows at most {EVENT_WINDOW_ROWS} events")
    values: dict[str, Any] = {"event_since": since, "event_count": len(events)}
    for index in range(EVENT_WINDOW_ROWS):
        if index < len(events):
            event = events[index]
            row: tuple[int, ...] = (event.seq, event.time, int(event.code), event.a, event.b)
        else:
            row = (0, 0, 0, 0, 0)
        for (field, *_), value in zip(_EVENT_FIELDS, row, strict=True):
            values[f"event[{index}].{field}"] = value
    return encode_block(Block.EVENT_WINDOW, values, order)


def decode_event_window(
    registers: Sequence[int], order: WordOrder = "big"
) -> tuple[int, list[Event]]:
    """(the window's ``since``, its events)."""
    values = decode_block(Block.EVENT_WINDOW, registers, order)
    count = values["event_count"]
    if count > EVENT_WINDOW_ROWS:
        raise DecodeError(f"event_count is 0..{EVENT_WINDOW_ROWS}, got {count}")
    events: list[Event] = []
    for index in range(count):
        code = values[f"event[{index}].code"]
        if code not in EventCode._value2member_map_:
            raise DecodeError(f"unknown event code {code}")
        events.append(
            Event(
                seq=values[f"event[{index}].seq"],
                time=values[f"event[{index}].time"],
                code=EventCode(code),
                a=values[f"event[{index}].a"],
                b=values[f"event[{index}].b"],
            )
        )
    return values["event_since"], events


# token gateway


def token_number(digits: str) -> int:
    """A 20-digit token as the number the DEC20 registers carry."""
    if len(digits) != 20 or not digits.isascii() or not digits.isdigit():
        raise ValidationError(f"an STS token is 20 digits, got {digits!r}")
    return int(digits)


def token_digits(number: int) -> str:
    if not 0 <= number <= DEC20_MAX:
        raise ValidationError(f"a token number has at most 20 digits, got {number}")
    return f"{number:020d}"


# -- documentation --------------------------------------------------------------------------------


def _repeated(row: Row) -> tuple[str, int] | None:
    """("profile", index) for a window row such as ``profile[3].time``; None otherwise."""
    if "[" not in row.name:
        return None
    head, _, rest = row.name.partition("[")
    return head, int(rest.partition("]")[0])


def _type_text(row: Row) -> str:
    if row.dtype in (DataType.STRING, DataType.OCTETS):
        return f"{row.dtype}[{2 * row.length}]"
    return str(row.dtype)


def _cosem_text(row: Row) -> str:
    if row.obis is None:
        return ""
    text = f"{row.obis} /{row.attribute}"
    return text if row.element is None else f"{text}[{row.element}]"


def row_as_dict(row: Row) -> dict[str, Any]:
    return {
        "name": row.name,
        "block": str(row.block),
        "table": str(row.table),
        "read_function": row.table.read_function,
        "address": row.address,
        "registers": row.size,
        "type": str(row.dtype),
        "scaler": row.scaler,
        "unit": row.unit,
        "access": str(row.access),
        "obis": str(row.obis) if row.obis else None,
        "attribute": row.attribute,
        "element": row.element,
        "minimum": row.minimum,
        "maximum": row.maximum,
        "enum": ({member.name.lower(): int(member) for member in row.enum} if row.enum else None),
        "optional": row.optional,
        "description": row.description,
    }


def table_as_json() -> list[dict[str, Any]]:
    """Every row as a JSON-ready dict (``meter-sim register-map --json``)."""
    return [row_as_dict(row) for row in ROWS]


def _md_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines]
    return out


_BLOCK_TEXT: dict[Block, str] = {
    Block.IDENTIFICATION: "Who the meter is. Read it first: `word_order` tells how to read every "
    "multi-register number of this meter.",
    Block.MEASUREMENTS: "The meter's registers at the moment of the read.",
    Block.ACCOUNT: "The prepaid account. Amounts are integers in the *account unit*: minor "
    "currency units (e.g. cents; see `currency_scale`) for a monetary account, Wh for a "
    "consumption account.",
    Block.STATUS: "Relay, status bits and the counters a head-end follows. Measurements, "
    "account and status are adjacent: one read of "
    "{snapshot_size} input registers from {snapshot_start} returns all of them.",
    Block.FLOATS: "IEEE-754 float copies of the instantaneous measurements, for tools that want "
    "floats. Never used for energy or money.",
    Block.SETTINGS: "Configuration, read-only. It changes only through the command block, so "
    "that every change is authenticated, numbered and logged.",
    Block.COMMAND: "Write the whole block, `cmd_go` = 1 included, in one write (function 16): "
    "the meter executes it once and the result block shows the outcome. The registers keep "
    "what was last written.",
    Block.RESULT: "The outcome of the last command received (executed or refused).",
    Block.PROFILE_WINDOW: "Write `profile_start`, then read the block: up to "
    f"{PROFILE_WINDOW_ROWS} load-profile rows with time >= start, oldest first. Function 23 "
    "does both in one request.",
    Block.EVENT_WINDOW: "Write `event_since`, then read the block: up to "
    f"{EVENT_WINDOW_ROWS} events with seq > since, oldest first. Function 23 does both in one "
    "request.",
    Block.TOKEN_GATEWAY: "Write the 20 token digits as five registers of four digits and "
    "`token_enter` = 1 in one write; read `token_status` for the outcome.",
}


def render_markdown() -> str:
    """``docs/register-map.md``, generated from the table."""
    snapshot_text = {
        "snapshot_size": str(SNAPSHOT_SIZE),
        "snapshot_start": str(SNAPSHOT_START),
    }
    out: list[str] = [
        "# Modbus register map",
        "",
        "<!-- Generated by protocols.registermap.render_markdown(); do not edit by hand. -->",
        "",
        f"Map version {MAP_VERSION}. Every simulated meter answers Modbus TCP and Modbus RTU "
        "with this map; `meter-sim register-map --json` prints the same table for tools.",
        "",
        "## Conventions",
        "",
        "* **Addresses** are PDU addresses, starting at 0. With `mbpoll`, pass `-0`.",
        "* **Tables**: input registers (function 04, `mbpoll -t 3`) hold what the meter reports; "
        "holding registers (functions 03/06/16/23, `mbpoll -t 4`) hold settings, the command "
        "block, the result block, the record windows and the token gateway.",
        "* **Unit id**: each meter has its own (1..247, `modbus_unit`). One TCP listener serves "
        "many meters by unit id; on a serial line only the addressed meter answers.",
        "* **Word order** of 32- and 64-bit numbers: big-endian (most significant word first) "
        'unless the meter is configured `word_order = "little"`. Input register 1 says which '
        "(0 big, 1 little) and `order_probe` reads "
        f"{ORDER_PROBE} ({ORDER_PROBE:#010x}) when read in the right order. `mbpoll` reads "
        "32-bit values little-endian unless given `-B`. Bytes inside a register are big-endian.",
        "* **Types**: `u16` `u32` `u64` unsigned, `i16` `i32` `i64` two's complement, `f32` "
        "IEEE-754 (measurement copies only), `string[n]` UTF-8 padded with NUL to n bytes "
        "(first character in the high byte), `octets[n]` raw bytes, `dec20` a 20-digit decimal "
        "number as five registers of four digits each, most significant first (not "
        "word-swapped). A `u64` read as four 16-bit registers w0..w3 in big-endian order is "
        "w0·2⁴⁸ + w1·2³² + w2·2¹⁶ + w3.",
        "* **Scaler**: physical value = register value * 10^scaler. Energy and money are always "
        "integers: energy in Wh, money in the account unit.",
        "* **Not implemented**: an optional value the meter does not have reads as all ones "
        "(unsigned), the type's minimum (signed), NaN (f32), or 65535 in every register (dec20).",
        "",
        "## Errors",
        "",
        "* **Exception 02** (illegal data address): a read of an unmapped address, a write to an "
        "unmapped or read-only address (partly read-only is enough). Nothing is written.",
        "* **Exception 03** (illegal data value): a value no meter could accept: `cmd_go` or "
        "`token_enter` other than 0/1, `cmd_code` above 9, a token digit group above 9999, or, "
        "when `cmd_go` = 1 is written, a command block that is not a well-formed command "
        "(sequence 0, code 0 or unknown, an argument outside the command's range). Nothing is "
        "written or executed, the result block does not change.",
        "* **Result codes** (result block, plus an event in the log): everything that depends on "
        "the meter's key or state, such as a wrong tag (7), a used sequence number (8), an old "
        "credit transfer (4), an amount outside the meter's limits (5), a transition the "
        "control mode does not allow (2).",
        "* **Exception 04** (device failure): the meter could not produce a value (a fault in "
        "the simulator; logged).",
        "* Over TCP, a unit id that no meter has gets exception 0B (gateway target failed to "
        "respond); on a serial line it gets no answer.",
        "",
    ]
    for block in Block:
        spec = BLOCKS[block]
        title = block.value.replace("_", " ").capitalize()
        out += [
            f"## {title}: {spec.table} registers {spec.start}..{spec.end - 1}",
            "",
            _BLOCK_TEXT[block].format(**snapshot_text),
            "",
        ]
        lines: list[list[str]] = []
        notes: list[str] = []
        for row in spec.rows:
            repeated = _repeated(row)
            if repeated is not None and repeated[1] > 0:
                continue
            lines.append(
                [
                    str(row.address),
                    str(row.size),
                    f"`{row.name}`",
                    _type_text(row),
                    str(row.scaler) if row.scaler else "",
                    row.unit,
                    str(row.access),
                    _cosem_text(row),
                    row.description
                    + (" (optional)" if row.optional and "not impl" not in row.description else ""),
                ]
            )
        for prefix, count in (("profile", PROFILE_WINDOW_ROWS), ("event", EVENT_WINDOW_ROWS)):
            first = f"{prefix}[0]"
            if any(r.name.startswith(first) for r in spec.rows):
                stride = (
                    ROW[f"{prefix}[1]." + ROW_FIELDS[prefix][0]].address
                    - ROW[f"{first}." + ROW_FIELDS[prefix][0]].address
                )
                notes.append(
                    f"Rows `{prefix}[0]` to `{prefix}[{count - 1}]` repeat every {stride} "
                    f"registers: `{prefix}[n].x` is at the address of `{prefix}[0].x` + "
                    f"{stride}·n. Rows beyond the count read 0."
                )
        out += _md_table(
            [
                "address",
                "regs",
                "name",
                "type",
                "scaler",
                "unit",
                "access",
                "OBIS /attr",
                "meaning",
            ],
            lines,
        )
        out.append("")
        for note in notes:
            out += [note, ""]
    out += _md_enums()
    out += _md_examples()
    return "\n".join(out).rstrip("\n") + "\n"


ROW_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "profile": tuple(field for field, *_ in _PROFILE_FIELDS),
    "event": tuple(field for field, *_ in _EVENT_FIELDS),
}


def _md_enums() -> list[str]:
    out = ["## Status bits (`status`)", ""]
    out += _md_table(
        ["bit", "value", "meaning"],
        [
            [str(flag.value.bit_length() - 1), str(flag.value), (flag.name or "").lower()]
            for flag in StatusFlag
        ],
    )
    out += ["", "## Commands (`cmd_code`)", ""]
    lines = []
    for code in CommandCode:
        specs = COMMAND_ARGS[code]
        if code is CommandCode.ENTER_TOKEN:
            where = "`cmd_token` = token"
        elif specs:
            where = ", ".join(
                f"`cmd_arg{n}` = {spec.name} ({spec.minimum}..{spec.maximum}): {spec.doc}"
                for n, spec in enumerate(specs, start=1)
            )
        else:
            where = "none"
        lines.append([str(int(code)), code.name.lower(), where])
    out += _md_table(["code", "command", "arguments"], lines)
    out += [
        "",
        "Unused argument registers are ignored. The tag is HMAC-SHA256 with the meter's key "
        "over `meter_id` (UTF-8), one NUL byte, the sequence (4 bytes, big-endian), the code "
        "(2 bytes) and each argument the command takes (16 bytes each, big-endian), truncated "
        "to its first 16 bytes. A meter without a key accepts a block whose tag is all zero.",
        "",
        "## Result codes (`result_code`, `token_result`)",
        "",
    ]
    out += _md_table(
        ["code", "meaning"], [[str(int(code)), code.name.lower()] for code in ResultCode]
    )
    out += ["", "## Token status (`token_status`)", ""]
    out += _md_table(
        ["code", "meaning"], [[str(int(code)), code.name.lower()] for code in TokenStatus]
    )
    out += ["", "## Event codes (`event[n].code`)", ""]
    out += _md_table(
        ["code", "meaning"], [[str(int(code)), code.name.lower()] for code in EventCode]
    )
    out.append("")
    return out


def _md_examples() -> list[str]:
    energy = ROW["energy_import_wh"]
    credit = ROW["credit"]
    probe = ROW["order_probe"]
    result = BLOCKS[Block.RESULT]
    example = CommandEnvelope("MTR-0001", 1, Command.credit_transfer(7, 5000))
    block = encode_command(example)
    return [
        "## Worked examples with mbpoll",
        "",
        "A meter with unit id 1 served over Modbus TCP on `127.0.0.1` port 5020. `-1` polls "
        "once, `-0` uses the addresses of this page.",
        "",
        "Check the word order (expect " + str(ORDER_PROBE) + " with `-B` on a big-endian meter):",
        "",
        "```sh",
        f"mbpoll -1 -0 -a 1 -p 5020 -t 3:int -B -r {probe.address} -c 1 127.0.0.1",
        "```",
        "",
        "Read the total imported energy, a `u64` in Wh, as four 16-bit registers "
        f"w0..w3 (energy = w0·2⁴⁸ + w1·2³² + w2·2¹⁶ + w3; below 4.29 GWh w0 and w1 are 0 and "
        "`-t 3:int -B -r "
        f"{energy.address + 2}` reads the low 32 bits directly):",
        "",
        "```sh",
        f"mbpoll -1 -0 -a 1 -p 5020 -t 3 -r {energy.address} -c 4 127.0.0.1",
        "```",
        "",
        f"The available credit is at input register {credit.address} (4 registers, account unit).",
        "",
        "Transfer 5000 minor units of credit as transfer number 7 to a meter *without a key*, "
        "with command sequence 1 (read `last_command_seq` first and use any greater number). "
        f"The block is {COMMAND_SIZE} holding registers from {COMMAND_START}: sequence (2), "
        "code 3 (1), arg1 = transfer (4), arg2 = amount (4), token (5, zero), tag (8, zero: "
        "no key), go = 1:",
        "",
        "```sh",
        f"mbpoll -1 -0 -a 1 -p 5020 -t 4 -r {COMMAND_START} 127.0.0.1 "
        + " ".join(str(value) for value in block),
        "```",
        "",
        f"Then read the result block ({result.size} holding registers from {result.start}): "
        "sequence (2 registers), result code, last applied transfer (2 registers). "
        "`0 1 0 0 7` means sequence 1, result 0 (ok), transfer 7 applied:",
        "",
        "```sh",
        f"mbpoll -1 -0 -a 1 -p 5020 -t 4 -r {result.start} -c {result.size} 127.0.0.1",
        "```",
        "",
        "Sending the same block again is answered with the same result and applies nothing "
        "(result code 0, the transfer is not applied twice); a new command needs a sequence "
        "above 1.",
        "",
        "Read the events after sequence 0: write `event_since`, then read the window:",
        "",
        "```sh",
        f"mbpoll -1 -0 -a 1 -p 5020 -t 4 -r {ROW['event_since'].address} 127.0.0.1 0 0",
        f"mbpoll -1 -0 -a 1 -p 5020 -t 4 -r {BLOCKS[Block.EVENT_WINDOW].start} "
        f"-c {BLOCKS[Block.EVENT_WINDOW].size} 127.0.0.1",
        "```",
        "",
        "Over a serial line use `-m rtu -b 9600 -P none` and the device path instead of the "
        "host (mbpoll defaults to even parity).",
        "",
    ]
