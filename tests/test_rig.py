"""Hardware-in-the-loop rigs: scenario files refused with their line and key, every fault kind
seen from the master's side of a socat pty pair, expectations that hold and that fail, the
JUnit and capture reports, the exit codes, and the worked examples of docs/hil.md."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import functools
import itertools
import re
import shutil
import signal
import struct
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import serial
import xmlschema
from pymodbus.framer import FramerRTU
from typer.testing import CliRunner

from cli import meter_sim as meter_sim_cli
from headend.links.modbus import LinkSettings, ModbusRtuLink, SerialLine
from meter_sim.modbus_server import gap_limit
from meter_sim.rig.expect import Verdict, judge
from meter_sim.rig.faults import RigLine
from meter_sim.rig.reports import CSV_COLUMNS, PCAP_LINKTYPE, junit_xml
from meter_sim.rig.runner import Record, SerialSettings, run_scenario
from meter_sim.rig.scenario import (
    KEY_DOCS,
    KeyLines,
    documented_keys,
    load_scenario,
    scenario_from_text,
)
from protocols import registermap as rm
from protocols.commands import Command, CommandEnvelope, ResultCode
from protocols.disconnect import ControlState
from protocols.errors import ConfigError, HesError
from protocols.readings import StatusFlag
from tests import test_modbus_rtu

pytestmark = pytest.mark.serial
pty_pair = test_modbus_rtu.pty_pair  # two connected pseudo-terminals (socat)

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
FAST = LinkSettings(timeout=0.4, retries=3, backoff=0.02)
runner = CliRunner()

ONE_METER = """
[rig]
duration = "{duration}"
speed = 60
{rig}

