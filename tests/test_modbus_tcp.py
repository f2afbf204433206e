"""Modbus TCP end to end: the simulator's server on loopback, the head-end's link, and a bare
pymodbus client (and mbpoll, when installed) as independent masters."""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient

from headend.links.base import send_command
from headend.links.endpoint import LinkOptions, open_link, parse_endpoint
from headend.links.modbus import LinkSettings, ModbusLink, ModbusTcpLink
from headend.links.pool import LinkPool
from headend.vending import vend_credit
from meter_sim.config import MeterConfig, StsConfig
from meter_sim.keypad import key_data_from_config
from meter_sim.modbus_server import serve_tcp, serve_tcp_per_meter
from meter_sim.runtime import MeterRuntime
from protocols import registermap as rm
from protocols.clock import ManualClock
from protocols.commands import Command, CommandCode, CommandEnvelope, ResultCode
from protocols.cosem import OBIS_SERIAL, OBIS_TOKEN_GATEWAY, TokenStatus
from protocols.disconnect import ControlState
from protocols.errors import ConfigError, DeviceException, LinkClosed, LinkError, LinkTimeout
from protocols.readings import EventCode

START = 1_767_225_600.0  # 2026-01-01T00:00:00Z, a Thursday
KEY = bytes.fromhex("00112233445566778899aabbccddeeff")
STS = StsConfig(vending_key="abababababababab", drn="00000000000")
FAST = LinkSettings(timeout=0.5, retries=2, backoff=0.01)


# -- helpers shared with the RTU tests ------------------------------------------------------------


def open_meter(
    state_dir: Path, clock: ManualClock, meter_id: str, unit: int, **overrides: Any
) -> MeterRuntime:
    config = MeterConfig(meter_id, modbus_unit=unit, serial=f"SN-{meter_id}", **overrides)
    return MeterRuntime.open(config, clock, state_dir)


def cosem(runtime: MeterRuntime, row: rm.Row) -> Any:
    """The value of a row's COSEM attribute, straight from the meter's objects."""
    assert row.obis is not None
    assert row.attribute is not None
    value = runtime.read(row.obis, row.attribute)
    if row.element is not None:
        value = value[row.element] if row.element < len(value) else None
    return int(value) if isinstance(value, bool) else value


def f32(value: float) -> float:
    return float(struct.unpack(">f", struct.pack(">f", value))[0])


def expected_values(
    runtime: MeterRuntime, profile_start: int, event_since: int, written: dict[str, Any]
) -> dict[str, Any]:
    """What every row should read now, computed from the model without the server's code."""
    config = runtime.config
    snap = runtime.snapshot()
    values: dict[str, Any] = {
        "map_version": rm.MAP_VERSION,
        "word_order": 0 if config.word_order == "big" else 1,
        "order_probe": rm.ORDER_PROBE,
        "manufacturer": config.manufacturer,
        "model": config.model,
        "firmware": config.firmware,
        "serial": runtime.read(OBIS_SERIAL, 2),
        "meter_id": runtime.meter_id,
    }
    for field in fields(snap):
        values[field.name] = getattr(snap, field.name)
    for rate, wh in enumerate(snap.energy_rates_wh, start=1):
        values[f"energy_rate{rate}_wh"] = wh
    values["output_state"] = int(snap.control_state is ControlState.CONNECTED)
    values["status"] = int(snap.status)
    values["power_w_f32"] = f32(snap.power_w)
    values["voltage_v_f32"] = f32(snap.voltage_dv / 10)
    values["current_a_f32"] = f32(snap.current_ma / 1000)
    values["power_factor_f32"] = f32(snap.power_factor_milli / 1000)
    values["frequency_hz_f32"] = f32(snap.frequency_chz / 100)
    for row in rm.BLOCKS[rm.Block.SETTINGS].rows:
        values[row.name] = cosem(runtime, row)
    last = runtime.last_result()
    values.update(
        result_sequence=last.sequence,
        result_code=last.code,
        result_last_transfer=last.last_transfer,
    )
    rows = runtime.profile_between(profile_start, 2**63)[: rm.PROFILE_WINDOW_ROWS]
    values.update(profile_start=profile_start, profile_count=len(rows))
    for index in range(rm.PROFILE_WINDOW_ROWS):
        captured = rows[index] if index < len(rows) else None
        for field_name in rm.ROW_FIELDS["profile"]:
            values[f"profile[{index}].{field_name}"] = (
                getattr(captured, field_name) if captured else 0
            )
    events = runtime.events_since(event_since, rm.EVENT_WINDOW_ROWS)
    values.update(event_since=event_since, event_count=len(events))
    for index in range(rm.EVENT_WINDOW_ROWS):
        event = events[index] if index < len(events) else None
        for field_name in rm.ROW_FIELDS["event"]:
            value = getattr(event, field_name) if event else 0
            values[f"event[{index}].{field_name}"] = value
    keypad = config.sts is not None
    values.update(
        token_status=runtime.read(OBIS_TOKEN_GATEWAY, 6) if keypad else None,
        token_time=runtime.read(OBIS_TOKEN_GATEWAY, 3) if keypad else None,
    )
    values.update(written)
    return values


