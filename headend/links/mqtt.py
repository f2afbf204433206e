"""MQTT for the head-end: one paho connection driven by the asyncio loop, and the MeterLink over it.

:class:`MqttConnection` is the adapter: paho's socket callbacks are wired to the event loop (no
network thread), it reconnects with back-off, re-subscribes on every connection, optionally
acknowledges QoS 1 messages only when the application says so (``manual_ack``: the broker's
in-flight window then paces a slow consumer), and translates paho's errors into
:class:`~protocols.errors.LinkError`. The ingest service uses it too.

:class:`MqttLinkHub` shares one such connection among the links to many meters (a head-end does
not open 1,000 connections): :meth:`MqttLinkHub.link` returns a :class:`MqttMeterLink` for one
meter. Commands go to ``…/<meter>/cmd`` with a response topic, correlation data and a message
expiry; results are matched by correlation data, or by ``(meter id, sequence)`` when a meter
answers without it. Reads (snapshot, events, profile, last result) are MQTT 5
request/response on ``…/req`` and ``…/reply``.

Why paho driven directly here while the meter agents use aiomqtt: the head-end's side carries
the fleet's whole message rate on one connection, acknowledges a QoS 1 message only once the
sink holds it, and reads the socket in bursts; this bridge controls all three, and
``bench/mqtt_ingest.py`` measures the ingest on it at 0.9-1.0x a bare paho subscriber. An agent
carries one meter's trickle, where aiomqtt's plain async API is the simpler tool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import secrets
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

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
    CONTENT_TYPE,
    DEFAULT_PREFIX,
    MAX_REPLY_ITEMS,
    SCHEMA_PROPERTY,
    SCHEMA_PROPERTY_VALUE,
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

log = logging.getLogger(__name__)

CleanStart = Literal["always", "never", "first"]
_CLEAN_START: dict[CleanStart, Any] = {
    "always": True,
    "never": False,
    "first": mqtt.MQTT_CLEAN_START_FIRST_ONLY,
}
R = TypeVar("R")
_READ_BURST = 64
# paho's socket callbacks, each wired to the method of the same name with a leading underscore
_SOCKET_CALLBACKS = (
    "on_socket_open",
    "on_socket_close",
    "on_socket_register_write",
    "on_socket_unregister_write",
)


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]


def publish_properties(
    *,
    correlation: bytes | None = None,
    response_topic: str | None = None,
    expiry: int | None = None,
    user: Iterable[tuple[str, str]] = (),
) -> Properties:
    """The MQTT 5 PUBLISH properties of the v1 scheme: schema user property, JSON content type,
    UTF-8 payload indicator, and the request/response and expiry properties when given."""
    props = _properties(PacketTypes.PUBLISH)
    props.PayloadFormatIndicator = 1
    props.ContentType = CONTENT_TYPE
    props.UserProperty = [(SCHEMA_PROPERTY, SCHEMA_PROPERTY_VALUE), *user]
    if correlation is not None:
        props.CorrelationData = correlation
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if expiry is not None:
        props.MessageExpiryInterval = expiry
    return props


class _TlsContext(ssl.SSLContext):
    """A client context that remembers the last socket it wrapped: paho leaves that socket open
    when the TLS handshake fails, so the connection closes it."""

    last_socket: ssl.SSLSocket | None = None

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock = super().wrap_socket(*args, **kwargs)
        self.last_socket = sock
        return sock


def tls_context(settings: BrokerSettings) -> ssl.SSLContext | None:
    """The client TLS context of ``settings``: TLS 1.2 or later, the broker's certificate
    verified against ``ca_file`` (or the system's trust store) and its host name checked."""
    if not settings.tls:
        return None
    context = _TlsContext(ssl.PROTOCOL_TLS_CLIENT)
    if settings.ca_file:
        context.load_verify_locations(settings.ca_file)
    else:
        context.load_default_certs()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _tls_pending(sock: Any) -> bool:
    pending = getattr(sock, "pending", None)
    return pending is not None and int(pending()) > 0


@dataclass(frozen=True, slots=True)
class Incoming:
    """A message as received; ``generation`` names the connection it came on (for acks)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    generation: int
    properties: Any = field(default=None, repr=False)  # paho Properties, read through the helpers

    def user_properties(self, name: str) -> list[str]:
        """The values of the user property ``name`` (MQTT 5 allows it more than once)."""
        pairs = getattr(self.properties, "UserProperty", None) or ()
        return [str(value) for key, value in pairs if key == name]

    @property
    def correlation_data(self) -> bytes | None:
        value = getattr(self.properties, "CorrelationData", None)
        return bytes(value) if value is not None else None

    @property
    def response_topic(self) -> str | None:
        value = getattr(self.properties, "ResponseTopic", None)
        return str(value) if value is not None else None


@dataclass(slots=True)
class ConnectionStats:
    connects: int = 0
    disconnects: int = 0
    last_error: str = ""


class MqttConnection:
    """An MQTT 5 client connection driven by the running asyncio loop, reconnecting on loss.

    ``subscriptions`` are (re)subscribed at QoS 1 on every connection; ``on_message`` runs in
    the loop for each message and must not block. With ``manual_ack`` a QoS 1 message is
    acknowledged only by :meth:`ack`. ``clean_start`` "never" plus ``session_expiry`` makes a
    persistent session: the broker keeps the subscriptions and queues messages while away.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        client_id: str,
        subscriptions: Sequence[str] = (),
        on_message: Callable[[Incoming], None] | None = None,
        clean_start: CleanStart = "always",
        session_expiry: int = 0,
        receive_maximum: int | None = None,
        manual_ack: bool = False,
        backoff: tuple[float, float] = (0.1, 5.0),
        connect_timeout: float = 10.0,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.subscriptions = tuple(subscriptions)
        self.on_message = on_message
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self.receive_maximum = receive_maximum
        self.manual_ack = manual_ack
        self.backoff = backoff
        self.connect_timeout = connect_timeout
        self.stats = ConnectionStats()
        self.connected = asyncio.Event()
        self.generation = 0
        self._client: mqtt.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._runner: asyncio.Task[None] | None = None
        self._misc: asyncio.Task[None] | None = None
        self._fd: int | None = None
        self._packets = 0  # PUBLISH and PUBACK packets received, to tell a read from no read
        self._tls: ssl.SSLContext | None = None
        self._connack: asyncio.Future[ReasonCode] | None = None
        self._lost: asyncio.Future[None] | None = None
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._closing = False

    @property
    def closing(self) -> bool:
        return self._closing

    # -- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect; raises LinkClosed when the first connection fails (refused, bad password)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._client = self._make_client()
        first: asyncio.Future[None] = self._loop.create_future()
        self._runner = self._loop.create_task(self._run(first), name=f"mqtt {self.client_id}")
        try:
            await first
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        self._closing = True
        client, lost = self._client, self._lost
        if client is not None and lost is not None and self.connected.is_set():
            client.disconnect()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await asyncio.shield(lost)
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        if self._misc is not None:
            self._misc.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._misc
            self._misc = None
        self._drop_socket()  # when closed while connecting, or the broker never answered
        self._fail_pending(LinkClosed("the MQTT connection was closed"))
        self.connected.clear()
        if client is not None:
            # paho closes its socket again when the client is collected, possibly after the
            # loop is gone and in another thread: from now on that is none of this object's
            for name in _SOCKET_CALLBACKS:
                setattr(client, name, None)

    async def __aenter__(self) -> MqttConnection:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def wait_connected(self, timeout: float) -> None:
        """Return once connected; LinkClosed if not connected within ``timeout``."""
        if self.connected.is_set():
            return
        try:
            async with asyncio.timeout(timeout):
                await self.connected.wait()
        except TimeoutError:
            raise LinkClosed(
                f"not connected to {self.settings.url()}: {self.stats.last_error or 'no answer'}"
            ) from None

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=self.manual_ack,
            reconnect_on_failure=False,
        )
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        if self.settings.username:
            client.username_pw_set(self.settings.username, self.settings.password)
        self._tls = tls_context(self.settings)
        if self._tls is not None:
            client.tls_set_context(self._tls)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        for name in _SOCKET_CALLBACKS:
            setattr(client, name, getattr(self, f"_{name}"))
        return client

    def _connect_properties(self) -> Properties:
        props = _properties(PacketTypes.CONNECT)
        if self.session_expiry:
            props.SessionExpiryInterval = self.session_expiry
        if self.receive_maximum:
            props.ReceiveMaximum = self.receive_maximum
        return props

    def _blocking_connect(self) -> None:
        """Runs in an executor thread: paho's connect resolves, connects and handshakes (TLS)."""
        assert self._client is not None
        try:
            self._client.connect(
                self.settings.host,
                self.settings.port,
                self.settings.keepalive,
                clean_start=_CLEAN_START[self.clean_start],
                properties=self._connect_properties(),
            )
            sock = self._client.socket()
            if isinstance(sock, socket.socket):  # small packets, no Nagle delay
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            if isinstance(self._tls, _TlsContext) and self._tls.last_socket is not None:
                self._tls.last_socket.close()
                self._tls.last_socket = None
            raise

    async def _run(self, first: asyncio.Future[None]) -> None:
        low, high = self.backoff
        delay = low
        while not self._closing:
            error = await self._connect_once(first)
            if error is None:
                delay = low
            else:
                self.stats.last_error = error
                if not first.done():
                    first.set_exception(LinkClosed(error))
                    return
                log.warning("MQTT %s: %s; retrying in %.1f s", self.client_id, error, delay)
            if self.closing:
                break
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, high)

    async def _connect_once(self, first: asyncio.Future[None]) -> str | None:
        """One connection: None after it was up and went down, else why it never came up."""
        assert self._loop is not None
        assert self._client is not None
        self._connack = self._loop.create_future()
        self._lost = self._loop.create_future()
        lost = self._lost
        try:
            await self._loop.run_in_executor(None, self._blocking_connect)
        except (OSError, ssl.SSLError, ValueError) as exc:
            return f"cannot connect to {self.settings.url()}: {exc}"
        try:
            async with asyncio.timeout(self.connect_timeout):
                waiting: set[asyncio.Future[Any]] = {self._connack, lost}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            self._drop_socket()
            return f"no CONNACK from {self.settings.url()} within {self.connect_timeout} s"
        if not self._connack.done():
            return f"{self.settings.url()} closed the connection before accepting it"
        reason = self._connack.result()
        if reason.is_failure:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await lost
            return f"{self.settings.url()} refused {self.settings.username!r}: {reason}"
        self.generation += 1
        self.stats.connects += 1
        self.connected.set()
        if not first.done():
            first.set_result(None)
        log.info("MQTT %s connected to %s", self.client_id, self.settings.url())
        try:
            await lost
        finally:
            self.connected.clear()
        self.stats.disconnects += 1
        if not self._closing:
            log.warning("MQTT %s lost its connection", self.client_id)
        return None

    def _drop_socket(self) -> None:
        """Close the socket without the protocol's goodbye (paho's own close of it later is
        recognised by its closed descriptor and ignored)."""
        sock = self._client.socket() if self._client is not None else None
        if self._loop is not None:
            self._unwatch_socket()
        if sock is not None:
            sock.close()

    def _fail_pending(self, exc: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(exc)

    # -- publishing and acknowledging -------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> asyncio.Future[None]:
        """Queue a message; the future resolves when the broker acknowledged it (QoS 1) or it
        was written (QoS 0). A QoS 1 message published while disconnected is sent after the
        reconnection."""
        client, loop = self._client, self._loop
        if client is None or loop is None or self._closing:
            raise LinkClosed("the MQTT connection is closed")
        try:
            info = client.publish(topic, payload, qos, retain, properties)
        except ValueError as exc:
            raise LinkError(f"cannot publish to {topic!r}: {exc}") from exc
        future: asyncio.Future[None] = loop.create_future()
        if info.rc == mqtt.MQTT_ERR_SUCCESS or (info.rc == mqtt.MQTT_ERR_NO_CONN and qos > 0):
            if qos == 0 or info.is_published():
                future.set_result(None)
            else:
                self._pending[info.mid] = future
            return future
        raise LinkClosed(f"cannot publish to {topic!r}: {mqtt.error_string(info.rc)}")

    def ack(self, message: Incoming) -> None:
        """Acknowledge a QoS 1 message (manual_ack). An ack for a message of an earlier
        connection is not sent: the broker delivers that message again."""
        client = self._client
        if (
            self.manual_ack
            and message.qos
            and client is not None
            and message.generation == self.generation
            and self.connected.is_set()
        ):
            client.ack(message.mid, message.qos)

    # -- paho callbacks (all run in the loop thread, except socket open/register from connect) ---

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not reason_code.is_failure and self.subscriptions:
            options = SubscribeOptions(
                qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB
            )
            client.subscribe([(topic, options) for topic in self.subscriptions])
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(reason_code)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self.stats.last_error = str(reason_code)
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        refused = [
            topic
            for topic, code in zip(self.subscriptions, reason_codes, strict=False)
            if code.is_failure
        ]
        if refused:
            self.stats.last_error = f"subscription refused: {', '.join(refused)}"
            log.error("MQTT %s: the broker refused subscriptions %s", self.client_id, refused)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._packets += 1
        future = self._pending.pop(mid, None)
        if future is None or future.done():
            return
        if reason_code.is_failure:
            future.set_exception(LinkError(f"the broker refused a publish: {reason_code}"))
        else:
            future.set_result(None)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._packets += 1
        if self.on_message is None:
            return
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = bytes(message._topic).decode("utf-8", "replace")
        incoming = Incoming(
            topic,
            bytes(message.payload),
            message.qos,
            bool(message.retain),
            message.mid,
            self.generation,
            message.properties,
        )
        try:
            self.on_message(incoming)
        except Exception:
            log.exception("MQTT %s: the message handler failed on %s", self.client_id, topic)

    def _in_loop(self, func: Callable[..., object], *args: Any) -> None:
        loop = self._loop
        assert loop is not None
        if loop.is_closed():
            return  # paho closing a socket late (its __del__, in any thread): nothing to watch
        if threading.get_ident() == self._loop_thread:
            func(*args)
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed between check and call
                loop.call_soon_threadsafe(func, *args)

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._watch_socket, sock.fileno())

    def _watch_socket(self, fd: int) -> None:
        assert self._loop is not None
        self._unwatch_socket()
        self._fd = fd
        self._loop.add_reader(fd, self._readable)
        if self._misc is None or self._misc.done():
            self._misc = self._loop.create_task(self._misc_loop())

    def _readable(self) -> None:
        client = self._client
        if client is None:
            return
        try:
            # paho reads one packet per call: read on while packets keep coming, so that a
            # busy connection costs one pass of the event loop per burst, not per message
            for _ in range(_READ_BURST):
                before = self._packets
                if client.loop_read() != mqtt.MQTT_ERR_SUCCESS or self._packets == before:
                    break
            # TLS may hold decrypted bytes the selector does not see
            while _tls_pending(client.socket()):
                client.loop_read()
        except Exception:
            log.exception("MQTT %s: reading failed", self.client_id)
            client.disconnect()

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._socket_closed, sock.fileno())

    def _socket_closed(self, fd: int) -> None:
        if fd < 0 or fd != self._fd:
            return  # a socket this connection had already let go
        self._unwatch_socket()
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def _unwatch_socket(self) -> None:
        assert self._loop is not None
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
            self._fd = None

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._watch_writable, sock.fileno())

    def _watch_writable(self, fd: int) -> None:
        assert self._loop is not None
        if fd == self._fd:
            self._loop.add_writer(fd, self._writable)

    def _writable(self) -> None:
        client = self._client
        if client is None:
            return
        try:
            client.loop_write()
        except Exception:
            log.exception("MQTT %s: writing failed", self.client_id)
            client.disconnect()

    def _on_socket_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._unwatch_writable, sock.fileno())

    def _unwatch_writable(self, fd: int) -> None:
        assert self._loop is not None
        if fd == self._fd:
            self._loop.remove_writer(fd)

    async def _misc_loop(self) -> None:
        """Keep-alive pings and time-outs: paho's loop_misc, each second while a socket is open."""
        client = self._client
        while client is not None:
            if client.loop_misc() != mqtt.MQTT_ERR_SUCCESS:
                return
            await asyncio.sleep(1.0)


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
            if kind is TopicKind.CMD_RESULT:
                self._on_result(meter_id, message)
            elif kind is TopicKind.REPLY:
                self._on_reply(meter_id, message)
        except DecodeError as exc:
            self.malformed += 1
            log.warning("MQTT link: ignoring a malformed answer on %s: %s", message.topic, exc)

    def _on_result(self, meter_id: str, message: Incoming) -> None:
        payload = decode_result(message.payload)
        if payload.meter_id != meter_id:
            raise DecodeError(f"a result of {payload.meter_id} on {meter_id}'s topic")
        correlation = message.correlation_data
        future = self._results_by_correlation.get(correlation) if correlation else None
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
        reply = decode_reply(message.payload)
        if reply.meter_id != meter_id:
            raise DecodeError(f"a reply of {reply.meter_id} on {meter_id}'s topic")
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

    async def execute(
        self, envelope: CommandEnvelope, timeout: float = 5.0, *, expiry: int | None = None
    ) -> CommandResult:
        """Publish the command and return the meter's result for its sequence number.

        The command expires on the broker after ``expiry`` seconds (default: ``timeout``
        rounded up): an offline meter that returns later does not execute it then. When no
        result arrives, the meter is asked for its last result before giving up (the result
        may have been lost while the command was executed). Re-sending the same envelope is
        always safe: the meter executes a sequence number at most once.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        check = min(1.0, timeout / 4)
        meter_id, key = envelope.meter_id, (envelope.meter_id, envelope.sequence)
        correlation = secrets.token_bytes(16)
        answer: asyncio.Future[CommandResult] = loop.create_future()
        self._results_by_correlation[correlation] = answer
        self._results_by_sequence.setdefault(key, answer)
        try:
            await self.connection.wait_connected(max(deadline - check - loop.time(), 0.01))
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
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline - check):
                    return await answer
            try:
                reply = await self.request(
                    LastResultRequest(meter_id=meter_id), max(deadline - loop.time(), 0.05)
                )
            except LinkTimeout:
                reply = None
            if isinstance(reply, LastResultReply) and reply.result.sequence == envelope.sequence:
                return reply.result.to_result()
            raise LinkTimeout(
                f"no result from {meter_id} for command {envelope.sequence} within {timeout} s"
            )
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
            except TimeoutError:
                raise LinkTimeout(
                    f"{meter_id} did not answer a {type(request).__name__} within {timeout} s"
                ) from None
        finally:
            self._replies.pop(correlation, None)
        if isinstance(reply, ErrorReply):
            raise LinkError(f"{meter_id} could not answer: {reply.error}")
        return reply


class MqttMeterLink:
    """The MeterLink of one meter over a shared :class:`MqttLinkHub`."""

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

    async def last_result(self) -> CommandResult:
        reply = await self._ask(LastResultRequest(meter_id=self.meter_id), LastResultReply)
        return reply.result.to_result()

    async def execute(self, envelope: CommandEnvelope, timeout: float = 5.0) -> CommandResult:
        if envelope.meter_id != self.meter_id:
            raise LinkError(f"an envelope for {envelope.meter_id} on the link of {self.meter_id}")
        return await self.hub.execute(envelope, timeout)

    async def close(self) -> None:
        """Nothing to release: the hub owns the connection."""


# -- opening a link from an endpoint string -------------------------------------------------------

_shared_hubs: dict[tuple[int, BrokerSettings, str], _SharedHub] = {}


@dataclass
class _SharedHub:
    starting: asyncio.Task[MqttLinkHub]
    users: int = 0


async def _started_hub(settings: BrokerSettings, topics: TopicScheme) -> MqttLinkHub:
    hub = MqttLinkHub(settings, topics)
    await hub.start()
    return hub


async def shared_hub(settings: BrokerSettings, topics: TopicScheme) -> MqttLinkHub:
    """The hub this event loop shares for ``settings`` and ``topics``, started on first use;
    give it back with :func:`release_hub` (the last user's release closes it)."""
    loop = asyncio.get_running_loop()
    key = (id(loop), settings, topics.prefix)
    entry = _shared_hubs.get(key)
    if entry is None:
        entry = _shared_hubs[key] = _SharedHub(loop.create_task(_started_hub(settings, topics)))
    entry.users += 1
    try:
        return await asyncio.shield(entry.starting)
    except BaseException:
        await _release(key, entry)
        raise


async def _release(key: tuple[int, BrokerSettings, str], entry: _SharedHub) -> None:
    entry.users -= 1
    if entry.users > 0 or _shared_hubs.get(key) is not entry:
        return
    del _shared_hubs[key]
    if entry.starting.done() and not entry.starting.cancelled():
        if entry.starting.exception() is None:
            await entry.starting.result().close()
    else:
        entry.starting.cancel()


async def release_hub(hub: MqttLinkHub) -> None:
    loop_id = id(asyncio.get_running_loop())
    for key, entry in list(_shared_hubs.items()):
        starting = entry.starting
        if (
            key[0] == loop_id
            and starting.done()
            and not starting.cancelled()
            and starting.exception() is None
            and starting.result() is hub
        ):
            await _release(key, entry)
            return


class _SharedMeterLink(MqttMeterLink):
    """A link opened from an endpoint: closing it gives its share of the hub back."""

    _released = False

    async def close(self) -> None:
        if not self._released:
            self._released = True
            await release_hub(self.hub)


async def open_mqtt_link(endpoint: Endpoint, options: LinkOptions) -> MeterLink:
    """``mqtt://user:password@host:port/<meter-id>?prefix=phs&keepalive=30&timeout=5`` (or
    ``mqtts://…&ca=/path/ca.pem``): a link over the connection this process shares for that
    broker and prefix. The meter may be offline: commands then wait on the broker until they
    expire."""
    endpoint.check_params({"prefix", "ca", "keepalive"})
    parts = urlsplit(endpoint.text)
    meter_id = endpoint.path.strip("/") or options.meter_id
    if not meter_id:
        raise ConfigError(f"{endpoint.text}: the path names the meter, e.g. mqtt://host/MTR-0001")
    try:
        topics = TopicScheme(endpoint.param("prefix") or DEFAULT_PREFIX)
        topics.meter_root(meter_id)
    except ValidationError as exc:
        raise ConfigError(f"{endpoint.text}: {exc}") from exc
    tls = endpoint.scheme == "mqtts"
    settings = BrokerSettings(
        host=endpoint.host,
        port=endpoint.port or (8883 if tls else 1883),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=tls,
        ca_file=endpoint.param("ca"),
        keepalive=endpoint.int_param("keepalive", 30, 5, 65535),
    )
    hub = await shared_hub(settings, topics)
    return _SharedMeterLink(hub, meter_id, endpoint.float_param("timeout", options.timeout))
