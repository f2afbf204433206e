"""Faults a served meter injects over Modbus TCP and MQTT (meter_sim/faults.py): the specs and
their refusals, each kind as a client sees it, seeded reproducibility, and the head-end's
confirmed execution under lost requests and lost acknowledgements: every command executed
exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException

from headend.broker import LocalBroker
from headend.links.base import RetryPolicy, execute_confirmed
from headend.links.modbus import LinkSettings, ModbusTcpLink
from headend.links.mqtt import MqttLinkHub
from meter_sim.config import (
    Delay,
    FaultsConfig,
    FleetConfig,
    MeterConfig,
    SimulationConfig,
    faults_from_text,
    fleet_from_mapping,
)
from meter_sim.faults import CORRUPT, FaultInjector, FleetFaults
from meter_sim.modbus_server import serve_tcp
from meter_sim.mqtt_agent import AgentOptions, run_agents
from meter_sim.runtime import MeterRuntime
from protocols import registermap as rm
from protocols.clock import ManualClock
from protocols.commands import Command, CommandEnvelope, ResultCode
from protocols.errors import ConfigError, DecodeError, LinkCorrupt, LinkTimeout
from protocols.mqtt import TopicScheme, decode_state
from protocols.readings import EventCode
from tests.mqtt_broker import TEST_KEY, TEST_METERS, TEST_SECRET, RuntimeFactory

QUICK = LinkSettings(timeout=0.15, retries=0, backoff=0.01)
PATIENT = LinkSettings(timeout=0.15, retries=4, backoff=0.01)
FAST_AGENT = AgentOptions(backoff_initial=0.05, backoff_max=0.2, meter_secret=TEST_SECRET)


# -- specs --------------------------------------------------------------------------------------


def test_a_faults_spec_reads_every_key() -> None:
    spec = faults_from_text(
        "drop=0.05, delay=uniform:100ms:0.5, lose_ack=0.1,disconnect=0.01,corrupt=0.02,"
        "delay_rate=0.5,seed=7"
    )
    assert spec == FaultsConfig(
        drop=0.05,
        delay=Delay("uniform", 0.1, 0.5),
        delay_rate=0.5,
        lose_ack=0.1,
        disconnect=0.01,
        corrupt=0.02,
        seed=7,
    )
    assert faults_from_text(spec.text()) == spec
    assert faults_from_text("delay=exponential:0.2").delay == Delay("exponential", 0.2)
    assert faults_from_text("delay=fixed:2s").delay == Delay("fixed", 2.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "an empty item"),
        ("drop=0.1,,corrupt=0.1", "an empty item"),
        ("drop", "'drop': give key=value"),
        ("drop=", "'drop=': give key=value"),
        ("dorp=0.1", "dorp: unknown fault key (known: drop, delay, delay_rate"),
        ("drop=0.1,drop=0.2", "drop: given twice"),
        ("drop=lots", "drop: expected float, got str"),
        ("drop=1.5", "drop: must be <= 1"),
        ("corrupt=-0.1", "corrupt: must be >= 0"),
        ("drop=0.5,lose_ack=0.3,corrupt=0.3", "add up to at most 1, got 1.1"),
        ("delay=gauss:1", "delay: must be fixed:S, uniform:LOW:HIGH or exponential:MEAN"),
        ("delay=uniform:1", "a delay is fixed:S, uniform:LOW:HIGH or exponential:MEAN"),
        ("delay=uniform:0.5:0.1", "the high end is below the low"),
        ("delay=fixed:2m", "a duration is 0 s to 60 s"),
        ("delay=fixed:soon", "not a duration: 'soon'"),
        ("seed=-1", "seed: must be >= 0"),
    ],
)
def test_a_bad_faults_spec_is_refused_with_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        faults_from_text(text)
    assert message in str(refused.value)


def test_the_fleet_file_gives_faults_fleet_wide_and_per_meter() -> None:
    config = fleet_from_mapping(
        {
            "faults": {"drop": 0.1, "delay": "fixed:250ms", "seed": 3},
            "defaults": {"modbus_unit": 1},
            "meters": [
                {"id": "A", "faults": {"corrupt": 0.5}},
                {"id": "B", "modbus_unit": 2},
                {"id": "C", "modbus_unit": 3, "faults": {}},
            ],
        }
    )
    faults = FleetFaults.of(config)
    assert sorted(faults.injectors) == ["A", "B"]  # C's empty table injects nothing
    assert faults.injectors["A"].config == FaultsConfig(corrupt=0.5)
    assert faults.injectors["B"].config == FaultsConfig(
        drop=0.1, delay=Delay("fixed", 0.25), seed=3
    )
    # --faults replaces both for every meter; --faults-seed every seed
    everyone = FleetFaults.of(config, faults_from_text("lose_ack=0.2"), seed=9)
    assert {i.config for i in everyone.injectors.values()} == {FaultsConfig(lose_ack=0.2, seed=9)}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"faults": {"drop": 2}}, "faults.drop: must be <= 1"),
        ({"faults": {"drop": "x"}}, "faults.drop: expected float, got str"),
        ({"faults": {"drop": 0.7, "corrupt": 0.7}}, "faults: drop, lose_ack, disconnect"),
        ({"faults": {"later": 1}}, "faults.later: unknown key"),
        ({"faults": {"delay": "uniform:2:1"}}, "faults: delay: uniform:2:1: the high end"),
    ],
)
def test_a_bad_faults_table_is_refused_with_its_path(
    document: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        fleet_from_mapping({**document, "meters": [{"id": "A"}]})
    assert message in str(refused.value)
    with pytest.raises(ConfigError) as refused:
        fleet_from_mapping({"meters": [{"id": "A", **document}]})
    text = str(refused.value)
    assert text.startswith("meters[0]"), text
    assert message.removeprefix("faults") in text


def test_the_same_seed_draws_the_same_faults_for_a_meter() -> None:
    spec = faults_from_text(
        "drop=0.2,lose_ack=0.2,corrupt=0.1,delay=exponential:0.1,delay_rate=0.3"
    )

    def draws(meter_id: str, seed: int) -> list[Any]:
        injector = FaultInjector(meter_id, FaultsConfig(**{**_fields(spec), "seed": seed}))
        return [injector.draw(n % 3 == 0, "test") for n in range(200)]

    assert draws("A", 1) == draws("A", 1)
    assert draws("A", 1) != draws("A", 2)
    assert draws("A", 1) != draws("B", 1)  # each meter its own sequence
    kinds = {d.fault for d in draws("A", 1)}
    assert kinds == {None, "drop", "lose_ack", "corrupt"}
    assert all(d.fault != "lose_ack" for n, d in enumerate(draws("A", 1)) if n % 3)  # reads


def _fields(config: FaultsConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in FaultsConfig.__dataclass_fields__}


# -- Modbus TCP ---------------------------------------------------------------------------------


def _runtime(tmp_path: Path, meter_id: str = "MTR-0001", **config: Any) -> MeterRuntime:
    config.setdefault("auth_key", TEST_KEY)
    config.setdefault("initial_credit", 100_000)
    return MeterRuntime.open(MeterConfig(meter_id, **config), ManualClock(), tmp_path / "m")


def _faults(runtimes: list[MeterRuntime], text: str) -> FleetFaults:
    config = FleetConfig(SimulationConfig(), tuple(rt.config for rt in runtimes))
    return FleetFaults.of(config, faults_from_text(text))


@contextlib.asynccontextmanager
async def _served(
    tmp_path: Path, text: str
) -> AsyncIterator[tuple[MeterRuntime, Any, FleetFaults]]:
    runtime = _runtime(tmp_path)
    faults = _faults([runtime], text)
    async with serve_tcp([runtime], faults=faults) as service:
        yield runtime, service, faults


@contextlib.asynccontextmanager
async def _client(port: int, timeout: float = 0.2) -> AsyncIterator[AsyncModbusTcpClient]:
    client = AsyncModbusTcpClient(
        "127.0.0.1", port=port, timeout=timeout, retries=0, reconnect_delay=0
    )
    assert await client.connect()
    try:
        yield client
    finally:
        client.close()


async def _exchange(port: int, request: bytes, wait: float = 0.2) -> bytes:
    """Send one raw Modbus TCP request; the frame the server answered (as its header's length
    says), ``<closed>`` when it closed the connection instead, or b"" after ``wait`` seconds of
    silence."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        try:
            async with asyncio.timeout(wait):
                header = await reader.readexactly(6)
                return header + await reader.readexactly(int.from_bytes(header[4:6], "big"))
        except asyncio.IncompleteReadError as exc:
            return exc.partial + b"<closed>"
        except TimeoutError:
            return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


