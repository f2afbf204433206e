"""Modbus conformance of the simulator's TCP server, checked by a raw-socket master that frames
its own ADUs (MBAP header + PDU), so that nothing a client library corrects or refuses to send
hides the server's answer: function 23 changes nothing when it is refused, malformed requests
get the request's function code with exception 03, every function the map does not serve gets
exception 01, and read device identification (0x2B/0x0E) answers from the meter's
identification."""

from __future__ import annotations

import asyncio
import logging
import shutil
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymodbus.client import AsyncModbusTcpClient

from meter_sim.modbus_server import _MeterDecoder, char_seconds, frame_silence, serve_tcp
from meter_sim.runtime import MeterRuntime
from protocols import modbus_functions as mf
from protocols import registermap as rm
from protocols.clock import ManualClock
from protocols.commands import Command, CommandEnvelope, ResultCode
from protocols.disconnect import ControlState
from tests.test_modbus_tcp import START, open_meter

MBPOLL = shutil.which("mbpoll")


class RawMaster:
    """A Modbus TCP master that sends hand-built PDUs and returns the answer's PDU."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.tid = 0

    async def ask(self, unit: int, pdu: bytes) -> bytes:
        self.tid += 1
        self.writer.write(struct.pack(">HHHB", self.tid, 0, len(pdu) + 1, unit) + pdu)
        await self.writer.drain()
        header = await asyncio.wait_for(self.reader.readexactly(7), 5)
        tid, protocol, length, answered_unit = struct.unpack(">HHHB", header)
        assert (tid, protocol, answered_unit) == (self.tid, 0, unit)
        return await asyncio.wait_for(self.reader.readexactly(length - 1), 5)


@pytest.fixture
def meters(tmp_path: Path) -> list[MeterRuntime]:
    clock = ManualClock(START)
    runtimes = [
        open_meter(tmp_path, clock, "MTR-0001", 1, initial_credit=10_000_000),
        open_meter(
            tmp_path,
            clock,
            "MTR-0002",
            2,
            word_order="little",
            manufacturer="ACME",
            model="PP-3000",
            firmware="2.4.1",
        ),
    ]
    clock.advance(3 * 3600)
    for runtime in runtimes:
        runtime.sync()
    return runtimes


@pytest.fixture
async def server(meters: list[MeterRuntime]) -> AsyncIterator[Any]:
    async with serve_tcp(meters) as service:
        yield service


@pytest.fixture
async def master(server: Any) -> AsyncIterator[RawMaster]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    yield RawMaster(reader, writer)
    writer.close()
    await writer.wait_closed()


def read_pdu(function: int, address: int, count: int) -> bytes:
    return struct.pack(">BHH", function, address, count)


def fc23(read_address: int, read_count: int, write_address: int, values: list[int]) -> bytes:
    head = struct.pack(
        ">BHHHHB", 0x17, read_address, read_count, write_address, len(values), 2 * len(values)
    )
    return head + struct.pack(f">{len(values)}H", *values)


def fc16(address: int, values: list[int], count: int | None = None) -> bytes:
    quantity = len(values) if count is None else count
    head = struct.pack(">BHHB", 0x10, address, quantity, 2 * len(values))
    return head + struct.pack(f">{len(values)}H", *values)


def registers(answer: bytes) -> list[int]:
    assert answer[1] == len(answer) - 2, answer.hex()
    return list(struct.unpack(f">{answer[1] // 2}H", answer[2:]))


# -- 1. function 23 is all or nothing --------------------------------------------------------------


async def test_fc23_refused_read_writes_nothing(
    master: RawMaster, meters: list[MeterRuntime], server: Any
) -> None:
    runtime = meters[0]
    since = rm.ROW["event_since"]
    written_before = dict(server.meters[1].written)
    assert await master.ask(1, fc23(5000, 1, since.address, [0, 7])) == bytes([0x97, 0x02])
    assert await master.ask(1, fc23(72, 1, since.address, [0, 7])) == bytes([0x97, 0x02])
    assert registers(await master.ask(1, read_pdu(3, since.address, 2))) == [0, 0]
    assert server.meters[1].written == written_before

    events_before = runtime.snapshot().last_event_seq
    result_before = runtime.last_result()
    block = rm.encode_command(CommandEnvelope(runtime.meter_id, 1, Command.remote_disconnect()))
    assert await master.ask(1, fc23(9000, 2, rm.COMMAND_START, block)) == bytes([0x97, 0x02])
    assert runtime.snapshot().control_state is ControlState.CONNECTED
    assert runtime.last_result() == result_before
    assert runtime.snapshot().last_event_seq == events_before
    assert server.meters[1].written == written_before


async def test_fc23_writes_then_reads_what_it_wrote(
    master: RawMaster, meters: list[MeterRuntime]
) -> None:
    runtime = meters[0]
    block = rm.encode_command(CommandEnvelope(runtime.meter_id, 1, Command.remote_disconnect()))
    answer = await master.ask(1, fc23(rm.RESULT_START, rm.RESULT_SIZE, rm.COMMAND_START, block))
    assert answer[0] == 0x17
    result = rm.decode_result(registers(answer))
    assert (result.sequence, result.code) == (1, ResultCode.OK)
    assert runtime.snapshot().control_state is ControlState.DISCONNECTED
    since = rm.ROW["event_since"]
    window = rm.BLOCKS[rm.Block.EVENT_WINDOW]
    answer = await master.ask(1, fc23(window.start, window.size, since.address, [0, 2]))
    decoded = rm.decode_block(rm.Block.EVENT_WINDOW, registers(answer))
    assert decoded["event_since"] == 2


# -- 2. malformed requests: the request's function code and exception 03 --------------------------

MALFORMED = [
    pytest.param(read_pdu(3, 1000, 0), id="fc03-count-0"),
    pytest.param(read_pdu(3, 1000, 126), id="fc03-count-126"),
    pytest.param(read_pdu(4, 100, 0), id="fc04-count-0"),
    pytest.param(read_pdu(4, 100, 126), id="fc04-count-126"),
    pytest.param(bytes([3, 0x03, 0xE8]), id="fc03-short"),
    pytest.param(read_pdu(4, 100, 1) + b"\x00", id="fc04-long"),
    pytest.param(bytes([6, 0x04]), id="fc06-short"),
    pytest.param(fc16(1400, [0] * 124), id="fc16-count-124"),
    pytest.param(struct.pack(">BHHB", 0x10, 1400, 0, 0), id="fc16-count-0"),
    pytest.param(fc16(1400, [0, 1], count=1), id="fc16-byte-count"),
    pytest.param(fc16(1400, [0, 1])[:-1], id="fc16-short-data"),
    pytest.param(bytes([0x10, 0x05, 0x78]), id="fc16-short"),
    pytest.param(fc23(1400, 126, 1400, [0, 1]), id="fc23-read-126"),
    pytest.param(fc23(1400, 0, 1400, [0, 1]), id="fc23-read-0"),
    pytest.param(fc23(1400, 2, 1400, [0] * 122), id="fc23-write-122"),
    pytest.param(fc23(1400, 2, 1400, [0, 1])[:-2], id="fc23-short-data"),
    pytest.param(bytes([0x17, 0x05]), id="fc23-short"),
    pytest.param(bytes([0x2B, 0x0E, 0x01]), id="fc2b-short"),
]


@pytest.mark.parametrize("pdu", MALFORMED)
async def test_malformed_requests_get_their_function_code_and_03(
    master: RawMaster, meters: list[MeterRuntime], server: Any, pdu: bytes
) -> None:
    written_before = dict(server.meters[1].written)
    snapshot_before = meters[0].snapshot()
    assert await master.ask(1, pdu) == bytes([pdu[0] | 0x80, 0x03])
    assert server.meters[1].written == written_before
    assert meters[0].snapshot() == snapshot_before
    # the connection still serves the next request
    answer = await master.ask(1, read_pdu(4, 0, 1))
    assert registers(answer) == [rm.MAP_VERSION]


async def test_the_largest_requests_are_served(master: RawMaster) -> None:
    assert len(registers(await master.ask(1, read_pdu(3, 1400, 123)))) == 123
    window = rm.BLOCKS[rm.Block.PROFILE_WINDOW]
    assert window.size <= 125
    assert len(registers(await master.ask(1, read_pdu(3, window.start, window.size)))) == (
        window.size
    )


# -- 3. functions the map does not serve: exception 01 --------------------------------------------

REFUSED = [f for f in mf.MODBUS_FUNCTIONS if not f.served]
OTHER_CODES = [0x00, 0x09, 0x0A, 0x0D, 0x12, 0x19, 0x41, 0x64, 0x7F, 0x80, 0x83, 0x99, 0xFF]


def _sample_request(function: mf.ModbusFunction) -> bytes:
    if function.mei_type is not None:
        return bytes([function.code, function.mei_type, 0x01, 0x00])
    return bytes([function.code]) + b"\x00\x00\x00\x01"


@pytest.mark.parametrize("function", REFUSED, ids=lambda f: f.label)
async def test_refused_functions_answer_01(
    master: RawMaster, function: mf.ModbusFunction, caplog: pytest.LogCaptureFixture
) -> None:
    assert function.exception is mf.ExceptionCode.ILLEGAL_FUNCTION
    with caplog.at_level(logging.INFO):
        for pdu in (_sample_request(function), bytes([function.code]), bytes([function.code]) * 9):
            if function.mei_type is not None and len(pdu) < 2:
                continue
            answer = await master.ask(1, pdu)
            assert answer == bytes([function.code | 0x80, 0x01]), pdu.hex()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("code", OTHER_CODES, ids=lambda code: f"0x{code:02X}")
async def test_other_function_codes_answer_01(
    master: RawMaster, code: int, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        answer = await master.ask(1, bytes([code, 0, 0, 0, 1]))
    assert answer == bytes([code | 0x80, 0x01])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_fifo_and_file_records_read_nothing_anywhere(master: RawMaster) -> None:
    for address in (0, 100, 1100, 5000):
        assert await master.ask(1, struct.pack(">BH", 0x18, address)) == bytes([0x98, 0x01])
    for mei_type in (0x0D, 0x00, 0x0F):
        assert await master.ask(1, bytes([0x2B, mei_type, 1, 0])) == bytes([0xAB, 0x01])


async def test_a_unit_without_a_meter_is_0b_whatever_the_function(master: RawMaster) -> None:
    for pdu in (bytes([0x18, 0, 0]), read_pdu(3, 1000, 0), bytes([0x2B, 0x0E, 1, 0])):
        assert await master.ask(99, pdu) == bytes([pdu[0] | 0x80, 0x0B])


def test_every_function_code_has_one_decision() -> None:
    served = {(f.code, f.mei_type) for f in mf.MODBUS_FUNCTIONS if f.served}
    assert served == {(3, None), (4, None), (6, None), (16, None), (23, None), (0x2B, 0x0E)}
    for code in range(256):
        function = mf.lookup(code, 0x0E if code == 0x2B else None)
        assert function.served == ((code, 0x0E if code == 0x2B else None) in served)
        assert function.served or function.exception is mf.ExceptionCode.ILLEGAL_FUNCTION
        assert function.explanation
    assert mf.lookup(0x2B, 0x0D).exception is mf.ExceptionCode.ILLEGAL_FUNCTION
    assert mf.lookup(0x2B, None) is mf.OTHER_FUNCTION
    assert mf.lookup(0x2B, 0x0E).label == "0x2B/0x0E"
    assert mf.lookup(0x17).max_write == 121


def test_classify_decides_like_the_spec() -> None:
    assert mf.classify(read_pdu(3, 0, 125)).code == 3
    assert mf.classify(fc16(0, [1] * 123)).code == 16
    assert mf.classify(fc23(0, 125, 0, [1] * 121)).code == 23
    for pdu, code in (
        (b"", 1),
        (b"\x01\x00\x00\x00\x01", 1),
        (read_pdu(3, 0, 126), 3),
        (fc16(0, [1] * 124), 3),
        (fc23(0, 1, 0, [1] * 122), 3),
        (b"\x2b", 1),
    ):
        with pytest.raises(mf.RequestRefused) as refused:
            mf.classify(pdu)
        assert refused.value.code == code, pdu.hex()


def _check_classified(pdu: bytes) -> None:
    """Any bytes are a served function or a refusal with 01 or 03, never another error, and the
    server's decoder turns them into a request or a refusal of the same function code."""
    try:
        function = mf.classify(pdu)
    except mf.RequestRefused as refused:
        assert refused.code in (
            mf.ExceptionCode.ILLEGAL_FUNCTION,
            mf.ExceptionCode.ILLEGAL_DATA_VALUE,
        )
    else:
        assert function.served
        assert function is mf.lookup(pdu[0], pdu[1] if pdu[0] == 0x2B else None)
    if pdu:
        request = _MeterDecoder({}).decode(pdu)
        assert request is not None
        assert request.function_code == pdu[0]


