"""Modbus TCP and Modbus RTU implementations of :class:`~headend.links.base.MeterLink`.

Both run on pymodbus' async clients and the register map (:mod:`protocols.registermap`):

* a **channel** owns one pymodbus client (one TCP connection, or one serial port) and a lock,
  so one request at a time goes through it; the links to the unit ids behind one gateway share
  its channel, and the links to the meters of one multi-drop line share the line's
  (:class:`SerialLine`); a :class:`~headend.links.pool.LinkPool` owns both;
* every request has a time-out; a failed request drops the connection (a late answer can
  then never be taken for the next one) and is tried again after a back-off, within an
  optional total deadline of the operation (:class:`LinkSettings`);
* a command is never re-sent blindly: :meth:`ModbusLink.send_envelope` writes the command
  block and reads the result block in one request (function 23), and
  :func:`~headend.links.base.execute_confirmed` reads the result block before any resend;
* pymodbus, pyserial and socket exceptions are translated in one place,
  :func:`map_modbus_errors`: a time-out becomes :class:`~protocols.errors.LinkTimeout`, a
  refused, dropped or unopenable connection :class:`~protocols.errors.LinkClosed`, a serial
  URL pyserial does not take :class:`~protocols.errors.ConfigError`, and an exception response
  :class:`~protocols.errors.DeviceException` (with the Modbus exception code); nothing foreign
  leaks out;
* an answer pymodbus cannot decode (a PDU cut short, a byte count that disagrees with the
  frame) is not reported by pymodbus to the caller: its framer raises inside the protocol's
  ``data_received``, asyncio logs that at ERROR with a traceback ("Fatal error:
  protocol.data_received() call failed", logger ``asyncio``) and closes the connection, and the
  request would wait out its whole time-out. The channel watches the client's own
  ``trace_connect`` and ``trace_packet`` hooks instead: a connection lost while a request
  waits ends the request at once, as :class:`~protocols.errors.LinkCorrupt` when bytes of an
  answer had arrived (logged at WARNING with them), as
  :class:`~protocols.errors.LinkClosed` otherwise. The link frames nothing itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, TypeVar

import serial
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from headend.links.base import ConfirmedExecution, RetryPolicy
from protocols import registermap as rm
from protocols.commands import CommandEnvelope, CommandResult
from protocols.errors import (
    ConfigError,
    DecodeError,
    DeviceException,
    HesError,
    LinkClosed,
    LinkCorrupt,
    LinkError,
    LinkTimeout,
    ValidationError,
)
from protocols.readings import Event, MeterSnapshot, ProfileRow

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT: Final = 2.0
DEFAULT_RETRIES: Final = 3
DEFAULT_BACKOFF: Final = 0.05
MAX_BACKOFF: Final = 2.0
_MAX_PAGES: Final = 100_000  # bound on window pages in one range read
_FOREVER: Final = 2**64 - 2
_IDENT = rm.BLOCKS[rm.Block.IDENTIFICATION]
_PROFILE = rm.BLOCKS[rm.Block.PROFILE_WINDOW]
_EVENTS = rm.BLOCKS[rm.Block.EVENT_WINDOW]


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """Time-outs and retries of a link.

    ``timeout`` bounds one request (and the connection attempt); a failed request is tried up
    to ``retries`` more times, waiting ``backoff``, then twice as long each time, up to
    :data:`MAX_BACKOFF`, each wait spread by ±20 %. ``deadline``, when set, bounds one whole
    read, retries included (no retry starts that could not finish in time). A dropped answer
    costs a whole ``timeout`` (pymodbus notices it only then), so a deadline shorter than two
    time-outs leaves no room for retrying one.
    """

    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    backoff: float = DEFAULT_BACKOFF
    deadline: float | None = None

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ConfigError(f"a link time-out is positive, got {self.timeout!r}")
        if self.retries < 0 or self.backoff < 0:
            raise ConfigError("retries and back-off are not negative")
        if self.deadline is not None and not self.deadline > 0:
            raise ConfigError(f"a link deadline is positive, got {self.deadline!r}")

    @property
    def policy(self) -> RetryPolicy:
        return RetryPolicy(backoff=self.backoff, max_backoff=max(MAX_BACKOFF, self.backoff))

    def delay(self, attempt: int) -> float:
        return self.policy.delay(attempt, _rng)


_rng = random.Random()
_SHOWN_BYTES: Final = 32  # of an undecodable answer, in the error and the log line


@dataclass(frozen=True, slots=True)
class ClientHooks:
    """The pymodbus client's ``trace_packet`` and ``trace_connect`` callbacks, which a
    :class:`Channel` gives every client it makes."""

    trace_packet: Callable[[bool, bytes], bytes]
    trace_connect: Callable[[bool], None]


ClientFactory = Callable[[float, ClientHooks], Any]

#: Modbus exception codes a meter (or the gateway in front of it) may answer
EXCEPTION_NAMES: Final[dict[int, str]] = {
    0x01: "illegal function",
    0x02: "illegal data address: unmapped or read-only",
    0x03: "illegal data value",
    0x04: "device failure",
    0x06: "device busy",
    0x0A: "gateway path unavailable",
    0x0B: "no meter answers this unit id",
}


def modbus_error(name: str, timeout: float, exc: BaseException) -> HesError | None:
    """The project's error for a pymodbus, pyserial or socket exception (see the module's
    docstring), naming the channel ``name``; None for anything else (the project's own errors,
    cancellation, bugs), which goes on as it is."""
    if isinstance(exc, HesError):
        return None
    if isinstance(exc, ModbusIOException | TimeoutError):
        return LinkTimeout(f"{name}: no answer within {timeout:g} s")
    if isinstance(exc, ConnectionException):
        return LinkClosed(f"{name}: connection lost")
    if isinstance(exc, OSError | serial.SerialException):
        return LinkClosed(f"{name}: {exc}")
    if isinstance(exc, ModbusException):
        return LinkError(f"{name}: {exc}")
    if isinstance(exc, ValueError):  # pyserial refusing a URL or a setting
        return ConfigError(f"{name}: {exc}")
    return None


@contextlib.contextmanager
def map_modbus_errors(name: str, timeout: float) -> Iterator[None]:
    """Translate pymodbus, pyserial and socket exceptions raised inside the block into the
    project's tree (:func:`modbus_error`), naming the channel ``name``."""
    try:
        yield
    except Exception as exc:
        error = modbus_error(name, timeout, exc)
        if error is None:
            raise
        raise error from exc


