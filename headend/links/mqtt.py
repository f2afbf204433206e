"""The head-end's MeterLink over MQTT: one shared connection for the links to many meters.

:class:`MqttLinkHub` shares one :class:`~headend.transport.mqtt.MqttConnection` among the links
to many meters (a head-end does not open 1,000 connections): :meth:`MqttLinkHub.link` returns
a :class:`MqttMeterLink` for one meter. Commands go to ``…/<meter>/cmd`` with a response topic,
correlation data and a message expiry; results are matched by correlation data, or by
``(meter id, sequence)`` when a meter answers without it. Reads (snapshot, events, profile,
last result) are MQTT 5 request/response on ``…/req`` and ``…/reply``. Confirming a command
(asking before a resend) is :func:`headend.links.base.execute_confirmed`, as for every link.

An answer that matches a waiting call but does not decode fails that call at once with a
:class:`~protocols.errors.DecodeError`; one that matches nothing is counted and ignored.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

from headend.links.base import ConfirmedExecution
from headend.transport.mqtt import Incoming, MqttConnection, publish_properties
from protocols.commands import CommandEnvelope, CommandResult
from protocols.errors import (
    ConfigError,
    DecodeError,
    LinkClosed,
    LinkError,
    LinkTimeout,
    ValidationError,
)
from protocols.mqtt import (
    DEFAULT_PREFIX,
    MAX_REPLY_ITEMS,
    BrokerSettings,
    ErrorReply,
    EventsReply,
    EventsRequest,
    LastResultReply,
    LastResultRequest,
    ProfileReply,
    ProfileRequest,
    Reply,
    Request,
    SnapshotReply,
    SnapshotRequest,
    TopicKind,
    TopicScheme,
    decode_reply,
    decode_result,
    encode_command,
    encode_request,
)
from protocols.readings import Event, MeterSnapshot, ProfileRow

if TYPE_CHECKING:
    from headend.links.base import MeterLink
    from headend.links.endpoint import Endpoint, LinkOptions
    from headend.links.pool import LinkPool

log = logging.getLogger(__name__)
R = TypeVar("R")


# -- the meter link -------------------------------------------------------------------------------


class MqttLinkHub:
    """One head-end connection for the MeterLinks of many meters.

    Subscribes to every meter's ``cmd/result`` and ``reply``; several hubs (head-end workers)
    may run at once: each ignores answers it did not ask for. The session is persistent after
    the first connection, so answers published while the hub reconnects are not lost.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        topics: TopicScheme | None = None,
        *,
        client_id: str | None = None,
        session_expiry: int = 300,
    ) -> None:
        self.topics = topics or TopicScheme()
        self.connection = MqttConnection(
            settings,
            client_id=client_id or f"hes-link-{secrets.token_hex(4)}",
            subscriptions=(
                self.topics.all_meters(TopicKind.CMD_RESULT),
                self.topics.all_meters(TopicKind.REPLY),
            ),
            on_message=self._on_message,
            clean_start="first",
            session_expiry=session_expiry,
        )
        self._results_by_correlation: dict[bytes, asyncio.Future[CommandResult]] = {}
        self._results_by_sequence: dict[tuple[str, int], asyncio.Future[CommandResult]] = {}
        self._replies: dict[bytes, asyncio.Future[Reply]] = {}
        self.unmatched = 0
        self.malformed = 0

    async def start(self) -> None:
        await self.connection.start()

    async def close(self) -> None:
        await self.connection.close()
        error = LinkClosed("the MQTT link hub was closed")
        futures: list[asyncio.Future[Any]] = [
            *self._results_by_correlation.values(),
            *self._results_by_sequence.values(),
            *self._replies.values(),
        ]
        for future in futures:
            if not future.done():
                future.set_exception(error)

    async def __aenter__(self) -> MqttLinkHub:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def link(self, meter_id: str, timeout: float = 5.0) -> MqttMeterLink:
        """A MeterLink for ``meter_id`` over this hub's connection (reads time out after
        ``timeout`` seconds)."""
        self.topics.meter_root(meter_id)  # validates the id
        return MqttMeterLink(self, meter_id, timeout)

    # -- incoming answers -------------------------------------------------------------------------

    def _on_message(self, message: Incoming) -> None:
        try:
            meter_id, kind = self.topics.parse(message.topic)
        except DecodeError as exc:
            self._malformed(message, exc)
            return
        if kind is TopicKind.CMD_RESULT:
            self._on_result(meter_id, message)
        elif kind is TopicKind.REPLY:
            self._on_reply(meter_id, message)

    def _malformed(self, message: Incoming, exc: DecodeError) -> None:
        self.malformed += 1
        log.warning("MQTT link: a malformed answer on %s: %s", message.topic, exc)

    def _on_result(self, meter_id: str, message: Incoming) -> None:
        correlation = message.correlation_data
        future = self._results_by_correlation.get(correlation) if correlation else None
        try:
            payload = decode_result(message.payload)
            if payload.meter_id != meter_id:
                raise DecodeError(f"a result of {payload.meter_id} on {meter_id}'s topic")
        except DecodeError as exc:
            self._malformed(message, exc)
            if future is not None and not future.done():
                future.set_exception(exc)  # the caller learns at once, not at its time-out
            return
        if future is None:
            future = self._results_by_sequence.get(payload.key)
        if future is None or future.done():
            self.unmatched += 1
            return
        future.set_result(payload.result.to_result())

    def _on_reply(self, meter_id: str, message: Incoming) -> None:
        correlation = message.correlation_data
        future = self._replies.get(correlation) if correlation else None
        if future is None or future.done():
            self.unmatched += 1
            return
        try:
            reply = decode_reply(message.payload)
            if reply.meter_id != meter_id:
                raise DecodeError(f"a reply of {reply.meter_id} on {meter_id}'s topic")
        except DecodeError as exc:
            self._malformed(message, exc)
            future.set_exception(exc)
            return
        future.set_result(reply)

    # -- requests ---------------------------------------------------------------------------------

    def _fail_on_publish_error(
        self, answer: asyncio.Future[R]
    ) -> Callable[[asyncio.Future[None]], None]:
        def done(published: asyncio.Future[None]) -> None:
            if published.cancelled():
                return
            error = published.exception()
            if error is not None and not answer.done():
                answer.set_exception(error)

        return done

    async def send_envelope(
        self, envelope: CommandEnvelope, timeout: float = 5.0, *, expiry: int | None = None
    ) -> CommandResult:
        """Publish the command once and return the meter's result for its sequence number;
        LinkTimeout when none arrives within ``timeout``.

        The command expires on the broker after ``expiry`` seconds (default: ``timeout``
        rounded up): an offline meter that returns later does not execute it then. Confirming
        it (asking before a resend) is :func:`~headend.links.base.execute_confirmed`'s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        meter_id, key = envelope.meter_id, (envelope.meter_id, envelope.sequence)
        correlation = secrets.token_bytes(16)
        answer: asyncio.Future[CommandResult] = loop.create_future()
        self._results_by_correlation[correlation] = answer
        self._results_by_sequence.setdefault(key, answer)
        try:
            await self.connection.wait_connected(max(deadline - loop.time(), 0.01))
            published = self.connection.publish(
                self.topics.cmd(meter_id),
                encode_command(envelope),
                qos=1,
                properties=publish_properties(
                    correlation=correlation,
                    response_topic=self.topics.cmd_result(meter_id),
                    expiry=expiry or max(1, math.ceil(timeout)),
                ),
            )
            published.add_done_callback(self._fail_on_publish_error(answer))
            try:
                async with asyncio.timeout_at(deadline):
                    return await answer
            except TimeoutError as exc:
                raise LinkTimeout(
                    f"no result from {meter_id} for command {envelope.sequence} "
                    f"within {timeout:g} s"
                ) from exc
        finally:
            self._results_by_correlation.pop(correlation, None)
            if self._results_by_sequence.get(key) is answer:
                del self._results_by_sequence[key]

    async def request(self, request: Request, timeout: float = 5.0) -> Reply:
        """Send a read request and return the meter's reply (LinkTimeout when none comes in
        time; LinkError when the meter answers with an error)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        meter_id = request.meter_id
        correlation = secrets.token_bytes(16)
        answer: asyncio.Future[Reply] = loop.create_future()
        self._replies[correlation] = answer
        try:
            await self.connection.wait_connected(max(deadline - loop.time(), 0.01))
            published = self.connection.publish(
                self.topics.request(meter_id),
                encode_request(request),
                qos=1,
                properties=publish_properties(
                    correlation=correlation,
                    response_topic=self.topics.reply(meter_id),
                    expiry=max(1, math.ceil(timeout)),
                ),
            )
            published.add_done_callback(self._fail_on_publish_error(answer))
            try:
                async with asyncio.timeout_at(deadline):
                    reply = await answer
            except TimeoutError as exc:
                raise LinkTimeout(
                    f"{meter_id} did not answer a {type(request).__name__} within {timeout:g} s"
                ) from exc
        finally:
            self._replies.pop(correlation, None)
        if isinstance(reply, ErrorReply):
            raise LinkError(f"{meter_id} could not answer: {reply.error}")
        return reply


