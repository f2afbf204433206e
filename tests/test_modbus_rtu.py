"""Modbus RTU over a socat pty pair: several meters on one serial line, the head-end's RTU link
sharing the line, a bare pymodbus serial client and mbpoll as independent masters."""

from __future__ import annotations

import asyncio
import select
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import serial
from pymodbus.client import AsyncModbusSerialClient
from pymodbus.framer import FramerRTU

from headend.links.endpoint import open_link
from headend.links.modbus import LinkSettings, ModbusRtuLink, SerialLine
from meter_sim.modbus_server import frame_silence, serve_rtu
from meter_sim.runtime import MeterRuntime
from protocols import registermap as rm
from protocols.clock import ManualClock
from protocols.commands import Command, CommandEnvelope, ResultCode
from protocols.disconnect import ControlState
from protocols.errors import ConfigError, LinkClosed, LinkTimeout
from protocols.readings import EventCode
from tests.test_modbus_tcp import KEY, START, check_every_row, mbpoll_values, open_meter

pytestmark = pytest.mark.serial

SOCAT = shutil.which("socat")
MBPOLL = shutil.which("mbpoll")
FAST = LinkSettings(timeout=0.5, retries=2, backoff=0.01)


@pytest.fixture
def pty_pair() -> Iterator[tuple[str, str]]:
    """Two connected pseudo-terminals from ``socat -d -d pty,raw,echo=0 pty,raw,echo=0``."""
    if SOCAT is None:
        pytest.skip("socat is not installed (apt-get install socat)")
    process = subprocess.Popen(
        [SOCAT, "-d", "-d", "pty,raw,echo=0", "pty,raw,echo=0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        bufsize=0,  # unbuffered: select() then sees every line that has not been read yet
    )
    assert process.stderr is not None
    paths: list[str] = []
    deadline = time.monotonic() + 10
    try:
        while True:  # socat's own ready signal: "starting data transfer loop"
            remaining = deadline - time.monotonic()
            assert remaining > 0, "socat did not start"
            ready, _, _ = select.select([process.stderr], [], [], remaining)
            assert ready, "socat did not start"
            line = process.stderr.readline().decode()
            assert line, f"socat exited: {process.wait()}"
            if "PTY is " in line:
                paths.append(line.rsplit("PTY is ", 1)[1].strip())
            if "starting data transfer loop" in line:
                break
        assert len(paths) == 2
        yield paths[0], paths[1]
    finally:
        process.terminate()
        process.communicate(timeout=10)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def bus_meters(tmp_path: Path, clock: ManualClock) -> list[MeterRuntime]:
    runtimes = [
        open_meter(tmp_path, clock, "RTU-0003", 3, initial_credit=10_000_000),
        open_meter(tmp_path, clock, "RTU-0005", 5, word_order="little", auth_key=KEY.hex()),
    ]
    clock.advance(6 * 3600)
    return runtimes


@pytest.fixture
async def line(
    pty_pair: tuple[str, str], bus_meters: list[MeterRuntime]
) -> AsyncIterator[tuple[Any, str]]:
    """The meters served on one end of the pair; the other end is the master's."""
    async with serve_rtu(bus_meters, pty_pair[0], baudrate=9600) as service:
        yield service, pty_pair[1]


async def test_multi_drop_each_meter_answers_only_to_its_own_unit(
    line: tuple[Any, str], bus_meters: list[MeterRuntime]
) -> None:
    _, port = line
    bus = SerialLine.shared(port, baudrate=9600)
    links = [ModbusRtuLink(bus, unit, settings=FAST) for unit in (3, 5)]
    try:
        snapshots = await asyncio.gather(*(link.read_snapshot() for link in links))
        for link, snapshot, runtime in zip(links, snapshots, bus_meters, strict=True):
            assert link.meter_id == runtime.meter_id
            assert snapshot == runtime.snapshot()
        assert links[1].word_order == "little"
        # both links use the line's one channel: one request at a time on the wire
        assert links[0].channel is links[1].channel
        results = await asyncio.gather(
            *(link.read_events(0, 1000) for link in links),
            *(link.read_snapshot() for link in links),
        )
        assert results[0] == bus_meters[0].events_since(0, 1000)
        assert results[1] == bus_meters[1].events_since(0, 1000)
        nobody = ModbusRtuLink(bus, 9, settings=LinkSettings(timeout=0.3, retries=0))
        with pytest.raises(LinkTimeout):
            await nobody.read_snapshot()  # no meter answers unit 9: silence, not an exception
        await nobody.close()
        assert await links[0].read_snapshot() == bus_meters[0].snapshot()  # the line recovers
    finally:
        for link in links:
            await link.close()
    assert bus.users == 0
    assert port not in SerialLine._open


async def test_every_mapped_value_reads_as_the_model_over_rtu(
    line: tuple[Any, str], bus_meters: list[MeterRuntime]
) -> None:
    _, port = line
    client = AsyncModbusSerialClient(port, baudrate=9600, timeout=2, retries=0)
    assert await client.connect()
    try:
        for runtime in bus_meters:
            unit = runtime.config.modbus_unit
            assert await check_every_row(client, runtime, unit) == len(rm.ROWS)
        response = await client.write_register(1000, 1, device_id=3)
        assert response.isError()
        assert response.exception_code == 2
        response = await client.write_register(rm.ROW["cmd_go"].address, 7, device_id=3)
        assert response.exception_code == 3
    finally:
        client.close()


async def test_commands_replays_and_forged_tags_over_rtu(
    line: tuple[Any, str], bus_meters: list[MeterRuntime]
) -> None:
    _, port = line
    keyed = bus_meters[1]
    link = await open_link(f"rtu://{port}?baud=9600&unit=5&timeout=0.5")
    try:
        forged = CommandEnvelope(keyed.meter_id, 1, Command.remote_disconnect(), b"\x01" * 16)
        assert (await link.execute(forged)).code is ResultCode.AUTH_FAILED
        good = CommandEnvelope.signed(keyed.meter_id, 1, Command.remote_disconnect(), KEY)
        assert (await link.execute(good)).code is ResultCode.OK
        assert keyed.snapshot().control_state is ControlState.DISCONNECTED
        replay = CommandEnvelope.signed(keyed.meter_id, 1, Command.remote_reconnect(), KEY)
        assert (await link.execute(replay)).code is ResultCode.REPLAYED
        assert keyed.snapshot().control_state is ControlState.DISCONNECTED
        codes = [event.code for event in keyed.events_since(0, 1000)]
        assert codes.count(EventCode.AUTH_FAILED) == 1
        assert codes.count(EventCode.REPLAY_REFUSED) == 1
        assert codes.count(EventCode.RELAY_DISCONNECTED) == 1
    finally:
        await link.close()


async def test_two_endpoints_on_one_port_share_the_line(
    line: tuple[Any, str], bus_meters: list[MeterRuntime]
) -> None:
    _, port = line
    first = await open_link(f"rtu://{port}?unit=3")
    second = await open_link(f"rtu://{port}?unit=5&baud=9600&parity=N&stopbits=1")
    try:
        assert isinstance(first, ModbusRtuLink)
        assert isinstance(second, ModbusRtuLink)
        assert first.line is second.line
        assert first.meter_id == "RTU-0003"
        assert second.meter_id == "RTU-0005"
        with pytest.raises(ConfigError, match="other settings"):
            await open_link(f"rtu://{port}?unit=3&baud=19200")
    finally:
        await first.close()
        await second.close()


async def test_paced_answers_take_the_time_of_a_real_line(
    pty_pair: tuple[str, str], bus_meters: list[MeterRuntime]
) -> None:
    server_port, port = pty_pair
    async with serve_rtu(bus_meters[:1], server_port, baudrate=9600, pace=True):
        link = ModbusRtuLink(SerialLine.shared(port, baudrate=9600), 3, settings=FAST)
        try:
            await link.connect()
            loop = asyncio.get_running_loop()
            started = loop.time()
            for _ in range(3):
                await link.read_snapshot()
            elapsed = (loop.time() - started) / 3
        finally:
            await link.close()
    # 8 request + 5 + 2*61 answer bytes + 2 x 3.5 silent characters, 10 bits each at 9600 baud
    expected = (8 + 5 + 2 * rm.SNAPSHOT_SIZE + 7) * 10 / 9600
    assert elapsed >= expected * 0.95
    assert elapsed < expected + 0.5


async def test_serial_ports_that_cannot_be_opened_are_link_closed(
    tmp_path: Path, bus_meters: list[MeterRuntime]
) -> None:
    missing = str(tmp_path / "no-such-tty")
    with pytest.raises(LinkClosed):
        await open_link(f"rtu://{missing}?unit=1&timeout=0.2&retries=0")
    assert missing not in SerialLine._open
    with pytest.raises(LinkClosed):
        async with serve_rtu(bus_meters, missing):
            pass
    with pytest.raises(ConfigError, match="parity"):
        async with serve_rtu(bus_meters, missing, parity="X"):
            pass


@pytest.mark.skipif(MBPOLL is None, reason="mbpoll is not installed (apt-get install mbpoll)")
async def test_mbpoll_reads_the_meters_on_the_line(
    line: tuple[Any, str], bus_meters: list[MeterRuntime]
) -> None:
    _, port = line
    assert MBPOLL is not None
    for runtime in bus_meters:
        unit = runtime.config.modbus_unit
        order = ["-B"] if runtime.config.word_order == "big" else []
        probe = rm.ROW["order_probe"].address
        process = await asyncio.create_subprocess_exec(
            MBPOLL,
            *("-m", "rtu", "-b", "9600", "-P", "none", "-a", str(unit), "-1", "-0"),
            *("-t", "3:int", *order, "-r", str(probe), "-c", "1", port),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 20)
        assert process.returncode == 0, err.decode()
        assert mbpoll_values(out.decode()) == {probe: rm.ORDER_PROBE}


# -- a raw master: hand-built frames, the RTU framing rules -------------------------------------


class RawRtuMaster:
    """A master on the pty that writes hand-built RTU frames and reads raw answers (pyserial's
    blocking reads run in a worker thread; the server runs in the test's event loop)."""

    def __init__(self, port: str, baudrate: int) -> None:
        self.line = serial.serial_for_url(port, baudrate=baudrate, timeout=1.0)

    def close(self) -> None:
        self.line.close()

    async def send(self, frame: bytes) -> None:
        await asyncio.to_thread(self.line.write, frame)

    async def receive(self, size: int) -> bytes:
        """Up to ``size`` bytes, or fewer when the line stays quiet for a second."""
        return bytes(await asyncio.to_thread(self.line.read, size))


def rtu(unit: int, pdu: bytes) -> bytes:
    frame = bytes([unit]) + pdu
    return frame + FramerRTU.compute_CRC(frame).to_bytes(2, "big")


def read_input(unit: int, address: int, count: int) -> bytes:
    return rtu(unit, bytes([4]) + address.to_bytes(2, "big") + count.to_bytes(2, "big"))


@pytest.fixture
async def raw_line(
    pty_pair: tuple[str, str], bus_meters: list[MeterRuntime]
) -> AsyncIterator[tuple[RawRtuMaster, float]]:
    """The meters on a 9600 baud line and a raw master on its other end, with the line's
    3.5-character silence."""
    async with serve_rtu(bus_meters, pty_pair[0], baudrate=9600):
        master = RawRtuMaster(pty_pair[1], 9600)
        try:
            yield master, frame_silence(9600, 8, "N", 1)
        finally:
            master.close()


async def _answered_map_version(master: RawRtuMaster, unit: int = 3) -> None:
    await master.send(read_input(unit, 0, 1))
    assert await master.receive(7) == rtu(unit, bytes([4, 2]) + rm.MAP_VERSION.to_bytes(2, "big"))


@pytest.mark.parametrize(
    "partial",
    [
        pytest.param(bytes.fromhex("0304000000"), id="truncated"),
        pytest.param(read_input(3, 0, 1)[:-1], id="no-crc-end"),
        pytest.param(bytes.fromhex("031000000002"), id="truncated-fc16"),
        pytest.param(rtu(3, bytes([4, 0, 0, 0, 1]))[:-2] + b"\x00\x00", id="bad-crc"),
        pytest.param(b"\x03", id="one-byte"),
    ],
)
async def test_a_partial_frame_is_discarded_after_the_silence(
    raw_line: tuple[RawRtuMaster, float], partial: bytes
) -> None:
    master, silence = raw_line
    await master.send(partial)
    await asyncio.sleep(20 * silence)  # the line is silent: the partial frame ends here
    await _answered_map_version(master)


async def test_unserved_functions_and_short_requests_are_answered_after_the_silence(
    raw_line: tuple[RawRtuMaster, float],
) -> None:
    master, _ = raw_line
    for pdu, answer in (
        (bytes([0x63, 0, 0, 0, 1]), bytes([0xE3, 0x01])),  # no such function
        (bytes([0x99]), bytes([0x99, 0x01])),
        (bytes([0x01, 0, 0, 0, 1]), bytes([0x81, 0x01])),  # coils
        (bytes([0x18, 0, 0]), bytes([0x98, 0x01])),  # FIFO
        (bytes([0x08, 0, 0, 0x12, 0x34]), bytes([0x88, 0x01])),  # diagnostics
        (bytes([0x2B, 0x0D, 0, 0]), bytes([0xAB, 0x01])),
        (bytes([0x03, 0x04, 0x4C]), bytes([0x83, 0x03])),  # a read without its count
        (bytes([0x04, 0, 0, 0, 0]), bytes([0x84, 0x03])),  # count 0
    ):
        await master.send(rtu(3, pdu))
        assert await master.receive(5) == rtu(3, answer), pdu.hex()
        await _answered_map_version(master)


async def test_other_units_frames_get_no_answer_whatever_they_hold(
    raw_line: tuple[RawRtuMaster, float],
) -> None:
    master, _ = raw_line
    master.line.timeout = 0.3
    for pdu in (bytes([0x63, 0, 0]), bytes([0x04, 0, 0, 0, 0]), bytes([0x04, 0, 0, 0, 1])):
        await master.send(rtu(9, pdu))
        assert await master.receive(5) == b""
        await _answered_map_version(master)


async def test_device_identification_over_rtu(
    raw_line: tuple[RawRtuMaster, float], bus_meters: list[MeterRuntime]
) -> None:
    master, _ = raw_line
    runtime = bus_meters[1]
    await master.send(rtu(5, bytes([0x2B, 0x0E, 4, 0x80])))
    meter_id = runtime.meter_id.encode()
    expected = rtu(5, bytes([0x2B, 0x0E, 4, 0x83, 0, 0, 1, 0x80, len(meter_id)]) + meter_id)
    assert await master.receive(len(expected)) == expected


async def test_a_frame_in_pieces_within_the_silence_is_one_frame(
    pty_pair: tuple[str, str], bus_meters: list[MeterRuntime]
) -> None:
    baud = 300  # 3.5 characters take 117 ms: pieces 5 ms apart are one frame
    async with serve_rtu(bus_meters, pty_pair[0], baudrate=baud):
        master = RawRtuMaster(pty_pair[1], baud)
        try:
            frame = read_input(3, 0, 1)
            await master.send(frame[:3])
            await asyncio.sleep(0.005)
            await master.send(frame[3:])
            answer = await master.receive(7)
            assert answer == rtu(3, bytes([4, 2]) + rm.MAP_VERSION.to_bytes(2, "big"))
        finally:
            master.close()


async def test_pymodbus_recovers_after_a_truncated_frame(
    raw_line: tuple[RawRtuMaster, float], pty_pair: tuple[str, str]
) -> None:
    master, silence = raw_line
    await master.send(bytes.fromhex("0204000000"))
    master.close()
    await asyncio.sleep(20 * silence)
    client = AsyncModbusSerialClient(pty_pair[1], baudrate=9600, timeout=1, retries=0)
    assert await client.connect()
    try:
        response = await client.read_input_registers(0, count=1, device_id=3)
        assert not response.isError()
        assert response.registers == [rm.MAP_VERSION]
    finally:
        client.close()
