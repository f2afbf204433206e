"""Meter agents, the head-end's MQTT link and ingest together, on a real Mosquitto."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from headend.broker import LocalBroker
from headend.ingest import Ingest, MemorySink
from headend.links.base import MeterLink, send_command
from headend.links.endpoint import open_link
from headend.links.mqtt import MqttLinkHub, MqttMeterLink
from headend.links.pool import LinkPool
from headend.transport.mqtt import publish_properties
from meter_sim.describe import snapshot_rows
from meter_sim.mqtt_agent import AgentOptions, MeterAgent, in_subtree, run_agents
from protocols import mqtt
from protocols.clock import ManualClock
from protocols.commands import Command, CommandEnvelope, ResultCode
from protocols.errors import ConfigError, LinkTimeout
from protocols.mqtt import TopicScheme
from protocols.readings import EventCode
from tests.mqtt_broker import TEST_KEY, TEST_METERS, TEST_SECRET, RuntimeFactory

pytestmark = pytest.mark.mqtt
ROOT = Path(__file__).resolve().parent.parent
KEY = bytes.fromhex(TEST_KEY)
TOPICS = TopicScheme()
M1, M2 = TEST_METERS[0], TEST_METERS[1]
FAST = AgentOptions(
    telemetry_interval=0.05, backoff_initial=0.05, backoff_max=0.2, meter_secret=TEST_SECRET
)
SLOW = AgentOptions(telemetry_interval=60, meter_secret=TEST_SECRET)


def _envelope(sequence: int, command: Command, meter_id: str = M1) -> CommandEnvelope:
    return CommandEnvelope.signed(meter_id, sequence, command, KEY)


@pytest.fixture
async def ingest(broker: LocalBroker) -> AsyncIterator[tuple[Ingest, MemorySink]]:
    sink = MemorySink()
    async with Ingest(broker.settings(), sink, client_id="hes-ingest-test") as service:
        yield service, sink


@pytest.fixture
async def hub(broker: LocalBroker) -> AsyncIterator[MqttLinkHub]:
    async with MqttLinkHub(broker.settings()) as link_hub:
        yield link_hub


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition of this process's own state (never a server's readiness)."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - agents' counters have no event to wait on
            await asyncio.sleep(0.01)


async def test_telemetry_events_and_state_reach_the_ingest(
    broker: LocalBroker,
    make_runtime: RuntimeFactory,
    ingest: tuple[Ingest, MemorySink],
    hub: MqttLinkHub,
) -> None:
    service, sink = ingest
    runtimes = [make_runtime(M1), make_runtime(M2)]
    async with run_agents(runtimes, broker.settings(), options=FAST) as group:
        await group.wait_connected(5)
        await sink.wait_until(
            lambda s: (
                {t.meter_id for t in s.telemetry_messages} == {M1, M2}
                and s.online == {M1: True, M2: True}
            ),
            5,
        )
        result = await hub.link(M1).execute(_envelope(1, Command.credit_transfer(1, 700)))
        assert result.code is ResultCode.OK
        await sink.wait_until(
            lambda s: any(e.event.code is EventCode.TOPUP_ACCEPTED for e in s.event_messages), 5
        )
        await sink.wait_until(lambda s: s.latest[M1].credit == 100_700, 5)
    await sink.wait_until(lambda s: s.online == {M1: False, M2: False}, 5)
    assert sink.latest[M1].meter_id == M1
    topup = next(e for e in sink.event_messages if e.event.code is EventCode.TOPUP_ACCEPTED)
    assert (topup.meter_id, topup.event.a, topup.event.b) == (M1, 1, 700)
    assert sink.repeats == 0
    assert service.stats.malformed == 0
    for meter_id in (M1, M2):
        numbers = [t.n for t in sink.telemetry_messages if t.meter_id == meter_id]
        assert numbers == list(range(1, len(numbers) + 1))


async def test_commands_and_reads_through_the_link(
    broker: LocalBroker, make_runtime: RuntimeFactory, hub: MqttLinkHub, clock: ManualClock
) -> None:
    runtime = make_runtime(M1)
    link: MeterLink = hub.link(M1)
    async with run_agents([runtime], broker.settings(), options=SLOW) as group:
        await group.wait_connected(5)
        first = _envelope(1, Command.credit_transfer(1, 5000))
        assert (await link.execute(first, 3)).code is ResultCode.OK
        again = await link.execute(first, 3)  # a retry of the same sequence: applied zero times
        assert again.accepted
        assert again.last_transfer == 1
        forged = CommandEnvelope.signed(M1, 2, Command.credit_transfer(2, 5000), b"wrong key")
        assert (await link.execute(forged, 3)).code is ResultCode.AUTH_FAILED
        assert (await link.execute(_envelope(1, Command.remote_disconnect()), 3)).code is (
            ResultCode.REPLAYED
        )
        token = await link.execute(_envelope(2, Command.enter_token("0" * 20)), 3)
        assert token.code is ResultCode.NOT_SUPPORTED  # the same answer as over Modbus
        result = await send_command(link, Command.remote_disconnect(), KEY, 3)
        assert (result.sequence, result.code) == (3, ResultCode.OK)

        snapshot = await link.read_snapshot()
        assert (snapshot.meter_id, snapshot.credit, snapshot.last_command_seq) == (M1, 105_000, 3)
        assert not snapshot.relay_closed
        events = await link.read_events(0)
        assert [e.code for e in events][:1] == [EventCode.TOPUP_ACCEPTED]
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert await link.read_events(events[-1].seq) == []
        assert [e.seq for e in await link.read_events(1, limit=2)] == [2, 3]

        start = runtime.now()
        clock.advance(3 * 3600)
        rows = await link.read_profile(start, start + 3 * 3600)
        assert len(rows) == 12  # 15-minute intervals
        assert rows == runtime.profile_between(start, start + 3 * 3600)
        assert (await hub.link(M1).read_last_result()).sequence == 3
    assert runtime.snapshot().credit == 105_000


async def test_a_command_is_answered_once_on_disk_and_its_commit_leaves_the_loop_free(
    broker: LocalBroker,
    make_runtime: RuntimeFactory,
    hub: MqttLinkHub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runtimes = [make_runtime(M1), make_runtime(M2)]
    entered, release = threading.Event(), threading.Event()
    assert runtimes[0].store is not None
    database = runtimes[0].store.fleet
    real_write = database.write

    def slow_write(prepared: object) -> int:  # the commit, with its fsync, waits for the test
        entered.set()
        if not release.wait(5):
            raise AssertionError("the commit ran on the event loop: the test could not release it")
        return real_write(prepared)  # type: ignore[arg-type]

    async with run_agents(runtimes, broker.settings(), options=SLOW) as group:
        await group.wait_connected(5)
        monkeypatch.setattr(database, "write", slow_write)
        try:
            executing = asyncio.create_task(
                hub.link(M1).execute(_envelope(1, Command.credit_transfer(1, 700)), 8)
            )
            await asyncio.to_thread(entered.wait, 5)
            watching = asyncio.create_task(hub.link(M1).read_last_result())
            assert (await hub.link(M2).read_snapshot()).meter_id == M2  # the loop runs on
            assert not executing.done(), "not answered before the state is on disk"
            assert not watching.done(), "no reply shows a command that is not on disk"
            release.set()
            assert (await executing).code is ResultCode.OK
            assert (await watching).sequence == 1
        finally:
            release.set()
            monkeypatch.setattr(database, "write", real_write)
    store = runtimes[0].store
    assert store is not None
    assert store.load()["last_transfer"] == 1


async def test_a_snapshot_carries_the_currency_scale(
    broker: LocalBroker, make_runtime: RuntimeFactory, hub: MqttLinkHub
) -> None:
    runtime = make_runtime(M2, currency="JPY", currency_scale=0, initial_credit=500)
    async with run_agents([runtime], broker.settings(), options=SLOW) as group:
        await group.wait_connected(5)
        snapshot = await hub.link(M2).read_snapshot()
    assert (snapshot.credit, snapshot.currency, snapshot.currency_scale) == (500, "JPY", 0)
    assert dict(snapshot_rows(snapshot))["credit"] == "500 JPY"


async def test_unreadable_commands_are_answered_not_executed(
    broker: LocalBroker, make_runtime: RuntimeFactory
) -> None:
    runtime = make_runtime(M1)
    async with (
        run_agents([runtime], broker.settings(), options=SLOW) as group,
        aiomqtt.Client(
            broker.host,
            broker.port,
            username="hes",
            password=broker.headend_password,
            identifier="hes-raw",
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as hes,
    ):
        await group.wait_connected(5)
        await hes.subscribe(TOPICS.all_meters(mqtt.TopicKind.CMD_RESULT), qos=1)
        answers: list[tuple[bytes | None, mqtt.ResultMessage]] = []
        for number, payload in enumerate(
            [b"not json", b'{"meter_id":"MTR-0001","sequence":7,"code":77}'], start=1
        ):
            await hes.publish(
                TOPICS.cmd(M1),
                payload,
                qos=1,
                properties=publish_properties(
                    correlation=bytes([number]), response_topic=TOPICS.cmd_result(M1)
                ),
            )
            async with asyncio.timeout(5):
                message = await anext(aiter(hes.messages))
            correlation = getattr(message.properties, "CorrelationData", None)
            answers.append((correlation, mqtt.decode_result(bytes(message.payload))))
    assert [(c, a.result.sequence, a.result.code) for c, a in answers] == [
        (b"\x01", 0, ResultCode.BAD_ARGUMENT),
        (b"\x02", 7, ResultCode.UNKNOWN_COMMAND),
    ]
    assert runtime.snapshot().last_command_seq == 0


async def test_a_command_to_an_offline_meter_times_out(hub: MqttLinkHub) -> None:
    started = time.monotonic()
    with pytest.raises(LinkTimeout, match="no result"):
        await hub.link(M1).execute(_envelope(1, Command.remote_disconnect()), 0.5)
    assert time.monotonic() - started < 2.0  # the time-out, not a hang
    with pytest.raises(LinkTimeout):
        await hub.link(M1, timeout=0.3).read_snapshot()


async def test_commands_queued_while_offline_arrive_once_unless_expired(
    broker: LocalBroker, make_runtime: RuntimeFactory, hub: MqttLinkHub
) -> None:
    runtime = make_runtime(M1)
    settings = broker.settings()
    first = MeterAgent(runtime, settings, TOPICS, FAST)
    task = asyncio.create_task(first.run())
    await asyncio.wait_for(first.connected.wait(), 5)  # the persistent session now exists
    first.stop()
    await task

    queued = asyncio.create_task(
        hub.link(M1).execute(_envelope(1, Command.credit_transfer(1, 100)), 20)
    )
    with pytest.raises(LinkTimeout):  # expires on the broker after 1 s
        await hub.link(M1).execute(_envelope(2, Command.credit_transfer(2, 200)), 1.0)
    await asyncio.sleep(1.2)  # let the second command's expiry pass for certain (1 s resolution)

    returned = MeterAgent(runtime, settings, TOPICS, FAST)
    task = asyncio.create_task(returned.run())
    try:
        assert (await queued).code is ResultCode.OK
        live = await hub.link(M1).execute(_envelope(3, Command.credit_transfer(3, 300)), 5)
        assert live.code is ResultCode.OK
    finally:
        returned.stop()
        await task
    assert returned.stats.commands == 2  # the queued one once, the live one; never the expired
    topups = [e for e in runtime.events_since(0) if e.code is EventCode.TOPUP_ACCEPTED]
    assert [(e.a, e.b) for e in topups] == [(1, 100), (3, 300)]


AGENT_SCRIPT = """
import asyncio, sys
from pathlib import Path
from protocols.clock import ManualClock
from meter_sim.config import MeterConfig
from meter_sim.mqtt_agent import AgentOptions, MeterAgent
from meter_sim.runtime import MeterRuntime
from protocols.mqtt import BrokerSettings

