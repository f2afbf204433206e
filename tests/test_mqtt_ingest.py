"""The head-end's MQTT ingest: validation, dead letters, de-duplication, shared subscriptions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from headend.broker import LocalBroker
from headend.ingest import Ingest, MemorySink, SinkStopped
from headend.transport.mqtt import publish_properties
from protocols import mqtt
from protocols.errors import StorageError, ValidationError
from protocols.mqtt import (
    SCHEMA_PROPERTY,
    SCHEMA_PROPERTY_VALUE,
    BrokerSettings,
    Telemetry,
    TopicScheme,
)
from protocols.readings import Event, EventCode
from tests.mqtt_broker import TEST_METERS
from tests.test_mqtt_payloads import SNAPSHOT

pytestmark = pytest.mark.mqtt
TOPICS = TopicScheme()
M1, M2 = TEST_METERS[0], TEST_METERS[1]
assert SNAPSHOT.meter_id == M1


def _client(settings: BrokerSettings, identifier: str | None = None) -> aiomqtt.Client:
    return aiomqtt.Client(
        settings.host,
        settings.port,
        username=settings.username,
        password=settings.password,
        identifier=identifier or settings.username,
        protocol=aiomqtt.ProtocolVersion.V5,
    )


def _telemetry(n: int, boot: int = 1) -> bytes:
    return mqtt.encode_telemetry(SNAPSHOT, boot, n)


@pytest.fixture
async def meter(broker: LocalBroker) -> AsyncIterator[aiomqtt.Client]:
    """A raw client logged in as meter M1 (it may publish anything under its own topics)."""
    async with _client(broker.meter_settings(M1)) as client:
        yield client


async def test_malformed_messages_are_counted_and_dead_lettered(
    broker: LocalBroker, meter: aiomqtt.Client
) -> None:
    sink = MemorySink()
    bad = [
        (TOPICS.telemetry(M1), b"\xff not json", None),
        (TOPICS.events(M1), b'{"v":1,"meter_id":"MTR-0001"}', None),
        (TOPICS.telemetry(M1), _telemetry(1).replace(b'"MTR-0001"', b'"MTR-0002"'), None),
        (TOPICS.telemetry(M1), _telemetry(1).replace(b'"v":1', b'"v":2'), None),
        (TOPICS.telemetry(M1), _telemetry(1), "2"),  # schema user property of another version
        (TOPICS.cmd_result(M1), b"{}", None),  # not a topic the ingest is subscribed to
    ]
    async with (
        Ingest(broker.settings(), sink) as ingest,
        _client(broker.settings(), "hes-dead-letters") as watcher,
    ):
        await watcher.subscribe(TOPICS.deadletter, qos=1)
        for topic, payload, schema in bad:
            properties = publish_properties()
            if schema is not None:  # a publisher that says it speaks another version
                properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                properties.UserProperty = [(mqtt.SCHEMA_PROPERTY, schema)]
            await meter.publish(topic, payload, qos=1, properties=properties)
        await meter.publish(TOPICS.telemetry(M1), _telemetry(2), qos=1)  # a good one after
        letters: list[aiomqtt.Message] = []
        async with asyncio.timeout(5):
            async for message in watcher.messages:
                letters.append(message)
                if len(letters) == 5:
                    break
        await sink.wait_until(lambda s: len(s.telemetry_messages) == 1, 5)
        assert ingest.stats.malformed == 5
        assert ingest.stats.telemetry == 1
        await asyncio.wait_for(_dead_lettered(ingest, 5), 5)
    assert [m.payload for m in letters] == [payload for _, payload, _ in bad[:5]]
    reasons = [dict(m.properties.UserProperty) for m in letters]  # type: ignore[union-attr]
    assert [r["original-topic"] for r in reasons] == [topic for topic, _, _ in bad[:5]]
    assert "not valid JSON" in reasons[0]["reason"]
    assert "MTR-0002" in reasons[2]["reason"]
    assert "schema '2'" in reasons[4]["reason"]
    assert sink.telemetry_messages[0].n == 2
    # the copy of bytes that are not UTF-8 does not claim to be UTF-8 JSON; the others still do
    not_utf8 = letters[0].properties
    assert getattr(not_utf8, "PayloadFormatIndicator", None) in (None, 0)
    assert getattr(not_utf8, "ContentType", None) is None
    utf8 = letters[1].properties
    assert getattr(utf8, "PayloadFormatIndicator", None) == 1
    assert getattr(utf8, "ContentType", None) == mqtt.CONTENT_TYPE


async def _dead_lettered(ingest: Ingest, count: int) -> None:
    while ingest.stats.dead_lettered < count:  # noqa: ASYNC110 - a counter, no event
        await asyncio.sleep(0.01)


async def test_duplicates_are_dropped_by_their_key(
    broker: LocalBroker, meter: aiomqtt.Client
) -> None:
    sink = MemorySink()
    event = mqtt.encode_event(M1, Event(5, 1_767_225_600, EventCode.TAMPER_DETECTED))
    async with Ingest(broker.settings(), sink) as ingest:
        for topic, payload in [
            (TOPICS.telemetry(M1), _telemetry(1)),
            (TOPICS.telemetry(M1), _telemetry(2)),
            (TOPICS.telemetry(M1), _telemetry(1)),  # a re-send after a lost acknowledgement
            (TOPICS.events(M1), event),
            (TOPICS.events(M1), event),
            (TOPICS.telemetry(M1), _telemetry(1, boot=2)),  # another run of the agent
            (TOPICS.state(M1), mqtt.encode_state(M1, True, 2)),
        ]:
            await meter.publish(topic, payload, qos=1)
        await sink.wait_until(lambda s: len(s.state_messages) == 1, 5)
    assert [t.key for t in sink.telemetry_messages] == [(M1, 1, 1), (M1, 1, 2), (M1, 2, 1)]
    assert [e.key for e in sink.event_messages] == [(M1, 5)]
    assert ingest.stats.duplicates == 2
    assert sink.repeats == 0
    assert sink.online == {M1: True}


async def test_shared_subscription_splits_the_load(
    broker: LocalBroker, meter: aiomqtt.Client
) -> None:
    sinks = [MemorySink(), MemorySink()]
    async with (
        Ingest(broker.settings(), sinks[0], group="workers", client_id="worker-1"),
        Ingest(broker.settings(), sinks[1], group="workers", client_id="worker-2"),
    ):
        for n in range(1, 41):
            await meter.publish(TOPICS.telemetry(M1), _telemetry(n), qos=1)
        await asyncio.wait_for(_total(sinks, 40), 5)
    shares = [{t.n for t in sink.telemetry_messages} for sink in sinks]
    assert shares[0] | shares[1] == set(range(1, 41))
    assert not shares[0] & shares[1]
    assert shares[0]
    assert shares[1]


async def _total(sinks: list[MemorySink], count: int) -> None:
    while sum(len(s.telemetry_messages) for s in sinks) < count:  # noqa: ASYNC110
        await asyncio.sleep(0.01)


class OutageSink(MemorySink):
    """A database that is away for ``outage`` seconds from the first telemetry call (each
    call then raises StorageError), refuses message ``invalid`` as invalid and fails on
    message ``bug`` with an unexpected exception."""

    def __init__(self, outage: float, invalid: int | None = None, bug: int | None = None) -> None:
        super().__init__()
        self.outage = outage
        self.invalid = invalid
        self.bug = bug
        self.back_at: float | None = None
        self.failures = 0

    async def telemetry(self, message: Telemetry) -> None:
        now = asyncio.get_running_loop().time()
        if self.back_at is None:
            self.back_at = now + self.outage
        if now < self.back_at:
            self.failures += 1
            raise StorageError("the database is away")
        if message.n == self.invalid:
            raise ValidationError("a reading from the future")
        if message.n == self.bug:
            raise RuntimeError("a bug in the sink")
        await super().telemetry(message)


async def test_a_sink_outage_pauses_the_ingest_and_loses_nothing(
    broker: LocalBroker, meter: aiomqtt.Client
) -> None:
    sink = OutageSink(outage=1.0)
    count = 50
    async with Ingest(broker.settings(), sink, sink_backoff=(0.02, 0.2)) as ingest:
        for n in range(1, count + 1):
            await meter.publish(TOPICS.telemetry(M1), _telemetry(n), qos=1)
        await asyncio.wait_for(_paused(ingest), 5)
        await sink.wait_until(lambda s: len(s.telemetry_messages) == count, 10)
        assert not ingest.paused
    assert [t.n for t in sink.telemetry_messages] == list(range(1, count + 1))  # all, in order
    assert sink.failures > 3  # it was away for longer than the old three retries
    assert ingest.stats.sink_failures == sink.failures
    assert ingest.stats.dead_lettered == 0
    assert ingest.stats.telemetry == count
    assert ingest.stats.handled == count


async def _paused(ingest: Ingest) -> None:
    while not ingest.paused:  # noqa: ASYNC110 - a flag, no event
        await asyncio.sleep(0.01)


async def test_only_a_bad_message_is_dead_lettered(
    broker: LocalBroker, meter: aiomqtt.Client
) -> None:
    sink = OutageSink(outage=0.3, invalid=3, bug=5)
    async with Ingest(broker.settings(), sink, sink_backoff=(0.02, 0.1)) as ingest:
        for n in range(1, 7):
            await meter.publish(TOPICS.telemetry(M1), _telemetry(n), qos=1)
        await sink.wait_until(lambda s: len(s.telemetry_messages) == 4, 5)
        await asyncio.wait_for(_dead_lettered(ingest, 2), 5)
    assert [t.n for t in sink.telemetry_messages] == [1, 2, 4, 6]
    assert (ingest.stats.sink_refused, ingest.stats.internal_errors) == (1, 1)
    assert ingest.stats.sink_failures == sink.failures > 0
    assert ingest.stats.handled == 6


async def test_messages_wait_on_the_broker_while_the_ingest_is_away(
    broker: LocalBroker, meter: aiomqtt.Client
) -> None:
    first = MemorySink()
    async with Ingest(broker.settings(), first, client_id="hes-ingest"):
        await meter.publish(TOPICS.telemetry(M1), _telemetry(1), qos=1)
        await first.wait_until(lambda s: len(s.telemetry_messages) == 1, 5)
    for n in (2, 3):
        await meter.publish(TOPICS.telemetry(M1), _telemetry(n), qos=1)
    second = MemorySink()
    async with Ingest(broker.settings(), second, client_id="hes-ingest"):
        await second.wait_until(lambda s: len(s.telemetry_messages) == 2, 5)
    assert [t.n for t in second.telemetry_messages] == [2, 3]


class _SettlesLater(MemorySink):
    """Holds each message at once (wait_until sees it) and returns from the call a moment later."""

    async def telemetry(self, message: Telemetry) -> None:
        await super().telemetry(message)
        await asyncio.sleep(0.05)


async def test_an_ingest_closed_right_after_its_last_messages_acknowledges_them(
    broker: LocalBroker, meter: aiomqtt.Client
) -> None:
    first = _SettlesLater()
    async with Ingest(broker.settings(), first, client_id="hes-ingest-close"):
        for n in range(1, 6):
            await meter.publish(TOPICS.telemetry(M1), _telemetry(n), qos=1)
        await first.wait_until(lambda s: len(s.telemetry_messages) == 5, 5)
    await meter.publish(TOPICS.telemetry(M1), _telemetry(6), qos=1)
    second = MemorySink()
    async with Ingest(broker.settings(), second, client_id="hes-ingest-close"):
        # a message left unacknowledged would come again before 6
        await second.wait_until(lambda s: len(s.telemetry_messages) >= 1, 5)
    assert [t.n for t in second.telemetry_messages] == [6]


class _StopsAtThree(MemorySink):
    async def telemetry(self, message: Telemetry) -> None:
        if message.n >= 3:
            raise SinkStopped("stopping")
        await super().telemetry(message)


async def test_a_stopped_sink_leaves_its_messages_for_the_next_ingest(
    broker: LocalBroker, meter: aiomqtt.Client
) -> None:
    first = _StopsAtThree()
    ingest = Ingest(broker.settings(), first, client_id="hes-ingest-stop")
    async with ingest:
        for n in range(1, 5):
            await meter.publish(TOPICS.telemetry(M1), _telemetry(n), qos=1)
        await first.wait_until(lambda s: len(s.telemetry_messages) == 2, 5)
    assert (ingest.stats.telemetry, ingest.stats.sink_failures, ingest.stats.dead_lettered) == (
        2,
        0,
        0,
    )
    second = MemorySink()
    async with Ingest(broker.settings(), second, client_id="hes-ingest-stop"):
        await second.wait_until(lambda s: len(s.telemetry_messages) == 2, 5)
    assert [t.n for t in second.telemetry_messages] == [3, 4]


def test_a_received_message_keeps_the_properties_it_needs_and_not_pahos_object() -> None:
    """An unacknowledged message waits while its burst is stored: it keeps the three
    properties the head-end reads as plain values, and no paho ``Properties`` (about eighty
    lists and tuples each, walked by every garbage collection while the message waits)."""
    import gc

    import paho.mqtt.client as paho

    from headend.transport.mqtt import Incoming

    message = paho.MQTTMessage(mid=7, topic=b"hes/v1/meters/x/telemetry")
    message.payload = b"{}"
    message.qos = 1
    message.properties = publish_properties(
        correlation=b"\x01\x02", response_topic="hes/v1/answers", user=[("x", "1"), ("x", "2")]
    )
    incoming = Incoming.of(message, message.topic, generation=3)
    assert incoming.user_properties("x") == ["1", "2"]
    assert incoming.user_properties(SCHEMA_PROPERTY) == [SCHEMA_PROPERTY_VALUE]
    assert incoming.user_properties("other") == []
    assert incoming.correlation_data == b"\x01\x02"
    assert incoming.response_topic == "hes/v1/answers"
    assert (incoming.mid, incoming.qos, incoming.generation) == (7, 1, 3)
    assert not any(isinstance(r, Properties) for r in gc.get_referents(incoming))
    plain = paho.MQTTMessage(mid=8, topic=b"t")
    bare = Incoming.of(plain, "t", generation=1)
    assert (bare.user_property_pairs, bare.correlation_data, bare.response_topic) == (
        (),
        None,
        None,
    )
