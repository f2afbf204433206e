"""The MQTT link hub's answers: one that matches a waiting call but does not decode fails that
call at once with a DecodeError (it used to be ignored and the caller waited out its
time-out); execute_confirmed does not resend after it."""

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
from protocols.errors import DecodeError, ValidationError
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


async def test_a_malformed_result_fails_the_command_without_a_resend(
    broker: LocalBroker, hub: MqttLinkHub
) -> None:
    def garbage(message: aiomqtt.Message) -> tuple[str, bytes]:
        return TOPICS.cmd_result(M1), b'{"v":1,"meter_id":"MTR-0001"}'

    meter = await _meter(broker, TOPICS.cmd(M1), garbage)
    try:
        envelope = CommandEnvelope(M1, 1, Command.remote_disconnect())
        started = time.monotonic()
        with pytest.raises(DecodeError):
            await execute_confirmed(hub.link(M1), envelope, 10.0)
        assert time.monotonic() - started < 5.0  # at once: no time-out, no ask, no resend
        assert hub.malformed == 1
    finally:
        await _stop(meter)


async def test_an_envelope_for_another_meter_is_a_validation_error(hub: MqttLinkHub) -> None:
    envelope = CommandEnvelope(TEST_METERS[1], 1, Command.remote_disconnect())
    with pytest.raises(ValidationError, match=f"this link reaches {M1}"):
        await hub.link(M1).execute(envelope, 1.0)
    with pytest.raises(ValidationError):
        await hub.link(M1).send_envelope(envelope, 1.0)