[[meters]]
id = "MTR-0001"
modbus_unit = 1
initial_credit = 100000
[meters.load]
model = "constant"
watts = 2000
"""


def scenario_text(steps: str = "", expect: str = "", duration: str = "2s", rig: str = "") -> str:
    expect = expect or '[[expect]]\nkind = "once"\n'
    return ONE_METER.format(duration=duration, rig=rig) + steps + "\n" + expect


# -- schema refusals: the line and the key ---------------------------------------------------------


def _line_of(text: str, needle: str) -> int:
    for number, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return number
    raise AssertionError(needle)


REFUSALS = [
    pytest.param(
        scenario_text(rig="bogus = 1"), "bogus = 1", "rig.bogus: unknown key", id="unknown-key"
    ),
    pytest.param(
        scenario_text(rig='response_delay = "soon"'),
        "response_delay",
        "rig.response_delay: not a duration: 'soon'",
        id="bad-duration",
    ),
    pytest.param(
        scenario_text('[[steps]]\naction = "drop"\ncount = "x"\n'),
        'count = "x"',
        "steps[0].count: expected int, got str",
        id="wrong-type",
    ),
    pytest.param(
        scenario_text('[[steps]]\naction = "drop"\n\n[[steps]]\naction = "drop"\ncount = 0\n'),
        "count = 0",
        "steps[1].count: must be >= 1",
        id="second-step-out-of-range",
    ),
    pytest.param(
        scenario_text('[[steps]]\naction = "explode"\n'),
        'action = "explode"',
        "steps[0].action: 'explode' is not one of set_load, advance",
        id="unknown-action",
    ),
    pytest.param(
        scenario_text('[[steps]]\naction = "set_load"\nmeter = "MTR-0001"\n'),
        "[[steps]]",
        "steps[0].watts: required key is missing",
        id="missing-key",
    ),
    pytest.param(
        scenario_text('[[steps]]\naction = "tamper"\nmeter = "MTR-0009"\n'),
        'meter = "MTR-0009"',
        "steps[0].meter: no meter 'MTR-0009' on the line",
        id="no-such-meter",
    ),
    pytest.param(
        scenario_text(
            expect='[[expect]]\nkind = "read_every"\nmeter = "MTR-0001"\nblock = "x"\nperiod = 1\n'
        ),
        'block = "x"',
        "expect[0].block:",
        id="bad-block",
    ),
    pytest.param(
        scenario_text().replace("initial_credit = 100000", "initial_credit = -5"),
        "initial_credit = -5",
        "meters[0].initial_credit: must be >= 0",
        id="inline-meter-key",
    ),
    pytest.param(
        scenario_text().replace("watts = 2000", 'watts = "lots"'),
        'watts = "lots"',
        "meters[0].load.watts: expected int, got str",
        id="nested-table-key",
    ),
    pytest.param(
        scenario_text(
            '[[steps]]\nat = "1s"\naction = "drop"\n\n[[steps]]\nat = "0.5s"\naction = "drop"\n'
        ),
        'at = "0.5s"',
        "steps[1].at: steps run in file order",
        id="out-of-order",
    ),
    pytest.param(
        scenario_text('[[steps]]\nat = "5s"\naction = "drop"\n'),
        'at = "5s"',
        "steps[0].at: after the end of the run",
        id="after-the-end",
    ),
]


@pytest.mark.parametrize(("text", "needle", "message"), REFUSALS)
def test_an_invalid_scenario_is_refused_with_its_line_and_key(
    tmp_path: Path, text: str, needle: str, message: str
) -> None:
    path = tmp_path / "scenario.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_scenario(path)
    assert str(caught.value).startswith(f"{path}:{_line_of(text, needle)}: "), str(caught.value)
    assert message in str(caught.value)


def test_refusals_without_a_line_and_toml_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="give at least one"):
        scenario_from_text('[rig]\nduration = 1\n[[meters]]\nid = "M-1"\n')
    with pytest.raises(ConfigError, match=r"line 2"):
        scenario_from_text("[rig]\nduration = = 1\n")
    with pytest.raises(ConfigError, match="no meters on the line"):
        scenario_from_text('[rig]\nduration = 1\n[[expect]]\nkind = "once"\n')
    two = scenario_text().replace(
        "[[meters]]", '[[meters]]\nid = "MTR-0002"\nmodbus_unit = 1\n\n[[meters]]'
    )
    with pytest.raises(
        ConfigError, match=r":13: meters\[1\].modbus_unit: MTR-0001 and MTR-0002 share unit id 1"
    ):
        scenario_from_text(two, tmp_path / "two.toml")
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="No such file"):
        load_scenario(missing)
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[meters]]\nid = "F-1"\nbogus = 2\n')
    with pytest.raises(
        ConfigError, match=r"s.toml:3: rig.fleet: .*fleet.toml: meters\[0\].bogus: unknown key"
    ):
        scenario_from_text(
            '[rig]\nduration = 1\nfleet = "fleet.toml"\n[[expect]]\nkind = "once"\n',
            tmp_path / "s.toml",
        )


def test_key_lines_follow_tables_arrays_and_dotted_keys() -> None:
    lines = KeyLines(
        "a = 1\n[t]\nb.c = 2\n[[arr]]\nx = 1\n[[arr]]\nx = 2\n[arr.sub]\ny = 3\nz = { q = 1 }\n"
    )
    assert lines.line("a") == 1
    assert lines.line("t.b.c") == 3
    assert lines.line("arr[1].x") == 7
    assert lines.line("arr[1].sub.y") == 9
    assert lines.line("arr[1].sub.z.q") == 10  # inside an inline table: the key's line
    assert lines.line("arr[0].missing") == 4  # a missing key: its table's header


def test_the_reference_describes_every_key() -> None:
    described = {key for _, key in KEY_DOCS}
    for section, key in documented_keys():
        assert (section, key) in KEY_DOCS or key in described, (section, key)


def test_a_fleet_file_puts_its_meters_on_the_line(tmp_path: Path) -> None:
    (tmp_path / "fleet.toml").write_text('[[meters]]\ncount = 3\nid_prefix = "F-"\n')
    scenario = scenario_from_text(
        '[rig]\nduration = 1\nfleet = "fleet.toml"\n[[expect]]\nkind = "once"\n',
        tmp_path / "s.toml",
    )
    assert [m.meter_id for m in scenario.meters] == ["F-0001", "F-0002", "F-0003"]
    assert [m.modbus_unit for m in scenario.meters] == [1, 2, 3]


# -- a master on the other end ---------------------------------------------------------------------


def rtu(unit: int, pdu: bytes) -> bytes:
    frame = bytes([unit]) + pdu
    return frame + FramerRTU.compute_CRC(frame).to_bytes(2, "big")


MAP_VERSION_READ = rtu(1, bytes([4, 0, 0, 0, 1]))
MAP_VERSION_ANSWER = rtu(1, bytes([4, 2]) + rm.MAP_VERSION.to_bytes(2, "big"))


class RawMaster:
    """Hand-built frames on the master's end; each received piece with its arrival time."""

    def __init__(self, port: str, baudrate: int) -> None:
        self.line = serial.serial_for_url(port, baudrate=baudrate, timeout=0.01)

    def close(self) -> None:
        self.line.close()

    async def send(self, frame: bytes) -> None:
        await asyncio.to_thread(self.line.write, frame)

    async def pieces(self, quiet: float) -> list[tuple[float, bytes]]:
        """What arrives until the line has been quiet for ``quiet`` seconds."""

        def read() -> list[tuple[float, bytes]]:
            out: list[tuple[float, bytes]] = []
            last = time.monotonic()
            while time.monotonic() - last < quiet:
                data = self.line.read(256)
                if data:
                    last = time.monotonic()
                    out.append((last, bytes(data)))
            return out

        return await asyncio.to_thread(read)


