"""The MQTT link hub's answers: one that matches a waiting call but does not decode fails that
call at once with a DecodeError (it used to be ignored and the caller waited out its
time-out); execute_confirmed takes it as a lost answer and asks the meter for its last result
before anything is resent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import aiomqtt
import pytest

from headend.broker import LocalBroker
from headend.links.base import execute_confirmed
from headend.links.mqtt import MqttLinkHub
from headend.transport.mqtt import publish_properties
from protocols.commands import Command, CommandEnvelope
from protocols.errors import DecodeError, LinkTimeout, ValidationError
from protocols.mqtt import SnapshotRequest, TopicScheme
from tests.mqtt_broker import TEST_METERS

pytestmark = pytest.mark.mqtt
TOPICS = TopicScheme()
M1 = TEST_METERS[0]
Answer = Callable[[aiomqtt.Message], tuple[str, bytes]]


async def _answer_with(
    broker: LocalBroker, topic: str, answer: Answer, ready: asyncio.Event
) -> None:
    """Be meter M1: answer the first message on ``topic`` with ``answer(message)``, echoing
    its correlation data, then leave."""
    settings = broker.meter_settings(M1)
    async with aiomqtt.Client(
        settings.host,
        settings.port,
        username=settings.username,
        password=settings.password,
        identifier=M1,
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        await client.subscribe(topic, qos=1)
        ready.set()
        async for message in client.messages:
            reply_topic, payload = answer(message)
            correlation = getattr(message.properties, "CorrelationData", None)
            await client.publish(
                reply_topic,
                payload,
                qos=1,
                properties=publish_properties(correlation=correlation),
            )
            return


@pytest.fixture
async def hub(broker: LocalBroker) -> AsyncIterator[MqttLinkHub]:
    async with MqttLinkHub(broker.settings()) as link_hub:
        yield link_hub


async def _meter(broker: LocalBroker, topic: str, answer: Answer) -> asyncio.Task[None]:
    ready = asyncio.Event()
    task = asyncio.create_task(_answer_with(broker, topic, answer, ready))
    async with asyncio.timeout(5):
        await ready.wait()
    return task


async def _stop(task: asyncio.Task[None]) -> None:
    async with asyncio.timeout(5):
        await task


async def test_a_malformed_reply_fails_the_waiting_read_at_once(
    broker: LocalBroker, hub: MqttLinkHub
) -> None:
    meter = await _meter(broker, TOPICS.request(M1), lambda _: (TOPICS.reply(M1), b"\xff{"))
    try:
        started = time.monotonic()
        with pytest.raises(DecodeError):
            await hub.request(SnapshotRequest(meter_id=M1), timeout=10.0)
        assert time.monotonic() - started < 5.0  # not the 10 s time-out
        assert hub.malformed == 1
    finally:
        await _stop(meter)


async def _garbling_meter(broker: LocalBroker, ready: asyncio.Event, asked: asyncio.Event) -> None:
    """Be meter M1: answer the first command with a result that does not decode, then wait
    for a read request (the head-end asking for the last result) and leave it unanswered."""
    settings = broker.meter_settings(M1)
    async with aiomqtt.Client(
        settings.host,
        settings.port,
        username=settings.username,
        password=settings.password,
        identifier=M1,
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        await client.subscribe(TOPICS.cmd(M1), qos=1)
        await client.subscribe(TOPICS.request(M1), qos=1)
        ready.set()
        async for message in client.messages:
            if message.topic.matches(TOPICS.request(M1)):
                asked.set()
                return
            correlation = getattr(message.properties, "CorrelationData", None)
            await client.publish(
                TOPICS.cmd_result(M1),
                b'{"v":1,"meter_id":"MTR-0001"}',
                qos=1,
                properties=publish_properties(correlation=correlation),
            )


async def test_a_malformed_result_is_not_final_the_meter_is_asked(
    broker: LocalBroker, hub: MqttLinkHub
) -> None:
    ready, asked = asyncio.Event(), asyncio.Event()
    meter = asyncio.create_task(_garbling_meter(broker, ready, asked))
    try:
        async with asyncio.timeout(5):
            await ready.wait()
        envelope = CommandEnvelope(M1, 1, Command.remote_disconnect())
        with pytest.raises(LinkTimeout, match=r"no confirmation of command 1 .*ResultMessage"):
            await execute_confirmed(hub.link(M1), envelope, 1.5)
        assert asked.is_set()  # its last result was asked for before any resend
        assert hub.malformed == 1
    finally:
        await _stop(meter)


async def test_an_envelope_for_another_meter_is_a_validation_error(hub: MqttLinkHub) -> None:
    envelope = CommandEnvelope(TEST_METERS[1], 1, Command.remote_disconnect())
    with pytest.raises(ValidationError, match=f"this link reaches {M1}"):
        await hub.link(M1).execute(envelope, 1.0)
    with pytest.raises(ValidationError):
        await hub.link(M1).send_envelope(envelope, 1.0)
