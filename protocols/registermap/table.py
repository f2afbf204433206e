"""The register map table: every row at its address, grouped in blocks.

``docs/register-map.md`` and ``meter-sim register-map --json`` are generated from :data:`ROWS`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Final

from protocols.commands import (
    TAG_BYTES,
    CommandCode,
    ResultCode,
)
from protocols.cosem import (
    OBIS_ACCOUNT,
    OBIS_CHARGE,
    OBIS_CLOCK,
    OBIS_CURRENT,
    OBIS_DISCONNECT,
    OBIS_EMERGENCY_CREDIT,
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
    TokenStatus,
)
from protocols.errors import ValidationError
from protocols.readings import SNAPSHOT_FIELDS
from protocols.registermap.datatypes import (
    MAX_READ,
    MAX_WRITE,
    ORDER_PROBE,
    Access,
    Block,
    DataType,
    Row,
    Table,
)

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


_OUTPUT_STATE_DESCRIPTION = "relay output: 1 on (supply connected), 0 off"


def _snapshot() -> list[Row]:
    """The measurements, account and status blocks, derived from the snapshot's one definition
    (:data:`protocols.readings.SNAPSHOT_FIELDS`), with ``output_state`` (the relay output that
    ``control_state`` implies) in front of ``control_state``."""
    rows: list[Row] = []
    lay: _Layout | None = None
    for name, spec in SNAPSHOT_FIELDS:
        if not spec.register:
            continue
        block = Block(spec.block)
        if lay is None or lay.block is not block:
            lay = _Layout(block, _T_IN, 100 if lay is None else lay.next)
        if name == "control_state":
            rows.append(
                lay.add(
                    "output_state",
                    DataType.U16,
                    _OUTPUT_STATE_DESCRIPTION,
                    obis=OBIS_DISCONNECT,
                    attribute=2,
                )
            )
        for index, row_name in enumerate(spec.row_names(name)):
            cosem: dict[str, Any] = {}
            if spec.obis:
                cosem = {"obis": spec.obis[index], "attribute": spec.attribute}
                if spec.element is not None:
                    cosem["element"] = spec.element
            rows.append(
                lay.add(
                    row_name,
                    DataType(spec.register),
                    spec.description.format(n=index + 1),
                    unit=spec.unit,
                    scaler=spec.scaler,
                    length=spec.length,
                    enum=spec.enum,
                    minimum=spec.minimum,
                    maximum=spec.maximum,
                    **cosem,
                )
            )
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

PROFILE_FIELDS: tuple[tuple[str, DataType, str, str], ...] = (
    ("time", DataType.U64, "s", "end of the interval, meter clock"),
    ("energy_import_wh", DataType.U64, "Wh", "energy register at capture"),
    ("interval_wh", DataType.U64, "Wh", "energy in the interval"),
    ("credit", DataType.U64, "account unit", "available credit at capture"),
    ("status", DataType.U32, "", "status bits at capture"),
)
EVENT_FIELDS: tuple[tuple[str, DataType, str, str], ...] = (
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
        for field, dtype, unit, text in PROFILE_FIELDS:
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
        for field, dtype, unit, text in EVENT_FIELDS:
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


ROW_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "profile": tuple(field for field, *_ in PROFILE_FIELDS),
    "event": tuple(field for field, *_ in EVENT_FIELDS),
}


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