Master = Callable[[str], Awaitable[Any]]


async def run_with(
    tmp_path: Path, text: str, pty: tuple[str, str], master: Master, baud: int = 9600
) -> tuple[Record, list[Verdict], Any]:
    path = tmp_path / "scenario.toml"
    path.write_text(text)
    scenario = load_scenario(path)
    lines: list[str] = []
    run = asyncio.create_task(run_scenario(scenario, SerialSettings(pty[0], baud), lines.append))
    await asyncio.sleep(0.2)  # the rig opens its end
    seen = await master(pty[1])
    record = await run
    assert lines
    assert "scenario" in lines[0]
    return record, judge(record), seen


def _fault(action: str, extra: str = "") -> str:
    return f'[[steps]]\nat = "0s"\naction = "{action}"\nmeter = "MTR-0001"\n{extra}\n'


FAULTS = [
    pytest.param("drop", "", id="drop"),
    pytest.param("late", 'delay = "0.4s"', id="late"),
    pytest.param("corrupt_crc", "", id="corrupt_crc"),
    pytest.param("exception", "code = 6", id="exception"),
    pytest.param("gaps", "chars = 20", id="gaps"),
    pytest.param("noise", "length = 5\nseed = 7", id="noise"),
    pytest.param("wrong_unit", "unit = 9", id="wrong_unit"),
]


@pytest.mark.parametrize(("action", "extra"), FAULTS)
async def test_each_line_fault_as_the_master_sees_it(
    tmp_path: Path,
    pty_pair: tuple[str, str],
    action: str,
    extra: str,
) -> None:
    baud = 1200  # 8.3 ms a character: a gap of 20 characters is 167 ms

    async def master(port: str) -> tuple[list[tuple[float, bytes]], list[tuple[float, bytes]]]:
        raw = RawMaster(port, baud)
        try:
            await raw.send(MAP_VERSION_READ)
            sent = time.monotonic()
            spoiled = [(t - sent, data) for t, data in await raw.pieces(0.6)]
            await raw.send(MAP_VERSION_READ)
            return spoiled, await raw.pieces(0.3)
        finally:
            raw.close()

    text = scenario_text(_fault(action, extra), duration="1.8s")
    record, _, (spoiled, after) = await run_with(tmp_path, text, pty_pair, master, baud)
    whole = b"".join(data for _, data in spoiled)
    assert b"".join(data for _, data in after) == MAP_VERSION_ANSWER  # one answer spoiled
    if action == "drop":
        assert whole == b""
    elif action == "late":
        assert whole == MAP_VERSION_ANSWER
        assert spoiled[0][0] >= 0.4
    elif action == "corrupt_crc":
        assert whole[:-1] == MAP_VERSION_ANSWER[:-1]
        assert whole != MAP_VERSION_ANSWER
    elif action == "exception":
        assert whole == rtu(1, bytes([0x84, 6]))
    elif action == "gaps":
        assert whole == MAP_VERSION_ANSWER
        assert len(spoiled) >= 2
        assert spoiled[-1][0] - spoiled[0][0] >= gap_limit(baud, 8, "N", 1)
    elif action == "noise":
        assert whole.endswith(MAP_VERSION_ANSWER)
        assert len(whole) == 5 + len(MAP_VERSION_ANSWER)
    elif action == "wrong_unit":
        assert whole == rtu(9, MAP_VERSION_ANSWER[1:-2])
    outcomes = [x.outcome for x in record.line.exchanges]
    assert outcomes[:2] == [action, "ok"]
    assert record.line.injected == {action: 1}
    rows = [row for row in record.line.capture if row.sender == "meter"]
    if action != "drop":
        assert rows[0].fault == action


async def test_the_response_delay_holds_every_answer_back(
    tmp_path: Path, pty_pair: tuple[str, str]
) -> None:
    async def master(port: str) -> list[tuple[float, bytes]]:
        raw = RawMaster(port, 9600)
        try:
            await raw.send(MAP_VERSION_READ)
            sent = time.monotonic()
            return [(t - sent, data) for t, data in await raw.pieces(0.5)]
        finally:
            raw.close()

    text = scenario_text(duration="1.2s", rig='response_delay = "300ms"')
    _, _, pieces = await run_with(tmp_path, text, pty_pair, master)
    assert b"".join(d for _, d in pieces) == MAP_VERSION_ANSWER
    assert pieces[0][0] >= 0.3