class MqttMeterLink(ConfirmedExecution):
    """The MeterLink of one meter over a shared :class:`MqttLinkHub` (which owns the
    connection: closing a link releases nothing)."""

    def __init__(self, hub: MqttLinkHub, meter_id: str, timeout: float = 5.0) -> None:
        self.hub = hub
        self.meter_id = meter_id
        self.timeout = timeout

    async def _ask(self, request: Request, kind: type[R]) -> R:
        reply = await self.hub.request(request, self.timeout)
        if not isinstance(reply, kind):
            raise LinkError(f"{self.meter_id} answered {type(reply).__name__} to a {kind.__name__}")
        return reply

    async def read_snapshot(self) -> MeterSnapshot:
        reply = await self._ask(SnapshotRequest(meter_id=self.meter_id), SnapshotReply)
        return reply.snapshot()

    async def read_profile(self, start: int, end: int) -> list[ProfileRow]:
        """Rows with ``start <= time <= end``, fetched in pages of at most MAX_REPLY_ITEMS."""
        rows: list[ProfileRow] = []
        while start <= end:
            request = ProfileRequest(meter_id=self.meter_id, start=start, end=end)
            reply = await self._ask(request, ProfileReply)
            rows += (item.to_row() for item in reply.rows)
            if not reply.truncated or not reply.rows:
                break
            start = reply.rows[-1].time + 1
        return rows

    async def read_events(self, since_seq: int, limit: int = 100) -> list[Event]:
        events: list[Event] = []
        while len(events) < limit:
            page = min(limit - len(events), MAX_REPLY_ITEMS)
            request = EventsRequest(meter_id=self.meter_id, since_seq=since_seq, limit=page)
            reply = await self._ask(request, EventsReply)
            events += (item.to_event() for item in reply.events)
            if len(reply.events) < page:
                break
            since_seq = reply.events[-1].seq
        return events

    async def read_last_result(self) -> CommandResult:
        reply = await self._ask(LastResultRequest(meter_id=self.meter_id), LastResultReply)
        return reply.result.to_result()

    async def send_envelope(self, envelope: CommandEnvelope, timeout: float) -> CommandResult:
        if envelope.meter_id != self.meter_id:
            raise ValidationError(
                f"the envelope is for meter {envelope.meter_id}, this link reaches {self.meter_id}"
            )
        return await self.hub.send_envelope(envelope, timeout)

    async def close(self) -> None:
        """Nothing to release: the hub (or the pool that opened it) owns the connection."""


