"""The register map: the table's invariants, fixed vectors, round trips in both word orders,
decoders that never crash on garbage, and the generated document."""

from __future__ import annotations

import contextlib
import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cli.docs import registermap as registermap_docs
from protocols import registermap as rm
from protocols.commands import (
    COMMAND_ARGS,
    TAG_BYTES,
    Command,
    CommandCode,
    CommandEnvelope,
    CommandResult,
    ResultCode,
)
from protocols.cosem import TokenStatus
from protocols.disconnect import ControlState
from protocols.errors import DecodeError, ValidationError
from protocols.readings import (
    SNAPSHOT_FIELDS,
    Event,
    EventCode,
    MeterSnapshot,
    ProfileRow,
    StatusFlag,
    snapshot_values,
)

ROOT = Path(__file__).resolve().parent.parent
ORDERS = st.sampled_from(rm.WORD_ORDERS)


def _row(name: str, dtype: rm.DataType, **extra: Any) -> rm.Row:
    if dtype is rm.DataType.F32:
        return rm.Row(name, rm.Block.FLOATS, rm.Table.INPUT, 2000, dtype, "test", **extra)
    return rm.Row(name, rm.Block.SETTINGS, rm.Table.HOLDING, 2000, dtype, "test", **extra)


# -- the table ------------------------------------------------------------------------------------


def test_rows_do_not_overlap_and_blocks_are_contiguous() -> None:
    for table in rm.Table:
        used: set[int] = set()
        for row in rm.rows_of(table):
            span = set(range(row.address, row.end))
            assert not span & used, row.name
            used |= span
    for spec in rm.BLOCKS.values():
        assert sum(row.size for row in spec.rows) == spec.size
        assert all(row.table is spec.table for row in spec.rows)


def test_snapshot_windows_and_command_fit_one_request() -> None:
    assert rm.SNAPSHOT_SIZE <= rm.MAX_READ
    assert rm.BLOCKS[rm.Block.PROFILE_WINDOW].size <= rm.MAX_READ
    assert rm.BLOCKS[rm.Block.EVENT_WINDOW].size <= rm.MAX_READ
    assert rm.COMMAND_SIZE <= rm.MAX_WRITE
    assert rm.RESULT_START == rm.COMMAND_START + rm.COMMAND_SIZE


def test_money_and_energy_are_never_float() -> None:
    for row in rm.ROWS:
        if row.unit in ("Wh", "account unit"):
            assert row.dtype in (rm.DataType.U64,), row.name
        if row.dtype is rm.DataType.F32:
            assert row.block is rm.Block.FLOATS
            assert row.access is rm.Access.READ


def test_f32_is_refused_outside_the_measurement_copies() -> None:
    with pytest.raises(ValidationError, match="f32"):
        rm.Row("energy", rm.Block.ACCOUNT, rm.Table.INPUT, 0, rm.DataType.F32, "x")
    with pytest.raises(ValidationError, match="read-only"):
        rm.Row(
            "x",
            rm.Block.STATUS,
            rm.Table.INPUT,
            0,
            rm.DataType.U16,
            "x",
            access=rm.Access.READ_WRITE,
        )
    with pytest.raises(ValidationError, match="length"):
        _row("text", rm.DataType.STRING)
    with pytest.raises(ValidationError, match="together"):
        rm.Row("x", rm.Block.STATUS, rm.Table.INPUT, 0, rm.DataType.U16, "x", attribute=2)


def test_writable_rows_are_the_command_windows_and_token() -> None:
    writable = {row.block for row in rm.ROWS if row.writable}
    assert writable == {
        rm.Block.COMMAND,
        rm.Block.PROFILE_WINDOW,
        rm.Block.EVENT_WINDOW,
        rm.Block.TOKEN_GATEWAY,
    }


def test_every_snapshot_field_has_a_row() -> None:
    names = {row.name for row in rm.ROWS}
    for field in MeterSnapshot.__dataclass_fields__:
        if field in ("meter_id", "energy_rates_wh"):
            continue
        assert field in names, field
    assert {f"energy_rate{n}_wh" for n in range(1, 5)} <= names
    assert "meter_id" in names  # in the identification block


