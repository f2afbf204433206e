"""The simulator at fleet scale: meters behind Modbus TCP gateways, and a server that load does
not kill (descriptors exhausted, saves failing)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from headend.links.endpoint import open_link
from headend.links.pool import LinkPool
from headend.services.registry import records_from_fleet
from meter_sim import gateways
from meter_sim.config import FleetConfig, fleet_from_mapping, load_fleet
from meter_sim.fleet import Fleet
from meter_sim.serve import Endpoints, ServeOptions, serve_fleet
from meter_sim.statedb import DB_NAME, FleetStore, PreparedState
from protocols import registermap as rm
from protocols.clock import ManualClock
from protocols.errors import ConfigError, StateFileError

START = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def _fleet(count: int, **simulation: object) -> FleetConfig:
    return fleet_from_mapping(
        {"simulation": {"start": START, **simulation}, "meters": [{"count": count}]}
    )


# -- the plan: which meter stands behind which gateway ------------------------------------------


def test_a_fleet_without_gateways_is_spread_247_to_a_gateway() -> None:
    plan = gateways.plan(_fleet(600))
    assert [(g.name, len(g.meters)) for g in plan] == [("GW-1", 247), ("GW-2", 247), ("GW-3", 106)]
    assert plan[1].meters[0].meter_id == "MTR-0248"
    assert plan[1].meters[0].modbus_unit == 1
    for gateway in plan:
        units = [meter.modbus_unit for meter in gateway.meters]
        assert len(set(units)) == len(units)
    assert gateways.ports(plan, 5020) == [5020, 5021, 5022]
    assert gateways.ports(plan, 0) == [0, 0, 0]
    with pytest.raises(ConfigError, match="past 65535"):
        gateways.ports(plan, 65534)


def test_each_meter_goes_to_the_first_gateway_where_its_unit_id_is_free() -> None:
    config = fleet_from_mapping(
        {
            "meters": [
                {"id": "A", "modbus_unit": 5},
                {"id": "B", "modbus_unit": 5},
                {"id": "C", "modbus_unit": 6},
                {"id": "D", "modbus_unit": 5},
            ]
        }
    )
    plan = gateways.plan(config)
    assert [[m.meter_id for m in g.meters] for g in plan] == [["A", "C"], ["B"], ["D"]]


GATEWAYS = """
[[gateways]]
name = "NORTH"
port = 6100

[[gateways]]
name = "SOUTH"

[[meters]]
count = 3
gateway = "NORTH"