READ_IDENT = bytes.fromhex("0007 0000 0006 01 04 0000 0004")
IDENT_ANSWER_SIZE = 7 + 2 + 8


async def _send_command(client: AsyncModbusTcpClient, runtime: MeterRuntime, seq: int) -> Any:
    """A credit transfer written to the command block with the result block read back in the
    same request (function 23), as the head-end sends one."""
    envelope = CommandEnvelope.signed(
        runtime.meter_id, seq, Command.credit_transfer(seq, 500), bytes.fromhex(TEST_KEY)
    )
    return await client.readwrite_registers(
        read_address=rm.RESULT_START,
        read_count=rm.RESULT_SIZE,
        write_address=rm.COMMAND_START,
        values=rm.encode_command(envelope, "big"),
        device_id=1,
    )


async def test_modbus_drop_loses_the_request_unexecuted(tmp_path: Path) -> None:
    async with _served(tmp_path, "drop=1") as (runtime, service, faults):
        assert await _exchange(service.port, READ_IDENT) == b""  # no answer, still connected
        async with _client(service.port) as client:
            with pytest.raises(ModbusIOException):
                await _send_command(client, runtime, 1)
        assert runtime.snapshot().last_command_seq == 0
        assert faults.totals()["drop"] == 2


async def test_modbus_lose_ack_executes_the_write_and_answers_reads(tmp_path: Path) -> None:
    async with _served(tmp_path, "lose_ack=1") as (runtime, service, faults):
        credit = runtime.snapshot().credit
        assert len(await _exchange(service.port, READ_IDENT)) == IDENT_ANSWER_SIZE
        async with _client(service.port) as client:
            with pytest.raises(ModbusIOException):
                await _send_command(client, runtime, 1)
        assert runtime.snapshot().last_command_seq == 1
        assert runtime.snapshot().credit == credit + 500
        assert faults.totals()["lose_ack"] == 1  # the read met no fault