@given(st.binary(max_size=300))
def test_any_bytes_are_classified(pdu: bytes) -> None:
    _check_classified(pdu)


@given(st.sampled_from([3, 4, 6, 0x10, 0x17, 0x2B]), st.binary(max_size=260))
def test_any_bytes_of_a_served_function_are_classified(code: int, data: bytes) -> None:
    _check_classified(bytes([code]) + data)


# -- 3. read device identification (0x2B / 0x0E) --------------------------------------------------


def parse_identification(answer: bytes) -> tuple[int, int, int, int, dict[int, bytes]]:
    """(read code, conformity, more follows, next object id, objects) of a 0x2B/0x0E answer."""
    assert answer[:2] == bytes([0x2B, 0x0E]), answer.hex()
    read_code, conformity, more, next_id, count = answer[2:7]
    objects: dict[int, bytes] = {}
    offset = 7
    for _ in range(count):
        object_id, length = answer[offset], answer[offset + 1]
        objects[object_id] = answer[offset + 2 : offset + 2 + length]
        offset += 2 + length
    assert offset == len(answer)
    return read_code, conformity, more, next_id, objects


def devid(read_code: int, object_id: int = 0) -> bytes:
    return bytes([0x2B, 0x0E, read_code, object_id])


async def test_device_identification_streams_and_objects(
    master: RawMaster, meters: list[MeterRuntime]
) -> None:
    for runtime in meters:
        unit = runtime.config.modbus_unit
        config = runtime.config
        basic = {0: config.manufacturer.encode(), 1: config.model.encode()}
        basic[2] = config.firmware.encode()
        regular = {**basic, 5: config.model.encode()}
        extended = {
            **regular,
            0x80: runtime.meter_id.encode(),
            0x81: config.serial.encode(),
            0x82: str(rm.MAP_VERSION).encode(),
        }
        assert config.serial == f"SN-{runtime.meter_id}"
        for read_code, objects in ((1, basic), (2, regular), (3, extended)):
            answer = parse_identification(await master.ask(unit, devid(read_code)))
            assert answer == (read_code, 0x83, 0, 0, objects)
        # a stream from a known object of the category starts there
        answer = parse_identification(await master.ask(unit, devid(1, 1)))
        assert answer[4] == {1: basic[1], 2: basic[2]}
        answer = parse_identification(await master.ask(unit, devid(3, 0x81)))
        assert answer[4] == {0x81: extended[0x81], 0x82: extended[0x82]}
        # an object id the category does not hold restarts the stream at object 0
        for read_code, object_id, objects in ((1, 5, basic), (2, 3, regular), (2, 0x80, regular)):
            answer = parse_identification(await master.ask(unit, devid(read_code, object_id)))
            assert answer[4] == objects
        # individual access
        for object_id, value in extended.items():
            answer = parse_identification(await master.ask(unit, devid(4, object_id)))
            assert answer == (4, 0x83, 0, 0, {object_id: value})
        for object_id in (0x03, 0x06, 0x7F, 0x90, 0xFF):
            assert await master.ask(unit, devid(4, object_id)) == bytes([0xAB, 0x02])
        for read_code in (0, 5, 0xFF):
            assert await master.ask(unit, devid(read_code)) == bytes([0xAB, 0x03])