[[meters]]
id_prefix = "S-"
count = 2
gateway = "SOUTH"
"""


def test_declared_gateways_hold_the_meters_that_name_them(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(GATEWAYS)
    plan = gateways.plan(load_fleet(path))
    assert [(g.name, [m.meter_id for m in g.meters]) for g in plan] == [
        ("NORTH", ["MTR-0001", "MTR-0002", "MTR-0003"]),
        ("SOUTH", ["S-0001", "S-0002"]),
    ]
    assert gateways.ports(plan, 5020) == [6100, 5021]
    assert gateways.ports(plan, 0) == [6100, 0]
    with pytest.raises(ConfigError, match="two gateways would listen on port 6100"):
        gateways.ports(plan, 6099)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[gateways]]\nname = "G"\n[[meters]]\nid = "A"\n', "meter A names no gateway"),
        ('[[meters]]\nid = "A"\ngateway = "G"\n', "gateway G is not declared"),
        (
            '[[gateways]]\nname = "G"\n[[meters]]\nid = "A"\ngateway = "G"\n'
            '[[meters]]\nid = "B"\ngateway = "G"\n',
            "meters A and B share unit id 1 behind gateway G",
        ),
        (
            '[[gateways]]\nname = "G"\n[[gateways]]\nname = "G"\n'
            '[[meters]]\nid = "A"\ngateway = "G"\n',
            "gateway G is declared twice",
        ),
        (
            '[[gateways]]\nname = "G"\nport = 7\n[[gateways]]\nname = "H"\nport = 7\n'
            '[[meters]]\nid = "A"\ngateway = "G"\n',
            "two gateways listen on port 7",
        ),
        ('[[gateways]]\nname = "G"\nport = 70000\n[[meters]]\nid = "A"\n', "port: must be <="),
        ('[[gateways]]\nport = 1\n[[meters]]\nid = "A"\n', "gateways\\[0\\].name: required"),
        ('[[gateways]]\nname = "a b"\n[[meters]]\nid = "A"\n', "name: must be letters"),
    ],
)
def test_bad_gateway_declarations_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_fleet(path)


# -- the head-end's import addresses each meter at its gateway -----------------------------------


def test_the_fleet_import_addresses_each_meter_behind_its_gateway(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text("[[meters]]\ncount = 300\n")
    rows, refused = records_from_fleet(path, "tcp://127.0.0.1:5020")
    assert not refused
    endpoints = {record.meter_id: record.endpoint for _, record in rows}
    assert endpoints["MTR-0001"] == "tcp://127.0.0.1:5020/1"
    assert endpoints["MTR-0247"] == "tcp://127.0.0.1:5020/247"
    assert endpoints["MTR-0248"] == "tcp://127.0.0.1:5021/1"
    assert endpoints["MTR-0300"] == "tcp://127.0.0.1:5021/53"
    assert len(set(endpoints.values())) == 300

    path.write_text(GATEWAYS)
    rows, _ = records_from_fleet(path, "tcp://10.0.0.5:5020")
    endpoints = {record.meter_id: record.endpoint for _, record in rows}
    assert endpoints["MTR-0002"] == "tcp://10.0.0.5:6100/2"
    assert endpoints["S-0002"] == "tcp://10.0.0.5:5021/2"

    path.write_text(GATEWAYS.replace("port = 6100", "port = 0"))
    with pytest.raises(ConfigError, match="gateway NORTH listens on a free port"):
        records_from_fleet(path, "tcp://127.0.0.1:5020")


# -- serving: the gateways listen, each meter answers behind its own --------------------------


async def test_serve_puts_300_meters_behind_two_gateways(tmp_path: Path) -> None:
    config = _fleet(300, save_seconds=3600)
    clock = ManualClock(START)
    fleet = Fleet.from_config(config, clock, tmp_path / "state")
    stop = asyncio.Event()
    serving = asyncio.Event()
    announced: list[Endpoints] = []

    def ready(endpoints: Endpoints) -> None:
        announced.append(endpoints)
        serving.set()

    task = asyncio.create_task(serve_fleet(fleet, ServeOptions(modbus_port=0), stop, ready))
    try:
        await asyncio.wait_for(serving.wait(), 60)
        shape = announced[0].as_dict()
        assert [(g["name"], len(g["meters"])) for g in shape["gateways"]] == [
            ("GW-1", 247),
            ("GW-2", 53),
        ]
        first, second = shape["gateways"]
        assert shape["modbus_tcp"] == f"127.0.0.1:{first['port']}"
        assert shape["simulation"] == {"time": START, "speed": 1.0, "integration": "fixed"}
        assert second["meters"]["MTR-0300"] == 53
        pool = LinkPool()
        try:
            for port, unit, meter_id in [
                (first["port"], 1, "MTR-0001"),
                (first["port"], 247, "MTR-0247"),
                (second["port"], 1, "MTR-0248"),
                (second["port"], 53, "MTR-0300"),
            ]:
                link = await open_link(f"tcp://127.0.0.1:{port}/{unit}", pool=pool)
                assert link.meter_id == meter_id
                assert (await link.read_snapshot()).meter_id == meter_id
        finally:
            await pool.close()
    finally:
        stop.set()
        await task


def _serve_ready(tmp_path: Path, *options: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """``meter-sim serve --ready-json`` of three meters at speed 3600, and its ready line."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "fleet.toml"
    config.write_text(
        f'[simulation]\nstate_dir = "{tmp_path / "state"}"\n\n[[meters]]\ncount = 3\n'
    )
    command = [sys.executable, "-m", "cli.meter_sim", "serve", "--config", str(config)]
    command += ["--modbus-port", "0", "--ready-json", "--speed", "3600", *options]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=30)
        raise AssertionError(f"serve exited: {proc.stderr.read() if proc.stderr else ''}")
    return proc, json.loads(line)


async def _meter_time(address: str, unit: int) -> int:
    pool = LinkPool()
    try:
        link = await open_link(f"tcp://{address}/{unit}", pool=pool)
        return (await link.read_snapshot()).time
    finally:
        await pool.close()


