"""Message codecs over the register map: blocks, the snapshot, commands, results, windows.

Each ``encode_*`` returns the registers of one block for a value; each ``decode_*`` returns the
value or raises :class:`~protocols.errors.DecodeError` (a malformed command is a
:class:`~protocols.errors.ValidationError`, exception 03), never anything else.
"""

from __future__ import annotations

import math
import operator
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Any, Final

from protocols.commands import (
    COMMAND_ARGS,
    Command,
    CommandCode,
    CommandEnvelope,
    CommandResult,
)
from protocols.disconnect import output_state
from protocols.errors import DecodeError, ValidationError
from protocols.obis import Obis
from protocols.readings import (
    SNAPSHOT_CONVERTERS,
    SNAPSHOT_FIELDS,
    SNAPSHOT_VALUE_FIELDS,
    Event,
    EventCode,
    MeterSnapshot,
    ProfileRow,
    SnapshotValues,
    snapshot_values,
)
from protocols.registermap.datatypes import (
    DEC20_MAX,
    INTEGER_TYPES,
    MAP_VERSION,
    ORDER_PROBE,
    TYPE_CODECS,
    WORD_ORDERS,
    Block,
    DataType,
    Row,
    WordOrder,
    check_order,
    decode_value,
    encode_value,
    plain_int_bounds,
)
from protocols.registermap.table import (
    ARG_SLOTS,
    BLOCKS,
    EVENT_FIELDS,
    EVENT_WINDOW_ROWS,
    PROFILE_FIELDS,
    PROFILE_WINDOW_ROWS,
    ROW,
)

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