async def read_row(client: AsyncModbusTcpClient, row: rm.Row, unit: int) -> list[int]:
    if row.table is rm.Table.INPUT:
        response = await client.read_input_registers(row.address, count=row.size, device_id=unit)
    else:
        response = await client.read_holding_registers(row.address, count=row.size, device_id=unit)
    assert not response.isError(), (row.name, response)
    return list(response.registers)


async def check_every_row(
    client: Any, runtime: MeterRuntime, unit: int, written: dict[str, Any] | None = None
) -> int:
    """Write the window starts, then read every row on its own and compare with the model."""
    order = runtime.config.word_order
    profile_start = int(START) + 3600
    event_since = 1
    for name, value in (("profile_start", profile_start), ("event_since", event_since)):
        row = rm.ROW[name]
        response = await client.write_registers(
            row.address, rm.encode_value(row, value, order), device_id=unit
        )
        assert not response.isError()
    # a command stored without executing it (go = 0) and a token stored without entering it
    tag = bytes(range(1, 17))
    staged = CommandEnvelope(
        runtime.meter_id, 41, Command(CommandCode.SET_LOW_CREDIT_THRESHOLD, (1234,)), tag
    )
    token = 12345678901234567890
    for address, values in (
        (rm.COMMAND_START, rm.encode_command(staged, order, go=False)),
        (rm.ROW["token"].address, [*rm.encode_value(rm.ROW["token"], token), 0]),
    ):
        response = await client.write_registers(address, values, device_id=unit)
        assert not response.isError()
    stored = {
        "cmd_sequence": 41,
        "cmd_code": 5,
        "cmd_arg1": 1234,
        "cmd_arg2": 0,
        "cmd_token": 0,
        "cmd_tag": tag,
        "cmd_go": 0,
        "token": token,
        "token_enter": 0,
        "token_result": ResultCode.NONE,
    }
    expected = expected_values(runtime, profile_start, event_since, {**stored, **(written or {})})
    checked = 0
    for row in rm.ROWS:
        registers = await read_row(client, row, unit)
        value = rm.decode_value(row, registers, order)
        assert value == expected[row.name], row.name
        checked += 1
        # the row's OBIS code and attribute name the object that holds this very value
        snapshot_blocks = (rm.Block.MEASUREMENTS, rm.Block.ACCOUNT, rm.Block.STATUS)
        # emergency_credit is in the snapshot only while in use
        if row.block in snapshot_blocks and row.obis and row.name != "emergency_credit":
            assert cosem(runtime, row) == value, row.name
    return checked


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def meters(tmp_path: Path, clock: ManualClock) -> list[MeterRuntime]:
    runtimes = [
        open_meter(tmp_path, clock, "MTR-0001", 1, initial_credit=10_000_000),
        open_meter(tmp_path, clock, "MTR-0002", 2, word_order="little", initial_credit=0),
        open_meter(
            tmp_path,
            clock,
            "MTR-0003",
            3,
            auth_key=KEY.hex(),
            control_mode=4,
            initial_credit=10_000_000,
        ),
        open_meter(
            tmp_path, clock, "KP-0004", 4, credit_unit="energy", sts=STS, initial_credit=90_000
        ),
    ]
    clock.advance(26 * 3600)  # a day and more of load profile and events
    for runtime in runtimes:
        runtime.sync()
    return runtimes


@pytest.fixture
async def server(meters: list[MeterRuntime]) -> AsyncIterator[Any]:
    async with serve_tcp(meters) as service:
        yield service


@pytest.fixture
async def client(server: Any) -> AsyncIterator[AsyncModbusTcpClient]:
    bare = AsyncModbusTcpClient("127.0.0.1", port=server.port, timeout=2, retries=0)
    assert await bare.connect()
    yield bare
    bare.close()


async def link_to(server: Any, unit: int, settings: LinkSettings = FAST) -> ModbusTcpLink:
    link = ModbusTcpLink("127.0.0.1", server.port, unit, settings=settings)
    await link.connect()
    return link


# -- reading --------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1, 2, 3])
async def test_every_mapped_value_reads_as_the_model(
    meters: list[MeterRuntime], client: AsyncModbusTcpClient, index: int
) -> None:
    runtime = meters[index]
    checked = await check_every_row(client, runtime, runtime.config.modbus_unit)
    assert checked == len(rm.ROWS)


