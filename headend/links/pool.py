"""The connections a caller's links share, owned by that caller.

A :class:`LinkPool` keeps one TCP connection (:class:`~headend.links.modbus.Channel`) per
gateway ``host:port``, shared by the links to all its unit ids; one owner
(:class:`~headend.links.modbus.SerialLine`) per serial line; and one MQTT connection
(:class:`~headend.links.mqtt.MqttLinkHub`) per broker and topic prefix. Closing a link gives
nothing back; closing the pool closes every connection it opened. Whoever needs links makes a
pool and closes it: the CLI makes one per command, a service one for its life::

    async with LinkPool() as pool:
        link = await open_link("tcp://10.0.0.5:502/7", pool=pool)
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from headend.links.modbus import Channel, SerialLine, tcp_channel
from headend.links.mqtt import MqttLinkHub
from protocols.errors import ConfigError, LinkClosed
from protocols.mqtt import BrokerSettings, TopicScheme


class LinkPool:
    """The shared connections of one owner; use ``async with`` or call :meth:`close`."""

    def __init__(self) -> None:
        self._tcp: dict[tuple[str, int], Channel] = {}
        self._serial: dict[str, SerialLine] = {}
        self._hubs: dict[tuple[BrokerSettings, str], asyncio.Task[MqttLinkHub]] = {}
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise LinkClosed("the link pool is closed")

    def tcp_channel(self, host: str, port: int) -> Channel:
        """The one connection to the Modbus TCP gateway at ``host:port``."""
        self._check_open()
        key = (host.lower(), port)
        channel = self._tcp.get(key)
        if channel is None:
            channel = self._tcp[key] = tcp_channel(host, port)
        return channel

    def serial_line(
        self,
        port: str,
        *,
        baudrate: int = 9600,
        parity: str = "N",
        stopbits: int = 1,
        bytesize: int = 8,
    ) -> SerialLine:
        """The one owner of the serial line ``port``; ConfigError when it is already open with
        other settings."""
        self._check_open()
        line = self._serial.get(port)
        if line is None:
            line = SerialLine(
                port, baudrate=baudrate, parity=parity, stopbits=stopbits, bytesize=bytesize
            )
            self._serial[port] = line
        elif line.settings != (baudrate, parity.upper(), stopbits, bytesize):
            raise ConfigError(f"{port} is already open with other settings {line.settings}")
        return line

    async def mqtt_hub(self, settings: BrokerSettings, topics: TopicScheme) -> MqttLinkHub:
        """The one connection to the broker of ``settings`` for ``topics``, started on first
        use (callers asking at the same time wait for the same start)."""
        self._check_open()
        key = (settings, topics.prefix)
        starting = self._hubs.get(key)
        if starting is None:
            starting = asyncio.get_running_loop().create_task(_started(settings, topics))
            self._hubs[key] = starting
        try:
            return await asyncio.shield(starting)
        except BaseException:
            if starting.done() and self._hubs.get(key) is starting:
                del self._hubs[key]  # a failed start: the next caller tries again
            raise

    @property
    def connections(self) -> int:
        """Connections held open now (TCP, serial and MQTT)."""
        hubs = sum(
            1
            for task in self._hubs.values()
            if task.done() and not task.cancelled() and task.exception() is None
        )
        return (
            sum(1 for channel in self._tcp.values() if channel.connected)
            + sum(1 for line in self._serial.values() if line.channel.connected)
            + hubs
        )

    async def close(self) -> None:
        self._closed = True
        for channel in self._tcp.values():
            channel.close()
        for line in self._serial.values():
            line.close()
        hubs, self._hubs = list(self._hubs.values()), {}
        self._tcp.clear()
        self._serial.clear()
        for task in hubs:
            if not task.done():
                task.cancel()
                await asyncio.wait([task])
            if not task.cancelled() and task.exception() is None:
                await task.result().close()

    async def __aenter__(self) -> LinkPool:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def _started(settings: BrokerSettings, topics: TopicScheme) -> MqttLinkHub:
    hub = MqttLinkHub(settings, topics)
    await hub.start()
    return hub
