"""The MQTT ingest: every meter's telemetry, events and state into the head-end's sink.

One persistent MQTT session (optionally a shared subscription ``$share/<group>/…``, so several
workers split the load) receives the meters' messages. Each is checked (topic, schema version,
payload schema, meter id in the payload = meter id in the topic), de-duplicated by its schema
key (telemetry ``(meter, boot, n)``, events ``(meter, seq)``) and handed to an
:class:`IngestSink`; only then is it acknowledged to the broker, so a message is never lost
between the broker and the sink, and the broker's in-flight window paces a slow sink.

Only a message that is itself bad goes to the dead-letter topic: one that does not parse or
belongs to another meter, or that the sink refuses as invalid (it raises
:class:`~protocols.errors.ValidationError` or :class:`~protocols.errors.DecodeError`). It is
counted, logged and republished unchanged to ``<prefix>/v1/deadletter`` with the reason in a
user property (a payload that is not UTF-8 without the JSON content type and payload format
indicator). A sink's transient failure (:class:`~protocols.errors.StorageError`: the database
is away) pauses consumption instead: the message is tried again with back-off, without being
acknowledged, until the sink takes it, and the broker's in-flight window holds the rest
meanwhile, so an outage loses nothing. An unexpected exception from the sink is a bug: it is
logged with its traceback and the message dead-lettered as "internal error", so the ingest
goes on and the message can be replayed. Nothing a meter sends crashes the ingest.

De-duplication state is in memory: after a restart of the ingest, a message the broker
re-delivers may reach the sink a second time, so a storage sink enforces the same keys as
unique (the in-memory sink here counts such repeats).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, TypeVar

from headend.transport.mqtt import Incoming, MqttConnection, publish_properties
from protocols.errors import DecodeError, LinkError, StorageError, ValidationError
from protocols.mqtt import (
    SCHEMA_PROPERTY,
    SCHEMA_PROPERTY_VALUE,
    BrokerSettings,
    EventMessage,
    StateMessage,
    Telemetry,
    TopicKind,
    TopicScheme,
    decode_event,
    decode_state,
    decode_telemetry,
)
from protocols.readings import MeterSnapshot

log = logging.getLogger(__name__)
P = TypeVar("P")

INGEST_KINDS = (TopicKind.TELEMETRY, TopicKind.EVENTS, TopicKind.STATE)
_BOOTS_REMEMBERED = 4
_BURST = 500  # messages checked and handed to the sink together at most
_LOGGED_MALFORMED = 20


@dataclass(frozen=True, slots=True)
class _Delivery:
    """An accepted message on its way to the sink: the sink's method, the decoded payload,
    and the statistic it counts in once taken."""

    message: Incoming
    handler: Callable[[Any], Awaitable[None]]
    payload: Any
    kind: str


class SinkStopped(StorageError):
    """A sink's answer once it takes no more messages (it is stopping): the message stays
    unacknowledged, for the broker to deliver again, and the ingest hands over no more."""


class IngestSink(Protocol):
    """Where the ingest hands accepted messages. Raise StorageError for a transient failure
    (the message is tried again until it is taken), ValidationError or DecodeError to refuse
    a message as invalid (it is dead-lettered), :class:`SinkStopped` once it takes no more."""

    async def telemetry(self, message: Telemetry) -> None: ...

    async def event(self, message: EventMessage) -> None: ...

    async def state(self, message: StateMessage) -> None: ...


class BurstSink(IngestSink, Protocol):
    """A sink that also takes a burst of messages at once (``take``): it returns, for each in
    order, None when it is stored or the exception the single-message method would raise."""

    async def take(
        self, messages: Sequence[Telemetry | EventMessage | StateMessage]
    ) -> list[BaseException | None]: ...


class MemorySink:
    """An in-memory :class:`IngestSink` (until the storage sink exists, and for tests).

    Keeps every message in arrival order, the latest snapshot and state per meter, and counts
    messages whose de-duplication key it had seen already.
    """

    def __init__(self) -> None:
        self.telemetry_messages: list[Telemetry] = []
        self.event_messages: list[EventMessage] = []
        self.state_messages: list[StateMessage] = []
        self.latest: dict[str, MeterSnapshot] = {}
        self.online: dict[str, bool] = {}
        self.repeats = 0
        self._keys: set[tuple[str, int] | tuple[str, int, int]] = set()
        self._changed = asyncio.Event()

    def _remember(self, key: tuple[str, int] | tuple[str, int, int]) -> None:
        if key in self._keys:
            self.repeats += 1
        self._keys.add(key)
        self._changed.set()

    async def telemetry(self, message: Telemetry) -> None:
        self.telemetry_messages.append(message)
        self.latest[message.meter_id] = message.snapshot()
        self._remember(message.key)

    async def event(self, message: EventMessage) -> None:
        self.event_messages.append(message)
        self._remember(message.key)

    async def state(self, message: StateMessage) -> None:
        self.state_messages.append(message)
        self.online[message.meter_id] = message.online
        self._changed.set()

    async def wait_until(self, predicate: Callable[[MemorySink], bool], timeout: float) -> None:
        """Return once ``predicate(self)`` holds; TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while not predicate(self):
                self._changed.clear()
                await self._changed.wait()