async def test_the_link_reads_the_snapshot_profile_and_events(
    server: Any, meters: list[MeterRuntime], clock: ManualClock
) -> None:
    for runtime in meters:
        link = await link_to(server, runtime.config.modbus_unit)
        try:
            assert link.meter_id == runtime.meter_id
            assert link.word_order == runtime.config.word_order
            assert await link.read_snapshot() == runtime.snapshot()
            clock.advance(600)  # a value read is the meter's value at that moment
            assert await link.read_snapshot() == runtime.snapshot()
            everything = runtime.profile_between(0, 2**40)
            assert len(everything) > 3 * rm.PROFILE_WINDOW_ROWS
            assert await link.read_profile(0, 2**40) == everything
            middle = everything[5:17]
            assert await link.read_profile(middle[0].time, middle[-1].time) == middle
            assert await link.read_profile(10, 5) == []
            events = runtime.events_since(0, 1000)
            assert await link.read_events(0, 1000) == events
            assert await link.read_events(1, 3) == events[1:4]
            assert await link.read_events(runtime.snapshot().last_event_seq) == []
        finally:
            await link.close()


async def test_many_events_page_through_the_window(server: Any, meters: list[MeterRuntime]) -> None:
    runtime = meters[0]
    link = await link_to(server, 1)
    try:
        for sequence in range(1, 21):  # 20 threshold changes, 20 events
            command = Command(CommandCode.SET_LOW_CREDIT_THRESHOLD, (sequence,))
            envelope = CommandEnvelope(runtime.meter_id, sequence, command)
            assert (await link.execute(envelope)).code is ResultCode.OK
        events = runtime.events_since(0, 1000)
        assert len(events) > 2 * rm.EVENT_WINDOW_ROWS
        assert await link.read_events(0, 1000) == events
    finally:
        await link.close()


async def test_floats_and_word_order_as_a_third_party_reads_them(
    meters: list[MeterRuntime], client: AsyncModbusTcpClient
) -> None:
    little = meters[1]
    probe = await read_row(client, rm.ROW["order_probe"], 2)
    assert probe == [0x0304, 0x0102]
    assert await read_row(client, rm.ROW["word_order"], 2) == [1]
    big_probe = await read_row(client, rm.ROW["order_probe"], 1)
    assert big_probe == [0x0102, 0x0304]
    voltage = await read_row(client, rm.ROW["voltage_v_f32"], 2)
    value = struct.unpack(">f", struct.pack(">2H", voltage[1], voltage[0]))[0]
    assert math.isclose(value, little.snapshot().voltage_dv / 10, rel_tol=1e-6)


async def test_reads_of_unmapped_addresses_are_02_and_coils_are_01(
    client: AsyncModbusTcpClient,
) -> None:
    gap = rm.BLOCKS[rm.Block.IDENTIFICATION].end  # 72..99 are not mapped
    for request in (
        client.read_input_registers(gap, count=1, device_id=1),
        client.read_input_registers(gap - 2, count=4, device_id=1),  # partly mapped
        client.read_input_registers(9000, count=2, device_id=1),  # beyond the table
        client.read_holding_registers(0, count=1, device_id=1),
    ):
        response = await request
        assert response.isError()
        assert response.exception_code == 2
    for request in (  # the map has no coils or discrete inputs: illegal function
        client.read_coils(0, count=1, device_id=1),
        client.read_discrete_inputs(0, count=1, device_id=1),
    ):
        response = await request
        assert response.isError()
        assert response.exception_code == 1


async def test_a_unit_without_a_meter_gets_exception_0b(server: Any) -> None:
    link = ModbusTcpLink("127.0.0.1", server.port, 99, settings=FAST)
    with pytest.raises(DeviceException) as caught:
        await link.read_snapshot()
    assert caught.value.code == 0x0B
    await link.close()


# -- commands -------------------------------------------------------------------------------------


async def test_every_command_round_trips_through_the_link(
    server: Any, meters: list[MeterRuntime]
) -> None:
    runtime = meters[1]  # no key, no credit, little-endian words
    link = await link_to(server, 2)
    sequence = 0

    async def run(command: Command) -> ResultCode:
        nonlocal sequence
        sequence += 1
        envelope = CommandEnvelope(runtime.meter_id, sequence, command)
        result = await link.execute(envelope)
        assert result.sequence == sequence
        last = runtime.last_result()  # the result block carries no detail text
        assert (last.sequence, last.code, last.last_transfer) == (
            result.sequence,
            result.code,
            result.last_transfer,
        )
        return result.code

    try:
        assert await run(Command(CommandCode.INVOKE_EMERGENCY_CREDIT)) is ResultCode.OK
        assert runtime.snapshot().emergency_credit == runtime.config.emergency_credit
        before = runtime.snapshot().credit
        assert await run(Command.credit_transfer(1, 50_000)) is ResultCode.OK
        assert runtime.snapshot().credit > before
        assert runtime.snapshot().last_transfer == 1
        assert await run(Command.remote_disconnect()) is ResultCode.OK
        assert runtime.snapshot().control_state is ControlState.DISCONNECTED
        assert await run(Command.remote_reconnect()) is ResultCode.OK  # mode 6: transition d
        assert runtime.snapshot().control_state is ControlState.READY_FOR_RECONNECTION
        assert await run(Command(CommandCode.SET_CONTROL_MODE, (4,))) is ResultCode.OK
        assert runtime.snapshot().control_mode == 4
        assert await run(Command(CommandCode.SET_LOW_CREDIT_THRESHOLD, (777,))) is ResultCode.OK
        assert runtime.snapshot().low_credit_threshold == 777
        assert await run(Command.set_clock(int(START) + 40 * 86400)) is ResultCode.OK
        assert runtime.now() == int(START) + 40 * 86400
        assert await run(Command(CommandCode.CLEAR_TAMPER)) is ResultCode.OK
        refused = await run(Command.enter_token("12345678901234567890"))
        assert refused is ResultCode.NOT_SUPPORTED  # no keypad decoder in this meter
        codes = [event.code for event in runtime.events_since(0, 1000)]
        for code in (
            EventCode.EMERGENCY_CREDIT_INVOKED,
            EventCode.TOPUP_ACCEPTED,
            EventCode.RELAY_DISCONNECTED,
            EventCode.CONTROL_MODE_CHANGED,
            EventCode.THRESHOLD_CHANGED,
            EventCode.CLOCK_SET,
            EventCode.TOKEN_REFUSED,
        ):
            assert code in codes
    finally:
        await link.close()