# -- fixed vectors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "value", "big", "little"),
    [
        (rm.DataType.U16, 0x1234, [0x1234], [0x1234]),
        (rm.DataType.U32, 0x01020304, [0x0102, 0x0304], [0x0304, 0x0102]),
        (
            rm.DataType.U64,
            0x0001_0002_0003_0004,
            [1, 2, 3, 4],
            [4, 3, 2, 1],
        ),
        (rm.DataType.I16, -2, [0xFFFE], [0xFFFE]),
        (rm.DataType.I32, -2, [0xFFFF, 0xFFFE], [0xFFFE, 0xFFFF]),
        (rm.DataType.I64, -1, [0xFFFF] * 4, [0xFFFF] * 4),
        (rm.DataType.F32, 230.5, [0x4366, 0x8000], [0x8000, 0x4366]),
        (rm.DataType.DEC20, 12345678901234567890, [1234, 5678, 9012, 3456, 7890], None),
    ],
)
def test_fixed_vectors(
    dtype: rm.DataType, value: Any, big: list[int], little: list[int] | None
) -> None:
    row = _row("v", dtype)
    assert rm.encode_value(row, value, "big") == big
    assert rm.decode_value(row, big, "big") == value
    expected_little = little if little is not None else big  # dec20 is never word-swapped
    assert rm.encode_value(row, value, "little") == expected_little
    assert rm.decode_value(row, expected_little, "little") == value


def test_strings_and_octets() -> None:
    text = _row("t", rm.DataType.STRING, length=2)
    assert rm.encode_value(text, "KES") == [0x4B45, 0x5300]
    assert rm.decode_value(text, [0x4B45, 0x5300]) == "KES"
    assert rm.encode_value(text, "KES", "little") == [0x4B45, 0x5300]  # not word-swapped
    with pytest.raises(ValidationError, match="holds 4 bytes"):
        rm.encode_value(text, "TOO LONG")
    with pytest.raises(DecodeError, match="NUL inside"):
        rm.decode_value(text, [0x4100, 0x4200])
    with pytest.raises(DecodeError, match="UTF-8"):
        rm.decode_value(text, [0xFFFE, 0])
    tag = _row("tag", rm.DataType.OCTETS, length=2)
    assert rm.encode_value(tag, b"\x01\x02\x03\x04") == [0x0102, 0x0304]
    assert rm.encode_value(tag, b"") == [0, 0]
    assert rm.decode_value(tag, [0, 0]) == b""
    with pytest.raises(ValidationError):
        rm.encode_value(tag, b"\x01")


def test_not_implemented_sentinels() -> None:
    cases = [
        (rm.DataType.U16, [0xFFFF]),
        (rm.DataType.U32, [0xFFFF, 0xFFFF]),
        (rm.DataType.U64, [0xFFFF] * 4),
        (rm.DataType.I16, [0x8000]),
        (rm.DataType.I32, [0x8000, 0x0000]),
        (rm.DataType.DEC20, [0xFFFF] * 5),
    ]
    for dtype, registers in cases:
        row = _row("o", dtype, optional=True)
        assert rm.encode_value(row, None) == registers, dtype
        assert rm.decode_value(row, registers) is None, dtype
        if dtype is not rm.DataType.DEC20:  # no dec20 value is all 65535s anyway
            with pytest.raises(ValidationError):  # the sentinel is no value of an optional row
                rm.encode_value(row, rm.sentinel(dtype))
    f32 = rm.Row("f", rm.Block.FLOATS, rm.Table.INPUT, 300, rm.DataType.F32, "x", optional=True)
    assert math.isnan(struct.unpack(">f", struct.pack(">2H", *rm.encode_value(f32, None)))[0])
    assert rm.decode_value(f32, rm.encode_value(f32, None)) is None
    required = _row("r", rm.DataType.U16)
    assert rm.decode_value(required, [0xFFFF]) == 0xFFFF  # a required row uses the whole range
    with pytest.raises(ValidationError, match="required"):
        rm.encode_value(required, None)