async def test_modbus_delay_answers_late(tmp_path: Path) -> None:
    async with _served(tmp_path, "delay=fixed:0.3") as (_, service, faults):
        loop = asyncio.get_running_loop()
        async with _client(service.port, timeout=2.0) as client:
            started = loop.time()
            response = await client.read_input_registers(0, count=4, device_id=1)
            assert not response.isError()
            assert loop.time() - started >= 0.3
        async with _client(service.port, timeout=0.1) as client:
            with pytest.raises(ModbusIOException):  # past a master's time-out: lost to it
                await client.read_input_registers(0, count=4, device_id=1)
        assert faults.totals()["delay"] == 2


async def test_modbus_corrupt_answers_a_pdu_one_byte_short(tmp_path: Path) -> None:
    async with _served(tmp_path, "corrupt=1") as (_, service, faults):
        answer = await _exchange(service.port, READ_IDENT)
        header, pdu = answer[:7], answer[7:]
        assert header[:2] == READ_IDENT[:2]  # the transaction id
        assert int.from_bytes(header[4:6], "big") == 1 + len(pdu)  # the header agrees ...
        assert pdu[:2] == b"\x04\x08"  # ... with a PDU that promises 8 bytes
        assert len(pdu) == 2 + 7  # and carries 7
        async with _client(service.port) as client:
            with pytest.raises(ModbusIOException):  # pymodbus cannot decode it
                await client.read_input_registers(0, count=4, device_id=1)
        assert faults.totals()["corrupt"] == 2


def _seed_where(meter_id: str, pattern: list[str | None]) -> int:
    """The first seed of ``corrupt=0.5`` whose first draws for ``meter_id`` are ``pattern``."""
    for seed in range(1000):
        injector = FaultInjector(meter_id, FaultsConfig(corrupt=0.5, seed=seed))
        if [injector.draw(True, "probe").fault for _ in pattern] == pattern:
            return seed
    raise AssertionError(f"no seed gives {pattern}")