async def test_tokens_through_the_token_gateway_and_the_command_block(
    server: Any, meters: list[MeterRuntime], client: AsyncModbusTcpClient
) -> None:
    runtime = meters[3]
    key = key_data_from_config(STS)
    before = runtime.snapshot().credit
    first = vend_credit(key, 1000, _issued(0), rnd=3)
    second = vend_credit(key, 2000, _issued(5), rnd=4)
    assert first.wh is not None
    assert second.wh is not None
    gateway = rm.BLOCKS[rm.Block.TOKEN_GATEWAY]
    values = [*rm.encode_value(rm.ROW["token"], rm.token_number(first.digits)), 1]
    response = await client.write_registers(gateway.start, values, device_id=4)
    assert not response.isError()
    registers = await client.read_holding_registers(gateway.start, count=gateway.size, device_id=4)
    state = rm.decode_block(rm.Block.TOKEN_GATEWAY, registers.registers)
    assert state["token_status"] is TokenStatus.EXECUTION_OK
    assert state["token_result"] is ResultCode.OK
    assert state["token"] == int(first.digits)
    assert runtime.snapshot().credit == before + first.wh
    response = await client.write_registers(gateway.start, values, device_id=4)  # again: used
    registers = await client.read_holding_registers(gateway.start, count=gateway.size, device_id=4)
    assert rm.decode_block(rm.Block.TOKEN_GATEWAY, registers.registers)["token_result"] is (
        ResultCode.TOKEN_REFUSED
    )
    assert runtime.snapshot().credit == before + first.wh

    link = await link_to(server, 4)
    try:
        result = await send_command(link, Command.enter_token(second.digits), None)
        assert result.code is ResultCode.OK
        assert runtime.snapshot().credit == before + first.wh + second.wh
    finally:
        await link.close()


def _issued(minutes: int) -> Any:
    from datetime import UTC, datetime, timedelta

    return datetime(2025, 12, 31, tzinfo=UTC) + timedelta(minutes=minutes)


async def test_a_repeated_command_is_answered_again_and_applied_once(
    server: Any, meters: list[MeterRuntime]
) -> None:
    runtime = meters[0]
    link = await link_to(server, 1)
    try:
        before = runtime.snapshot().credit
        envelope = CommandEnvelope(runtime.meter_id, 1, Command.credit_transfer(9, 1234))
        first = await link.execute(envelope)
        again = await link.execute(envelope)
        assert first.code is ResultCode.OK
        assert again == first
        assert runtime.snapshot().credit == before + 1234
        accepted = [e for e in runtime.events_since(0, 1000) if e.code is EventCode.TOPUP_ACCEPTED]
        assert len(accepted) == 1
        # the same transfer under a new sequence: acknowledged as a duplicate, applied zero times
        repeat = await link.execute(
            CommandEnvelope(runtime.meter_id, 2, Command.credit_transfer(9, 1234))
        )
        assert repeat.code is ResultCode.DUPLICATE
        assert runtime.snapshot().credit == before + 1234
    finally:
        await link.close()