def test_enum_rows_decode_members_and_refuse_others() -> None:
    row = rm.ROW["control_state"]
    assert rm.decode_value(row, [2]) is ControlState.READY_FOR_RECONNECTION
    with pytest.raises(DecodeError, match="ControlState"):
        rm.decode_value(row, [7])
    status = rm.ROW["token_status"]
    assert rm.decode_value(status, [3]) is TokenStatus.EXECUTION_OK
    assert rm.decode_value(status, [0xFFFF]) is None


def test_values_out_of_range_are_refused() -> None:
    with pytest.raises(ValidationError):
        rm.encode_value(_row("u", rm.DataType.U16), 0x10000)
    with pytest.raises(ValidationError):
        rm.encode_value(_row("u", rm.DataType.U32), -1)
    with pytest.raises(ValidationError):
        rm.encode_value(_row("u", rm.DataType.U16), True)
    with pytest.raises(ValidationError):
        rm.encode_value(_row("d", rm.DataType.DEC20), 10**20)
    floats = rm.ROW["voltage_v_f32"]
    with pytest.raises(ValidationError):
        rm.encode_value(floats, math.inf)
    with pytest.raises(ValidationError):
        rm.encode_value(floats, 1e39)
    with pytest.raises(ValidationError):
        rm.encode_value(_row("u", rm.DataType.U16), 1, "middle")  # type: ignore[arg-type]


def test_check_written_applies_the_rows_range() -> None:
    assert rm.check_written(rm.ROW["cmd_go"], [1]) == 1
    with pytest.raises(ValidationError, match="at most 1"):
        rm.check_written(rm.ROW["cmd_go"], [2])
    with pytest.raises(ValidationError, match="at most 9"):
        rm.check_written(rm.ROW["cmd_code"], [10])
    with pytest.raises(ValidationError, match="digit group"):
        rm.check_written(rm.ROW["token"], [0, 0, 10000, 0, 0])


# -- round trips ----------------------------------------------------------------------------------


def _values(row: rm.Row) -> st.SearchStrategy[Any]:
    dtype = row.dtype
    if dtype in (rm.DataType.STRING,):
        return st.text(
            alphabet=st.characters(codec="utf-8", exclude_characters="\0"),
            max_size=row.length,
        ).filter(lambda text: len(text.encode()) <= 2 * row.length)
    if dtype is rm.DataType.OCTETS:
        return st.one_of(
            st.just(b""), st.binary(min_size=2 * row.length, max_size=2 * row.length)
        ).filter(lambda data: data == b"" or any(data))
    if dtype is rm.DataType.F32:
        return st.floats(width=32, allow_nan=False, allow_infinity=False)
    if dtype is rm.DataType.DEC20:
        base = st.integers(0, rm.DEC20_MAX)
    else:
        bits = 16 * row.size
        if dtype in (rm.DataType.I16, rm.DataType.I32, rm.DataType.I64):
            low, high = -(1 << (bits - 1)) + int(row.optional), (1 << (bits - 1)) - 1
        else:
            low, high = 0, (1 << bits) - 1 - int(row.optional)
        base = st.integers(low, high)
    if row.enum is not None:
        base = st.sampled_from([int(member) for member in row.enum])
    return st.one_of(st.none(), base) if row.optional else base


@st.composite
def _row_and_value(draw: st.DrawFn) -> tuple[rm.Row, Any]:
    row = draw(st.sampled_from(rm.ROWS))
    return row, draw(_values(row))


@given(_row_and_value(), ORDERS)
@settings(max_examples=600)
def test_every_row_round_trips(case: tuple[rm.Row, Any], order: rm.WordOrder) -> None:
    row, value = case
    registers = rm.encode_value(row, value, order)
    assert len(registers) == row.size
    assert all(0 <= r <= 0xFFFF for r in registers)
    assert rm.decode_value(row, registers, order) == value


@given(
    st.sampled_from(rm.ROWS),
    st.lists(st.integers(-(2**20), 2**20), max_size=40),
    ORDERS,
)
@settings(max_examples=800)
def test_decoding_garbage_parses_or_raises_decode_error(
    row: rm.Row, registers: list[int], order: rm.WordOrder
) -> None:
    with contextlib.suppress(DecodeError):
        rm.decode_value(row, registers, order)