@dataclass(slots=True)
class IngestStats:
    received: int = 0
    telemetry: int = 0
    events: int = 0
    states: int = 0
    duplicates: int = 0
    malformed: int = 0
    dead_lettered: int = 0
    sink_failures: int = 0  # sink calls that failed transiently (StorageError), each retried
    sink_refused: int = 0  # messages the sink refused as invalid, dead-lettered
    internal_errors: int = 0  # messages dead-lettered after an unexpected exception

    @property
    def handled(self) -> int:
        """Messages finished with: handed to the sink, dropped as duplicates or dead-lettered."""
        return (
            self.telemetry
            + self.events
            + self.states
            + self.duplicates
            + self.malformed
            + self.sink_refused
            + self.internal_errors
        )


class Ingest:
    """Subscribe to the meters' ``kinds`` and feed ``sink``; use ``async with`` or start/close.

    ``group`` makes the subscriptions shared (``$share/<group>/…``); give each worker of a
    group its own ``client_id``. (MQTT 5 sends no retained messages to a shared subscription:
    a worker of a group learns a meter's state from its next state message.) The session is
    persistent (``session_expiry`` seconds), so messages published while the ingest is away
    wait for it on the broker.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        sink: IngestSink,
        topics: TopicScheme | None = None,
        *,
        group: str | None = None,
        client_id: str = "hes-ingest",
        session_expiry: int = 3600,
        receive_maximum: int = 1000,
        kinds: Iterable[TopicKind] = INGEST_KINDS,
        sink_backoff: tuple[float, float] = (0.05, 2.0),
        close_grace: float = 5.0,
    ) -> None:
        self.topics = topics or TopicScheme()
        self.sink = sink
        self.sink_backoff = sink_backoff
        self.close_grace = close_grace
        self.stats = IngestStats()
        self.connection = MqttConnection(
            settings,
            client_id=client_id,
            subscriptions=[self.topics.shared(kind, group) for kind in kinds],
            on_message=self._on_message,
            clean_start="never",
            session_expiry=session_expiry,
            receive_maximum=receive_maximum,
            manual_ack=True,
        )
        self._inbox: collections.deque[Incoming] = collections.deque()
        self._wake = asyncio.Event()
        self._consumer: asyncio.Task[None] | None = None
        self._telemetry_seen: dict[str, dict[int, int]] = {}
        self._event_seen: dict[str, int] = {}
        self._rng = random.Random()
        self.paused = False  # waiting for the sink to recover
        self._closing = False
        self._sink_stopped = False  # the sink said SinkStopped: no more bursts

    async def start(self) -> None:
        self._consumer = asyncio.get_running_loop().create_task(self._consume(), name="mqtt ingest")
        try:
            await self.connection.start()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Take no new burst; let the burst in hand be settled and its messages acknowledged
        (up to ``close_grace`` seconds: a sink that stored them must not see them again), then
        disconnect. Messages not yet handed to the sink stay unacknowledged on the broker."""
        self._closing = True
        self._wake.set()
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            done, _ = await asyncio.wait([consumer], timeout=self.close_grace)
            if not done:
                log.warning("ingest: the sink did not settle in %.1f s of close", self.close_grace)
                consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
        await self.connection.close()  # the acknowledgements queued go out before DISCONNECT

    async def __aenter__(self) -> Ingest:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def backlog(self) -> int:
        """Messages received and not yet handled."""
        return len(self._inbox)

    # -- the pipeline -----------------------------------------------------------------------------

    def _on_message(self, message: Incoming) -> None:
        self._inbox.append(message)
        if not self._wake.is_set():
            self._wake.set()

    async def _consume(self) -> None:
        inbox = self._inbox
        while not (self._closing or self._sink_stopped):
            if not inbox:
                self._wake.clear()
                await self._wake.wait()
                continue
            burst = [inbox.popleft() for _ in range(min(len(inbox), _BURST))]
            await self._handle_burst(burst)

    async def _handle_burst(self, burst: list[Incoming]) -> None:
        """Check each message of ``burst`` (in arrival order), hand the accepted ones to the
        sink (all at once to a :class:`BurstSink`, which may store them in one transaction;
        else one after the other), then settle and acknowledge each in arrival order; one
        that the sink failed to take transiently is tried again on its own, in order, before
        any later one is acknowledged."""
        staged = [(message, self._stage_safely(message)) for message in burst]
        deliveries = [d for _, d in staged if d is not None]
        results: list[BaseException | None] = []
        take = getattr(self.sink, "take", None)
        if take is not None and deliveries:  # a sink that stores a burst at once
            results = await take([d.payload for d in deliveries])
        else:
            for each in deliveries:
                try:
                    await each.handler(each.payload)
                    results.append(None)
                except Exception as exc:
                    results.append(exc)
        outcomes = iter(results)
        for message, delivery in staged:
            if delivery is not None:
                result = next(outcomes)
                try:
                    settled = await self._settle(delivery, result)
                except Exception as exc:  # the ingest never dies of one message
                    log.error("ingest: unexpected failure on %s", message.topic, exc_info=exc)
                    self.stats.internal_errors += 1
                    self._dead_letter(message, "internal error")
                    settled = True
                if not settled:  # left, with every later one, for the broker to deliver again
                    return
            self.connection.ack(message)

    def _stage_safely(self, message: Incoming) -> _Delivery | None:
        try:
            return self._stage(message)
        except Exception:  # the ingest never dies of one message
            log.exception("ingest: unexpected failure on %s", message.topic)
            self.stats.internal_errors += 1
            self._dead_letter(message, "internal error")
            return None

    def _stage(self, message: Incoming) -> _Delivery | None:
        """Check one message; what to hand to the sink, or None when it is finished with
        (a duplicate, or malformed and dead-lettered)."""
        self.stats.received += 1
        try:
            meter_id, kind = self.topics.parse(message.topic)
            for schema in message.user_properties(SCHEMA_PROPERTY):
                if schema != SCHEMA_PROPERTY_VALUE:
                    raise DecodeError(
                        f"schema {schema!r}; this ingest reads {SCHEMA_PROPERTY_VALUE}"
                    )
            if kind is TopicKind.TELEMETRY:
                return self._telemetry(meter_id, decode_telemetry(message.payload), message)
            if kind is TopicKind.EVENTS:
                return self._event(meter_id, decode_event(message.payload), message)
            if kind is TopicKind.STATE:
                payload = decode_state(message.payload)
                self._check_owner(meter_id, payload.meter_id)
                return _Delivery(message, self.sink.state, payload, "states")
            raise DecodeError(f"the ingest does not take {kind.value} messages")
        except DecodeError as exc:
            self.stats.malformed += 1
            if self.stats.malformed <= _LOGGED_MALFORMED or self.stats.malformed % 1000 == 0:
                log.warning(
                    "ingest: malformed message #%d on %s: %s",
                    self.stats.malformed,
                    message.topic,
                    exc,
                )
            self._dead_letter(message, str(exc))
            return None

    @staticmethod
    def _check_owner(meter_id: str, payload_meter_id: str) -> None:
        if payload_meter_id != meter_id:
            raise DecodeError(f"payload of meter {payload_meter_id!r} on {meter_id!r}'s topic")

    def _telemetry(self, meter_id: str, payload: Telemetry, message: Incoming) -> _Delivery | None:
        self._check_owner(meter_id, payload.meter_id)
        boots = self._telemetry_seen.setdefault(meter_id, {})
        if payload.n <= boots.get(payload.boot, 0):
            self.stats.duplicates += 1
            return None
        # seen from here on: the message is stored, or dead-lettered, before it is acknowledged
        boots[payload.boot] = payload.n
        if len(boots) > _BOOTS_REMEMBERED:
            del boots[next(iter(boots))]
        return _Delivery(message, self.sink.telemetry, payload, "telemetry")

    def _event(self, meter_id: str, payload: EventMessage, message: Incoming) -> _Delivery | None:
        self._check_owner(meter_id, payload.meter_id)
        if payload.event.seq <= self._event_seen.get(meter_id, 0):
            self.stats.duplicates += 1
            return None
        self._event_seen[meter_id] = payload.event.seq
        return _Delivery(message, self.sink.event, payload, "events")

    async def _settle(self, delivery: _Delivery, result: BaseException | None) -> bool:
        """Count what the sink made of a delivery; a transient failure is tried again until
        the sink takes the message (or refuses it). False: the message is not settled (the sink
        stopped, or the ingest is closing while the sink fails) and must stay unacknowledged."""
        if isinstance(result, SinkStopped):
            self._sink_stopped = True
            return False
        if isinstance(result, StorageError):
            self.stats.sink_failures += 1
            if not self.paused:
                self.paused = True
                log.warning("ingest: the sink failed (%s); paused until it recovers", result)
            outcome = await self._deliver(delivery.handler, delivery.payload, delivery.message)
            if outcome is None:
                return False
            taken = outcome
        elif isinstance(result, ValidationError | DecodeError):
            self._refused(delivery.message, result)
            taken = False
        elif result is not None:
            raise result
        else:
            taken = True
            if self.paused:
                self.paused = False
                log.warning("ingest: the sink recovered; consuming again")
        if taken:
            setattr(self.stats, delivery.kind, getattr(self.stats, delivery.kind) + 1)
        return True

    def _refused(self, message: Incoming, exc: BaseException) -> None:
        self.stats.sink_refused += 1
        log.warning("ingest: the sink refused a message from %s: %s", message.topic, exc)
        self._dead_letter(message, f"refused by the sink: {exc}")

    async def _deliver(
        self, handler: Callable[[P], Awaitable[None]], payload: P, message: Incoming
    ) -> bool | None:
        """Hand ``payload`` to the sink. While the sink fails transiently, wait and try again
        (the message stays unacknowledged); when it refuses the message, dead-letter it
        (False). None: given up unsettled, as the ingest is closing or the sink stopped."""
        low, high = self.sink_backoff
        delay = low
        while True:
            await asyncio.sleep(delay * self._rng.uniform(0.8, 1.2))
            delay = min(delay * 2, high)
            if self._closing:
                return None
            try:
                await handler(payload)
            except SinkStopped:
                self._sink_stopped = True
                return None
            except StorageError as exc:
                self.stats.sink_failures += 1
                if not self.paused:
                    self.paused = True
                    log.warning("ingest: the sink failed (%s); paused until it recovers", exc)
                continue
            except (ValidationError, DecodeError) as exc:
                self._refused(message, exc)
                return False
            if self.paused:
                self.paused = False
                log.warning("ingest: the sink recovered; consuming again")
            return True

    def _dead_letter(self, message: Incoming, reason: str) -> None:
        properties = publish_properties(
            user=[("original-topic", message.topic), ("reason", reason[:256])],
            json_payload=_is_utf8(message.payload),
        )
        try:
            published = self.connection.publish(
                self.topics.deadletter, message.payload, qos=1, properties=properties
            )
        except LinkError as exc:
            log.warning("ingest: cannot dead-letter a message from %s: %s", message.topic, exc)
            return
        published.add_done_callback(self._dead_lettered)

    def _dead_lettered(self, published: asyncio.Future[None]) -> None:
        if published.cancelled():
            return
        error = published.exception()
        if error is None:
            self.stats.dead_lettered += 1
        else:
            log.warning("ingest: the broker refused a dead letter: %s", error)


def _is_utf8(payload: bytes) -> bool:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