async def test_device_identification_through_pymodbus(
    server: Any, meters: list[MeterRuntime]
) -> None:
    client = AsyncModbusTcpClient("127.0.0.1", port=server.port, timeout=2, retries=0)
    assert await client.connect()
    try:
        response = await client.read_device_information(read_code=3, object_id=0, device_id=2)
        assert not response.isError()
        assert response.information[0] == b"ACME"
        assert response.information[0x80] == b"MTR-0002"
        assert response.conformity == 0x83
    finally:
        client.close()


def test_select_objects_follows_the_spec() -> None:
    objects = {0: b"v", 1: b"p", 2: b"r", 5: b"m", 0x80: b"x"}
    assert mf.select_objects(objects, 1, 0) == (0, 1, 2)
    assert mf.select_objects(objects, 1, 2) == (2,)
    assert mf.select_objects(objects, 1, 0x80) == (0, 1, 2)
    assert mf.select_objects(objects, 2, 5) == (5,)
    assert mf.select_objects(objects, 3, 5) == (5, 0x80)
    assert mf.select_objects(objects, 3, 0x81) == (0, 1, 2, 5, 0x80)
    assert mf.select_objects(objects, 4, 0x80) == (0x80,)
    for read_code, object_id, code in ((4, 3, 2), (0, 0, 3), (5, 0, 3)):
        with pytest.raises(mf.RequestRefused) as refused:
            mf.select_objects(objects, read_code, object_id)
        assert refused.value.code == code