@given(st.sampled_from(rm.ROWS), ORDERS, st.data())
def test_decoding_any_well_formed_registers_never_crashes(
    row: rm.Row, order: rm.WordOrder, data: st.DataObject
) -> None:
    registers = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=row.size, max_size=row.size))
    try:
        value = rm.decode_value(row, registers, order)
    except DecodeError:
        return
    if value is not None and not (row.dtype is rm.DataType.OCTETS and value == b""):
        assert rm.encode_value(row, value, order) == registers


@given(st.sampled_from(list(rm.Block)), st.lists(st.integers(0, 0xFFFF), max_size=130), ORDERS)
def test_block_decoders_parse_or_raise_typed_errors(
    block: rm.Block, registers: list[int], order: rm.WordOrder
) -> None:
    decoders: dict[rm.Block, Callable[[], object]] = {
        rm.Block.IDENTIFICATION: lambda: rm.decode_identification(registers),
        rm.Block.RESULT: lambda: rm.decode_result(registers, order),
        rm.Block.PROFILE_WINDOW: lambda: rm.decode_profile_window(registers, order),
        rm.Block.EVENT_WINDOW: lambda: rm.decode_event_window(registers, order),
        rm.Block.COMMAND: lambda: rm.decode_command(registers, "MTR-1", order),
        rm.Block.MEASUREMENTS: lambda: rm.decode_snapshot(registers, "MTR-1", order),
    }
    decode = decoders.get(block, lambda: rm.decode_block(block, registers, order))
    with contextlib.suppress(DecodeError, ValidationError):
        decode()


# -- blocks ---------------------------------------------------------------------------------------

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)


@st.composite
def snapshots(draw: st.DrawFn) -> MeterSnapshot:
    state = draw(st.sampled_from(list(ControlState)))
    return MeterSnapshot(
        meter_id="MTR-1",
        time=draw(U64),
        energy_import_wh=draw(U64),
        energy_rates_wh=(draw(U64), draw(U64), draw(U64), draw(U64)),
        power_w=draw(st.integers(-(2**31), 2**31 - 1)),
        voltage_dv=draw(st.integers(0, 0xFFFF)),
        current_ma=draw(U32),
        power_factor_milli=draw(st.integers(-1000, 1000)),
        frequency_chz=draw(st.integers(0, 0xFFFF)),
        credit=draw(U64),
        emergency_credit=draw(U64),
        debt=draw(U64),
        credit_unit=draw(st.sampled_from([1, 2])),
        currency=draw(st.sampled_from(["KES", "Wh", "USD"])),
        currency_scale=draw(st.integers(-4, 0)),
        low_credit_threshold=draw(U64),
        control_state=state,
        control_mode=draw(st.integers(0, 6)),
        status=StatusFlag(draw(st.integers(0, int(max(StatusFlag)) * 2 - 1))),
        last_event_seq=draw(U32),
        last_transfer=draw(U32),
        last_command_seq=draw(U32),
    )


@given(snapshots(), ORDERS)
def test_snapshot_round_trips(snapshot: MeterSnapshot, order: rm.WordOrder) -> None:
    registers = rm.encode_snapshot(snapshot, order)
    assert len(registers) == rm.SNAPSHOT_SIZE
    assert rm.decode_snapshot(registers, "MTR-1", order) == snapshot


@given(snapshots())
def test_snapshot_values_are_the_fields_in_order(snapshot: MeterSnapshot) -> None:
    values = snapshot_values(snapshot)
    assert values == tuple(getattr(snapshot, name) for name, _ in SNAPSHOT_FIELDS)
    assert MeterSnapshot(*values) == snapshot


