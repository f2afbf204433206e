"""The link pool: one TCP connection per gateway shared by its unit ids, one owner per serial
line, one MQTT connection per broker, all closed with the pool."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from headend.links.endpoint import open_link
from headend.links.modbus import ModbusTcpLink
from headend.links.pool import LinkPool
from meter_sim.config import MeterConfig
from meter_sim.modbus_server import serve_tcp
from meter_sim.runtime import MeterRuntime
from protocols.clock import ManualClock
from protocols.errors import ConfigError, LinkClosed
from protocols.mqtt import BrokerSettings, TopicScheme

UNITS = range(1, 11)


class CountingProxy:
    """A loopback TCP proxy in front of ``target_port`` that counts the connections made."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        self.tasks.update(pipes)
        await asyncio.gather(*pipes, return_exceptions=True)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(4096):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def counting_proxy(target_port: int) -> AsyncIterator[CountingProxy]:
    proxy = CountingProxy(target_port)
    proxy.server = await asyncio.start_server(proxy._client, "127.0.0.1", 0)
    try:
        yield proxy
    finally:
        proxy.server.close()
        for task in list(proxy.tasks):
            task.cancel()
        await asyncio.gather(*proxy.tasks, return_exceptions=True)
        await proxy.server.wait_closed()


@pytest.fixture
def gateway_meters() -> list[MeterRuntime]:
    clock = ManualClock(1_767_225_600.0)
    return [
        MeterRuntime.open(MeterConfig(f"GW-{unit:04d}", modbus_unit=unit), clock) for unit in UNITS
    ]


async def test_ten_unit_ids_behind_one_gateway_share_one_connection(
    gateway_meters: list[MeterRuntime],
) -> None:
    async with serve_tcp(gateway_meters) as service, counting_proxy(service.port) as proxy:
        async with LinkPool() as pool:
            links = [
                await open_link(f"tcp://127.0.0.1:{proxy.port}/{unit}", pool=pool) for unit in UNITS
            ]
            snapshots = await asyncio.gather(*(link.read_snapshot() for link in links))
            assert [s.meter_id for s in snapshots] == [m.meter_id for m in gateway_meters]
            assert all(isinstance(link, ModbusTcpLink) for link in links)
            assert len({link.channel for link in links if isinstance(link, ModbusTcpLink)}) == 1
            assert proxy.connections == 1
            assert pool.connections == 1
            await links[0].close()  # a link gives nothing back: the others go on
            assert (await links[1].read_snapshot()).meter_id == "GW-0002"
            assert proxy.connections == 1
        assert pool.connections == 0  # the pool closed the connection
        async with LinkPool() as other:  # another owner has its own connection
            link = await open_link(f"tcp://127.0.0.1:{proxy.port}/3", pool=other)
            assert link.meter_id == "GW-0003"
            assert proxy.connections == 2


async def test_one_owner_per_serial_line() -> None:
    async with LinkPool() as pool:
        line = pool.serial_line("loop://", baudrate=9600)
        assert pool.serial_line("loop://", baudrate=9600) is line
        with pytest.raises(ConfigError, match="other settings"):
            pool.serial_line("loop://", baudrate=19200)
        assert pool.serial_line("loop://?other", baudrate=19200) is not line


async def test_a_closed_pool_opens_nothing() -> None:
    pool = LinkPool()
    await pool.close()
    with pytest.raises(LinkClosed):
        await open_link("tcp://127.0.0.1:1/1", pool=pool)


async def test_a_failed_broker_connection_is_not_kept() -> None:
    settings = BrokerSettings(host="127.0.0.1", port=1)
    async with LinkPool() as pool:
        for _ in range(2):  # the second attempt tries again instead of reusing the failure
            with pytest.raises(LinkClosed):
                await pool.mqtt_hub(settings, TopicScheme())
        assert pool.connections == 0
