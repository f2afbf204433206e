"""The MQTT agent of a simulated meter: one asyncio task per meter, many meters per process.

An agent connects as its meter (client id and user name = meter id, password from
``MeterConfig.mqtt_password`` or derived by :func:`protocols.mqtt.meter_password`) with a
persistent MQTT 5 session, a retained ``online`` state and a last will that marks it
``offline``. It publishes telemetry every ``telemetry_interval`` seconds and every event the
moment the firmware logs it (QoS 1), and it serves the head-end: commands on ``…/cmd`` are
executed through :meth:`MeterRuntime.execute_async` (the same envelope, sequence and tag checks
as over Modbus; ENTER_TOKEN too; the state is fsynced in a worker thread and the result sent
only once it is on disk, while the other agents run on) and answered with its correlation
data on its response topic when that lies in the result subtree ``…/cmd/result[/…]``, else on
``…/cmd/result``; read requests on ``…/req`` are answered likewise in the reply subtree
``…/reply[/…]``. A command or request whose ``schema`` user property is not this meter's is
refused as one whose ``v`` is.

Telemetry and events go through a bounded outbox: produced whether or not the broker is
reachable, published in order, one at a time, and removed only once the broker acknowledged
them; after a lost connection the agent reconnects with exponential back-off and sends what is
left, so nothing acknowledged is lost and a duplicate can only be a message whose
acknowledgement was lost (the ingest drops it by its key). When the outbox is full the oldest
message is dropped and counted.

Faults (meter_sim/faults.py): an agent given a :class:`~meter_sim.faults.FaultInjector` draws
the faults of each command and read request it receives: a dropped one is neither executed nor
answered, a lost acknowledgement executes the command and publishes no result, a corrupt
answer is published cut to half its length (not JSON), a late one waits before it is published
(the agent serves one message at a time, as a meter does, so what follows waits too), and a
disconnect shuts the connection's socket down under the MQTT client: the broker sees the
connection fail, publishes the meter's will (``offline``), and the agent reconnects after its
back-off with its session.

The transport is aiomqtt (paho underneath): no thread per meter; bench/mqtt_ingest.py measures
1,000 agents in one process at about a quarter of one core.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import secrets
import socket
import ssl
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from meter_sim.faults import (
    CORRUPT,
    DISCONNECT,
    DROP,
    LOSE_ACK,
    NO_FAULT,
    Draw,
    FaultInjector,
    FleetFaults,
)
from meter_sim.runtime import MeterRuntime
from protocols.commands import CommandResult, ResultCode
from protocols.errors import DecodeError, HesError
from protocols.mqtt import (
    CONTENT_TYPE,
    DEFAULT_PREFIX,
    MAX_REPLY_ITEMS,
    SCHEMA_PROPERTY,
    SCHEMA_PROPERTY_VALUE,
    BrokerSettings,
    ErrorReply,
    EventItem,
    EventsReply,
    EventsRequest,
    LastResultReply,
    LastResultRequest,
    ProfileItem,
    ProfileReply,
    ProfileRequest,
    Reading,
    Reply,
    ResultItem,
    SnapshotReply,
    SnapshotRequest,
    TopicScheme,
    decode_command_message,
    decode_request,
    encode_event,
    encode_reply,
    encode_result,
    encode_state,
    encode_telemetry,
    meter_password,
)
from protocols.readings import Event

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AgentOptions:
    telemetry_interval: float = 60.0  # real seconds; 0: the next as soon as one is acknowledged
    telemetry_limit: int | None = None  # stop producing telemetry after this many (benches)
    buffer_limit: int = 1000  # telemetry and events kept while the broker is unreachable
    session_expiry: int = 7 * 86400  # how long the broker keeps the session and queued commands
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    connect_timeout: float = 10.0
    flush_timeout: float = 2.0  # on stop, how long to try sending what is still buffered
    #: the fleet's password secret, for the derived password of a meter without its own
    #: ``mqtt_password`` (required; None when every meter has one)
    meter_secret: str | None = field(kw_only=True)


@dataclass(slots=True)
class AgentStats:
    connects: int = 0
    telemetry_produced: int = 0
    telemetry_acked: int = 0
    last_acked_n: int = 0  # the telemetry number of the last acknowledged telemetry
    events_acked: int = 0
    dropped: int = 0  # buffered messages dropped because the outbox was full
    commands: int = 0
    requests: int = 0
    last_error: str = ""


@dataclass(frozen=True, slots=True)
class _Outgoing:
    topic: str
    payload: bytes
    number: int  # telemetry n or event seq
    telemetry: bool


def _properties(packet_type: int, user: Iterable[tuple[str, str]] = ()) -> Properties:
    props = Properties(packet_type)  # type: ignore[no-untyped-call]
    if packet_type in (PacketTypes.PUBLISH, PacketTypes.WILLMESSAGE):
        props.PayloadFormatIndicator = 1
        props.ContentType = CONTENT_TYPE
        props.UserProperty = [(SCHEMA_PROPERTY, SCHEMA_PROPERTY_VALUE), *user]
    return props


_PUBLISH_PROPERTIES = _properties(PacketTypes.PUBLISH)
_NO_DELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)  # small packets, no Nagle delay


def _answer_properties(correlation: bytes | None) -> Properties:
    if correlation is None:
        return _PUBLISH_PROPERTIES
    props = _properties(PacketTypes.PUBLISH)
    props.CorrelationData = correlation
    return props


class _TlsContext(ssl.SSLContext):
    """Remembers the last socket it wrapped: paho leaves it open when a TLS handshake fails."""

    last_socket: ssl.SSLSocket | None = None

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock = super().wrap_socket(*args, **kwargs)
        self.last_socket = sock
        return sock

    def close_failed(self) -> None:
        if self.last_socket is not None:
            self.last_socket.close()
            self.last_socket = None


def _tls_context(settings: BrokerSettings) -> _TlsContext | None:
    if not settings.tls:
        return None
    context = _TlsContext(ssl.PROTOCOL_TLS_CLIENT)
    if settings.ca_file:
        context.load_verify_locations(settings.ca_file)
    else:
        context.load_default_certs()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _payload_bytes(message: aiomqtt.Message) -> bytes:
    return bytes(message.payload)


def _schemas(message: aiomqtt.Message) -> tuple[str, ...]:
    """The values of the message's ``schema`` user properties (MQTT 5 allows several)."""
    pairs = getattr(message.properties, "UserProperty", None) or ()
    return tuple(str(value) for key, value in pairs if key == SCHEMA_PROPERTY)