def test_snapshot_with_a_contradicting_relay_is_refused() -> None:
    snapshot = MeterSnapshot(
        "MTR-1",
        1,
        2,
        (1, 1, 0, 0),
        3,
        2300,
        4,
        1000,
        5000,
        10,
        0,
        0,
        2,
        "KES",
        -2,
        50,
        ControlState.CONNECTED,
        4,
        StatusFlag.IN_CREDIT,
        1,
        0,
        0,
    )
    registers = rm.encode_snapshot(snapshot)
    output = rm.ROW["output_state"].address - rm.SNAPSHOT_START
    registers[output] = 0
    with pytest.raises(DecodeError, match="contradicts"):
        rm.decode_snapshot(registers, "MTR-1")


def test_identification_round_trips_and_carries_its_word_order() -> None:
    for order in rm.WORD_ORDERS:
        ident = rm.Identification("MTR-0001", "PHS", "SIM-1P", "1.2.3", "SN-42", order)
        registers = rm.encode_identification(ident)
        assert registers[1] == rm.WORD_ORDERS.index(order)
        probe = registers[2:4]
        assert probe == ([0x0102, 0x0304] if order == "big" else [0x0304, 0x0102])
        assert rm.decode_identification(registers) == ident
    registers = rm.encode_identification(ident)
    registers[1] = 7
    with pytest.raises(DecodeError, match="word_order"):
        rm.decode_identification(registers)


@st.composite
def envelopes(draw: st.DrawFn) -> CommandEnvelope:
    code = draw(st.sampled_from(list(CommandCode)))
    args = tuple(draw(st.integers(spec.minimum, spec.maximum)) for spec in COMMAND_ARGS[code])
    tag = draw(st.one_of(st.just(b""), st.binary(min_size=TAG_BYTES, max_size=TAG_BYTES)))
    if tag and not any(tag):
        tag = b""
    return CommandEnvelope("MTR-7", draw(st.integers(1, 2**32 - 1)), Command(code, args), tag)


@given(envelopes(), ORDERS)
def test_command_block_round_trips(envelope: CommandEnvelope, order: rm.WordOrder) -> None:
    registers = rm.encode_command(envelope, order)
    assert len(registers) == rm.COMMAND_SIZE
    assert registers[-1] == 1  # go
    assert rm.decode_command(registers, "MTR-7", order) == envelope


def test_command_block_fixed_vector() -> None:
    envelope = CommandEnvelope("MTR-0001", 1, Command.credit_transfer(7, 5000))
    assert rm.encode_command(envelope) == [
        0, 1,  # sequence
        3,  # credit transfer
        0, 0, 0, 7,  # transfer
        0, 0, 0, 5000,  # amount
        0, 0, 0, 0, 0,  # token
        0, 0, 0, 0, 0, 0, 0, 0,  # no tag
        1,  # go
    ]  # fmt: skip
    token = CommandEnvelope("M", 2, Command.enter_token("12345678901234567890"))
    registers = rm.encode_command(token, go=False)
    assert registers[rm.BLOCKS[rm.Block.COMMAND].offset("cmd_token") :][:5] == [
        1234,
        5678,
        9012,
        3456,
        7890,
    ]
    assert registers[-1] == 0


def test_malformed_command_blocks_are_validation_errors() -> None:
    good = rm.encode_command(CommandEnvelope("M", 1, Command.remote_disconnect()))
    spec = rm.BLOCKS[rm.Block.COMMAND]
    unknown = list(good)
    unknown[spec.offset("cmd_code")] = 0
    with pytest.raises(ValidationError, match="unknown command code 0"):
        rm.decode_command(unknown, "M")
    no_sequence = list(good)
    no_sequence[0:2] = [0, 0]
    with pytest.raises(ValidationError, match="sequence"):
        rm.decode_command(no_sequence, "M")
    mode = rm.encode_command(CommandEnvelope("M", 1, Command(CommandCode.SET_CONTROL_MODE, (4,))))
    mode[spec.offset("cmd_arg1") + 3] = 9
    with pytest.raises(ValidationError, match="mode"):
        rm.decode_command(mode, "M")
    # arguments a command does not take are ignored
    extra = list(good)
    extra[spec.offset("cmd_arg2") + 3] = 99
    assert rm.decode_command(extra, "M").command == Command.remote_disconnect()