@pytest.mark.parametrize("strict", [True, False])
async def test_a_frame_broken_by_a_gap_is_discarded_on_receive(
    tmp_path: Path, pty_pair: tuple[str, str], strict: bool
) -> None:
    baud = 150  # a character: 67 ms; 1.5 characters: 100 ms; 3.5: 233 ms

    async def master(port: str) -> tuple[bytes, bytes]:
        raw = RawMaster(port, baud)
        try:
            await raw.send(MAP_VERSION_READ[:3])
            await asyncio.sleep(0.18)  # 113 ms of silence after the third character
            await raw.send(MAP_VERSION_READ[3:])
            broken = b"".join(d for _, d in await raw.pieces(0.4))
            await raw.send(MAP_VERSION_READ)
            return broken, b"".join(d for _, d in await raw.pieces(0.4))
        finally:
            raw.close()

    text = scenario_text(duration="2s", rig=f"strict_gaps = {str(strict).lower()}")
    _, _, (broken, whole) = await run_with(tmp_path, text, pty_pair, master, baud)
    assert broken == (b"" if strict else MAP_VERSION_ANSWER)
    assert whole == MAP_VERSION_ANSWER


def _link(port: str, settings: LinkSettings = FAST) -> ModbusRtuLink:
    return ModbusRtuLink(SerialLine(port, baudrate=9600), 1, settings=settings)


async def _snapshots(port: str, until: float, period: float = 0.15) -> list[tuple[float, Any]]:
    link = _link(port, LinkSettings(timeout=0.3, retries=0))
    out: list[tuple[float, Any]] = []
    started = time.monotonic()
    try:
        while time.monotonic() - started < until:
            try:
                out.append((time.monotonic() - started, await link.read_snapshot()))
            except HesError:
                out.append((time.monotonic() - started, None))
            await asyncio.sleep(period)
    finally:
        await link.close()
    return out


async def test_meter_steps_as_the_master_sees_them(
    tmp_path: Path,
    pty_pair: tuple[str, str],
) -> None:
    steps = (
        '[[steps]]\nat = "0.3s"\naction = "set_load"\nmeter = "MTR-0001"\nwatts = 4000\n\n'
        '[[steps]]\nat = "0.6s"\naction = "tamper"\nmeter = "MTR-0001"\n\n'
        '[[steps]]\nat = "0.9s"\naction = "advance"\nby = "1h"\n\n'
        '[[steps]]\nat = "1.2s"\naction = "power_cut"\nmeter = "MTR-0001"\nfor = "0.6s"\n\n'
        '[[steps]]\nat = "2.2s"\naction = "run_down"\nmeter = "MTR-0001"\nto = 0\n'
    )
    expect = (
        '[[expect]]\nkind = "relay"\nmeter = "MTR-0001"\nstate = "closed"\nat = "1s"\n\n'
        '[[expect]]\nkind = "relay"\nmeter = "MTR-0001"\nstate = "open"\n\n'
        '[[expect]]\nkind = "recovered"\nmeter = "MTR-0001"\nwithin = "1s"\n'
    )
    text = scenario_text(steps, expect, duration="3s")
    record, verdicts, seen = await run_with(
        tmp_path, text, pty_pair, lambda port: _snapshots(port, 2.6)
    )
    assert all(v.passed for v in verdicts), verdicts
    good = [(t, s) for t, s in seen if s is not None]
    loads = {s.power_w for _, s in good}
    assert 4000 in loads
    assert 2000 in loads
    assert any(s.status & StatusFlag.TAMPER for _, s in good)
    hours = [s.time for _, s in good]
    assert max(b - a for a, b in itertools.pairwise(hours)) >= 3600  # the clock jumped an hour
    assert any(s is None for _, s in seen)  # the master lost the meter while it had no power
    silent = [x.at for x in record.line.exchanges if x.outcome == "silent"]
    assert silent
    assert all(1.1 < at < 1.9 for at in silent)
    assert good[-1][1].control_state is not ControlState.CONNECTED  # credit run down: cut off
    assert good[-1][1].credit == 0
    events = record.events["MTR-0001"]
    assert events.count("power_down") == 1
    assert events.count("power_up") == 1
    assert "tamper_detected" in events
    assert "credit_exhausted" in events