async def test_forged_tags_and_replays_are_refused_with_their_codes_and_events(
    server: Any, meters: list[MeterRuntime]
) -> None:
    runtime = meters[2]  # has a key
    link = await link_to(server, 3)
    meter_id = runtime.meter_id
    try:
        credit = runtime.snapshot().credit
        unsigned = CommandEnvelope(meter_id, 1, Command.credit_transfer(1, 500))
        assert (await link.execute(unsigned)).code is ResultCode.AUTH_FAILED
        forged = CommandEnvelope.signed(meter_id, 1, Command.credit_transfer(1, 500), b"wrong")
        assert (await link.execute(forged)).code is ResultCode.AUTH_FAILED
        other_meter = CommandEnvelope.signed("MTR-0001", 1, Command.credit_transfer(1, 500), KEY)
        block = rm.encode_command(other_meter)  # a tag made for another meter's id
        tagged = CommandEnvelope(meter_id, 1, other_meter.command, other_meter.tag)
        assert rm.encode_command(tagged) == block
        assert (await link.execute(tagged)).code is ResultCode.AUTH_FAILED
        assert runtime.snapshot().credit == credit

        good = CommandEnvelope.signed(meter_id, 1, Command.credit_transfer(1, 500), KEY)
        assert (await link.execute(good)).code is ResultCode.OK
        assert runtime.snapshot().credit == credit + 500
        replay = CommandEnvelope.signed(meter_id, 1, Command.remote_disconnect(), KEY)
        assert (await link.execute(replay)).code is ResultCode.REPLAYED
        older = CommandEnvelope.signed(meter_id, 1, Command.credit_transfer(2, 900), KEY)
        assert (await link.execute(older)).code is ResultCode.REPLAYED
        assert runtime.snapshot().credit == credit + 500
        assert runtime.snapshot().control_state is ControlState.CONNECTED
        codes = [event.code for event in runtime.events_since(0, 1000)]
        assert codes.count(EventCode.AUTH_FAILED) == 3
        assert codes.count(EventCode.REPLAY_REFUSED) == 2
        result = await send_command(link, Command.remote_disconnect(), KEY)
        assert result.code is ResultCode.OK
        assert result.sequence == 2
    finally:
        await link.close()


# -- refused writes -------------------------------------------------------------------------------


async def test_bad_writes_get_02_or_03_and_change_nothing(
    server: Any, meters: list[MeterRuntime], client: AsyncModbusTcpClient
) -> None:
    runtime = meters[0]
    registers = server.meters[1]
    good = rm.encode_command(CommandEnvelope(runtime.meter_id, 1, Command.remote_disconnect()))
    staged = rm.encode_command(
        CommandEnvelope(runtime.meter_id, 5, Command(CommandCode.CLEAR_TAMPER)), go=False
    )
    assert not (await client.write_registers(rm.COMMAND_START, staged, device_id=1)).isError()
    before_written = dict(registers.written)
    before_snapshot = runtime.snapshot()
    before_result = runtime.last_result()
    spec = rm.BLOCKS[rm.Block.COMMAND]
    mode = Command(CommandCode.SET_CONTROL_MODE, (4,))
    mode_block = rm.encode_command(CommandEnvelope(runtime.meter_id, 1, mode))

    def with_value(name: str, value: int) -> list[int]:
        block = list(good)
        row = rm.ROW[name]
        offset = row.address - spec.start
        block[offset : offset + row.size] = rm.encode_value(
            rm.Row("x", rm.Block.COMMAND, rm.Table.HOLDING, 0, row.dtype, "x", length=row.length),
            value,
        )
        return block

    cases: list[tuple[Callable[[], Any], int]] = [
        # read-only or unmapped -> 02
        (lambda: client.write_register(1000, 5, device_id=1), 2),  # settings
        (lambda: client.write_registers(rm.RESULT_START, [0, 9], device_id=1), 2),
        (lambda: client.write_registers(rm.COMMAND_START, [*good, 0], device_id=1), 2),  # spills
        (lambda: client.write_register(999, 1, device_id=1), 2),  # unmapped
        (lambda: client.write_register(rm.ROW["profile_count"].address, 1, device_id=1), 2),
        # no coils -> 01
        (lambda: client.write_coil(0, True, device_id=1), 1),
        # values no meter accepts -> 03
        (lambda: client.write_register(rm.ROW["cmd_go"].address, 2, device_id=1), 3),
        (lambda: client.write_register(rm.ROW["cmd_code"].address, 10, device_id=1), 3),
        (
            lambda: client.write_registers(
                rm.COMMAND_START, with_value("cmd_code", 0), device_id=1
            ),
            3,
        ),
        (
            lambda: client.write_registers(
                rm.COMMAND_START, with_value("cmd_sequence", 0), device_id=1
            ),
            3,
        ),
        (
            lambda: client.write_register(rm.ROW["token"].address + 2, 10_000, device_id=1),
            3,
        ),
        (
            lambda: client.write_registers(
                rm.COMMAND_START,
                [*mode_block[:3], 0, 0, 0, 9, *good[7:]],
                device_id=1,
            ),
            3,
        ),
    ]
    for request, code in cases:
        response = await request()
        assert response.isError(), response
        assert response.exception_code == code, response
    assert registers.written == before_written
    assert runtime.snapshot() == before_snapshot
    assert runtime.last_result() == before_result
    echo = await client.read_holding_registers(rm.COMMAND_START, count=rm.COMMAND_SIZE, device_id=1)
    assert echo.registers == staged
    link = await link_to(server, 1)
    try:
        bad = CommandEnvelope(runtime.meter_id, 1, Command.remote_disconnect())
        with pytest.raises(ValueError, match="meter"):
            await link.execute(CommandEnvelope("MTR-9999", 1, bad.command))
    finally:
        await link.close()