async def test_modbus_link_reports_a_corrupt_answer_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with _served(tmp_path, "corrupt=1") as (_, service, faults):
        settings = LinkSettings(timeout=2.0, retries=1, backoff=0.01)
        link = ModbusTcpLink("127.0.0.1", service.port, 1, settings=settings)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            with pytest.raises(LinkCorrupt, match=r"an answer that does not decode \(\d+ bytes"):
                await link.read_snapshot()
        finally:
            await link.close()
        assert loop.time() - started < 1.0  # both attempts, neither waits out the 2 s time-out
        assert faults.totals()["corrupt"] == 2  # tried again once
        assert link.channel.corrupt == 2
    logged = [r for r in caplog.records if r.name == "headend.links.modbus"]
    assert [r.levelname for r in logged if "does not decode" in r.getMessage()] == ["WARNING"] * 2


async def test_modbus_a_corrupt_answer_to_a_command_is_confirmed_by_reading_back(
    tmp_path: Path,
) -> None:
    seed = _seed_where("MTR-0001", [None, CORRUPT, None])  # identification, command, result
    async with _served(tmp_path, f"corrupt=0.5,seed={seed}") as (runtime, service, faults):
        credit = runtime.snapshot().credit
        settings = LinkSettings(timeout=2.0, retries=0)
        link = ModbusTcpLink("127.0.0.1", service.port, 1, settings=settings)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            result = await link.execute(_envelope(runtime, 1), 5.0)
        finally:
            await link.close()
        assert loop.time() - started < 1.0  # no time-out waited out
        assert (result.sequence, result.code) == (1, ResultCode.OK)
        assert runtime.snapshot().credit == credit + 500  # executed once, confirmed
        assert faults.totals()["corrupt"] == 1
        injector = faults.get(runtime.meter_id)
        assert injector is not None
        assert injector.requests == 3  # asked, never resent


async def test_modbus_disconnect_closes_the_connection_unanswered(tmp_path: Path) -> None:
    async with _served(tmp_path, "disconnect=1") as (runtime, service, faults):
        assert await _exchange(service.port, READ_IDENT) == b"<closed>"
        async with _client(service.port) as client:
            with pytest.raises(ModbusIOException):
                await _send_command(client, runtime, 1)
            assert not client.connected
        assert runtime.snapshot().last_command_seq == 0
        assert faults.totals()["disconnect"] == 2


async def test_modbus_faults_are_reproducible_from_the_seed(tmp_path: Path) -> None:
    async def outcomes(where: Path, seed: int) -> list[str]:
        runtime = _runtime(where)
        faults = _faults([runtime], f"drop=0.3,corrupt=0.2,seed={seed}")
        seen = []
        async with serve_tcp([runtime], faults=faults) as service:
            for _ in range(12):
                answer = await _exchange(service.port, READ_IDENT)
                size = len(answer)
                seen.append("none" if not size else "ok" if size == IDENT_ANSWER_SIZE else "short")
        return seen

    first = await outcomes(tmp_path / "a", 5)
    assert first == await outcomes(tmp_path / "b", 5)
    assert set(first) == {"none", "short", "ok"}
    assert first != await outcomes(tmp_path / "c", 6)


# -- MQTT ---------------------------------------------------------------------------------------

TOPICS = TopicScheme()


@contextlib.asynccontextmanager
async def _agent(
    broker: LocalBroker, make_runtime: RuntimeFactory, text: str
) -> AsyncIterator[tuple[MeterRuntime, Any, FleetFaults, MqttLinkHub]]:
    runtime = make_runtime(TEST_METERS[0])
    faults = _faults([runtime], text)
    async with (
        run_agents([runtime], broker.settings(), options=FAST_AGENT, faults=faults) as agents,
        MqttLinkHub(broker.settings()) as hub,
    ):
        await agents.wait_connected(5)
        yield runtime, agents.agents[runtime.meter_id], faults, hub


def _envelope(runtime: MeterRuntime, seq: int, amount: int = 500) -> CommandEnvelope:
    command = Command.credit_transfer(seq, amount)
    return CommandEnvelope.signed(runtime.meter_id, seq, command, bytes.fromhex(TEST_KEY))