async def test_a_stuck_relay_stays_on_after_a_disconnect(
    tmp_path: Path,
    pty_pair: tuple[str, str],
) -> None:
    async def master(port: str) -> Any:
        link = _link(port)
        try:
            await asyncio.sleep(0.4)
            envelope = CommandEnvelope.signed("MTR-0001", 1, Command.remote_disconnect(), None)
            result = await link.execute(envelope)
            await asyncio.sleep(0.3)
            return result, await link.read_snapshot()
        finally:
            await link.close()

    steps = '[[steps]]\nat = "0.1s"\naction = "stuck_relay"\nmeter = "MTR-0001"\n'
    expect = (
        '[[expect]]\nkind = "disconnect"\nmeter = "MTR-0001"\nwithin = "2s"\n\n'
        '[[expect]]\nname = "welded: supply still on"\nkind = "relay"\nmeter = "MTR-0001"\n'
        'state = "open"\n'
    )
    record, verdicts, (result, snapshot) = await run_with(
        tmp_path, scenario_text(steps, expect, duration="1.5s"), pty_pair, master
    )
    assert result.code is ResultCode.OK
    assert snapshot.control_state is ControlState.DISCONNECTED
    assert snapshot.power_w == 2000  # the output stays on
    assert "relay_welded" in record.events["MTR-0001"]
    assert [v.passed for v in verdicts] == [True, False]
    assert "it was closed" in verdicts[1].message


async def test_expectations_that_fail_say_what_was_expected_and_seen(
    tmp_path: Path,
    pty_pair: tuple[str, str],
) -> None:
    async def master(port: str) -> None:
        link = _link(port)
        try:
            for transfer in (1, 2):  # the same top-up twice under new transfer numbers
                command = Command.credit_transfer(transfer, 5000)
                await link.execute(CommandEnvelope.signed("MTR-0001", transfer, command, None))
            await asyncio.sleep(0.3)
        finally:
            await link.close()

    expect = (
        '[[expect]]\nkind = "reconnect"\nmeter = "MTR-0001"\nwithin = "1s"\n\n'
        '[[expect]]\nkind = "topup"\nmeter = "MTR-0001"\nwithin = "2s"\namount = 5000\n\n'
        '[[expect]]\nkind = "credit_rose"\nmeter = "MTR-0001"\namount = 5000\n\n'
        '[[expect]]\nkind = "once"\n\n'
        '[[expect]]\nkind = "read_every"\nmeter = "MTR-0001"\nblock = "event_window"\n'
        'period = "0.5s"\n\n'
        '[[expect]]\nkind = "recovered"\nmeter = "MTR-0001"\n'
    )
    _, verdicts, _ = await run_with(
        tmp_path, scenario_text(expect=expect, duration="1.5s"), pty_pair, master
    )
    by_kind = {v.kind: v for v in verdicts}
    assert [v.passed for v in verdicts] == [False, True, False, False, False, False]
    assert by_kind["reconnect"].message.startswith(
        "expected a remote_reconnect written to MTR-0001"
    )
    assert "saw credit_transfer (amount 5000, transfer 1) seq 1" in by_kind["reconnect"].message
    assert "it rose by 10000 (transfer 1: 5000, transfer 2: 5000)" in by_kind["credit_rose"].message
    assert "expected no command to run twice" in by_kind["once"].message
    assert "saw 0 successful read(s)" in by_kind["read_every"].message
    assert "none ended" in by_kind["recovered"].message


# -- mbpoll (libmodbus) as the master -------------------------------------------------------------

MBPOLL = shutil.which("mbpoll")
MEASUREMENTS = rm.BLOCKS[rm.Block.MEASUREMENTS]
MBPOLL_FAULTS = (
    '[[steps]]\nat = "1s"\naction = "drop"\nmeter = "MTR-0001"\ncount = 2\n\n'
    '[[steps]]\nat = "2s"\naction = "corrupt_crc"\nmeter = "MTR-0001"\n\n'
    '[[steps]]\nat = "3s"\naction = "exception"\nmeter = "MTR-0001"\ncode = 6\n'
)
MBPOLL_EXPECT = (
    '[[expect]]\nkind = "read_every"\nmeter = "MTR-0001"\nblock = "measurements"\n'
    'period = "2s"\n\n'
    '[[expect]]\nkind = "recovered"\nmeter = "MTR-0001"\nwithin = "1.5s"\n'
)


async def _mbpoll(port: str, seconds: float) -> tuple[str, str]:
    """mbpoll reading the measurements block of unit 1 every 200 ms (time-out 0.3 s) for
    ``seconds``, then stopped with Ctrl-C as a person stops it; its stdout and stderr."""
    assert MBPOLL is not None
    command = [MBPOLL, "-m", "rtu", "-b", "9600", "-P", "none", "-a", "1", "-t", "3:hex", "-0"]
    command += ["-r", str(MEASUREMENTS.start), "-c", str(MEASUREMENTS.size)]
    command += ["-l", "200", "-o", "0.3", port]
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await asyncio.sleep(seconds)
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(10):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return stdout.decode(), stderr.decode()