async def test_go_executes_once_and_a_single_register_write_of_go_works(
    server: Any, meters: list[MeterRuntime], client: AsyncModbusTcpClient
) -> None:
    runtime = meters[0]
    envelope = CommandEnvelope(runtime.meter_id, 1, Command.remote_disconnect())
    staged = rm.encode_command(envelope, go=False)
    assert not (await client.write_registers(rm.COMMAND_START, staged, device_id=1)).isError()
    assert runtime.last_result().code is ResultCode.NONE  # stored, not executed
    go = rm.ROW["cmd_go"].address
    response = await client.write_register(go, 1, device_id=1)
    assert not response.isError()
    assert response.registers == [1]  # the echo
    assert runtime.last_result().code is ResultCode.OK
    assert runtime.snapshot().control_state is ControlState.DISCONNECTED
    events_before = runtime.snapshot().last_event_seq
    assert not (await client.write_register(go, 1, device_id=1)).isError()  # same sequence again
    assert runtime.last_result().code is ResultCode.OK
    assert runtime.snapshot().last_event_seq == events_before  # nothing executed twice


async def test_a_command_is_answered_once_on_disk_and_its_commit_leaves_the_loop_free(
    server: Any, meters: list[MeterRuntime], monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = meters[0]
    entered, release = threading.Event(), threading.Event()
    assert runtime.store is not None
    database = runtime.store.fleet
    real_write = database.write

    def slow_write(prepared: Any) -> int:  # the commit, with its fsync, waits for the test
        entered.set()
        if not release.wait(5):
            raise AssertionError("the commit ran on the event loop: the test could not release it")
        return real_write(prepared)

    clients = [
        AsyncModbusTcpClient("127.0.0.1", port=server.port, timeout=10, retries=0) for _ in range(3)
    ]
    writer, watcher, other = clients
    for bare in clients:
        assert await bare.connect()
    try:
        monkeypatch.setattr(database, "write", slow_write)
        envelope = CommandEnvelope(runtime.meter_id, 1, Command.remote_disconnect())
        writing = asyncio.create_task(
            writer.write_registers(rm.COMMAND_START, rm.encode_command(envelope), device_id=1)
        )
        await asyncio.to_thread(entered.wait, 5)
        watching = asyncio.create_task(read_row(watcher, rm.ROW["result_code"], 1))
        assert await read_row(other, rm.ROW["result_code"], 2) == [int(ResultCode.NONE)]
        assert not writing.done(), "not answered before the state is on disk"
        assert not watching.done(), "no result block shows a command that is not on disk"
        release.set()
        assert not (await writing).isError()
        assert await watching == [int(ResultCode.OK)]
    finally:
        release.set()
        for bare in clients:
            bare.close()
    monkeypatch.setattr(database, "write", real_write)
    assert runtime.store is not None
    saved = MeterRuntime.open_stopped(runtime.config, runtime.store.path.parent)
    assert saved.last_result().code is ResultCode.OK


# -- faults ---------------------------------------------------------------------------------------


class DroppingProxy:
    """A loopback TCP proxy that closes the client's connection instead of passing on the next
    ``drops`` answers to function ``function`` (the request reaches the server; the answer is
    lost)."""

    def __init__(self, target_port: int, function: int, drops: int = 1) -> None:
        self.target_port = target_port
        self.function = function
        self.drops = drops
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> DroppingProxy:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        forward = asyncio.create_task(self._pipe(reader, up_writer))
        self.tasks.add(forward)
        try:
            while True:
                header = await up_reader.readexactly(7)
                length = int.from_bytes(header[4:6], "big")
                body = await up_reader.readexactly(length - 1)
                if body[0] == self.function and self.drops > 0:
                    self.drops -= 1
                    break
                writer.write(header + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            forward.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await forward
            self.tasks.discard(forward)
            for stream in (writer, up_writer):
                stream.close()
                with contextlib.suppress(ConnectionError):
                    await stream.wait_closed()
            self.tasks.discard(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while data := await reader.read(4096):
                writer.write(data)
                await writer.drain()


async def test_a_dropped_answer_during_a_command_is_retried_and_executed_once(
    server: Any, meters: list[MeterRuntime]
) -> None:
    runtime = meters[0]
    before = runtime.snapshot().credit
    async with DroppingProxy(server.port, function=0x17, drops=1) as proxy:
        link = ModbusTcpLink("127.0.0.1", proxy.port, 1, settings=FAST)
        try:
            envelope = CommandEnvelope(runtime.meter_id, 1, Command.credit_transfer(3, 4000))
            result = await link.execute(envelope, timeout=5.0)
            assert result.code is ResultCode.OK
            assert result.sequence == 1
            assert proxy.connections == 2  # the link reconnected after the drop
        finally:
            await link.close()
    assert runtime.snapshot().credit == before + 4000
    accepted = [e for e in runtime.events_since(0, 1000) if e.code is EventCode.TOPUP_ACCEPTED]
    assert [(e.a, e.b) for e in accepted] == [(3, 4000)]
    assert runtime.snapshot().last_command_seq == 1


async def test_reads_reconnect_after_the_connection_drops(
    server: Any, meters: list[MeterRuntime]
) -> None:
    quick = LinkSettings(timeout=0.25, retries=2, backoff=0.01)
    async with DroppingProxy(server.port, function=0x04, drops=2) as proxy:
        link = ModbusTcpLink("127.0.0.1", proxy.port, 1, settings=quick)
        try:
            assert await link.read_snapshot() == meters[0].snapshot()
            assert proxy.connections == 3
        finally:
            await link.close()
    async with DroppingProxy(server.port, function=0x04, drops=10) as proxy:
        link = ModbusTcpLink("127.0.0.1", proxy.port, 1, settings=quick)
        started = time.monotonic()
        with pytest.raises(LinkClosed, match="connection lost during the request"):
            await link.read_snapshot()
        assert time.monotonic() - started < 0.25  # each drop seen at once, not at a time-out
        assert proxy.connections == 3  # tried again twice
        await link.close()


async def test_a_drop_ends_the_request_without_spending_a_cancellation(
    server: Any, meters: list[MeterRuntime]
) -> None:
    """The drop ends the request by cancelling the task it waits in; that cancellation is
    taken back, so a time-out around the read still fires as a time-out, and a caller's own
    cancellation still goes through."""
    task = asyncio.current_task()
    assert task is not None
    once = LinkSettings(timeout=2.0, retries=0)
    async with DroppingProxy(server.port, function=0x04, drops=10) as proxy:
        link = ModbusTcpLink("127.0.0.1", proxy.port, 1, settings=once)
        try:
            async with asyncio.timeout(5.0):
                with pytest.raises(LinkClosed, match="connection lost during the request"):
                    await link.read_snapshot()
            assert task.cancelling() == 0
        finally:
            await link.close()
    async with SilentServer() as silent:
        link = ModbusTcpLink("127.0.0.1", silent.port, 1, settings=once)
        link.identification = rm.Identification("MTR-0001", "x", "y", "z", "s")  # skip the read
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await link.read_snapshot()
            assert task.cancelling() == 0
            reading = asyncio.create_task(link.read_snapshot())
            await asyncio.sleep(0.05)
            reading.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reading
            assert not link.channel.connected  # a caller giving up drops the connection
        finally:
            await link.close()


class SilentServer:
    """A loopback TCP server that accepts connections and never answers."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> SilentServer:
        self.server = await asyncio.start_server(self._swallow, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _swallow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(4096):
                pass

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await self.server.wait_closed()


async def test_a_silent_server_times_out_and_a_closed_port_is_link_closed() -> None:
    async with SilentServer() as silent:
        port = silent.port
        link = ModbusTcpLink(
            "127.0.0.1", port, 1, settings=LinkSettings(timeout=0.2, retries=1, backoff=0.01)
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(LinkTimeout):
            await link.read_snapshot()
        assert loop.time() - started < 2.0
        await link.close()
    closed = ModbusTcpLink("127.0.0.1", port, 1, settings=FAST)
    with pytest.raises(LinkClosed):
        await closed.read_snapshot()
    await closed.close()
    with pytest.raises(LinkClosed):
        await closed.read_snapshot()  # a closed link stays closed


async def test_execute_gives_up_with_link_timeout_when_no_confirmation_arrives() -> None:
    async with SilentServer() as silent:
        settings = LinkSettings(timeout=0.1, backoff=0.01)
        link = ModbusTcpLink("127.0.0.1", silent.port, 1, settings=settings)
        link.meter_id = "MTR-0001"
        link.identification = rm.Identification("MTR-0001", "x", "y", "z", "s")  # skip the read
        with pytest.raises(LinkTimeout, match="no confirmation"):
            await link.execute(
                CommandEnvelope("MTR-0001", 1, Command.remote_disconnect()), timeout=0.5
            )
        await link.close()


# -- servers and endpoints ------------------------------------------------------------------------


async def test_one_port_per_meter_for_fleets_beyond_247(tmp_path: Path, clock: ManualClock) -> None:
    runtimes = [open_meter(tmp_path, clock, f"BIG-{n:03d}", 1) for n in range(5)]
    with pytest.raises(ConfigError, match="share unit id 1"):
        async with serve_tcp(runtimes):
            pass
    async with serve_tcp_per_meter(runtimes) as services:
        assert len({service.port for service in services}) == 5
        for runtime, service in zip(runtimes, services, strict=True):
            pool = LinkPool()
            link = await open_link(f"tcp://127.0.0.1:{service.port}/1", pool=pool)
            try:
                assert link.meter_id == runtime.meter_id
                assert (await link.read_snapshot()).meter_id == runtime.meter_id
            finally:
                await pool.close()


async def test_open_link_checks_the_expected_meter(server: Any) -> None:
    pool = LinkPool()
    link = await open_link(
        f"tcp://127.0.0.1:{server.port}/2?timeout=0.5&retries=1",
        LinkOptions(meter_id="MTR-0002"),
        pool=pool,
    )
    assert isinstance(link, ModbusLink)
    assert link.settings == LinkSettings(timeout=0.5, retries=1)
    await link.close()
    with pytest.raises(LinkError, match="expected meter MTR-0001, found MTR-0002"):
        await open_link(
            f"tcp://127.0.0.1:{server.port}/2", LinkOptions(meter_id="MTR-0001"), pool=pool
        )
    await pool.close()


def test_endpoint_parsing() -> None:
    tcp = parse_endpoint("tcp://127.0.0.1:5020/3")
    assert (tcp.scheme, tcp.host, tcp.port, tcp.path) == ("tcp", "127.0.0.1", 5020, "/3")
    rtu = parse_endpoint("rtu:///dev/ttyUSB0?baud=9600&unit=3&parity=E&stopbits=2")
    assert rtu.device == "/dev/ttyUSB0"
    assert rtu.int_param("unit", 1, 1, 247) == 3
    assert rtu.param("parity") == "E"
    url = parse_endpoint("rtu://socket://127.0.0.1:7000?unit=5")
    assert url.device == "socket://127.0.0.1:7000"
    assert parse_endpoint("rtu://loop://").device == "loop://"
    for bad in (
        "127.0.0.1:502",
        "tcp://:502/1",
        "rtu://?unit=1",
        "tcp://h:99999/1",
        "tcp://h/1?a=1&a=2",
    ):
        with pytest.raises(ConfigError):
            parse_endpoint(bad)
    with pytest.raises(ConfigError, match="unit id"):
        asyncio.run(open_link("tcp://127.0.0.1:1/300", pool=LinkPool()))
    with pytest.raises(ConfigError, match="unknown scheme"):
        asyncio.run(open_link("http://127.0.0.1/1", pool=LinkPool()))
    with pytest.raises(ConfigError, match="unknown parameter"):
        asyncio.run(open_link("tcp://127.0.0.1:1/1?baud=9600", pool=LinkPool()))
    with pytest.raises(ConfigError, match="an integer"):
        asyncio.run(open_link("rtu://loop://?unit=x", pool=LinkPool()))


# -- an independent master ------------------------------------------------------------------------

MBPOLL = shutil.which("mbpoll")


async def _mbpoll(*args: str) -> str:
    assert MBPOLL is not None
    process = await asyncio.create_subprocess_exec(
        MBPOLL,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, err.decode()
    return out.decode()


def mbpoll_values(output: str) -> dict[int, int]:
    """``[104]: 	0`` lines of mbpoll's output -> {reference: value}."""
    values: dict[int, int] = {}
    for raw in output.splitlines():
        line = raw.strip()
        if line.startswith("[") and "]:" in line:
            reference, _, value = line[1:].partition("]:")
            values[int(reference)] = int(value.split()[0])
    return values


@pytest.mark.skipif(MBPOLL is None, reason="mbpoll is not installed (apt-get install mbpoll)")
async def test_mbpoll_reads_energy_and_transfers_credit_following_the_doc(
    server: Any, meters: list[MeterRuntime]
) -> None:
    runtime = meters[0]
    common = ["-1", "-0", "-a", "1", "-p", str(server.port)]
    probe = rm.ROW["order_probe"].address
    out = await _mbpoll(*common, "-t", "3:int", "-B", "-r", str(probe), "-c", "1", "127.0.0.1")
    assert mbpoll_values(out) == {probe: rm.ORDER_PROBE}
    energy = rm.ROW["energy_import_wh"].address
    out = await _mbpoll(*common, "-t", "3", "-r", str(energy), "-c", "4", "127.0.0.1")
    words = mbpoll_values(out)
    value = sum(words[energy + n] << (16 * (3 - n)) for n in range(4))
    assert value == runtime.snapshot().energy_import_wh > 0
    before = runtime.snapshot().credit
    block = rm.encode_command(
        CommandEnvelope(runtime.meter_id, 1, Command.credit_transfer(7, 5000))
    )
    await _mbpoll(*common, "-t", "4", "-r", str(rm.COMMAND_START), "127.0.0.1", *map(str, block))
    out = await _mbpoll(
        *common, "-t", "4", "-r", str(rm.RESULT_START), "-c", str(rm.RESULT_SIZE), "127.0.0.1"
    )
    assert list(mbpoll_values(out).values()) == [0, 1, 0, 0, 7]
    assert runtime.snapshot().credit == before + 5000