class RowsCodec:
    """:func:`encode_rows` and :func:`decode_rows` for one fixed group of rows, compiled to one
    ``struct`` format from the rows' type codecs (:data:`TYPE_CODECS`): the same registers,
    values and errors as row by row, several times faster (the simulator encodes and the
    head-end decodes on every poll)."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = tuple(rows)
        self.size = sum(row.size for row in self.rows)
        self.words = struct.Struct(f">{self.size}H")
        self.codecs = tuple(TYPE_CODECS[row.dtype] for row in self.rows)
        swap: list[int] = []
        for row, codec in zip(self.rows, self.codecs, strict=True):
            span = list(range(len(swap), len(swap) + row.size))
            swap += span[::-1] if codec.swapped else span
        self.values = struct.Struct(
            ">"
            + "".join(codec.code(row) for row, codec in zip(self.rows, self.codecs, strict=True))
        )
        self.little = swap  # reversing each number's words is its own inverse
        self._plan = tuple(
            (row, codec.to_raw, codec.from_raw, codec.items)
            for row, codec in zip(self.rows, self.codecs, strict=True)
        )
        #: per row, the (lowest, highest) plain int it packs as it is (None: not an integer
        #: row), so that such values skip the per-row conversion (see encode_list)
        self._int_bounds = tuple(
            plain_int_bounds(row) if row.dtype in INTEGER_TYPES else None for row in self.rows
        )

    def encode_list(self, values: Sequence[Any], order: WordOrder = "big") -> list[int]:
        """:meth:`encode` of the rows' values given in row order, with the same registers and
        errors: a plain int within its row's range is packed as it is, anything else (None,
        an enum, a string, a value out of range) goes through its row's conversion. The
        snapshot is encoded this way on every read."""
        order = check_order(order)
        if len(values) != len(self.rows):
            raise ValidationError(f"{len(self.rows)} values expected, got {len(values)}")
        args: list[Any] = []
        for value, bounds, (row, to_raw, _, _) in zip(
            values, self._int_bounds, self._plan, strict=True
        ):
            if bounds is not None and type(value) is int and bounds[0] <= value <= bounds[1]:
                args.append(value)
            else:
                args += to_raw(row, value)
        registers = list(self.words.unpack(self.values.pack(*args)))
        if order == "little":
            registers = [registers[index] for index in self.little]
        return registers

    def encode(self, values: Mapping[str, Any], order: WordOrder = "big") -> list[int]:
        order = check_order(order)
        args: list[Any] = []
        for row, to_raw, _, _ in self._plan:
            try:
                value = values[row.name]
            except KeyError as exc:
                raise ValidationError(f"no value for {row.name}") from exc
            args += to_raw(row, value)
        registers = list(self.words.unpack(self.values.pack(*args)))
        if order == "little":
            registers = [registers[index] for index in self.little]
        return registers

    def decode(self, registers: Sequence[int], order: WordOrder = "big") -> dict[str, Any]:
        order = check_order(order)
        regs = list(registers)
        if len(regs) != self.size:
            raise DecodeError(f"{self.size} registers expected, got {len(regs)}")
        if order == "little":
            regs = [regs[index] for index in self.little]
        try:
            data = self.words.pack(*regs)
        except struct.error:
            # not all registers are ints 0..65535: let the row-by-row decoder name the culprit
            return decode_rows(self.rows, registers, order)
        raw = self.values.unpack(data)
        values: dict[str, Any] = {}
        position = 0
        for row, _, from_raw, items in self._plan:
            values[row.name] = from_raw(row, raw[position : position + items])
            position += items
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
    order = check_order(ident.word_order)
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
    values = _CODECS[Block.IDENTIFICATION].decode(regs, order)  # one struct unpack
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


#: (field name, its register rows) of every snapshot field the snapshot blocks carry
_SNAPSHOT_ROW_NAMES: Final = tuple(
    (name, spec.row_names(name)) for name, spec in SNAPSHOT_FIELDS if spec.register
)


def _snapshot_layout() -> tuple[tuple[int, int | None], ...]:
    """Where each register row of the snapshot blocks takes its value, in row order: (the
    position of the snapshot field in :data:`~protocols.readings.SnapshotValues`, the index in a
    field of several rows or None); position -1 is ``output_state``, derived from the control
    state."""
    position = {name: at for at, (name, _) in enumerate(SNAPSHOT_FIELDS)}
    where: dict[str, tuple[int, int | None]] = {"output_state": (-1, None)}
    for name, row_names in _SNAPSHOT_ROW_NAMES:
        if len(row_names) == 1:
            where[row_names[0]] = (position[name], None)
        else:
            where.update((row, (position[name], index)) for index, row in enumerate(row_names))
    return tuple(where[row.name] for row in _SNAPSHOT_ROWS)


#: the precomputed layout of encode_snapshot (a row without a source fails at import)
_SNAPSHOT_LAYOUT: Final = _snapshot_layout()
_CONTROL_STATE_AT: Final = [name for name, _ in SNAPSHOT_FIELDS].index("control_state")
_SNAPSHOT_RANGES: Final = tuple(
    (name, spec.minimum, spec.maximum)
    for name, spec in SNAPSHOT_FIELDS
    if spec.register and (spec.minimum is not None or spec.maximum is not None)
)


def encode_snapshot(snapshot: MeterSnapshot, order: WordOrder = "big") -> list[int]:
    """The MEASUREMENTS, ACCOUNT and STATUS blocks (``SNAPSHOT_SIZE`` registers from
    ``SNAPSHOT_START``). The meter id lives in the identification block."""
    return encode_snapshot_values(snapshot_values(snapshot), order)


def encode_snapshot_values(values: SnapshotValues, order: WordOrder = "big") -> list[int]:
    """:func:`encode_snapshot` of the snapshot whose fields are ``values`` (in order, as
    ``Meter.snapshot_values`` gives them), without building the snapshot."""
    fields: Sequence[Any] = values
    output = int(output_state(fields[_CONTROL_STATE_AT]))
    row_values = [
        output if at < 0 else fields[at] if index is None else fields[at][index]
        for at, index in _SNAPSHOT_LAYOUT
    ]
    return _SNAPSHOT_CODEC.encode_list(row_values, order)


def decode_snapshot(
    registers: Sequence[int], meter_id: str, order: WordOrder = "big"
) -> MeterSnapshot:
    """The snapshot in the MEASUREMENTS, ACCOUNT and STATUS blocks; DecodeError otherwise.

    Decoded by :class:`SnapshotReader` (one ``struct`` unpack straight into the snapshot's
    fields, what the head-end does on every poll); whatever that path does not take as it is
    goes through :func:`decode_snapshot_rows`, which gives the same snapshot or names the
    problem."""
    try:
        return _SNAPSHOT_READER.read(registers, meter_id, order)
    except _NOT_FAST:
        return decode_snapshot_rows(registers, meter_id, order)


def decode_snapshot_rows(
    registers: Sequence[int], meter_id: str, order: WordOrder = "big"
) -> MeterSnapshot:
    """:func:`decode_snapshot` row by row: the general path, and the one whose errors are
    reported."""
    values = _SNAPSHOT_CODEC.decode(registers, order)
    control_state = values["control_state"]
    if values["output_state"] != int(output_state(control_state)):
        raise DecodeError(
            f"output_state {values['output_state']} contradicts control_state {control_state}"
        )
    for name, minimum, maximum in _SNAPSHOT_RANGES:
        value = values[name]
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise DecodeError(f"{name} is {minimum}..{maximum}, got {value}")
    fields: dict[str, Any] = {}
    for name, row_names in _SNAPSHOT_ROW_NAMES:
        if len(row_names) == 1:
            fields[name] = values[name]
        else:
            fields[name] = tuple(values[row_name] for row_name in row_names)
    try:
        return MeterSnapshot.from_values(meter_id, fields)
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"not a snapshot: {exc}") from exc


class SnapshotReader:
    """:func:`decode_snapshot_rows` compiled for registers that decode cleanly: the snapshot
    rows' ``struct`` format (:class:`RowsCodec`) unpacked in one call, the items picked in the
    order of the snapshot's fields (:data:`~protocols.readings.SNAPSHOT_VALUE_FIELDS`), the few
    that need it converted (text, enumerations, flags), the ranges and the relay checked, and
    the snapshot built from them positionally.

    :meth:`read` raises one of :data:`_NOT_FAST` for anything it does not take as it is (a
    register that is no 16-bit int, a value out of range, a meter id the snapshot refuses...);
    :func:`decode_snapshot` then asks the general path, which is the one that explains."""

    def __init__(self, codec: RowsCodec) -> None:
        self.codec = codec
        item_of: dict[str, int] = {}
        position = 0
        for row, row_codec in zip(codec.rows, codec.codecs, strict=True):
            if row_codec.items != 1:
                raise ValidationError(f"{row.name}: one struct item per snapshot row")
            item_of[row.name] = position
            position += row_codec.items
        by_name = {row.name: row for row in codec.rows}
        picked: list[int] = []
        converts: list[tuple[int, Callable[[Any], Any]]] = []
        groups: list[tuple[int, int]] = []
        ranges: list[tuple[int, int | float, int | float]] = []
        control = -1
        spec_of = dict(SNAPSHOT_FIELDS)
        where = dict(_SNAPSHOT_ROW_NAMES)
        for name in SNAPSHOT_VALUE_FIELDS:
            if name not in where:
                raise ValidationError(f"the snapshot field {name} has no register row")
            row_names = where[name]
            if len(row_names) > 1:
                groups.append((len(picked), len(row_names)))
            for row_name in row_names:
                row = by_name[row_name]
                convert = _item_converter(row, SNAPSHOT_CONVERTERS.get(name))
                if convert is not None:
                    converts.append((len(picked), convert))
                if row_name == "control_state":
                    control = len(picked)
                picked.append(item_of[row_name])
            spec = spec_of[name]
            if spec.minimum is not None or spec.maximum is not None:
                if len(row_names) != 1:
                    raise ValidationError(f"the snapshot field {name}: a range on one row only")
                low = spec.minimum if spec.minimum is not None else -math.inf
                high = spec.maximum if spec.maximum is not None else math.inf
                ranges.append((len(picked) - 1, low, high))
        self._pick = operator.itemgetter(*picked)
        self._converts = tuple(converts)
        self._groups = tuple(reversed(groups))  # from the end, so earlier positions hold
        self._ranges = tuple(ranges)
        self._output = item_of["output_state"]
        self._control = control

    def read(self, registers: Sequence[int], meter_id: str, order: WordOrder) -> MeterSnapshot:
        codec = self.codec
        if len(registers) != codec.size:
            raise DecodeError(f"{codec.size} registers expected, got {len(registers)}")
        if order == "little":
            registers = [registers[index] for index in codec.little]
        elif order != "big":
            raise ValidationError(f"word order is big or little, got {order!r}")
        raw = codec.values.unpack(codec.words.pack(*registers))
        args = list(self._pick(raw))
        for position, convert in self._converts:
            args[position] = convert(args[position])
        for position, low, high in self._ranges:
            if not low <= args[position] <= high:
                raise DecodeError(f"item {position} is {low}..{high}")
        if raw[self._output] != output_state(args[self._control]):
            raise DecodeError("output_state contradicts control_state")
        for position, count in self._groups:
            args[position : position + count] = [tuple(args[position : position + count])]
        return MeterSnapshot(meter_id, *args)


def _item_converter(row: Row, rebuild: Callable[[Any], Any] | None) -> Callable[[Any], Any] | None:
    """What turns the struct item of ``row`` into the snapshot's value (None: taken as it is):
    an enumeration row's member, a flags field's flags (both looked up among the members made
    so far: KeyError for a number not met yet, which the general path then makes), a text
    row's text."""
    codec = TYPE_CODECS[row.dtype]
    if row.dtype in INTEGER_TYPES and not row.optional:
        enum = row.enum if row.enum is not None else rebuild
        if enum is None:
            return None
        if not isinstance(enum, type) or not issubclass(enum, Enum):
            raise ValidationError(f"{row.name}: an enumeration or flags expected")
        return enum._value2member_map_.__getitem__
    if row.dtype is DataType.STRING and rebuild is None:
        return partial(_from_item, codec.from_raw, row)
    raise ValidationError(f"{row.name}: a {row.dtype} row in the snapshot")


def _from_item(from_raw: Callable[[Row, tuple[Any, ...]], Any], row: Row, item: Any) -> Any:
    return from_raw(row, (item,))


#: what SnapshotReader.read raises for registers it leaves to the general path
_NOT_FAST: Final = (struct.error, TypeError, ValueError, KeyError, DecodeError)
_SNAPSHOT_READER: Final = SnapshotReader(_SNAPSHOT_CODEC)


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
        for field, *_ in PROFILE_FIELDS:
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
        ProfileRow(*(values[f"profile[{index}].{field}"] for field, *_ in PROFILE_FIELDS))
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
        for (field, *_), value in zip(EVENT_FIELDS, row, strict=True):
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