def _polled_blocks(stdout: str) -> list[tuple[int, ...]]:
    """The register values of each complete poll mbpoll printed (``[100]: 0x1A2B`` lines)."""
    values: dict[int, int] = {}
    blocks = []
    for line in stdout.splitlines():
        found = re.fullmatch(r"\[(\d+)\]:\s+0x([0-9A-Fa-f]{4})", line.strip())
        if found is None:
            continue
        address = int(found[1])
        if address == MEASUREMENTS.start:
            values = {}
        values[address] = int(found[2], 16)
        if len(values) == MEASUREMENTS.size:
            blocks.append(tuple(values[a] for a in sorted(values)))
    return blocks


@pytest.mark.skipif(MBPOLL is None, reason="mbpoll is not installed (apt-get install mbpoll)")
async def test_mbpoll_as_the_master_recovers_from_drops_bad_crcs_and_exceptions(
    tmp_path: Path, pty_pair: tuple[str, str]
) -> None:
    text = scenario_text(MBPOLL_FAULTS, MBPOLL_EXPECT, duration="4.5s")
    record, verdicts, (stdout, stderr) = await run_with(
        tmp_path, text, pty_pair, lambda port: _mbpoll(port, 4.0)
    )
    assert all(v.passed for v in verdicts), verdicts
    _check_junit(junit_xml(record, verdicts))
    assert record.line.injected == {"drop": 2, "corrupt_crc": 1, "exception": 1}
    # what libmodbus made of each fault, in its own words
    assert stderr.count("Read input register failed: Invalid CRC") == 1
    assert stderr.count("Read input register failed: Slave device or server is busy") == 1
    assert stderr.count("Read input register failed: Connection timed out") >= 2
    # every poll mbpoll printed is an answer the meter sent, register for register
    answered = {
        tuple(struct.unpack(f">{MEASUREMENTS.size}H", bytes(row.data)[3:-2]))
        for row in record.line.capture
        if row.sender == "meter" and bytes(row.data)[1:3] == bytes([4, 2 * MEASUREMENTS.size])
    }
    polls = _polled_blocks(stdout)
    assert len(polls) >= 8
    assert set(polls) <= answered
    # its own statistics agree with the rig's record of good answers
    stats = re.search(r"(\d+) frames transmitted, (\d+) received, (\d+) errors", stdout)
    assert stats is not None, stdout[-500:]
    sent, received, errors = (int(n) for n in stats.groups())
    good = sum(1 for x in record.line.exchanges if x.ok)
    assert abs(received - good) <= 1  # the last request may have gone out as mbpoll stopped
    assert errors >= 4
    assert received + errors <= sent <= received + errors + 1


# -- the command line: exit codes and reports ------------------------------------------------------