@pytest.mark.mqtt
@pytest.mark.parametrize(("kind", "executed"), [("drop", False), ("lose_ack", True)])
async def test_mqtt_drop_and_lose_ack_send_no_result(
    broker: LocalBroker, make_runtime: RuntimeFactory, kind: str, executed: bool
) -> None:
    async with _agent(broker, make_runtime, f"{kind}=1") as (runtime, _, faults, hub):
        with pytest.raises(LinkTimeout):
            await hub.send_envelope(_envelope(runtime, 1), 0.5)
        assert (runtime.snapshot().last_command_seq == 1) is executed
        link = hub.link(runtime.meter_id, timeout=0.5)
        if kind == "lose_ack":  # a read is answered
            assert (await link.read_last_result()).sequence == 1
        else:
            with pytest.raises(LinkTimeout):
                await link.read_last_result()
        assert faults.totals()[kind] == (1 if executed else 2)


@pytest.mark.mqtt
async def test_mqtt_corrupt_publishes_a_payload_that_does_not_decode(
    broker: LocalBroker, make_runtime: RuntimeFactory
) -> None:
    async with _agent(broker, make_runtime, "corrupt=1") as (runtime, _, faults, hub):
        with pytest.raises(DecodeError):  # at once, not at the time-out
            await hub.send_envelope(_envelope(runtime, 1), 5.0)
        assert runtime.snapshot().last_command_seq == 1  # executed, answered malformed
        with pytest.raises(DecodeError):
            await hub.link(runtime.meter_id).read_snapshot()
        assert faults.totals()["corrupt"] == 2


@pytest.mark.mqtt
async def test_mqtt_a_corrupt_result_is_confirmed_by_asking_the_meter(
    broker: LocalBroker, make_runtime: RuntimeFactory
) -> None:
    seed = _seed_where(TEST_METERS[0], [CORRUPT, None])  # the command, the question after it
    async with _agent(broker, make_runtime, f"corrupt=0.5,seed={seed}") as (
        runtime,
        _,
        faults,
        hub,
    ):
        credit = runtime.snapshot().credit
        result = await execute_confirmed(hub.link(runtime.meter_id), _envelope(runtime, 1), 5.0)
        assert (result.sequence, result.code) == (1, ResultCode.OK)
        assert runtime.snapshot().credit == credit + 500
        assert faults.totals()["corrupt"] == 1
        injector = faults.get(runtime.meter_id)
        assert injector is not None
        assert injector.requests == 2  # asked, never resent
        assert hub.malformed == 1


@pytest.mark.mqtt
async def test_mqtt_delay_answers_late(broker: LocalBroker, make_runtime: RuntimeFactory) -> None:
    async with _agent(broker, make_runtime, "delay=uniform:0.2:0.3") as (runtime, _, faults, hub):
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await hub.send_envelope(_envelope(runtime, 1), 5.0)
        assert result.code is ResultCode.OK
        assert loop.time() - started >= 0.2
        with pytest.raises(LinkTimeout):
            await hub.link(runtime.meter_id, timeout=0.1).read_snapshot()
        assert faults.totals()["delay"] == 2


@pytest.mark.mqtt
async def test_mqtt_disconnect_drops_the_session_and_the_will_is_published(
    broker: LocalBroker, make_runtime: RuntimeFactory
) -> None:
    async with _agent(broker, make_runtime, "disconnect=1") as (runtime, agent, faults, hub):
        settings = broker.settings()
        async with aiomqtt.Client(
            settings.host, settings.port, username=settings.username, password=settings.password
        ) as watcher:
            await watcher.subscribe(TOPICS.state(runtime.meter_id), qos=1)
            states = watcher.messages
            assert decode_state(bytes((await anext(states)).payload)).state == "online"
            with pytest.raises(LinkTimeout):
                await hub.send_envelope(_envelope(runtime, 1), 0.5)
            async with asyncio.timeout(5):  # the broker saw the connection fail: the will
                assert decode_state(bytes((await anext(states)).payload)).state == "offline"
                assert decode_state(bytes((await anext(states)).payload)).state == "online"
        assert agent.stats.connects == 2  # back after its back-off
        assert runtime.snapshot().last_command_seq == 0
        assert faults.totals()["disconnect"] == 1


