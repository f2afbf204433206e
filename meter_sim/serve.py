"""Serve a fleet: advance it under its clock and expose it over Modbus TCP, Modbus RTU and
MQTT at once, until told to stop. The transports are adapters over the same live meters.

Modbus TCP is served by gateways (meter_sim/gateways.py): one listener per gateway, each meter
behind it at its unit id. Load never ends the process: a listener that runs out of file
descriptors pauses accepting for a second (asyncio's rule; the connection waits in the listen
backlog) with one log line, the connections already open keep being served, and a periodic
save that fails is logged and retried (``Fleet.periodic_save``). The last save runs once the
listeners are closed and their descriptors given back.

Faults (meter_sim/faults.py): the meters whose fleet file gives them faults (``[faults]`` or
their own ``faults`` table), or every meter with ``ServeOptions.faults`` (``--faults``), inject
them into their Modbus TCP and MQTT answers; the counts are in :attr:`Endpoints.faults` while
serving and logged in one line when serving ends. Serial lines are the rig's (scripted faults).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meter_sim import gateways as gw
from meter_sim.config import FaultsConfig, FleetConfig
from meter_sim.faults import FleetFaults
from meter_sim.fleet import Fleet, keep_for_good
from meter_sim.modbus_server import serve_rtu, serve_tcp, serve_tcp_per_meter
from meter_sim.mqtt_agent import AgentOptions, run_agents
from protocols.clock import clock_speed
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
    strict_gaps: bool = False  # discard a frame with a gap of more than 1.5 characters
    response_delay: float = 0.0  # seconds to wait before every answer


@dataclass(frozen=True, slots=True)
class ServeOptions:
    modbus_host: str = "127.0.0.1"
    modbus_port: int | None = 5020  # port of the first gateway (0: free ports); None: off
    port_per_meter: int | None = None  # first port of one listener per meter (0: free ports)
    serial: tuple[SerialLine, ...] = ()  # every meter on each line, by unit id
    broker: BrokerSettings | None = None  # MQTT agents for every meter when set
    mqtt_prefix: str = DEFAULT_PREFIX
    telemetry_interval: float = 60.0
    faults: FaultsConfig | None = None  # every meter's faults, instead of the fleet file's
    faults_seed: int | None = None  # the seed of every meter's faults, instead of theirs

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


@dataclass(frozen=True, slots=True)
class GatewayEndpoint:
    """A listening gateway and the meters behind it."""

    name: str
    host: str
    port: int
    meters: dict[str, int]  # meter id -> its unit id behind this gateway

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "host": self.host, "port": self.port, "meters": self.meters}


@dataclass(frozen=True, slots=True)
class SimulationClock:
    """Where the fleet's simulated time stood when it was ready: a master expects
    ``time + speed x (real seconds since)`` from any meter's clock from then on."""

    time: float  # simulated epoch seconds
    speed: float  # simulated seconds per real second
    integration: str  # how the meters integrate: "events" or "fixed"

    def as_dict(self) -> dict[str, Any]:
        return {"time": self.time, "speed": self.speed, "integration": self.integration}


@dataclass(slots=True)
class Endpoints:
    """Where the fleet can be reached once it is served (printed by ``meter-sim serve``).

    A meter behind a gateway is ``tcp://<host>:<port>/<unit>`` with the gateway's host and
    port and the meter's unit id there."""

    modbus_tcp: str | None = None  # host:port of the first gateway
    gateways: list[GatewayEndpoint] = field(default_factory=list)
    modbus_ports: dict[str, int] = field(default_factory=dict)  # per-meter listeners
    serial: list[str] = field(default_factory=list)
    mqtt: str | None = None
    meters: dict[str, int] = field(default_factory=dict)  # meter id -> Modbus unit id
    faults: FleetFaults = field(default_factory=FleetFaults)  # the meters that inject faults
    simulation: SimulationClock | None = None  # set once every transport listens

    def as_dict(self) -> dict[str, Any]:
        return {
            "simulation": self.simulation.as_dict() if self.simulation else None,
            "modbus_tcp": self.modbus_tcp,
            "gateways": [gateway.as_dict() for gateway in self.gateways],
            "modbus_ports": self.modbus_ports,
            "serial": self.serial,
            "mqtt": self.mqtt,
            "meters": self.meters,
            "faults": self.faults.as_dict() if self.faults else None,
        }


_ACCEPT_EXHAUSTED = "socket.accept() out of system resource"
#: real seconds during which further accept failures of one listener are counted, not logged
ACCEPT_LOG_PERIOD = 5.0
_ACCEPT_RETRY_DELAY = 1.0  # asyncio's constants.ACCEPT_RETRY_DELAY