@given(U32, st.sampled_from(list(ResultCode)), U32, ORDERS)
def test_result_block_round_trips(
    sequence: int, code: ResultCode, transfer: int, order: rm.WordOrder
) -> None:
    result = CommandResult(sequence, code, transfer)
    assert rm.decode_result(rm.encode_result(result, order), order) == result


@given(
    U64,
    st.lists(st.builds(ProfileRow, U64, U64, U64, U64, U32), max_size=rm.PROFILE_WINDOW_ROWS),
    ORDERS,
)
def test_profile_window_round_trips(
    start: int, rows: list[ProfileRow], order: rm.WordOrder
) -> None:
    registers = rm.encode_profile_window(start, rows, order)
    assert len(registers) == rm.BLOCKS[rm.Block.PROFILE_WINDOW].size
    assert rm.decode_profile_window(registers, order) == (start, rows)


@given(
    U32,
    st.lists(
        st.builds(
            Event,
            U32,
            U64,
            st.sampled_from(list(EventCode)),
            st.integers(-(2**63), 2**63 - 1),
            st.integers(-(2**63), 2**63 - 1),
        ),
        max_size=rm.EVENT_WINDOW_ROWS,
    ),
    ORDERS,
)
def test_event_window_round_trips(since: int, events: list[Event], order: rm.WordOrder) -> None:
    registers = rm.encode_event_window(since, events, order)
    assert len(registers) == rm.BLOCKS[rm.Block.EVENT_WINDOW].size
    assert rm.decode_event_window(registers, order) == (since, events)


def test_window_counts_beyond_the_rows_are_refused() -> None:
    registers = rm.encode_event_window(0, [])
    registers[rm.BLOCKS[rm.Block.EVENT_WINDOW].offset("event_count")] = rm.EVENT_WINDOW_ROWS + 1
    with pytest.raises(DecodeError, match="event_count"):
        rm.decode_event_window(registers)
    with pytest.raises(ValidationError):
        rm.encode_profile_window(0, [ProfileRow(1, 1, 1, 1, 1)] * (rm.PROFILE_WINDOW_ROWS + 1))


def test_cosem_values_reads_attributes_and_elements() -> None:
    rows = rm.BLOCKS[rm.Block.SETTINGS].rows
    calls: list[tuple[str, int]] = []

    def read(obis: Any, attribute: int) -> Any:
        calls.append((str(obis), attribute))
        if (str(obis), attribute) == ("0.0.19.20.0.255", 5):
            return (2500, 1200)
        return 1

    values = rm.cosem_values(rows, read)
    assert values["unit_charge_rate1"] == 2500
    assert values["unit_charge_rate2"] == 1200
    assert values["unit_charge_rate3"] is None  # not implemented: the tariff has two rates
    registers = rm.encode_block(rm.Block.SETTINGS, values)
    assert rm.decode_block(rm.Block.SETTINGS, registers) == values
    assert ("0.0.17.0.0.255", 3) in calls  # the threshold in force (threshold_active)


def test_token_digits() -> None:
    assert rm.token_digits(rm.token_number("00000000000000000042")) == "00000000000000000042"
    with pytest.raises(ValidationError):
        rm.token_number("1234")
    with pytest.raises(ValidationError):
        rm.token_digits(10**20)


# -- the document ---------------------------------------------------------------------------------


def test_register_map_document_is_current() -> None:
    path = ROOT / "docs" / "register-map.md"
    assert path.read_text() == registermap_docs.render_markdown(), (
        "docs/register-map.md is stale: run python -m cli.gendocs"
    )


def test_document_lists_every_row_and_the_mbpoll_example() -> None:
    text = registermap_docs.render_markdown()
    for row in rm.ROWS:
        if "[" in row.name and "[0]" not in row.name:
            continue
        assert f"`{row.name}`" in text, row.name
    example = " ".join(
        str(v) for v in rm.encode_command(CommandEnvelope("X", 1, Command.credit_transfer(7, 5000)))
    )
    assert f"-t 4 -r {rm.COMMAND_START} 127.0.0.1 {example}" in text


