"""The head-end's MQTT connection: one paho client driven by the asyncio loop.

:class:`MqttConnection` is the adapter: paho's socket callbacks are wired to the event loop (no
network thread), it reconnects with back-off, re-subscribes on every connection, optionally
acknowledges QoS 1 messages only when the application says so (``manual_ack``: the broker's
in-flight window then paces a slow consumer). The meter links (:mod:`headend.links.mqtt`) and
the ingest (:mod:`headend.ingest`) both run on it.

Foreign exceptions are translated in one place, :func:`map_mqtt_errors` (and
:func:`translate_mqtt_error` for an exception caught where it cannot be raised), into the
project's tree, each with its cause chained:

* a file the settings name that cannot be read (the CA file), or a CA file that is not a
  certificate -> :class:`~protocols.errors.ConfigError`;
* a refused or failed connection, a TLS handshake or certificate failure, a name that does not
  resolve -> :class:`~protocols.errors.LinkClosed`;
* a time-out -> :class:`~protocols.errors.LinkTimeout`;
* paho refusing an argument (a topic, a payload) -> :class:`~protocols.errors.ValidationError`.

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
import random
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from protocols.errors import (
    ConfigError,
    HesError,
    LinkClosed,
    LinkError,
    LinkTimeout,
    ValidationError,
)
from protocols.mqtt import CONTENT_TYPE, SCHEMA_PROPERTY, SCHEMA_PROPERTY_VALUE, BrokerSettings

log = logging.getLogger(__name__)

CleanStart = Literal["always", "never", "first"]
_CLEAN_START: dict[CleanStart, Any] = {
    "always": True,
    "never": False,
    "first": mqtt.MQTT_CLEAN_START_FIRST_ONLY,
}
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
    json_payload: bool = True,
) -> Properties:
    """The MQTT 5 PUBLISH properties of the v1 scheme: schema user property, JSON content type,
    UTF-8 payload indicator, and the request/response and expiry properties when given.

    ``json_payload=False`` leaves out the content type and the payload format indicator, for a
    payload that is not (or may not be) UTF-8 JSON, such as a dead letter's copy of bad bytes."""
    props = _properties(PacketTypes.PUBLISH)
    if json_payload:
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


def translate_mqtt_error(exc: BaseException, doing: str, *, setup: bool = False) -> HesError:
    """The project's error for a foreign exception raised while ``doing`` something (``setup``:
    while building the client from its settings, before any I/O); the exception is chained as
    the cause. A project error is returned as it is."""
    if isinstance(exc, HesError):
        return exc
    error: HesError
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
        error = ConfigError(f"{doing}: cannot read {exc.filename or 'a file'}: {exc.strerror}")
    elif isinstance(exc, ssl.SSLError) and setup:
        error = ConfigError(f"{doing}: not a usable certificate file: {exc}")
    elif isinstance(exc, TimeoutError):
        error = LinkTimeout(f"{doing}: timed out")
    elif isinstance(exc, OSError):  # refused, reset, unreachable, unresolvable, TLS failures
        error = LinkClosed(f"{doing}: {exc}")
    elif isinstance(exc, ValueError | TypeError):
        error = ValidationError(f"{doing}: {exc}")
    else:
        error = LinkError(f"{doing}: {exc}")
    error.__cause__ = exc
    return error


@contextlib.contextmanager
def map_mqtt_errors(doing: str, *, setup: bool = False) -> Iterator[None]:
    """Translate paho, ssl and socket exceptions raised inside the block (see the module's
    docstring); ``doing`` says what was being done, e.g. "connecting to mqtt://host:1883"."""
    try:
        yield
    except HesError:
        raise
    except Exception as exc:
        raise translate_mqtt_error(exc, doing, setup=setup) from exc


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
    """A message as received; ``generation`` names the connection it came on (for acks).

    The MQTT 5 properties the head-end reads are copied out of paho's ``Properties`` at
    receipt and the object is not kept: paho builds each one with about eighty lists and
    tuples of its own, and a message waiting for its acknowledgement (a burst being stored)
    would keep them all for the garbage collector to walk again and again."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    generation: int
    user_property_pairs: tuple[tuple[str, str], ...] = ()
    correlation_data: bytes | None = None
    response_topic: str | None = None

    def user_properties(self, name: str) -> list[str]:
        """The values of the user property ``name`` (MQTT 5 allows it more than once)."""
        return [value for key, value in self.user_property_pairs if key == name]

    @classmethod
    def of(cls, message: mqtt.MQTTMessage, topic: str, generation: int) -> Incoming:
        """The message paho received, with the properties the head-end reads."""
        properties = message.properties
        pairs = getattr(properties, "UserProperty", None) or ()
        correlation = getattr(properties, "CorrelationData", None)
        response = getattr(properties, "ResponseTopic", None)
        return cls(
            topic,
            bytes(message.payload),
            message.qos,
            bool(message.retain),
            message.mid,
            generation,
            tuple((str(key), str(value)) for key, value in pairs),
            bytes(correlation) if correlation is not None else None,
            str(response) if response is not None else None,
        )


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
        with map_mqtt_errors(f"setting up the connection to {self.settings.url()}", setup=True):
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
        except TimeoutError as exc:
            raise LinkClosed(
                f"not connected to {self.settings.url()}: {self.stats.last_error or 'no answer'}"
            ) from exc

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
                self.stats.last_error = str(error)
                if not first.done():
                    first.set_exception(error)
                    return
                log.warning("MQTT %s: %s; retrying in %.1f s", self.client_id, error, delay)
            if self.closing:
                break
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, high)

    async def _connect_once(self, first: asyncio.Future[None]) -> HesError | None:
        """One connection: None after it was up and went down, else why it never came up."""
        assert self._loop is not None
        assert self._client is not None
        self._connack = self._loop.create_future()
        self._lost = self._loop.create_future()
        lost = self._lost
        try:
            await self._loop.run_in_executor(None, self._blocking_connect)
        except Exception as exc:
            return translate_mqtt_error(exc, f"cannot connect to {self.settings.url()}")
        try:
            async with asyncio.timeout(self.connect_timeout):
                waiting: set[asyncio.Future[Any]] = {self._connack, lost}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            self._drop_socket()
            return LinkClosed(
                f"no CONNACK from {self.settings.url()} within {self.connect_timeout} s"
            )
        if not self._connack.done():
            return LinkClosed(f"{self.settings.url()} closed the connection before accepting it")
        reason = self._connack.result()
        if reason.is_failure:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await lost
            return LinkClosed(f"{self.settings.url()} refused {self.settings.username!r}: {reason}")
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
        with map_mqtt_errors(f"cannot publish to {topic!r}"):
            info = client.publish(topic, payload, qos, retain, properties)
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
        incoming = Incoming.of(message, topic, self.generation)
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