class _LoopErrors:
    """The loop's exception handler while serving.

    A listener out of descriptors is one error line per listener every ACCEPT_LOG_PERIOD
    seconds (asyncio reports each failed accept), with the count of the failures in between.
    asyncio also schedules a resume of the listener one second after each failed accept; one
    that comes due after the listener has closed finds no socket, which is expected and logged
    at debug level (:meth:`drain` waits for those before the handler is given back)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.previous = loop.get_exception_handler()
        self.last_failure = -math.inf
        self._reported: dict[object, tuple[float, int]] = {}  # listener -> (when, since)

    def __enter__(self) -> _LoopErrors:
        self.loop.set_exception_handler(self.handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.loop.set_exception_handler(self.previous)

    async def drain(self) -> None:
        """Wait until every resume asyncio scheduled for a paused listener has come due."""
        remaining = self.last_failure + _ACCEPT_RETRY_DELAY + 0.05 - time.monotonic()
        if remaining > 0:
            await asyncio.sleep(remaining)

    def handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == _ACCEPT_EXHAUSTED:
            self._accept_failed(context)
            return
        if isinstance(context.get("exception"), ValueError) and "_start_serving" in repr(
            context.get("handle")
        ):
            log.debug("a paused listener closed before it resumed accepting")
            return
        if self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def _accept_failed(self, context: dict[str, Any]) -> None:
        sock = context.get("socket")
        where = sock.getsockname() if sock is not None else "a listener"
        now = self.last_failure = time.monotonic()
        reported, since = self._reported.get(where, (-math.inf, 0))
        if now - reported < ACCEPT_LOG_PERIOD:
            self._reported[where] = (reported, since + 1)
            return
        self._reported[where] = (now, 0)
        log.error(
            "cannot accept a connection on %s: %s (%d more such failure(s) since the last "
            "report); that listener pauses for 1 s, the connection waits in its backlog, "
            "open connections are still served",
            where,
            context.get("exception"),
            since,
        )


async def serve_fleet(
    fleet: Fleet,
    options: ServeOptions,
    stop: asyncio.Event,
    ready: Callable[[Endpoints], None] | None = None,
) -> None:
    """Serve ``fleet`` until ``stop`` is set; ``ready`` is called once every transport listens.
    The meters are saved once more when it returns, after every listener is closed."""
    try:
        with _LoopErrors(asyncio.get_running_loop()) as errors:
            await _serve(fleet, options, stop, ready)
            await errors.drain()
    finally:
        fleet.final_save()


async def _serve(
    fleet: Fleet,
    options: ServeOptions,
    stop: asyncio.Event,
    ready: Callable[[Endpoints], None] | None,
) -> None:
    runtimes = list(fleet.runtimes.values())
    units = [runtime.config.modbus_unit for runtime in runtimes]
    if options.serial and len(set(units)) != len(units):
        raise ConfigError(
            "two meters share a Modbus unit id on a serial line: give each a distinct "
            "modbus_unit (at most 247 per line) or serve them over Modbus TCP gateways"
        )
    faults = FleetFaults.of(
        fleet.config, options.faults, options.faults_seed, [rt.meter_id for rt in runtimes]
    )
    if faults and options.serial:
        log.info("faults are injected over Modbus TCP and MQTT, not on the serial lines")
    endpoints = Endpoints(
        meters={rt.meter_id: rt.config.modbus_unit for rt in runtimes}, faults=faults
    )
    try:
        await _serve_endpoints(fleet, options, stop, ready, endpoints)
    finally:
        if faults:
            log.warning("%s", faults.summary())


async def _serve_endpoints(
    fleet: Fleet,
    options: ServeOptions,
    stop: asyncio.Event,
    ready: Callable[[Endpoints], None] | None,
    endpoints: Endpoints,
) -> None:
    runtimes = list(fleet.runtimes.values())
    secret = mqtt_password_secret(fleet.config) if options.broker is not None else None
    plan = gw.plan(fleet.config) if options.modbus_port is not None else []
    chosen = gw.ports(plan, options.modbus_port or 0)
    faults = endpoints.faults
    async with contextlib.AsyncExitStack() as stack:
        for gateway, port in zip(plan, chosen, strict=True):
            behind = [fleet.runtimes[meter.meter_id] for meter in gateway.meters]
            service = await stack.enter_async_context(
                serve_tcp(behind, options.modbus_host, port, faults)
            )
            endpoints.gateways.append(
                GatewayEndpoint(
                    gateway.name,
                    options.modbus_host,
                    service.port,
                    {rt.meter_id: rt.config.modbus_unit for rt in behind},
                )
            )
        if endpoints.gateways:
            first = endpoints.gateways[0]
            endpoints.modbus_tcp = f"{first.host}:{first.port}"
        if options.port_per_meter is not None:
            services = await stack.enter_async_context(
                serve_tcp_per_meter(runtimes, options.modbus_host, options.port_per_meter, faults)
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
                    strict_gaps=line.strict_gaps,
                    response_delay=line.response_delay,
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
                    faults=faults,
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
        keep_for_good()  # the meters and their listeners, built: out of the collector's walks
        endpoints.simulation = SimulationClock(
            fleet.clock.now(), clock_speed(fleet.clock), fleet.integration
        )
        if ready is not None:
            ready(endpoints)
        await fleet.run(stop, final_save=False)