def test_serve_integrates_the_event_driven_way_unless_told_and_its_clock_keeps_pace(
    tmp_path: Path,
) -> None:
    """The ready line tells the simulated time, the clock's speed and the integration (events
    unless --integration fixed); a meter's clock read later is at least that time plus speed
    times the real seconds since the line came."""
    served = [
        _serve_ready(tmp_path / "events"),
        _serve_ready(tmp_path / "fixed", "--integration", "fixed"),
    ]
    try:
        for (proc, ready), way in zip(served, ["events", "fixed"], strict=True):
            read_at = time.monotonic()
            simulation = ready["simulation"]
            assert (simulation["speed"], simulation["integration"]) == (3600.0, way)
            time.sleep(0.5)  # half a simulated hour
            expected = simulation["time"] + 3600 * (time.monotonic() - read_at)
            shown = asyncio.run(_meter_time(ready["modbus_tcp"], 1))
            assert shown >= int(expected) - 1  # the clock register holds whole seconds
            assert proc.poll() is None
    finally:
        for proc, _ in served:
            proc.send_signal(signal.SIGTERM)
        for proc, _ in served:
            _, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 0, stderr


# -- never die of load ---------------------------------------------------------------------------

FD_FLEET = """
[simulation]
start = {start}
state_dir = "{state}"
save_seconds = 0.3
tick_seconds = 0.1

[[meters]]
count = 5
"""
#: descriptors the child may open beyond what it holds once serving
HEADROOM = 6
BURST = 40


def _read_request(unit: int, transaction: int) -> bytes:
    """FC04 reading the identification block's first 4 registers, as an MBAP frame."""
    start = rm.BLOCKS[rm.Block.IDENTIFICATION].start
    pdu = bytes([4]) + start.to_bytes(2, "big") + (4).to_bytes(2, "big")
    return (
        transaction.to_bytes(2, "big")
        + b"\0\0"
        + (len(pdu) + 1).to_bytes(2, "big")
        + bytes([unit])
        + pdu
    )