# -- opening a link from an endpoint string -------------------------------------------------------


def broker_of(
    endpoint: Endpoint, default_meter: str | None = None
) -> tuple[BrokerSettings, TopicScheme, str]:
    """The broker settings, topic scheme and meter id of an ``mqtt://`` / ``mqtts://``
    endpoint (the path, else ``default_meter``); ConfigError for anything malformed."""
    endpoint.check_params({"prefix", "ca", "keepalive"})
    parts = urlsplit(endpoint.text)
    meter_id = endpoint.path.strip("/") or default_meter
    if not meter_id:
        raise ConfigError(f"{endpoint.shown}: the path names the meter, e.g. mqtt://host/MTR-0001")
    try:
        topics = TopicScheme(endpoint.param("prefix") or DEFAULT_PREFIX)
        topics.meter_root(meter_id)
        settings = BrokerSettings(
            host=endpoint.host,
            port=endpoint.port or (8883 if endpoint.scheme == "mqtts" else 1883),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=endpoint.scheme == "mqtts",
            ca_file=endpoint.param("ca"),
            keepalive=endpoint.int_param("keepalive", 30, 5, 65535),
        )
    except ValidationError as exc:
        raise ConfigError(f"{endpoint.shown}: {exc}") from exc
    return settings, topics, meter_id


async def open_mqtt_link(endpoint: Endpoint, options: LinkOptions, pool: LinkPool) -> MeterLink:
    """``mqtt://user:password@host:port/<meter-id>?prefix=phs&keepalive=30&timeout=5`` (or
    ``mqtts://…&ca=/path/ca.pem``): a link over the connection ``pool`` keeps for that broker
    and prefix. The meter may be offline: commands then wait on the broker until they
    expire."""
    settings, topics, meter_id = broker_of(endpoint, options.meter_id)
    if options.meter_id and options.meter_id != meter_id:
        raise ConfigError(f"{endpoint.shown}: expected meter {options.meter_id}, not {meter_id}")
    hub = await pool.mqtt_hub(settings, topics)
    return hub.link(meter_id, endpoint.float_param("timeout", options.timeout))