class Channel:
    """One pymodbus client (one connection or one serial port) used one request at a time."""

    def __init__(self, name: str, make_client: ClientFactory) -> None:
        self.name = name
        self._make_client = make_client
        self._client: Any = None
        self.lock = asyncio.Lock()
        self.connects = 0  # connections opened, over the channel's life
        self.corrupt = 0  # answers that did not decode, over the channel's life
        self._hooks = ClientHooks(self._trace_packet, self._trace_connect)
        self._waiting: asyncio.Task[Any] | None = None  # the task a request waits in
        self._dropped = False  # the connection dropped while that request waited
        self._received = b""  # what arrived since the waiting request went out

    @property
    def connected(self) -> bool:
        return self._client is not None and bool(self._client.connected)

    async def request(self, timeout: float, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call the pymodbus client's ``method(*args, **kwargs)`` once, connecting first if
        need be; its exception response becomes DeviceException. Any failure, and a caller
        giving up (cancellation), drops the connection.

        The call is awaited in the caller's task, and a drop of the connection meanwhile (see
        the module's docstring) cancels that task: that cancellation (only that one: a
        caller's own or a time-out's goes on) ends the request as LinkCorrupt when part of an
        answer had come, else as LinkClosed."""
        async with self.lock:
            try:
                client = self._client
                if client is None or not client.connected:
                    client = await self._connect(timeout)
                call = getattr(client, method)(*args, **kwargs)
                task = asyncio.current_task()
                self._waiting, self._received, self._dropped = task, b"", False
                lost = False
                try:
                    response = await call
                except asyncio.CancelledError:
                    if task is None or not self._dropped or task.uncancel() > 0:
                        raise
                    lost = True
                finally:
                    self._waiting = None
                if lost:
                    raise self._lost_answer()
                if self._dropped and task is not None:
                    task.uncancel()  # the answer was complete: pymodbus took the cancellation
            except BaseException as exc:
                self._drop()
                error = modbus_error(self.name, timeout, exc)
                if error is None:
                    raise
                raise error from exc
        if response.isError():
            code = int(getattr(response, "exception_code", 0))
            meaning = EXCEPTION_NAMES.get(code, "unknown")
            raise DeviceException(f"{self.name}: Modbus exception {code:02X} ({meaning})", code)
        return response

    def _lost_answer(self) -> LinkError:
        """The error of a request whose connection dropped while it waited."""
        if not self._received:
            return LinkClosed(f"{self.name}: connection lost during the request")
        self.corrupt += 1
        shown = self._received[:_SHOWN_BYTES].hex(" ")
        more = " ..." if len(self._received) > _SHOWN_BYTES else ""
        log.warning("%s: an answer that does not decode: %s%s", self.name, shown, more)
        return LinkCorrupt(
            f"{self.name}: an answer that does not decode ({len(self._received)} bytes: "
            f"{shown}{more}); the connection was dropped"
        )

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if not sending and self._waiting is not None:
            self._received = bytes(data)  # pymodbus hands over all it has not used yet
        return data

    def _trace_connect(self, connected: bool) -> None:
        if not connected and self._waiting is not None and not self._dropped:
            self._dropped = True
            self._waiting.cancel()

    async def _connect(self, timeout: float) -> Any:
        if self.connected:
            return self._client
        self._drop()
        client = self._make_client(timeout, self._hooks)
        try:
            with map_modbus_errors(f"cannot connect to {self.name}", timeout):
                ok = await client.connect()
        except HesError:
            client.close()
            raise
        if not ok:
            client.close()
            raise LinkClosed(f"cannot connect to {self.name}")
        self._client = client
        self.connects += 1
        log.debug("connected to %s", self.name)
        return client

    def _drop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def close(self) -> None:
        self._drop()


class SerialLine:
    """One serial port (a device path or a pyserial URL) shared by the meters on its bus.

    Every link to a meter on the line uses the line's one channel, so one request at a time is
    on the wire. A :class:`~headend.links.pool.LinkPool` keeps one line per port; each link
    acquires the line and releases it on close, and the last release closes the port (the
    next request opens it again).
    """

    def __init__(
        self,
        port: str,
        *,
        baudrate: int = 9600,
        parity: str = "N",
        stopbits: int = 1,
        bytesize: int = 8,
    ) -> None:
        if parity.upper() not in ("N", "E", "O"):
            raise ConfigError(f"parity is N, E or O, got {parity!r}")
        if stopbits not in (1, 2) or bytesize not in (7, 8) or baudrate <= 0:
            raise ConfigError("stop bits are 1 or 2, byte size 7 or 8, baud rate positive")
        self.port = port
        self.settings = (baudrate, parity.upper(), stopbits, bytesize)
        self.users = 0

        def make_client(timeout: float, hooks: ClientHooks) -> Any:
            return AsyncModbusSerialClient(
                port,
                baudrate=baudrate,
                parity=parity.upper(),
                stopbits=stopbits,
                bytesize=bytesize,
                timeout=timeout,
                retries=0,
                reconnect_delay=0,
                trace_packet=hooks.trace_packet,
                trace_connect=hooks.trace_connect,
            )

        self.channel = Channel(f"rtu:{port}", make_client)

    def acquire(self) -> None:
        self.users += 1

    def release(self) -> None:
        self.users = max(self.users - 1, 0)
        if self.users == 0:
            self.channel.close()

    def close(self) -> None:
        self.users = 0
        self.channel.close()


class ModbusLink(ConfirmedExecution):
    """A :class:`~headend.links.base.MeterLink` to one meter (one unit id) over a channel.

    ``meter_id`` is read from the meter's identification block on the first request (or
    :meth:`connect`); when the caller names the meter it expects, another meter at the endpoint
    is an error.
    """

    def __init__(
        self,
        channel: Channel,
        unit: int,
        *,
        meter_id: str | None = None,
        settings: LinkSettings | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        if not 1 <= unit <= 247:
            raise ConfigError(f"a Modbus unit id is 1..247, got {unit}")
        self.channel = channel
        self.unit = unit
        self.settings = settings or LinkSettings()
        self.meter_id = meter_id or ""
        self._expected = meter_id
        self.identification: rm.Identification | None = None
        self.word_order: rm.WordOrder = "big"
        self._on_close = on_close
        self._closed = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.channel.name}, unit={self.unit})"

    # -- requests ---------------------------------------------------------------------------------

    async def _once(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise LinkClosed(f"{self!r} is closed")
        return await self.channel.request(self.settings.timeout, method, *args, **kwargs)

    async def _retried(
        self,
        attempt_once: Callable[[], Awaitable[T]],
        failed: LinkError | None = None,
        deadline: float | None = None,
    ) -> T:
        """``attempt_once()`` retried with back-off after time-outs and dropped connections,
        until ``deadline`` (loop time; default: the settings' deadline from now, if any).
        ``failed`` is the error of a first attempt already made. A device exception (the meter
        answered) is not retried."""
        loop = asyncio.get_running_loop()
        if deadline is None and self.settings.deadline is not None:
            deadline = loop.time() + self.settings.deadline
        attempt = 0
        error = failed
        while True:
            if error is not None:
                delay = self.settings.delay(attempt)
                if self._closed or attempt >= self.settings.retries:
                    raise error
                if deadline is not None and loop.time() + delay >= deadline:
                    raise LinkTimeout(
                        f"{self!r}: no answer within the deadline "
                        f"({self.settings.deadline:g} s): {error}"
                    ) from error
                log.info("%r: %s; retrying in %.2f s", self, error, delay)
                attempt += 1
                await asyncio.sleep(delay)
            try:
                async with asyncio.timeout_at(deadline):
                    return await attempt_once()
            except DeviceException:
                raise
            except TimeoutError as exc:
                raise LinkTimeout(
                    f"{self!r}: no answer within the deadline ({self.settings.deadline:g} s)"
                ) from exc
            except LinkError as exc:
                error = exc

    async def read_registers(self, table: rm.Table, address: int, count: int) -> list[int]:
        """``count`` registers of ``table`` from ``address`` (one request, retried within the
        time-out)."""
        method = "read_input_registers" if table is rm.Table.INPUT else "read_holding_registers"
        deadline = None
        if self.settings.deadline is not None:
            deadline = asyncio.get_running_loop().time() + self.settings.deadline
        try:  # the common case without the retry machinery: polls are the hot path
            if self._closed:
                raise LinkClosed(f"{self!r} is closed")
            request = self.channel.request(
                self.settings.timeout, method, address, count=count, device_id=self.unit
            )
            if deadline is None:
                response = await request
            else:
                async with asyncio.timeout_at(deadline):
                    response = await request
        except DeviceException:
            raise
        except TimeoutError as exc:
            raise LinkTimeout(
                f"{self!r}: no answer within the deadline ({self.settings.deadline:g} s)"
            ) from exc
        except LinkError as exc:
            response = await self._retried(
                partial(self._once, method, address, count=count, device_id=self.unit),
                exc,
                deadline,
            )
        return _registers(response, count)

    async def _write_read(
        self, write_address: int, values: Sequence[int], read_address: int, read_count: int
    ) -> list[int]:
        """One function-23 request: write, then read (one attempt)."""
        response = await self._once(
            "readwrite_registers",
            read_address=read_address,
            read_count=read_count,
            write_address=write_address,
            values=list(values),
            device_id=self.unit,
        )
        return _registers(response, read_count)

    # -- identification ---------------------------------------------------------------------------

    async def connect(self) -> rm.Identification:
        """Read the identification block (once): the meter id and its word order."""
        if self.identification is not None:
            return self.identification
        registers = await self.read_registers(rm.Table.INPUT, _IDENT.start, _IDENT.size)
        try:
            ident = rm.decode_identification(registers)
        except DecodeError as exc:
            raise LinkError(f"{self!r}: unreadable identification block: {exc}") from exc
        if ident.map_version != rm.MAP_VERSION:
            raise LinkError(
                f"{self!r}: register map version {ident.map_version}, "
                f"this head-end reads version {rm.MAP_VERSION}"
            )
        if self._expected and ident.meter_id != self._expected:
            raise LinkError(f"{self!r}: expected meter {self._expected}, found {ident.meter_id}")
        self.identification = ident
        self.meter_id = ident.meter_id
        self.word_order = ident.word_order
        return ident

    # -- MeterLink --------------------------------------------------------------------------------

    async def read_snapshot(self) -> MeterSnapshot:
        if self.identification is None:
            await self.connect()
        registers = await self.read_registers(rm.Table.INPUT, rm.SNAPSHOT_START, rm.SNAPSHOT_SIZE)
        try:
            return rm.decode_snapshot(registers, self.meter_id, self.word_order)
        except DecodeError as exc:
            raise LinkError(f"{self!r}: unreadable snapshot: {exc}") from exc

    async def read_profile(self, start: int, end: int) -> list[ProfileRow]:
        """Rows with ``start <= time <= end``, page by page through the profile window."""
        await self.connect()
        if start > end:
            return []
        order = self.word_order
        rows: list[ProfileRow] = []
        position = max(start, 0)
        for _ in range(_MAX_PAGES):
            values = rm.encode_value(rm.ROW["profile_start"], min(position, _FOREVER), order)
            registers = await self._retried(
                partial(self._write_read, _PROFILE.start, values, _PROFILE.start, _PROFILE.size)
            )
            try:
                shown, page = rm.decode_profile_window(registers, order)
            except DecodeError as exc:
                raise LinkError(f"{self!r}: unreadable profile window: {exc}") from exc
            if shown != min(position, _FOREVER):
                raise LinkError(f"{self!r}: the profile window moved (another master?)")
            rows += [row for row in page if row.time <= end]
            if len(page) < rm.PROFILE_WINDOW_ROWS or page[-1].time >= end:
                return rows
            position = page[-1].time + 1
        raise LinkError(f"{self!r}: more than {_MAX_PAGES} profile pages")

    async def read_events(self, since_seq: int, limit: int = 100) -> list[Event]:
        """Events with ``seq > since_seq``, oldest first, at most ``limit``."""
        await self.connect()
        order = self.word_order
        events: list[Event] = []
        position = max(since_seq, 0)
        for _ in range(_MAX_PAGES):
            if len(events) >= limit:
                break
            values = rm.encode_value(rm.ROW["event_since"], position, order)
            registers = await self._retried(
                partial(self._write_read, _EVENTS.start, values, _EVENTS.start, _EVENTS.size)
            )
            try:
                shown, page = rm.decode_event_window(registers, order)
            except DecodeError as exc:
                raise LinkError(f"{self!r}: unreadable event window: {exc}") from exc
            if shown != position:
                raise LinkError(f"{self!r}: the event window moved (another master?)")
            events += page
            if len(page) < rm.EVENT_WINDOW_ROWS:
                break
            position = page[-1].seq
        return events[:limit]

    async def read_settings(self) -> dict[str, Any]:
        """The settings block by row name (currency scale, limits, prices, ...)."""
        await self.connect()
        spec = rm.BLOCKS[rm.Block.SETTINGS]
        registers = await self.read_registers(rm.Table.HOLDING, spec.start, spec.size)
        try:
            return rm.decode_block(rm.Block.SETTINGS, registers, self.word_order)
        except DecodeError as exc:
            raise LinkError(f"{self!r}: unreadable settings block: {exc}") from exc

    async def read_last_result(self) -> CommandResult:
        """The result block: the meter's last command sequence and its result."""
        await self.connect()
        registers = await self.read_registers(rm.Table.HOLDING, rm.RESULT_START, rm.RESULT_SIZE)
        return self._decode_result(registers)

    def _decode_result(self, registers: list[int]) -> CommandResult:
        try:
            return rm.decode_result(registers, self.word_order)
        except DecodeError as exc:
            raise LinkError(f"{self!r}: unreadable result block: {exc}") from exc

    async def send_envelope(self, envelope: CommandEnvelope, timeout: float) -> CommandResult:
        """Write the command block and read the result block in one request (function 23),
        once. Raises DeviceException when the meter refuses the block itself (exception 03: not
        a well-formed command), LinkError when the answer is lost or shows another sequence."""
        async with asyncio.timeout(timeout):
            await self.connect()
        if envelope.meter_id != self.meter_id:
            raise ValidationError(
                f"the envelope is for meter {envelope.meter_id}, this link reaches {self.meter_id}"
            )
        try:
            block = rm.encode_command(envelope, self.word_order)
        except ValidationError as exc:
            raise ValidationError(f"the command does not fit the command block: {exc}") from exc
        try:
            async with asyncio.timeout(timeout):
                registers = await self._write_read(
                    rm.COMMAND_START, block, rm.RESULT_START, rm.RESULT_SIZE
                )
        except TimeoutError as exc:
            raise LinkTimeout(f"{self!r}: no answer within {timeout:g} s") from exc
        result = self._decode_result(registers)
        if result.sequence != envelope.sequence:
            raise LinkError(
                f"{self!r}: the result block shows sequence {result.sequence}, "
                f"not {envelope.sequence} (another master?)"
            )
        return result

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._on_close is not None:
            self._on_close()


class ModbusTcpLink(ModbusLink):
    """A meter over Modbus TCP: ``host``, ``port`` and the meter's unit id.

    ``channel`` is the gateway's connection, shared with the links to its other unit ids
    (:meth:`headend.links.pool.LinkPool.tcp_channel`); without one the link opens its own and
    closes it on close."""

    def __init__(
        self,
        host: str,
        port: int = 502,
        unit: int = 1,
        *,
        meter_id: str | None = None,
        settings: LinkSettings | None = None,
        channel: Channel | None = None,
    ) -> None:
        own = channel is None
        channel = channel or tcp_channel(host, port)
        super().__init__(
            channel,
            unit,
            meter_id=meter_id,
            settings=settings,
            on_close=channel.close if own else None,
        )
        self.host = host
        self.port = port


def tcp_channel(host: str, port: int) -> Channel:
    """A channel to the Modbus TCP server (or gateway) at ``host:port``."""

    def make_client(timeout: float, hooks: ClientHooks) -> Any:
        return AsyncModbusTcpClient(
            host,
            port=port,
            timeout=timeout,
            retries=0,
            reconnect_delay=0,
            trace_packet=hooks.trace_packet,
            trace_connect=hooks.trace_connect,
        )

    return Channel(f"tcp://{host}:{port}", make_client)


class ModbusRtuLink(ModbusLink):
    """A meter with unit id ``unit`` on a serial line shared with the other meters of its bus."""

    def __init__(
        self,
        line: SerialLine,
        unit: int,
        *,
        meter_id: str | None = None,
        settings: LinkSettings | None = None,
    ) -> None:
        line.acquire()
        super().__init__(
            line.channel, unit, meter_id=meter_id, settings=settings, on_close=line.release
        )
        self.line = line


def _registers(response: Any, count: int) -> list[int]:
    registers = getattr(response, "registers", None)
    if not isinstance(registers, list) or len(registers) != count:
        raise LinkError(f"expected {count} registers, the answer has {registers!r}")
    return registers