def _ask(sock: socket.socket, unit: int, transaction: int) -> bytes:
    sock.sendall(_read_request(unit, transaction))
    answer = b""
    while len(answer) < 6 or len(answer) < 6 + int.from_bytes(answer[4:6], "big"):
        chunk = sock.recv(256)
        assert chunk, "the server closed the connection"
        answer += chunk
    return answer


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _open_descriptors(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


@pytest.mark.slow
def test_serve_outlives_descriptor_exhaustion_and_failing_saves(tmp_path: Path) -> None:
    """A burst of connections runs the process out of descriptors: accepting pauses and says
    so, the open connection keeps being answered and the periodic saves go on (the state
    store holds its descriptors); once the burst is gone a new connection is served, and
    SIGTERM exits 0."""
    config = tmp_path / "fleet.toml"
    config.write_text(FD_FLEET.format(start=START, state=tmp_path / "state"))
    log_path = tmp_path / "serve.log"
    command = [sys.executable, "-m", "cli.meter_sim", "serve", "--config", str(config)]
    command += ["--modbus-port", "0", "--ready-json"]
    # a first run finds how many descriptors a serving process holds
    with log_path.open("w") as log:
        probe = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        assert probe.stdout is not None
        json.loads(probe.stdout.readline())
        baseline = _open_descriptors(probe.pid)
        probe.send_signal(signal.SIGTERM)
        probe.communicate(timeout=30)
    assert probe.returncode == 0, log_path.read_text()

    limited = ["sh", "-c", f'ulimit -n {baseline + HEADROOM} && exec "$@"', "sh", *command]
    with log_path.open("w") as log:
        proc = subprocess.Popen(limited, stdout=subprocess.PIPE, stderr=log, text=True)
    burst: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        host, port = ready["modbus_tcp"].rsplit(":", 1)
        address = (host, int(port))
        steady = socket.create_connection(address, timeout=10)
        assert _ask(steady, 1, 1)[7] == 4
        for _ in range(BURST):  # the kernel queues them; the server runs out accepting them
            burst.append(socket.create_connection(address, timeout=10))
        text = log_path.read_text
        _wait_for(lambda: "cannot accept a connection" in text(), 20, "the accept refusal")
        log = tmp_path / "state" / f"{DB_NAME}-wal"  # where each save's commit lands
        refused = time.time()
        _wait_for(lambda: log.stat().st_mtime > refused, 20, "a save with no descriptor left")
        assert _ask(steady, 2, 2)[7] == 4, "an open connection is no longer answered"
        assert proc.poll() is None
        for sock in burst:
            sock.close()
        burst.clear()
        closed = time.time()
        _wait_for(lambda: log.stat().st_mtime > closed, 30, "a save after the burst")
        # the new connection waits in the backlog behind the burst's closed ones, which the
        # listener accepts (and drops at their end of file) a few at a time, pausing a second
        # whenever the descriptors run out again: give it the time that takes
        # (about 12 s for the 40 here)
        with socket.create_connection(address, timeout=40) as fresh:
            assert _ask(fresh, 3, 3)[7] == 4
        assert _ask(steady, 4, 4)[7] == 4
        steady.close()
    finally:
        for sock in burst:
            sock.close()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0, log_path.read_text()
    assert "Traceback" not in log_path.read_text()


class FlakyStore(FleetStore):
    """A state store whose next ``failures`` commits fail as a full disk would."""

    def __init__(self, state_dir: Path, failures: int) -> None:
        super().__init__(state_dir)
        self.failures = failures

    def write(self, prepared: Iterable[PreparedState]) -> int:
        if self.failures:
            self.failures -= 1
            raise StateFileError(f"{self.path}: cannot save the meters' state: disk full")
        return super().write(prepared)


def _flaky_fleet(tmp_path: Path, failures: int) -> tuple[Fleet, FlakyStore]:
    fleet = Fleet.from_config(_fleet(3, save_seconds=30), ManualClock(START), tmp_path)
    flaky = FlakyStore(tmp_path, failures)
    for runtime in fleet.runtimes.values():
        assert runtime.store is not None
        runtime.store.fleet = flaky
    return fleet, flaky


async def test_a_failed_periodic_save_is_reported_and_retried_sooner(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fleet, flaky = _flaky_fleet(tmp_path, failures=2)
    assert isinstance(fleet.clock, ManualClock)
    fleet.clock.advance(600)
    fleet.sync_all()
    assert await fleet.periodic_save() == 1.0
    assert await fleet.periodic_save() == 2.0
    assert fleet.save_failures == 2
    assert "saving the fleet failed (2 time(s) in a row), retrying in 2.0 s" in caplog.text
    assert await fleet.periodic_save() == 30.0
    assert fleet.save_failures == 0
    assert flaky.failures == 0
    assert "the fleet saved again after 2 failed attempt(s)" in caplog.text
    saved = FleetStore(tmp_path).meter("MTR-0001").load()
    assert saved["true_time"] == START + 600


def test_the_last_save_is_retried_and_its_failure_raised(tmp_path: Path) -> None:
    fleet, flaky = _flaky_fleet(tmp_path, failures=2)
    fleet.final_save(attempts=3, pause=0)
    assert flaky.failures == 0
    flaky.failures = 3
    with pytest.raises(StateFileError, match="disk full"):
        fleet.final_save(attempts=3, pause=0)


async def test_a_fleet_opened_unsaved_is_saved_first_thing_when_it_runs(tmp_path: Path) -> None:
    """``meter-sim serve`` answers before the meters' first save: the fleet saves them as soon
    as it runs, not a save interval later."""
    fleet = Fleet.from_config(
        _fleet(3, save_seconds=3600), ManualClock(START), tmp_path, save=False
    )
    assert not fleet.saved
    assert FleetStore(tmp_path).load_many(["MTR-0001"]) == {}
    stop = asyncio.Event()
    task = asyncio.create_task(fleet.run(stop, final_save=False))
    try:
        deadline = time.monotonic() + 30
        while not fleet.saved:
            assert time.monotonic() < deadline, "the fleet was not saved"
            await asyncio.sleep(0.01)
        saved = FleetStore(tmp_path).load_many(["MTR-0001", "MTR-0002", "MTR-0003"])
        assert sorted(saved) == ["MTR-0001", "MTR-0002", "MTR-0003"]
        assert saved["MTR-0001"]["true_time"] == START
    finally:
        stop.set()
        await task
