"""The local Mosquitto (headend.broker): passwords, the ACL, TLS, restarts, choosing a broker."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import aiomqtt
import pytest

from headend import broker as broker_module
from headend.broker import (
    BrokerError,
    LocalBroker,
    choose_broker,
    free_port,
    password_fields,
    probe,
)
from headend.links.mqtt import MqttLinkHub
from headend.transport.mqtt import Incoming, MqttConnection
from meter_sim.mqtt_agent import AgentOptions, MeterAgent
from protocols.commands import Command, CommandEnvelope, ResultCode
from protocols.errors import LinkClosed
from protocols.mqtt import BrokerSettings, TopicKind, TopicScheme
from protocols.readings import EventCode
from tests.mqtt_broker import (
    TEST_KEY,
    TEST_METERS,
    TEST_SECRET,
    BrokerFactory,
    RuntimeFactory,
)

pytestmark = pytest.mark.mqtt
TOPICS = TopicScheme()
M1, M2 = TEST_METERS[0], TEST_METERS[1]
KEY = bytes.fromhex(TEST_KEY)


def _client(settings: BrokerSettings, identifier: str | None = None) -> aiomqtt.Client:
    return aiomqtt.Client(
        settings.host,
        settings.port,
        username=settings.username,
        password=settings.password,
        identifier=identifier or settings.username,
        protocol=aiomqtt.ProtocolVersion.V5,
    )


async def _next_message(client: aiomqtt.Client, timeout: float = 5.0) -> aiomqtt.Message:
    async with asyncio.timeout(timeout):
        return await anext(aiter(client.messages))


def test_password_hashes_match_mosquitto_ctrl(tmp_path: Path) -> None:
    tool = shutil.which("mosquitto_ctrl")
    if tool is None:
        pytest.skip("mosquitto_ctrl is not installed")
    path = tmp_path / "dynsec.json"
    subprocess.run(
        [tool, "dynsec", "init", str(path), "alice", "s3cret"], check=True, capture_output=True
    )
    written = json.loads(path.read_text())["clients"][0]
    fields = password_fields("s3cret", base64.b64decode(written["salt"]), written["iterations"])
    assert fields == {k: written[k] for k in ("password", "salt", "iterations")}


async def test_a_wrong_password_cannot_connect(broker: LocalBroker) -> None:
    wrong = broker.meter_settings(M1).login(M1, "not-the-password")
    result = await probe(wrong)
    assert result.answered
    assert not result.accepted
    with pytest.raises(LinkClosed, match="refused"):
        async with MqttConnection(wrong, client_id=M1):
            pass
    unknown = broker.settings("nobody", "whatever")
    assert not (await probe(unknown)).accepted
    assert (await probe(broker.meter_settings(M1), client_id=M1)).accepted
    assert (await probe(broker.settings())).accepted


async def test_a_meter_cannot_publish_to_another_meters_topics(broker: LocalBroker) -> None:
    async with (
        _client(broker.settings(), "hes-watch") as hes,
        _client(broker.meter_settings(M1)) as meter,
    ):
        await hes.subscribe(f"{TOPICS.base}/#", qos=1)
        await hes.subscribe(TOPICS.deadletter, qos=1)
        await meter.publish(TOPICS.telemetry(M2), b"forged telemetry", qos=1)
        await meter.publish(TOPICS.cmd_result(M2), b"forged result", qos=1)
        await meter.publish(TOPICS.deadletter, b"forged dead letter", qos=1)
        await meter.publish(TOPICS.telemetry(M1), b"own telemetry", qos=1)
        # the broker keeps one publisher's messages in order: the forged ones would come first
        message = await _next_message(hes)
    assert message.topic.value == TOPICS.telemetry(M1)
    assert message.payload == b"own telemetry"


async def test_a_meter_cannot_read_another_meters_commands(broker: LocalBroker) -> None:
    async with (
        _client(broker.settings(), "hes-send") as hes,
        _client(broker.meter_settings(M1)) as meter,
    ):
        await meter.subscribe(TOPICS.cmd(M2), qos=1)
        await meter.subscribe(TOPICS.all_meters(TopicKind.CMD), qos=1)
        await meter.subscribe(TOPICS.cmd(M1), qos=1)
        await hes.publish(TOPICS.cmd(M2), b"for M2", qos=1)
        await hes.publish(TOPICS.cmd(M1), b"for M1", qos=1)
        message = await _next_message(meter)
    assert (message.topic.value, message.payload) == (TOPICS.cmd(M1), b"for M1")


async def test_tls_with_the_generated_ca(broker_factory: BrokerFactory) -> None:
    broker = broker_factory(tls=True)
    settings = broker.tls_settings()
    assert settings.tls
    assert (await probe(settings)).accepted
    received: list[Incoming] = []
    arrived = asyncio.Event()

    def on_message(message: Incoming) -> None:
        received.append(message)
        arrived.set()

    async with MqttConnection(
        settings, client_id="hes-tls", subscriptions=[TOPICS.deadletter], on_message=on_message
    ) as connection:
        await connection.publish(TOPICS.deadletter, b"over TLS")
        async with asyncio.timeout(5):
            await arrived.wait()
    assert received[0].payload == b"over TLS"
    # without the CA the broker's certificate is not trusted
    untrusted = BrokerSettings(settings.host, settings.port, "hes", settings.password, tls=True)
    assert not (await probe(untrusted)).answered
    with pytest.raises(LinkClosed, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
        async with MqttConnection(untrusted, client_id="hes-untrusted"):
            pass


async def test_a_restart_keeps_the_port_and_the_persistent_sessions(broker: LocalBroker) -> None:
    received: list[Incoming] = []
    arrived = asyncio.Event()

    def on_message(message: Incoming) -> None:
        received.append(message)
        arrived.set()

    def persistent() -> MqttConnection:
        return MqttConnection(
            broker.settings(),
            client_id="hes-persistent",
            subscriptions=[TOPICS.all_meters(TopicKind.EVENTS)],
            on_message=on_message,
            clean_start="never",
            session_expiry=600,
        )

    async with persistent():
        pass  # the session and its subscription now exist on the broker
    async with _client(broker.meter_settings(M1)) as meter:
        await meter.publish(TOPICS.events(M1), b"queued while away", qos=1)
    port = broker.port
    await asyncio.to_thread(broker.restart)
    assert broker.port == port
    async with persistent():
        async with asyncio.timeout(5):
            await arrived.wait()
    assert [m.payload for m in received] == [b"queued while away"]
    assert "Saving in-memory database" in broker.log_text()


async def test_choosing_a_broker(tmp_path: Path, broker: LocalBroker) -> None:
    given = broker.settings().url(with_password=True)
    plan = await choose_broker(given, tmp_path / "unused", secret=TEST_SECRET)
    assert plan.local is None
    assert plan.settings == broker.settings()
    assert "using the broker" in plan.note

    silent = f"mqtt://127.0.0.1:{free_port()}"
    with pytest.raises(BrokerError, match="did not accept us"):
        await choose_broker(silent, tmp_path / "never", [M1], secret=TEST_SECRET)
    assert not (tmp_path / "never").exists(), "a named broker is never silently replaced"

    plan = await choose_broker(
        None, tmp_path / "local", [M1], default_url=silent, secret=TEST_SECRET
    )
    try:
        assert plan.local is not None
        assert plan.settings is not None
        assert plan.settings.port == plan.local.port != broker.port
        assert "none at" in plan.note
        assert (await probe(plan.local.meter_settings(M1), client_id=M1)).accepted
    finally:
        plan.close()

    plan = await choose_broker("local", tmp_path / "local-2", default_url=given, secret=TEST_SECRET)
    try:
        assert plan.local is not None
        assert "asked for" in plan.note
    finally:
        plan.close()


async def test_without_a_url_a_broker_that_accepts_the_fleet_is_used(
    tmp_path: Path, broker: LocalBroker
) -> None:
    plan = await choose_broker(
        None, tmp_path, [M1], default_url=broker.settings().url(True), secret=TEST_SECRET
    )
    assert plan.local is None
    assert plan.settings is not None
    assert plan.settings.port == broker.port
    assert "answers at" in plan.note
    stranger = await choose_broker(
        None,
        tmp_path / "other",
        ["NOT-PROVISIONED"],
        default_url=broker.settings().url(True),
        secret=TEST_SECRET,
    )
    try:
        assert stranger.local is not None, "a broker that refuses the fleet's meters is not used"
    finally:
        stranger.close()


async def test_without_mosquitto_the_fleet_runs_on_modbus_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(broker_module, "find_mosquitto", lambda: None)
    plan = await choose_broker(
        None, tmp_path, default_url=f"mqtt://127.0.0.1:{free_port()}", secret=TEST_SECRET
    )
    assert (plan.settings, plan.local) == (None, None)
    assert "Modbus only" in plan.note


async def test_a_server_that_never_accepts_the_connection_is_given_up() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # reads nothing, answers nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        settings = BrokerSettings("127.0.0.1", port, "hes", "x")
        with pytest.raises(LinkClosed, match="no CONNACK"):
            async with MqttConnection(settings, client_id="hes-patient", connect_timeout=0.3):
                pass
        assert not (await probe(settings, timeout=0.3)).answered
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


def test_a_connection_collected_after_its_loop_closed_stays_quiet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """paho closes its socket again when its client is collected; that may happen in another
    thread after the event loop has closed, and must not reach the closed loop."""
    kept: list[MqttConnection] = []

    async def give_up() -> None:
        accepted: list[asyncio.StreamWriter] = []

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            connection = MqttConnection(
                BrokerSettings("127.0.0.1", port, "hes", "x"),
                client_id="hes-collected",
                connect_timeout=0.2,
            )
            kept.append(connection)
            with pytest.raises(LinkClosed, match="no CONNACK"):
                await connection.start()
        finally:
            for writer in accepted:
                writer.close()
            server.close()
            await server.wait_closed()

    asyncio.run(give_up())
    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    def collect() -> None:
        kept.clear()
        gc.collect()

    worker = threading.Thread(target=collect)
    worker.start()
    worker.join()
    assert [u.exc_value for u in unraisable] == []  # type: ignore[attr-defined]


def _takeover(broker: LocalBroker, victim: str, thief: str) -> list[str]:
    """``mosquitto_sub`` with the thief's user name and password and the victim's client id,
    asking for the victim's persistent session (the argv of the attempt)."""
    return [
        "mosquitto_sub", "-V", "5", "-h", broker.host, "-p", str(broker.port),
        "-u", thief, "-P", broker.passwords[thief], "-i", victim, "-c", "-x", "604800",
        "-t", TOPICS.cmd(victim), "-q", "1", "-C", "1", "-W", "3",
    ]  # fmt: skip