def check_schema(schemas: Iterable[str]) -> None:
    """DecodeError unless every ``schema`` user property names the schema this agent speaks
    (a message without one is read as this schema, as its ``v`` field then decides)."""
    for schema in schemas:
        if schema != SCHEMA_PROPERTY_VALUE:
            raise DecodeError(f"schema {schema!r}; this meter speaks {SCHEMA_PROPERTY_VALUE}")


def in_subtree(topic: str, root: str) -> bool:
    """True when ``topic`` is ``root`` or a topic below it, with no wildcard or NUL: where a
    meter may answer a command (``…/cmd/result``) or a read request (``…/reply``)."""
    return (topic == root or topic.startswith(root + "/")) and not any(c in topic for c in "+#\0")


class MeterAgent:
    """The MQTT side of one :class:`MeterRuntime`. ``await run()`` until stopped or cancelled."""

    def __init__(
        self,
        runtime: MeterRuntime,
        broker: BrokerSettings,
        topics: TopicScheme | None,
        options: AgentOptions,
        faults: FaultInjector | None = None,
    ) -> None:
        self.runtime = runtime
        self.faults = faults
        self.meter_id = runtime.meter_id
        self.topics = topics or TopicScheme()
        self.options = options
        password = meter_password(
            self.meter_id, runtime.config.mqtt_password, self.options.meter_secret
        )
        self.broker = broker.login(self.meter_id, password)
        self.boot = secrets.randbelow(2**53 - 2) + 1
        self.stats = AgentStats()
        self.connected = asyncio.Event()
        self._outbox: collections.deque[_Outgoing] = collections.deque()
        self._wake = asyncio.Event()  # the writer has work (or must stop)
        self._progress = asyncio.Event()  # a message left the outbox
        self._stopping = asyncio.Event()
        self._n = 0
        self._topic_telemetry = self.topics.telemetry(self.meter_id)
        self._topic_events = self.topics.events(self.meter_id)
        self._topic_state = self.topics.state(self.meter_id)
        self._topic_cmd = self.topics.cmd(self.meter_id)
        self._topic_req = self.topics.request(self.meter_id)
        self._tls = _tls_context(self.broker)

    # -- life cycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        unsubscribe = self.runtime.subscribe(self._on_event)
        producer = asyncio.get_running_loop().create_task(
            self._produce(), name=f"telemetry {self.meter_id}"
        )
        try:
            await self._connection_loop()
        finally:
            unsubscribe()
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer

    def stop(self) -> None:
        """Ask :meth:`run` to finish: flush the outbox (briefly), publish ``offline``, and
        disconnect cleanly (the session stays on the broker)."""
        self._stopping.set()
        self._wake.set()

    @property
    def buffered(self) -> int:
        return len(self._outbox)

    def _client(self) -> aiomqtt.Client:
        connect = _properties(PacketTypes.CONNECT)
        connect.SessionExpiryInterval = self.options.session_expiry
        return aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            username=self.broker.username,
            password=self.broker.password,
            identifier=self.meter_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=aiomqtt.Will(
                self._topic_state,
                encode_state(self.meter_id, False, self.boot),
                qos=1,
                retain=True,
                properties=_properties(PacketTypes.WILLMESSAGE),
            ),
            clean_start=False,
            properties=connect,
            keepalive=self.broker.keepalive,
            tls_context=self._tls,
            socket_options=_NO_DELAY,
            timeout=self.options.connect_timeout,
        )

    async def _connection_loop(self) -> None:
        delay = self.options.backoff_initial
        while not self._stopping.is_set():
            try:
                async with self._client() as client:
                    self.stats.connects += 1
                    delay = self.options.backoff_initial
                    await client.publish(
                        self._topic_state,
                        encode_state(self.meter_id, True, self.boot),
                        qos=1,
                        retain=True,
                        properties=_PUBLISH_PROPERTIES,
                    )
                    await client.subscribe(self._topic_cmd, qos=1)
                    await client.subscribe(self._topic_req, qos=1)
                    self.connected.set()
                    await self._serve(client)
            except aiomqtt.MqttError as exc:
                if self._tls is not None:
                    self._tls.close_failed()
                self.stats.last_error = str(exc)
                log.info("meter %s: MQTT: %s; retrying in %.1f s", self.meter_id, exc, delay)
            finally:
                self.connected.clear()
            if self._stopping.is_set():
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay * random.uniform(0.8, 1.2)):
                    await self._stopping.wait()
            delay = min(delay * 2, self.options.backoff_max)

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Run the reader and the writer until the connection fails or the agent stops."""
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read(client), name=f"commands {self.meter_id}")
        writer = loop.create_task(self._write(client), name=f"outbox {self.meter_id}")
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
        for task in done:
            error = task.exception()
            if error is not None:
                raise error

    # -- producing and publishing -----------------------------------------------------------------

    def _enqueue(self, item: _Outgoing) -> None:
        if len(self._outbox) >= self.options.buffer_limit:
            self._outbox.popleft()
            self.stats.dropped += 1
            if self.stats.dropped == 1 or self.stats.dropped % 1000 == 0:
                log.warning("meter %s: outbox full, %d dropped", self.meter_id, self.stats.dropped)
        self._outbox.append(item)
        self._wake.set()

    def _on_event(self, event: Event) -> None:
        self._enqueue(
            _Outgoing(self._topic_events, encode_event(self.meter_id, event), event.seq, False)
        )

    def produce_telemetry(self) -> int:
        """Read the meter now and queue its telemetry; returns the telemetry number."""
        snapshot = self.runtime.snapshot()  # may log events first: they queue before it
        self._n += 1
        self.stats.telemetry_produced += 1
        payload = encode_telemetry(snapshot, self.boot, self._n)
        self._enqueue(_Outgoing(self._topic_telemetry, payload, self._n, True))
        return self._n

    async def _produce(self) -> None:
        interval, limit = self.options.telemetry_interval, self.options.telemetry_limit
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while limit is None or self._n < limit:
            if interval > 0:
                delay = next_at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at = max(next_at + interval, loop.time())
            else:
                while len(self._outbox) >= 2:  # keep the next one ready behind the one in flight
                    self._progress.clear()
                    await self._progress.wait()
            await self.runtime.settled()  # telemetry shows no command not yet on disk
            self.produce_telemetry()

    async def _write(self, client: aiomqtt.Client) -> None:
        loop = asyncio.get_running_loop()
        flush_deadline: float | None = None
        outbox = self._outbox
        while True:
            if self._stopping.is_set():
                if flush_deadline is None:
                    flush_deadline = loop.time() + self.options.flush_timeout
                if not outbox or loop.time() > flush_deadline:
                    break
            if not outbox:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self.runtime.settled()  # a command's events go out once it is on disk
            item = outbox.popleft()
            try:
                await client.publish(
                    item.topic, item.payload, qos=1, properties=_PUBLISH_PROPERTIES
                )
            except BaseException:
                outbox.appendleft(item)  # not acknowledged: sent again after reconnecting
                raise
            if item.telemetry:
                self.stats.telemetry_acked += 1
                self.stats.last_acked_n = item.number
            else:
                self.stats.events_acked += 1
            self._progress.set()
        await client.publish(
            self._topic_state,
            encode_state(self.meter_id, False, self.boot),
            qos=1,
            retain=True,
            properties=_PUBLISH_PROPERTIES,
        )

    # -- serving the head-end ---------------------------------------------------------------------

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = message.topic.value
            if topic == self._topic_cmd:
                await self._command(client, message)
            elif topic == self._topic_req:
                await self._request(client, message)
            else:
                log.debug("meter %s: ignoring a message on %s", self.meter_id, topic)

    def _answer_topic(self, message: aiomqtt.Message, default: str) -> str:
        """The message's response topic when it lies in ``default``'s subtree, else ``default``."""
        wanted = getattr(message.properties, "ResponseTopic", None)
        if isinstance(wanted, str) and in_subtree(wanted, default):
            return wanted
        if wanted:
            log.info("meter %s: answering on %s, not on %s", self.meter_id, default, wanted)
        return default

    def _draw(self, write: bool, what: str) -> Draw:
        return self.faults.draw(write, what) if self.faults is not None else NO_FAULT

    async def _command(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        self.stats.commands += 1
        draw = self._draw(True, "MQTT command")
        if draw.fault == DROP:
            return
        if draw.fault == DISCONNECT:
            drop_connection(client)
            return
        result = await self.execute_payload(_payload_bytes(message), _schemas(message))
        if draw.fault == LOSE_ACK:
            return
        correlation = getattr(message.properties, "CorrelationData", None)
        await self._answer(
            client,
            self._answer_topic(message, self.topics.cmd_result(self.meter_id)),
            encode_result(self.meter_id, result),
            bytes(correlation) if correlation else None,
            draw,
        )

    @staticmethod
    async def _answer(
        client: aiomqtt.Client, topic: str, payload: bytes, correlation: bytes | None, draw: Draw
    ) -> None:
        """Publish an answer, spoiled or late as ``draw`` says."""
        if draw.fault == CORRUPT:
            payload = corrupt_payload(payload)
        if draw.delay > 0:
            await asyncio.sleep(draw.delay)
        await client.publish(topic, payload, qos=1, properties=_answer_properties(correlation))

    async def execute_payload(self, payload: bytes, schemas: Sequence[str] = ()) -> CommandResult:
        """A command payload's result: executed by the runtime (returned once its outcome is on
        disk), or refused as unreadable.

        ``schemas`` are the values of the message's ``schema`` user properties: a command that
        names a schema other than the one this meter speaks is refused like a payload whose
        ``v`` is not 1 (sequence 0, BAD_ARGUMENT), and nothing is executed.
        """
        try:
            check_schema(schemas)
            message = decode_command_message(payload)
        except DecodeError as exc:
            log.warning("meter %s: unreadable command: %s", self.meter_id, exc)
            last_transfer = self.runtime.snapshot().last_transfer
            return CommandResult(0, ResultCode.BAD_ARGUMENT, last_transfer, str(exc)[:200])
        refusal = message.refusal()
        if refusal is not None:
            last_transfer = self.runtime.snapshot().last_transfer
            return CommandResult(message.sequence, refusal, last_transfer, "command not understood")
        try:
            return await self.runtime.execute_async(message.to_envelope())
        except Exception as exc:  # the agent outlives a failing command; the meter says BUSY
            log.exception("meter %s: command %d failed", self.meter_id, message.sequence)
            return CommandResult(message.sequence, ResultCode.BUSY, 0, str(exc)[:200])

    async def _request(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        self.stats.requests += 1
        draw = self._draw(False, "MQTT read request")
        if draw.fault == DROP:
            return
        if draw.fault == DISCONNECT:
            drop_connection(client)
            return
        await self.runtime.settled()  # then answer with no await in between
        reply = self.answer_request(_payload_bytes(message), _schemas(message))
        correlation = getattr(message.properties, "CorrelationData", None)
        await self._answer(
            client,
            self._answer_topic(message, self.topics.reply(self.meter_id)),
            encode_reply(reply),
            bytes(correlation) if correlation else None,
            draw,
        )

    def answer_request(self, payload: bytes, schemas: Sequence[str] = ()) -> Reply:
        """The reply to a read request; an error reply for one that is unreadable or names a
        ``schema`` user property other than this meter's (``schemas``, as for commands)."""
        meter_id = self.meter_id
        try:
            check_schema(schemas)
            request = decode_request(payload)
            if request.meter_id != meter_id:
                return ErrorReply(meter_id=meter_id, error=f"request for {request.meter_id}")
            if isinstance(request, SnapshotRequest):
                return SnapshotReply(
                    meter_id=meter_id, reading=Reading.from_snapshot(self.runtime.snapshot())
                )
            if isinstance(request, EventsRequest):
                events = self.runtime.events_since(request.since_seq, request.limit)
                return EventsReply(
                    meter_id=meter_id, events=[EventItem.from_event(e) for e in events]
                )
            if isinstance(request, ProfileRequest):
                if request.start > request.end:
                    return ErrorReply(meter_id=meter_id, error="profile: start after end")
                rows = self.runtime.profile_between(request.start, request.end)
                return ProfileReply(
                    meter_id=meter_id,
                    rows=[ProfileItem.from_row(r) for r in rows[:MAX_REPLY_ITEMS]],
                    truncated=len(rows) > MAX_REPLY_ITEMS,
                )
            assert isinstance(request, LastResultRequest)
            return LastResultReply(
                meter_id=meter_id, result=ResultItem.from_result(self.runtime.last_result())
            )
        except HesError as exc:  # DecodeError included
            return ErrorReply(meter_id=meter_id, error=str(exc)[:500])
        except Exception as exc:  # the agent outlives a failing read
            log.exception("meter %s: a read request failed", meter_id)
            return ErrorReply(meter_id=meter_id, error=f"internal error: {exc}"[:500])