# -- 4. the RTU silence, computed -----------------------------------------------------------------


def test_character_time_and_frame_silence() -> None:
    assert char_seconds(9600, 8, "N", 1) == 10 / 9600
    for parity, stopbits in (("E", 1), ("O", 1), ("N", 2)):
        assert char_seconds(9600, 8, parity, stopbits) == 11 / 9600
    assert frame_silence(9600, 8, "N", 1) == pytest.approx(3.5 * 10 / 9600)
    assert frame_silence(19200, 8, "E", 1) == pytest.approx(3.5 * 11 / 19200)
    for baud in (38400, 57600, 115200):
        assert frame_silence(baud, 8, "N", 1) == 0.00175


# -- an independent master ------------------------------------------------------------------------


@pytest.mark.skipif(MBPOLL is None, reason="mbpoll is not installed (apt-get install mbpoll)")
async def test_mbpoll_is_told_coils_are_an_illegal_function(server: Any) -> None:
    assert MBPOLL is not None
    process = await asyncio.create_subprocess_exec(
        MBPOLL,
        *("-1", "-0", "-a", "1", "-p", str(server.port), "-t", "0", "-r", "0", "-c", "1"),
        "127.0.0.1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 20)
    assert "Illegal function" in (out + err).decode(), (out + err).decode()