def test_rig_check_and_the_exit_codes_of_run(tmp_path: Path, pty_pair: tuple[str, str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text(
        scenario_text(
            expect='[[expect]]\nkind = "relay"\nmeter = "MTR-0001"\nstate = "closed"\n',
            duration="0.5s",
        )
    )
    result = runner.invoke(meter_sim_cli.app, ["rig", "check", str(good)])
    assert result.exit_code == 0, result.output
    assert "is valid: 1 meter(s), 0 step(s), 1 expectation(s)" in result.output
    bad = tmp_path / "bad.toml"
    bad.write_text(scenario_text(rig="strict_gaps = 3"))
    result = runner.invoke(meter_sim_cli.app, ["rig", "check", str(bad)])
    assert result.exit_code == 1
    assert f"error: {bad}:5: rig.strict_gaps: expected bool, got int" in result.output

    junit, frames = tmp_path / "report.xml", tmp_path / "frames.csv"
    args = [
        "rig",
        "run",
        str(good),
        "--serial",
        pty_pair[0],
        "--junit",
        str(junit),
        "--capture",
        str(frames),
    ]
    result = runner.invoke(meter_sim_cli.app, args)
    assert result.exit_code == 0, result.output
    assert "1 of 1 expectation(s) held" in result.output
    _check_junit(junit)
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None
    assert suite.get("failures") == "0"
    assert suite.get("tests") == "1"

    never = tmp_path / "never.toml"
    never.write_text(
        scenario_text(
            expect='[[expect]]\nname = "top-up arrives"\nkind = "topup"\nmeter = "MTR-0001"\n'
            'within = "0.4s"\n',
            duration="0.5s",
        )
    )
    args[2] = str(never)
    args[-1] = str(tmp_path / "frames.pcap")
    result = runner.invoke(meter_sim_cli.app, args)
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output
    _check_junit(junit)  # a report with a failed expectation is valid JUnit XML too
    root = ET.parse(junit).getroot()
    case = root.find("testsuite/testcase")
    assert case is not None
    assert case.get("name") == "top-up arrives"
    failure = case.find("failure")
    assert failure is not None
    assert failure.get("message") == (
        "expected a credit_transfer written to MTR-0001 between 0.00 s and 0.40 s; "
        "saw no command at all"
    )
    assert (tmp_path / "frames.pcap").read_bytes()[20:24] == struct.pack("<I", PCAP_LINKTYPE)


JUNIT_XSD = Path(__file__).resolve().parent / "data" / "junit.xsd"


@functools.cache
def _junit_schema() -> xmlschema.XMLSchema11:
    return xmlschema.XMLSchema11(JUNIT_XSD)


def _check_junit(report: Path | str) -> None:
    """The report (a file, or the XML itself) is valid JUnit XML as tests/data/junit.xsd
    describes it: the elements and attributes CI tools read, counts that agree."""
    _junit_schema().validate(str(report) if isinstance(report, Path) else report)


def _verdicts_of(text: str) -> tuple[Record, list[Verdict]]:
    """An empty run of the scenario ``text``: nothing on the line, 1.5 s long."""
    record = Record(scenario_from_text(text), RigLine(9600, 8, "N", 1), time.time(), 1.5)
    return record, judge(record)


def test_junit_reports_with_passes_and_failures_validate_against_the_schema() -> None:
    expect = (
        '[[expect]]\nname = "nothing ran twice"\nkind = "once"\n\n'
        '[[expect]]\nname = "a top-up <arrives> & is \\"applied\\""\nkind = "topup"\n'
        'meter = "MTR-0001"\nwithin = "1s"\n\n'
        '[[expect]]\nkind = "recovered"\nmeter = "MTR-0001"\n'
    )
    record, verdicts = _verdicts_of(scenario_text(expect=expect))
    assert [v.passed for v in verdicts] == [True, False, False]
    report = junit_xml(record, verdicts)
    _check_junit(report)
    root = ET.fromstring(report)
    cases = root.findall("testsuite/testcase")
    assert [c.get("name") for c in cases][:2] == [
        "nothing ran twice",
        'a top-up <arrives> & is "applied"',
    ]
    failure = cases[1].find("failure")
    assert failure is not None
    assert failure.get("message", "").startswith("expected a credit_transfer written to MTR-0001")
    assert cases[0].findtext("system-out", "").startswith("0 command(s) ran once each")
    held, passing = _verdicts_of(scenario_text())
    assert all(v.passed for v in passing)
    _check_junit(junit_xml(held, passing))  # every expectation held: no failure element


@pytest.mark.parametrize(
    ("pattern", "replacement"),
    [
        pytest.param(r'(<testsuite [^>]*)tests="2"', r'\1tests="3"', id="tests-miscounted"),
        pytest.param(
            r'(<testsuite [^>]*)failures="1"', r'\1failures="0"', id="failures-miscounted"
        ),
        pytest.param(r"<testcase ", '<testcase bogus="1" ', id="unknown-attribute"),
        pytest.param(r' name="top-up"', "", id="no-name"),
        pytest.param(r'(<testcase [^>]*)time="[0-9.]+"', r'\1time="1.5 s"', id="time-with-unit"),
        pytest.param(r'timestamp="[^"]+"', 'timestamp="yesterday"', id="timestamp"),
        pytest.param(r"</failure>", "</failure><error />", id="two-outcomes"),
        pytest.param(r"<system-out>", "<stdout>", id="unknown-element"),
    ],
)
def test_the_schema_refuses_what_a_ci_would_misread(pattern: str, replacement: str) -> None:
    expect = (
        '[[expect]]\nname = "top-up"\nkind = "topup"\nmeter = "MTR-0001"\n\n'
        '[[expect]]\nkind = "once"\n'
    )
    record, verdicts = _verdicts_of(scenario_text(expect=expect))
    report = junit_xml(record, verdicts)
    _check_junit(report)
    spoilt = re.sub(pattern, replacement, report, count=1)
    if replacement == "<stdout>":
        spoilt = spoilt.replace("</system-out>", "</stdout>", 1)
    assert spoilt != report
    with pytest.raises(xmlschema.XMLSchemaValidationError):
        _check_junit(spoilt)


def test_a_capture_holds_every_frame_with_timestamps(
    tmp_path: Path, pty_pair: tuple[str, str]
) -> None:
    path = tmp_path / "s.toml"
    path.write_text(scenario_text(_fault("gaps", "chars = 3"), duration="0.8s"))

    async def both() -> Record:
        scenario = load_scenario(path)
        task = asyncio.create_task(run_scenario(scenario, SerialSettings(pty_pair[0], 9600)))
        await asyncio.sleep(0.2)
        raw = RawMaster(pty_pair[1], 9600)
        try:
            for _ in range(2):
                await raw.send(MAP_VERSION_READ)
                await raw.pieces(0.1)
        finally:
            raw.close()
        return await task

    record = asyncio.run(both())
    from meter_sim.rig.reports import write_capture

    frames = tmp_path / "frames.csv"
    write_capture(frames, record)
    with frames.open() as handle:
        rows = list(csv.reader(handle))
    assert tuple(rows[0]) == CSV_COLUMNS
    senders = [(r[2], r[5], r[6]) for r in rows[1:]]
    assert senders[0] == ("master", "1", "")
    assert senders[1][0] == "meter"
    assert senders[1][2] == "gaps"
    assert senders[-2:] == [("master", "1", ""), ("meter", "1", "")]
    assert rows[-1][7] == MAP_VERSION_ANSWER.hex()
    assert float(rows[1][1]) < float(rows[-1][1])


# -- the worked examples of docs/hil.md ------------------------------------------------------------


async def _credit_master(port: str) -> None:
    link = _link(port)
    topped = False
    started = time.monotonic()
    try:
        while time.monotonic() - started < 5.5:
            try:
                snapshot = await link.read_snapshot()
                if not topped and snapshot.control_state is not ControlState.CONNECTED:
                    await asyncio.sleep(0.8)  # the customer goes to pay
                    command = Command.credit_transfer(1, 50000)
                    await link.execute(CommandEnvelope.signed("MTR-0001", 1, command, None))
                    topped = True
            except HesError:
                pass
            await asyncio.sleep(0.2)
    finally:
        await link.close()


async def _power_cut_master(port: str) -> Any:
    link = _link(port)
    try:
        await asyncio.sleep(0.3)
        command = Command.credit_transfer(7, 25000)
        envelope = CommandEnvelope.signed("MTR-0001", 1, command, None)
        result = await link.execute(envelope, timeout=4.0)
        for _ in range(5):
            await link.read_snapshot()
            await asyncio.sleep(0.2)
        return result
    finally:
        await link.close()


async def _noisy_master(port: str) -> None:
    line = SerialLine(port, baudrate=9600)
    links = [ModbusRtuLink(line, unit, settings=FAST) for unit in (1, 2)]

    async def poll(link: ModbusRtuLink) -> None:
        started = time.monotonic()
        while time.monotonic() - started < 8.5:
            with contextlib.suppress(HesError):
                await link.read_snapshot()
            await asyncio.sleep(0.1)

    async def top_up() -> None:
        await asyncio.sleep(1.0)
        command = Command.credit_transfer(1, 7000)
        envelope = CommandEnvelope.signed("MTR-0002", 1, command, None)
        for _ in range(3):  # the same envelope again until it is confirmed
            with contextlib.suppress(HesError):
                await links[1].execute(envelope, timeout=2.0)
                return

    try:
        await asyncio.gather(*(poll(link) for link in links), top_up())
    finally:
        for link in links:
            await link.close()


@pytest.mark.parametrize(
    ("example", "master"),
    [
        pytest.param("credit-exhaustion.toml", _credit_master, id="credit-exhaustion"),
        pytest.param("power-cut-topup.toml", _power_cut_master, id="power-cut-topup"),
        pytest.param("noisy-line.toml", _noisy_master, id="noisy-line"),
    ],
)
async def test_the_worked_examples_hold_against_the_head_ends_link(
    tmp_path: Path,
    pty_pair: tuple[str, str],
    example: str,
    master: Master,
) -> None:
    text = (EXAMPLES / example).read_text()
    record, verdicts, seen = await run_with(tmp_path, text, pty_pair, master)
    failed = [v for v in verdicts if not v.passed]
    assert not failed, failed
    if example == "power-cut-topup.toml":
        assert seen.code is ResultCode.OK
        events = record.events["MTR-0001"]
        assert events.count("topup_accepted") == 1
        assert "power_up" in events
        assert [c.new for c in record.commands].count(True) == 1
        assert record.line.injected["power_cut"] == 1
    if example == "noisy-line.toml":
        assert set(record.line.injected) == {
            "noise",
            "corrupt_crc",
            "gaps",
            "wrong_unit",
            "drop",
            "late",
            "exception",
        }