def test_table_as_json_is_the_table() -> None:
    table = json.loads(json.dumps(rm.table_as_json()))
    assert [entry["name"] for entry in table] == [row.name for row in rm.ROWS]
    energy = next(entry for entry in table if entry["name"] == "energy_import_wh")
    assert energy == {
        "name": "energy_import_wh",
        "block": "measurements",
        "table": "input",
        "read_function": 4,
        "address": 104,
        "registers": 4,
        "type": "u64",
        "scaler": 0,
        "unit": "Wh",
        "access": "r",
        "obis": "1.0.1.8.0.255",
        "attribute": 2,
        "element": None,
        "minimum": None,
        "maximum": None,
        "enum": None,
        "optional": False,
        "description": "active energy import, total",
    }
    control = next(entry for entry in table if entry["name"] == "control_state")
    assert control["enum"] == {"disconnected": 0, "connected": 1, "ready_for_reconnection": 2}


@given(st.sampled_from(list(rm.Block)), ORDERS, st.data())
@settings(max_examples=400)
def test_the_compiled_block_decoder_agrees_with_the_generic_one(
    block: rm.Block, order: rm.WordOrder, data: st.DataObject
) -> None:
    spec = rm.BLOCKS[block]
    size = data.draw(st.sampled_from([spec.size, spec.size, spec.size - 1, spec.size + 1]))
    registers = data.draw(
        st.lists(
            st.one_of(st.integers(0, 0xFFFF), st.sampled_from([0, 0xFFFF, 0x7FC0, 0x8000, 9999])),
            min_size=max(size, 0),
            max_size=max(size, 0),
        )
    )
    if data.draw(st.booleans()) and registers:
        registers[0] = data.draw(st.sampled_from([-1, 0x10000]))
    try:
        expected: Any = rm.decode_rows(spec.rows, registers, order)
    except DecodeError as exc:
        expected = type(exc)
    try:
        got: Any = rm.decode_block(block, registers, order)
    except DecodeError as exc:
        got = type(exc)
    if isinstance(expected, dict) and isinstance(got, dict):
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(got[name])
            else:
                assert got[name] == value, name
                assert type(got[name]) is type(value), name
    else:
        assert got == expected


@given(st.sampled_from(list(rm.Block)), ORDERS, st.data())
@settings(max_examples=300)
def test_the_compiled_block_encoder_agrees_with_the_generic_one(
    block: rm.Block, order: rm.WordOrder, data: st.DataObject
) -> None:
    spec = rm.BLOCKS[block]
    values = {row.name: data.draw(_values(row)) for row in spec.rows}
    if data.draw(st.booleans()):  # spoil one value
        row = data.draw(st.sampled_from(spec.rows))
        values[row.name] = data.draw(
            st.sampled_from([None, -1, 2**64, True, "x" * 70, b"\x01", math.nan, 1e39, "a\0b"])
        )
    try:
        expected: Any = rm.encode_rows(spec.rows, values, order)
    except ValidationError as exc:
        expected = type(exc)
    try:
        got: Any = rm.encode_block(block, values, order)
    except ValidationError as exc:
        got = type(exc)
    assert got == expected


def test_one_codec_per_data_type_serves_both_paths() -> None:
    """The row-by-row codec and the compiled block codec use the same type codec table."""
    assert set(rm.TYPE_CODECS) == set(rm.DataType)
    for spec in rm.BLOCKS.values():
        codec = rm.RowsCodec(spec.rows)
        assert all(
            used is rm.TYPE_CODECS[row.dtype]
            for row, used in zip(spec.rows, codec.codecs, strict=True)
        )
    row = rm.ROW["cmd_arg1"]
    values = {r.name: 0 for r in rm.BLOCKS[rm.Block.COMMAND].rows}
    values.update(cmd_token=0, cmd_tag=b"", cmd_arg1=-1)
    with pytest.raises(ValidationError) as one:
        rm.encode_value(row, -1)
    with pytest.raises(ValidationError) as compiled:
        rm.encode_block(rm.Block.COMMAND, values)
    assert (
        str(one.value) == str(compiled.value) == "cmd_arg1 is a u64 0..18446744073709551615, got -1"
    )
