"""Serve a fleet: advance it under its clock and expose it over Modbus TCP, Modbus RTU and
MQTT at once, until told to stop. The transports are adapters over the same live meters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meter_sim.config import FleetConfig
from meter_sim.fleet import Fleet
from meter_sim.modbus_server import serve_rtu, serve_tcp, serve_tcp_per_meter
from meter_sim.mqtt_agent import AgentOptions, run_agents
from protocols.errors import ConfigError
from protocols.mqtt import DEFAULT_PREFIX, BrokerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SerialLine:
    url: str  # a device path (/dev/ttyUSB0), a pty, or a pyserial URL
    baudrate: int = 9600
    parity: str = "N"
    stopbits: int = 1
    pace: bool = False  # answer at the pace of a real line at this baud rate


@dataclass(frozen=True, slots=True)
class ServeOptions:
    modbus_host: str = "127.0.0.1"
    modbus_port: int | None = 5020  # one listener for all meters by unit id; None: off
    port_per_meter: int | None = None  # first port of one listener per meter (0: free ports)
    serial: tuple[SerialLine, ...] = ()  # every meter on each line, by unit id
    broker: BrokerSettings | None = None  # MQTT agents for every meter when set
    mqtt_prefix: str = DEFAULT_PREFIX
    telemetry_interval: float = 60.0

    def __post_init__(self) -> None:
        if (
            self.modbus_port is None
            and self.port_per_meter is None
            and not self.serial
            and self.broker is None
        ):
            raise ConfigError("nothing to serve: give Modbus TCP, serial or MQTT options")
        if not self.telemetry_interval > 0:  # 0 would publish as fast as the broker acknowledges
            raise ConfigError(f"the telemetry interval is > 0 s, got {self.telemetry_interval!r}")


def mqtt_password_secret(config: FleetConfig) -> str | None:
    """The secret the meters of ``config`` derive their MQTT passwords from; ConfigError when a
    meter without ``mqtt_password`` would need it and the fleet file has none."""
    secret = config.mqtt_password_secret
    lacking = config.meters_without_mqtt_password()
    if secret is None and lacking:
        shown = ", ".join(lacking[:3]) + (
            f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
        )
        raise ConfigError(
            f"{shown} have no mqtt_password and the fleet file no [mqtt] password_secret: "
            "set password_secret (64 hex digits; meter-sim init writes one) or give each meter "
            "an mqtt_password"
        )
    return secret


@dataclass(slots=True)
class Endpoints:
    """Where the fleet can be reached once it is served (printed by ``meter-sim serve``)."""

    modbus_tcp: str | None = None  # host:port of the shared listener
    modbus_ports: dict[str, int] = field(default_factory=dict)  # per-meter listeners
    serial: list[str] = field(default_factory=list)
    mqtt: str | None = None
    meters: dict[str, int] = field(default_factory=dict)  # meter id -> Modbus unit id

    def as_dict(self) -> dict[str, Any]:
        return {
            "modbus_tcp": self.modbus_tcp,
            "modbus_ports": self.modbus_ports,
            "serial": self.serial,
            "mqtt": self.mqtt,
            "meters": self.meters,
        }


async def serve_fleet(
    fleet: Fleet,
    options: ServeOptions,
    stop: asyncio.Event,
    ready: Callable[[Endpoints], None] | None = None,
) -> None:
    """Serve ``fleet`` until ``stop`` is set; ``ready`` is called once every transport listens."""
    runtimes = list(fleet.runtimes.values())
    secret = mqtt_password_secret(fleet.config) if options.broker is not None else None
    units = [runtime.config.modbus_unit for runtime in runtimes]
    shared_listener = options.modbus_port is not None or options.serial
    if shared_listener and len(set(units)) != len(units):
        raise ConfigError(
            "two meters share a Modbus unit id on one listener: give each a distinct "
            "modbus_unit (at most 247 per listener) or use one port per meter"
        )
    endpoints = Endpoints(meters={rt.meter_id: rt.config.modbus_unit for rt in runtimes})
    async with contextlib.AsyncExitStack() as stack:
        if options.modbus_port is not None:
            service = await stack.enter_async_context(
                serve_tcp(runtimes, options.modbus_host, options.modbus_port)
            )
            endpoints.modbus_tcp = f"{options.modbus_host}:{service.port}"
        if options.port_per_meter is not None:
            services = await stack.enter_async_context(
                serve_tcp_per_meter(runtimes, options.modbus_host, options.port_per_meter)
            )
            endpoints.modbus_ports = {
                rt.meter_id: svc.port for rt, svc in zip(runtimes, services, strict=True)
            }
        for line in options.serial:
            await stack.enter_async_context(
                serve_rtu(
                    runtimes,
                    line.url,
                    baudrate=line.baudrate,
                    parity=line.parity,
                    stopbits=line.stopbits,
                    pace=line.pace,
                )
            )
            endpoints.serial.append(line.url)
        if options.broker is not None:
            agents = await stack.enter_async_context(
                run_agents(
                    runtimes,
                    options.broker,
                    prefix=options.mqtt_prefix,
                    options=AgentOptions(
                        telemetry_interval=options.telemetry_interval, meter_secret=secret
                    ),
                )
            )
            endpoints.mqtt = options.broker.url()
            try:
                await agents.wait_connected(timeout=15.0)
            except TimeoutError:
                log.warning(
                    "%d of %d meters connected to %s so far; the others keep trying",
                    agents.connected_count(),
                    len(runtimes),
                    endpoints.mqtt,
                )
        if ready is not None:
            ready(endpoints)
        await fleet.run(stop)
