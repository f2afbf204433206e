"""Endpoint strings, and opening a :class:`~headend.links.base.MeterLink` from one.

* ``tcp://host:port/unit`` — Modbus TCP (port 502 and unit 1 by default);
* ``rtu:///dev/ttyUSB0?baud=9600&unit=3&parity=N&stopbits=1&bytesize=8`` — Modbus RTU on a
  serial device; ``rtu://socket://127.0.0.1:5020?unit=3`` or ``rtu://loop://?unit=1`` take a
  pyserial URL instead of a device path (the part before the last ``?``);
* ``mqtt://user:password@host:1883/MTR-0001?prefix=phs`` — MQTT 5 through a broker;
  ``mqtts://…?ca=/path/ca.pem`` with TLS;
* every scheme also takes ``timeout`` (seconds per request) and ``retries``; Modbus also
  ``deadline`` (seconds for one whole read, retries included).

An endpoint may hold a password; :func:`masked_endpoint` (and :attr:`Endpoint.shown`) is the
form to print or put in a message, with the password replaced by ``***`` as SQLAlchemy shows a
database URL.

Links are opened in a :class:`~headend.links.pool.LinkPool`, which owns their connections. A
transport registers its scheme with one entry in :data:`SCHEMES`: a coroutine function that
takes the parsed :class:`Endpoint`, the :class:`LinkOptions` and the pool and returns an open
link::

    SCHEMES["mqtt"] = open_mqtt_link
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qsl, urlsplit

from headend.links.base import MeterLink
from headend.links.modbus import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    LinkSettings,
    ModbusLink,
    ModbusRtuLink,
    ModbusTcpLink,
)
from headend.links.mqtt import open_mqtt_link
from headend.links.pool import LinkPool
from protocols.errors import ConfigError, HesError


def masked_endpoint(text: str) -> str:
    """``text`` with the password of its ``user:password@`` part replaced by ``***``; works on
    malformed text too, since it is meant for the messages about it."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text
    end = len(rest)
    for mark in "/?#":
        found = rest.find(mark)
        if found != -1:
            end = min(end, found)
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hostport = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return text
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}:***@{hostport}{tail}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A parsed endpoint. ``device`` is the serial device or pyserial URL of an ``rtu`` endpoint;
    ``params`` are the query parameters in order."""

    text: str
    scheme: str
    host: str = ""
    port: int | None = None
    path: str = ""
    device: str = ""
    params: tuple[tuple[str, str], ...] = ()

    @property
    def shown(self) -> str:
        """The endpoint as it may be printed: its password masked."""
        return masked_endpoint(self.text)

    def param(self, name: str) -> str | None:
        for key, value in self.params:
            if key == name:
                return value
        return None

    def int_param(self, name: str, default: int, minimum: int, maximum: int) -> int:
        raw = self.param(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError as exc:
            raise ConfigError(f"{self.shown}: {name} is an integer, got {raw!r}") from exc
        if not minimum <= value <= maximum:
            raise ConfigError(f"{self.shown}: {name} is {minimum}..{maximum}, got {value}")
        return value

    def float_param(self, name: str, default: float) -> float:
        raw = self.param(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError as exc:
            raise ConfigError(f"{self.shown}: {name} is a number, got {raw!r}") from exc
        if not value > 0:
            raise ConfigError(f"{self.shown}: {name} must be positive, got {raw!r}")
        return value

    def check_params(self, allowed: set[str]) -> None:
        unknown = sorted({key for key, _ in self.params} - allowed - COMMON_PARAMS)
        if unknown:
            raise ConfigError(f"{self.shown}: unknown parameter(s) {', '.join(unknown)}")


@dataclass(frozen=True, slots=True)
class LinkOptions:
    """What a caller may say about every link; an endpoint's own parameters take precedence."""

    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    meter_id: str | None = None  # the meter expected at the endpoint
    deadline: float | None = None  # bounds one whole read, retries included

    def settings_for(self, endpoint: Endpoint) -> LinkSettings:
        deadline = endpoint.float_param("deadline", 0.0) or self.deadline
        return LinkSettings(
            timeout=endpoint.float_param("timeout", self.timeout),
            retries=endpoint.int_param("retries", self.retries, 0, 100),
            deadline=deadline,
        )