def corrupt_payload(payload: bytes) -> bytes:
    """An answer's payload made malformed: its first half, which is not a JSON document."""
    return payload[: len(payload) // 2]


def drop_connection(client: aiomqtt.Client) -> None:
    """Fail the client's connection as a network failure would: its socket is shut down under
    paho, which then reports the connection lost (the messages iterator raises MqttError) and
    sends no DISCONNECT, so the broker publishes the will. aiomqtt keeps its paho client
    private; ``socket()`` is paho's public API."""
    sock = client._client.socket()
    if isinstance(sock, socket.socket):  # an ssl.SSLSocket is one too
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


# -- many agents ----------------------------------------------------------------------------------


@dataclass
class AgentGroup:
    """The agents of many meters in this process (one task each)."""

    agents: dict[str, MeterAgent]
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for meter_id, agent in self.agents.items():
            self.tasks[meter_id] = loop.create_task(agent.run(), name=f"agent {meter_id}")

    async def wait_connected(self, timeout: float) -> None:
        """Return once every agent is connected; TimeoutError otherwise."""
        async with asyncio.timeout(timeout):
            for agent in self.agents.values():
                await agent.connected.wait()

    def connected_count(self) -> int:
        return sum(agent.connected.is_set() for agent in self.agents.values())

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop every agent cleanly (in parallel); cancel those that do not finish in time."""
        for agent in self.agents.values():
            agent.stop()
        pending = [task for task in self.tasks.values() if not task.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for meter_id, task in self.tasks.items():
            if not task.cancelled() and task.exception() is not None:
                log.error("agent %s failed: %s", meter_id, task.exception())


@contextlib.asynccontextmanager
async def run_agents(
    runtimes: Iterable[MeterRuntime],
    broker: BrokerSettings,
    *,
    prefix: str = DEFAULT_PREFIX,
    options: AgentOptions,
    faults: FleetFaults | None = None,
) -> AsyncIterator[AgentGroup]:
    """Run an agent for each runtime while the block runs; stop them all cleanly after it.
    The meters with an injector in ``faults`` inject its faults into their answers."""
    topics = TopicScheme(prefix)
    group = AgentGroup(
        {
            rt.meter_id: MeterAgent(
                rt, broker, topics, options, faults.get(rt.meter_id) if faults else None
            )
            for rt in runtimes
        }
    )
    group.start()
    try:
        yield group
    finally:
        await group.stop()


__all__ = ["AgentGroup", "AgentOptions", "AgentStats", "MeterAgent", "run_agents"]
