"""Registering meters: from a CSV file or straight from a `meter-sim` fleet file."""

from __future__ import annotations

from pathlib import Path

from headend.domain.registry import MeterRecord, Route, RowRefusal, parse_meters_csv
from headend.links.endpoint import parse_endpoint
from meter_sim import gateways
from meter_sim.config import FleetConfig, load_fleet
from protocols.errors import ConfigError, DecodeError, ValidationError


def route_of(text: str) -> Route:
    """What the registry keeps of an endpoint; ConfigError for a malformed one."""
    endpoint = parse_endpoint(text)
    if endpoint.scheme == "tcp":
        unit_text = endpoint.path.strip("/") or "1"
        if not unit_text.isdigit() or not 0 <= int(unit_text) <= 247:
            raise ConfigError(f"{text}: the unit id is 0..247")
        return Route("tcp", f"{endpoint.host}:{endpoint.port or 502}", int(unit_text))
    if endpoint.scheme == "rtu":
        unit = endpoint.int_param("unit", 1, 1, 247)
        return Route("rtu", endpoint.device, unit)
    if endpoint.scheme in ("mqtt", "mqtts"):
        if not endpoint.path.strip("/"):
            raise ConfigError(f"{text}: an MQTT endpoint names the meter: mqtt://host:port/ID")
        port = endpoint.port or (8883 if endpoint.scheme == "mqtts" else 1883)
        return Route("mqtt", f"{endpoint.host}:{port}", None)
    raise ConfigError(f"{text}: the scheme is tcp, rtu, mqtt or mqtts")


def records_from_csv(path: Path) -> tuple[list[tuple[int, MeterRecord]], list[RowRefusal]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DecodeError(f"{path}: {exc}") from exc
    try:
        return parse_meters_csv(text, route_of)
    except DecodeError as exc:
        raise DecodeError(f"{path}: {exc}") from exc


def records_from_fleet(
    path: Path, endpoint_base: str
) -> tuple[list[tuple[int, MeterRecord]], list[RowRefusal]]:
    """Every meter of a fleet file, reached at ``endpoint_base``: ``tcp://host:port`` (each
    meter behind its gateway, the first of which listens on ``port``, at its Modbus unit id;
    see meter_sim/gateways.py) or ``mqtt://host:port`` (each by its meter id). Keys included."""
    fleet = load_fleet(path)
    base = endpoint_base.rstrip("/")
    scheme = base.partition("://")[0].lower()
    if scheme not in ("tcp", "mqtt", "mqtts") or parse_endpoint(base).path.strip("/"):
        raise ConfigError(
            f"--endpoint-base is tcp://host:port or mqtt://host:port, got {endpoint_base!r}"
        )
    at = _gateway_endpoints(fleet, base) if scheme == "tcp" else {}
    rows: list[tuple[int, MeterRecord]] = []
    refused: list[RowRefusal] = []
    for number, meter in enumerate(fleet.meters, start=1):
        endpoint = at[meter.meter_id] if scheme == "tcp" else f"{base}/{meter.meter_id}"
        try:
            record = MeterRecord(
                meter_id=meter.meter_id,
                endpoint=endpoint,
                route=route_of(endpoint),
                serial=meter.serial or meter.meter_id,
                control_mode=meter.control_mode,
                credit_unit=meter.credit_unit,
                currency=meter.currency,
                currency_scale=meter.currency_scale,
                profile_period=meter.profile_period,
                auth_key=meter.key_bytes,
            )
        except (ValidationError, ConfigError) as exc:
            refused.append(RowRefusal(number, meter.meter_id, str(exc)))
            continue
        rows.append((number, record))
    return rows, refused


def _gateway_endpoints(fleet: FleetConfig, base: str) -> dict[str, str]:
    """meter id -> ``tcp://host:port/unit`` of the gateway it stands behind, as
    ``meter-sim serve --modbus-port <base's port>`` serves the fleet."""
    plan = gateways.plan(fleet)
    if len(plan) == 1 and plan[0].declared_port is None:  # one gateway: at the base itself
        return {m.meter_id: f"{base}/{m.modbus_unit}" for m in plan[0].meters}
    parsed = parse_endpoint(base)
    ports = gateways.ports(plan, parsed.port or 502)
    host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
    found: dict[str, str] = {}
    for gateway, port in zip(plan, ports, strict=True):
        if port == 0:
            raise ConfigError(
                f"gateway {gateway.name} listens on a free port (port = 0 in the fleet file): "
                "give it a fixed port to import its meters"
            )
        for meter in gateway.meters:
            found[meter.meter_id] = f"tcp://{host}:{port}/{meter.modbus_unit}"
    return found