# -- chaos: confirmed execution under lost requests and lost acknowledgements ------------------


async def _deliver(link: Any, envelope: CommandEnvelope, timeout: float) -> ResultCode:
    """What the head-end's dispatcher does with one command: confirmed execution, tried
    again with the same sequence number until a result is confirmed."""
    policy = RetryPolicy(backoff=0.01, max_backoff=0.05)
    for _ in range(20):
        with contextlib.suppress(LinkTimeout):
            result = await execute_confirmed(link, envelope, timeout, policy=policy)
            assert result.sequence == envelope.sequence
            return result.code
    raise AssertionError(f"command {envelope.sequence} never confirmed")


def _check_exactly_once(runtime: MeterRuntime, credit: int, transfers: list[int]) -> None:
    accepted = [
        (e.a, e.b) for e in runtime.events_since(0, 10_000) if e.code is EventCode.TOPUP_ACCEPTED
    ]
    assert accepted == [(n, 100 * n) for n in transfers]  # each applied once, in order
    assert runtime.snapshot().credit == credit + sum(100 * n for n in transfers)
    assert runtime.snapshot().last_command_seq == transfers[-1]


CHAOS = "drop=0.25,lose_ack=0.3,seed=2"


async def test_chaos_over_modbus_tcp_executes_every_command_exactly_once(tmp_path: Path) -> None:
    async with _served(tmp_path, CHAOS) as (runtime, service, faults):
        credit = runtime.snapshot().credit
        link = ModbusTcpLink("127.0.0.1", service.port, 1, settings=PATIENT)
        transfers = list(range(1, 11))
        try:
            for n in transfers:
                envelope = _envelope(runtime, n, 100 * n)
                assert await _deliver(link, envelope, 2.0) is ResultCode.OK
        finally:
            await link.close()
        _check_exactly_once(runtime, credit, transfers)
        totals = faults.totals()
        assert totals["drop"] >= 2
        assert totals["lose_ack"] >= 2


@pytest.mark.mqtt
async def test_chaos_over_mqtt_executes_every_command_exactly_once(
    broker: LocalBroker, make_runtime: RuntimeFactory
) -> None:
    async with _agent(broker, make_runtime, CHAOS) as (runtime, _, faults, hub):
        credit = runtime.snapshot().credit
        link = hub.link(runtime.meter_id, timeout=0.3)
        transfers = list(range(1, 7))
        for n in transfers:
            assert await _deliver(link, _envelope(runtime, n, 100 * n), 1.2) is ResultCode.OK
        _check_exactly_once(runtime, credit, transfers)
        totals = faults.totals()
        assert totals["drop"] >= 1
        assert totals["lose_ack"] >= 1


# -- meter-sim serve ----------------------------------------------------------------------------


def test_serve_with_faults_announces_them_and_counts_them_at_shutdown(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[faults]\ncorrupt = 0.5\n\n[[meters]]\nid = "M-1"\n')
    command = [sys.executable, "-m", "cli.meter_sim", "serve", "-c", str(fleet)]
    command += ["--state-dir", str(tmp_path / "state"), "--modbus-port", "0", "--ready-json"]
    command += ["--faults", "drop=1", "--faults-seed", "4"]  # instead of the file's
    proc = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        meter = ready["faults"]["meters"]["M-1"]
        assert meter["faults"] == "drop=1,lose_ack=0,disconnect=0,corrupt=0,seed=4"
        host, port = ready["modbus_tcp"].rsplit(":", 1)
        for _ in range(3):
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(READ_IDENT)
                sock.settimeout(0.2)
                with pytest.raises(TimeoutError):  # dropped: no answer
                    sock.recv(100)
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    stopped = json.loads(stdout.strip().splitlines()[-1])
    assert stopped["stopped"] is True
    assert stopped["faults"]["totals"]["drop"] == 3
    assert stopped["faults"]["meters"]["M-1"]["requests"] == 3
    logged = [line for line in stderr.splitlines() if "injected fault drop" in line]
    assert len(logged) == 3
    assert all("meter M-1" in line for line in logged)
    assert "faults injected into 1 meter(s) over 3 request(s): drop 3," in stderr