async def _run(argv: list[str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def test_a_meter_cannot_take_over_another_meters_session(
    broker: LocalBroker, make_runtime: RuntimeFactory
) -> None:
    if shutil.which("mosquitto_sub") is None:
        pytest.skip("mosquitto_sub is not installed")
    runtime = make_runtime(M2)
    options = AgentOptions(
        telemetry_interval=60, backoff_initial=0.05, backoff_max=0.2, meter_secret=TEST_SECRET
    )
    victim = MeterAgent(runtime, broker.settings(), TOPICS, options)
    task = asyncio.create_task(victim.run())
    try:
        await asyncio.wait_for(victim.connected.wait(), 5)
        # while the victim is online: refused, and the victim keeps its connection
        code, output = await _run(_takeover(broker, M2, M1))
        assert code != 0
        assert "not authori" in output.lower()
        assert victim.connected.is_set()
        assert victim.stats.connects == 1
    finally:
        victim.stop()
        await task  # offline now; its session (and subscription) stay on the broker

    envelope = CommandEnvelope.signed(M2, 300, Command.credit_transfer(1, 500), KEY)
    async with (
        MqttLinkHub(broker.settings()) as hub,
        _client(broker.settings(), "hes-watch-cmd") as watcher,
    ):
        await watcher.subscribe(TOPICS.cmd(M2), qos=1)
        # message expiry 30 s
        queued = asyncio.create_task(hub.link(envelope.meter_id).execute(envelope, 30))
        await _next_message(watcher)  # the broker holds it now, for the offline victim too
        code, output = await _run(_takeover(broker, M2, M1))
        assert code != 0
        assert "not authori" in output.lower()
        with pytest.raises(aiomqtt.MqttError):  # the same attempt through paho
            async with aiomqtt.Client(
                broker.host,
                broker.port,
                username=M1,
                password=broker.passwords[M1],
                identifier=M2,
                protocol=aiomqtt.ProtocolVersion.V5,
                clean_start=False,
            ):
                pass
        assert not queued.done()
        returned = MeterAgent(runtime, broker.settings(), TOPICS, options)
        task = asyncio.create_task(returned.run())
        try:
            result = await asyncio.wait_for(queued, 10)
        finally:
            returned.stop()
            await task
    assert (result.sequence, result.code) == (300, ResultCode.OK)
    assert returned.stats.commands == 1
    topups = [e for e in runtime.events_since(0) if e.code is EventCode.TOPUP_ACCEPTED]
    assert [(e.a, e.b) for e in topups] == [(1, 500)]


async def test_the_probe_logs_in_through_paho_with_mqtt_5(broker: LocalBroker) -> None:
    assert (await probe(broker.settings())).accepted
    logged = [line for line in broker.log_text().splitlines() if " as hes-probe-" in line]
    assert logged
    assert "(p5," in logged[-1]  # MQTT 5, as every client of the project speaks


async def test_checking_a_meters_login_leaves_its_queued_commands(
    tmp_path: Path, broker: LocalBroker, make_runtime: RuntimeFactory
) -> None:
    runtime = make_runtime(M1)
    options = AgentOptions(
        telemetry_interval=60, backoff_initial=0.05, backoff_max=0.2, meter_secret=TEST_SECRET
    )
    first = MeterAgent(runtime, broker.settings(), TOPICS, options)
    task = asyncio.create_task(first.run())
    await asyncio.wait_for(first.connected.wait(), 5)
    first.stop()
    await task
    envelope = CommandEnvelope.signed(M1, 1, Command.credit_transfer(1, 700), KEY)
    async with (
        MqttLinkHub(broker.settings()) as hub,
        _client(broker.settings(), "hes-watch-cmd") as watcher,
    ):
        await watcher.subscribe(TOPICS.cmd(M1), qos=1)
        queued = asyncio.create_task(hub.link(envelope.meter_id).execute(envelope, 30))
        await _next_message(watcher)
        # the fleet check logs in as the meter, into its session with the command waiting
        plan = await choose_broker(
            None, tmp_path, [M1], default_url=broker.settings().url(True), secret=TEST_SECRET
        )
        assert plan.local is None
        returned = MeterAgent(runtime, broker.settings(), TOPICS, options)
        task = asyncio.create_task(returned.run())
        try:
            result = await asyncio.wait_for(queued, 10)
        finally:
            returned.stop()
            await task
    assert (result.sequence, result.code) == (1, ResultCode.OK)
    assert runtime.snapshot().last_transfer == 1