async def main() -> None:
    runtime = MeterRuntime.open(MeterConfig(sys.argv[2]), ManualClock(), Path(sys.argv[3]))
    options = AgentOptions(meter_secret=sys.argv[4])
    agent = MeterAgent(runtime, BrokerSettings.parse_url(sys.argv[1]), None, options)
    task = asyncio.create_task(agent.run())
    await agent.connected.wait()
    sys.stdout.write("connected\\n")
    sys.stdout.flush()
    await task

asyncio.run(main())
"""


async def test_a_meter_that_vanishes_is_marked_offline_by_its_last_will(
    broker: LocalBroker, ingest: tuple[Ingest, MemorySink], tmp_path: Path
) -> None:
    _, sink = ingest
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        AGENT_SCRIPT,
        broker.settings().url(with_password=True),
        M2,
        str(tmp_path),
        TEST_SECRET,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 20)
        assert line == b"connected\n"
        await sink.wait_until(lambda s: s.online.get(M2) is True, 5)
        process.kill()  # no clean disconnect: the broker publishes the will
        await sink.wait_until(lambda s: s.online.get(M2) is False, 5)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
    offline = sink.state_messages[-1]
    online = next(m for m in sink.state_messages if m.online)
    assert offline.boot == online.boot  # the will names the run that vanished


async def test_broker_restart_during_telemetry_loses_nothing_acknowledged(
    broker: LocalBroker, make_runtime: RuntimeFactory, ingest: tuple[Ingest, MemorySink]
) -> None:
    _, sink = ingest
    options = AgentOptions(
        telemetry_interval=0.01, backoff_initial=0.05, backoff_max=0.2, meter_secret=TEST_SECRET
    )
    runtimes = [make_runtime(M1), make_runtime(M2)]
    async with run_agents(runtimes, broker.settings(), options=options) as group:
        agents = list(group.agents.values())
        await _until(lambda: all(a.stats.telemetry_acked >= 20 for a in agents))
        await asyncio.to_thread(broker.stop)
        produced_at_stop = [a.stats.telemetry_produced for a in agents]
        # offline: telemetry goes on being produced into the outbox
        await _until(
            lambda: all(
                a.stats.telemetry_produced >= p + 10
                for a, p in zip(agents, produced_at_stop, strict=True)
            )
        )
        assert all(a.buffered >= 10 for a in agents)
        await asyncio.to_thread(broker.start)
        await group.wait_connected(10)
        await _until(
            lambda: all(a.stats.telemetry_acked >= a.stats.telemetry_produced - 2 for a in agents),
            10,
        )
        for agent in agents:
            agent.stop()
        await asyncio.gather(*group.tasks.values())
    for agent in agents:
        assert agent.stats.dropped == 0
        assert agent.stats.connects == 2
        acked = agent.stats.last_acked_n
        assert agent.stats.telemetry_acked == acked  # in order: 1..acked
        await sink.wait_until(
            lambda s, a=agent, n=acked: any(
                t.meter_id == a.meter_id and t.n == n for t in s.telemetry_messages
            ),
            10,
        )
        numbers = [
            t.n for t in sink.telemetry_messages if t.key[:2] == (agent.meter_id, agent.boot)
        ]
        assert numbers == list(range(1, acked + 1))  # all, once each, in order
    assert sink.repeats == 0


async def test_a_full_outbox_drops_the_oldest_telemetry(
    broker: LocalBroker, make_runtime: RuntimeFactory, ingest: tuple[Ingest, MemorySink]
) -> None:
    _, sink = ingest
    options = AgentOptions(
        telemetry_interval=0.01,
        buffer_limit=5,
        backoff_initial=0.05,
        backoff_max=0.1,
        meter_secret=TEST_SECRET,
    )
    agent = MeterAgent(make_runtime(M1), broker.settings(), TOPICS, options)
    await asyncio.to_thread(broker.stop)
    task = asyncio.create_task(agent.run())
    try:
        await _until(lambda: agent.stats.telemetry_produced >= 12)
        assert agent.buffered == 5
        assert agent.stats.dropped == agent.stats.telemetry_produced - 5
        await asyncio.to_thread(broker.start)
        await asyncio.wait_for(agent.connected.wait(), 10)
        await _until(lambda: agent.stats.telemetry_acked >= 8)
    finally:
        agent.stop()
        await task
    await sink.wait_until(lambda s: len(s.telemetry_messages) >= 8, 5)
    numbers = [t.n for t in sink.telemetry_messages]
    assert numbers == sorted(numbers)
    assert numbers[0] > 1  # the oldest were dropped
    assert json.loads(mqtt.encode(sink.telemetry_messages[0]))["meter_id"] == M1


async def test_endpoint_links_share_one_connection(
    broker: LocalBroker, make_runtime: RuntimeFactory
) -> None:
    settings = broker.settings()
    base = f"mqtt://hes:{settings.password}@127.0.0.1:{broker.port}"
    runtimes = [make_runtime(M1), make_runtime(M2)]
    async with run_agents(runtimes, settings, options=SLOW) as group:
        await group.wait_connected(5)
        pool = LinkPool()
        first = await open_link(f"{base}/{M1}?timeout=2", pool=pool)
        second = await open_link(f"{base}/{M2}?prefix=phs", pool=pool)
        assert isinstance(first, MqttMeterLink)
        assert isinstance(second, MqttMeterLink)
        assert first.hub is second.hub
        assert (first.meter_id, first.timeout) == (M1, 2.0)
        assert (await first.read_snapshot()).meter_id == M1
        assert (await second.read_snapshot()).meter_id == M2
        await first.close()
        await first.close()  # a second close gives nothing back twice
        assert second.hub.connection.connected.is_set()
        await second.close()
        await pool.close()
        assert not second.hub.connection.connected.is_set()


@pytest.mark.parametrize(
    "endpoint",
    [
        "mqtt://127.0.0.1:1/",
        "mqtt://127.0.0.1:1/M1?prefix=a/%2B",
        "mqtt://127.0.0.1:1/M1?colour=blue",
        "mqtt://127.0.0.1:1/bad+id",
    ],
)
async def test_bad_mqtt_endpoints(endpoint: str) -> None:
    with pytest.raises(ConfigError):
        await open_link(endpoint, pool=LinkPool())


def _raw_properties(
    schema: str | None, correlation: bytes, response_topic: str | None = None
) -> Properties:
    """PUBLISH properties as any MQTT 5 client may send them (not the head-end's helper)."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if schema is not None:
        props.UserProperty = [(mqtt.SCHEMA_PROPERTY, schema)]
    props.CorrelationData = correlation
    if response_topic is not None:
        props.ResponseTopic = response_topic
    return props


def _headend_client(broker: LocalBroker, identifier: str) -> aiomqtt.Client:
    return aiomqtt.Client(
        broker.host,
        broker.port,
        username="hes",
        password=broker.headend_password,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
    )


async def _answer(
    client: aiomqtt.Client, correlation: bytes, timeout: float = 5.0
) -> aiomqtt.Message:
    """The next message carrying ``correlation`` that is not the question itself: the meter's
    answer, whatever its topic."""
    async with asyncio.timeout(timeout):
        async for message in client.messages:
            question = message.topic.value.endswith(("/cmd", "/req"))
            if not question and getattr(message.properties, "CorrelationData", None) == correlation:
                return message
    raise AssertionError("the subscription ended")


async def test_a_foreign_schema_user_property_is_refused_and_nothing_runs(
    broker: LocalBroker, make_runtime: RuntimeFactory
) -> None:
    runtime = make_runtime(M2, auth_key=None)  # keyless, as the meter the problem was seen on
    command = b'{"v":1,"meter_id":"MTR-0002","sequence":12,"code":3,"args":[1,100]}'
    request = mqtt.encode_request(mqtt.SnapshotRequest(meter_id=M2))
    async with (
        run_agents([runtime], broker.settings(), options=SLOW) as group,
        _headend_client(broker, "hes-schema") as hes,
    ):
        await group.wait_connected(5)
        await hes.subscribe(TOPICS.cmd_result(M2), qos=1)
        await hes.subscribe(TOPICS.reply(M2), qos=1)
        # a third-party client, exactly as an operator would type it
        pub = await asyncio.create_subprocess_exec(
            "mosquitto_pub", "-V", "5", "-q", "1", "-h", broker.host, "-p", str(broker.port),
            "-u", "hes", "-P", broker.headend_password, "-i", "hes-mosquitto-pub",
            "-t", TOPICS.cmd(M2), "-m", command.decode(),
            "-D", "publish", "user-property", "schema", "2",
            "-D", "publish", "correlation-data", "pub",
        )  # fmt: skip
        assert await asyncio.wait_for(pub.wait(), 10) == 0
        by_cli = mqtt.decode_result(bytes((await _answer(hes, b"pub")).payload)).result
        for schema, number in (("2", b"\x01"), ("1", b"\x02")):  # paho: refused, then accepted
            await hes.publish(
                TOPICS.cmd(M2), command, qos=1, properties=_raw_properties(schema, number)
            )
            answer = await _answer(hes, number)
            if schema == "2":
                by_paho = mqtt.decode_result(bytes(answer.payload)).result
                assert runtime.snapshot().last_command_seq == 0  # nothing ran before the "1"
        assert mqtt.decode_result(bytes(answer.payload)).result.code == ResultCode.OK
        replies = []
        for schema, number in (("2", b"\x03"), ("1", b"\x04")):
            await hes.publish(
                TOPICS.request(M2), request, qos=1, properties=_raw_properties(schema, number)
            )
            replies.append(mqtt.decode_reply(bytes((await _answer(hes, number)).payload)))
    for refused in (by_cli, by_paho):
        assert (refused.sequence, refused.code) == (0, ResultCode.BAD_ARGUMENT)
        assert "schema '2'" in refused.detail
    assert isinstance(replies[0], mqtt.ErrorReply)
    assert "schema '2'" in replies[0].error
    assert isinstance(replies[1], mqtt.SnapshotReply)
    topups = [e for e in runtime.events_since(0) if e.code is EventCode.TOPUP_ACCEPTED]
    assert [(e.a, e.b) for e in topups] == [(1, 100)]  # once: only the schema-1 copy ran


@pytest.mark.parametrize(
    ("kind", "response_topic", "answered_on"),
    [
        ("cmd", None, "cmd/result"),
        ("cmd", "cmd/result", "cmd/result"),
        ("cmd", "cmd/result/hes-7", "cmd/result/hes-7"),
        ("cmd", "telemetry", "cmd/result"),  # where Telemetry is documented: refused
        ("cmd", "events", "cmd/result"),
        ("cmd", "state", "cmd/result"),
        ("cmd", "cmd", "cmd/result"),
        ("cmd", "cmd/resultant", "cmd/result"),
        ("cmd", "reply", "cmd/result"),
        ("req", None, "reply"),
        ("req", "reply/hes-7", "reply/hes-7"),
        ("req", "telemetry", "reply"),
        ("req", "cmd/result", "reply"),
        ("req", "replyx", "reply"),
    ],
)
async def test_answers_go_to_the_response_topic_only_inside_its_subtree(
    broker: LocalBroker,
    make_runtime: RuntimeFactory,
    kind: str,
    response_topic: str | None,
    answered_on: str,
) -> None:
    runtime = make_runtime(M1)
    root = TOPICS.meter_root(M1)
    payload = (
        mqtt.encode_command(_envelope(1, Command.credit_transfer(1, 100)))
        if kind == "cmd"
        else mqtt.encode_request(mqtt.LastResultRequest(meter_id=M1))
    )
    wanted = f"{root}/{response_topic}" if response_topic else None
    async with (
        run_agents([runtime], broker.settings(), options=SLOW) as group,
        _headend_client(broker, "hes-response-topic") as hes,
    ):
        await group.wait_connected(5)
        await hes.subscribe(f"{root}/#", qos=1)
        await hes.publish(
            f"{root}/{kind}", payload, qos=1, properties=_raw_properties("1", b"rt", wanted)
        )
        answer = await _answer(hes, b"rt")
    assert answer.topic.value == f"{root}/{answered_on}"


@pytest.mark.parametrize(
    ("topic", "inside"),
    [
        ("a/b", True),
        ("a/b/c/d", True),
        ("a/bc", False),
        ("a", False),
        ("a/b/+", False),
        ("a/b/#", False),
        ("a/b/c\0", False),
        ("x/a/b", False),
    ],
)
def test_the_answer_subtree(topic: str, inside: bool) -> None:
    assert in_subtree(topic, "a/b") is inside