COMMON_PARAMS: Final = frozenset({"timeout", "retries"})
LinkFactory = Callable[[Endpoint, LinkOptions, LinkPool], Awaitable[MeterLink]]


def parse_endpoint(text: str) -> Endpoint:
    """Parse ``scheme://...``; ConfigError for anything malformed."""
    if not isinstance(text, str):
        raise ConfigError(f"an endpoint is text, got {text!r}")
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or not scheme:
        raise ConfigError(
            f"an endpoint looks like tcp://host:port/unit, got {masked_endpoint(text)!r}"
        )
    if scheme == "rtu":
        device, _, query = rest.rpartition("?") if "?" in rest else (rest, "", "")
        if not device:
            raise ConfigError(f"{masked_endpoint(text)}: no serial device")
        return Endpoint(text, scheme, device=device, params=_params(text, query))
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{masked_endpoint(text)}: {exc}") from exc
    if not parts.hostname:
        raise ConfigError(f"{masked_endpoint(text)}: no host")
    return Endpoint(
        text,
        scheme,
        host=parts.hostname,
        port=port,
        path=parts.path,
        params=_params(text, parts.query),
    )


def _params(text: str, query: str) -> tuple[tuple[str, str], ...]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise ConfigError(f"{masked_endpoint(text)}: malformed parameters {query!r}") from exc
    keys = [key for key, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ConfigError(f"{masked_endpoint(text)}: a parameter appears twice")
    return tuple(pairs)


def _tcp_unit(endpoint: Endpoint) -> int:
    path = endpoint.path.strip("/")
    if not path:
        return 1
    if not path.isdigit():
        raise ConfigError(f"{endpoint.shown}: the path is the unit id, got {endpoint.path!r}")
    unit = int(path)
    if not 1 <= unit <= 247:
        raise ConfigError(f"{endpoint.shown}: a unit id is 1..247, got {unit}")
    return unit


async def _connected(link: ModbusLink) -> ModbusLink:
    try:
        await link.connect()
    except HesError:
        await link.close()
        raise
    return link


async def open_tcp(endpoint: Endpoint, options: LinkOptions, pool: LinkPool) -> MeterLink:
    endpoint.check_params({"deadline"})
    port = endpoint.port if endpoint.port is not None else 502
    unit = _tcp_unit(endpoint)
    settings = options.settings_for(endpoint)
    link = ModbusTcpLink(
        endpoint.host,
        port,
        unit,
        meter_id=options.meter_id,
        settings=settings,
        channel=pool.tcp_channel(endpoint.host, port),
    )
    return await _connected(link)


async def open_rtu(endpoint: Endpoint, options: LinkOptions, pool: LinkPool) -> MeterLink:
    endpoint.check_params({"baud", "unit", "parity", "stopbits", "bytesize", "deadline"})
    parity = (endpoint.param("parity") or "N").upper()
    line = pool.serial_line(
        endpoint.device,
        baudrate=endpoint.int_param("baud", 9600, 50, 4_000_000),
        parity=parity,
        stopbits=endpoint.int_param("stopbits", 1, 1, 2),
        bytesize=endpoint.int_param("bytesize", 8, 7, 8),
    )
    link = ModbusRtuLink(
        line,
        endpoint.int_param("unit", 1, 1, 247),
        meter_id=options.meter_id,
        settings=options.settings_for(endpoint),
    )
    return await _connected(link)


#: scheme -> opener; a transport adds its own entry
SCHEMES: dict[str, LinkFactory] = {"tcp": open_tcp, "rtu": open_rtu}
SCHEMES["mqtt"] = SCHEMES["mqtts"] = open_mqtt_link


async def open_link(
    endpoint: str | Endpoint, options: LinkOptions | None = None, *, pool: LinkPool
) -> MeterLink:
    """Open a link to the meter at ``endpoint`` over ``pool``'s connections and identify it
    (``link.meter_id`` is set). Every failure is a :class:`~protocols.errors.HesError`."""
    parsed = parse_endpoint(endpoint) if isinstance(endpoint, str) else endpoint
    opener = SCHEMES.get(parsed.scheme)
    if opener is None:
        known = ", ".join(sorted(SCHEMES))
        raise ConfigError(f"{parsed.shown}: unknown scheme {parsed.scheme!r} (known: {known})")
    return await opener(parsed, options or LinkOptions(), pool)
