"""Which meters stand behind which Modbus TCP gateway, and on which port (pure: no I/O).

Real fleets are wired through Modbus TCP gateways or data concentrators, up to 247 unit ids
each. A fleet file either declares its gateways (``[[gateways]]``, each meter naming its own
with ``gateway = ...``) or declares none, and then the meters are spread in file order: each
meter goes to the first gateway where its unit id is still free. A fleet of N meters with
consecutive unit ids (what ``count`` makes) takes ceil(N/247) gateways that way, meters 1..247
behind the first, 248..494 behind the second, and so on.

Ports: a declared gateway's ``port``, else the serve command's base port plus the gateway's
index (0-based, in file order); with a base port of 0 every such gateway takes a free port.
The head-end's fleet import computes the same plan from the same file, so the endpoints it
records (``tcp://host:port/unit``) are the ones ``meter-sim serve`` listens on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from meter_sim.config import FleetConfig, MeterConfig
from protocols.errors import ConfigError

MAX_UNITS = 247
DEFAULT_PREFIX = "GW-"


@dataclass(frozen=True, slots=True)
class Gateway:
    """One listener and the meters behind it (distinct unit ids)."""

    name: str
    index: int  # position among the fleet's gateways, from 0
    meters: tuple[MeterConfig, ...]
    declared_port: int | None = None

    def port(self, base: int) -> int:
        """The port it listens on when the base port is ``base`` (0: a free one)."""
        if self.declared_port is not None:
            return self.declared_port
        return base + self.index if base else 0


def plan(config: FleetConfig) -> list[Gateway]:
    """The fleet's gateways, in order, each with its meters in file order."""
    if config.gateways:
        behind: dict[str, list[MeterConfig]] = {g.name: [] for g in config.gateways}
        for meter in config.meters:
            assert meter.gateway is not None  # FleetConfig checks it
            behind[meter.gateway].append(meter)
        return [
            Gateway(g.name, index, tuple(behind[g.name]), g.port)
            for index, g in enumerate(config.gateways)
        ]
    taken: Counter[int] = Counter()
    spread: list[list[MeterConfig]] = []
    for meter in config.meters:
        index = taken[meter.modbus_unit]  # the first gateway where this unit id is free
        taken[meter.modbus_unit] += 1
        if index == len(spread):
            spread.append([])
        spread[index].append(meter)
    return [
        Gateway(f"{DEFAULT_PREFIX}{index + 1}", index, tuple(meters))
        for index, meters in enumerate(spread)
    ]


def ports(gateways: list[Gateway], base: int) -> list[int]:
    """Each gateway's port for base port ``base``; ConfigError past 65535 or for a port two
    gateways would share."""
    chosen = [gateway.port(base) for gateway in gateways]
    for gateway, port in zip(gateways, chosen, strict=True):
        if port > 65535:
            raise ConfigError(
                f"gateway {gateway.name} would listen on port {port}, past 65535: "
                f"{len(gateways)} gateways from port {base} do not fit"
            )
    fixed = [port for port in chosen if port]
    for port in fixed:
        if fixed.count(port) > 1:
            raise ConfigError(
                f"two gateways would listen on port {port}: move a declared port or the base port"
            )
    return chosen
