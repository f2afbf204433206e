"""Meter and fleet configuration, read from TOML. Every key has a default (docs/configuration.md).

A fleet file has a ``[simulation]`` table, a ``[defaults]`` table whose keys apply to every meter,
and ``[[meters]]`` entries: one meter each, or ``count`` meters named ``<id_prefix><n>``.
``[[gateways]]`` entries, when present, declare the Modbus TCP gateways the meters stand behind
(see meter_sim/gateways.py for how a fleet without them is spread over gateways). A ``[faults]``
table (fleet-wide) or a meter's ``faults`` table sets the faults its Modbus TCP and MQTT serving
injects (meter_sim/faults.py); ``meter-sim serve --faults`` gives the same keys on the command
line.
"""

from __future__ import annotations

import re
import secrets
import tomllib
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import msgspec
from msgspec import UNSET, Meta, UnsetType

from protocols.errors import ConfigError, ValidationError
from protocols.meter_id import METER_ID_MAX_LENGTH, METER_ID_PATTERN, is_meter_id
from protocols.units import Money

CreditUnitName = Literal["money", "energy"]
LoadModelName = Literal["residential", "constant", "csv"]
WordOrder = Literal["big", "little"]
SECRET = re.compile(r"^[0-9a-fA-F]{64}$")
T = TypeVar("T")


def parse_hhmm(text: str) -> int:
    """``"07:30"`` -> minute of the day (0..1440; "24:00" is the end of the day)."""
    match = re.fullmatch(r"(\d{1,2}):(\d{2})", text)
    if match is None:
        raise ConfigError(f"a time of day is HH:MM, got {text!r}")
    hours, minutes = int(match[1]), int(match[2])
    if hours > 24 or minutes > 59 or (hours == 24 and minutes):
        raise ConfigError(f"not a time of day: {text!r}")
    return hours * 60 + minutes


def format_hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_seconds(raw: object, maximum: float) -> float:
    """A duration: a number of seconds or a string such as ``"250ms"``, ``"2s"``, ``"15m"``,
    ``"1h"``, ``"2d"``, from 0 to ``maximum`` seconds; TypeError for a value of another type,
    ValueError for one out of form or range. (The rig's scenarios and the faults share it.)"""
    if isinstance(raw, bool):
        raise TypeError('a duration is a number of seconds or a string such as "2s"')
    if isinstance(raw, int | float):
        value = float(raw)
    elif isinstance(raw, str):
        match = _DURATION.match(raw)
        if match is None:
            raise ValueError(f"not a duration: {raw!r} (e.g. 250ms, 2s, 15m, 1h, 2d)")
        value = float(match[1]) * _DURATION_UNITS[match[2]]
    else:
        raise TypeError('a duration is a number of seconds or a string such as "2s"')
    if not 0 <= value <= maximum:
        raise ValueError(f"a duration is 0 s to {_seconds_text(maximum)}")
    return value


def _seconds_text(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:g} days" if days >= 1 and days.is_integer() else f"{seconds:g} s"


# -- faults of a served meter ---------------------------------------------------------------------

DelayDistribution = Literal["fixed", "uniform", "exponential"]
MAX_FAULT_DELAY = 60.0  # seconds, as the serial response delay
#: the fault kinds, in the order a request's draw tries them (delay is drawn on its own)
FAULT_KINDS = ("drop", "lose_ack", "disconnect", "corrupt", "delay")
_DELAY_FORMS = "fixed:S, uniform:LOW:HIGH or exponential:MEAN (durations such as 0.2 or 250ms)"


@dataclass(frozen=True, slots=True)
class Delay:
    """How late a delayed answer is: ``fixed`` (always ``low``), ``uniform`` (between ``low``
    and ``high``) or ``exponential`` (mean ``low``, cut at MAX_FAULT_DELAY); seconds."""

    distribution: DelayDistribution
    low: float
    high: float = 0.0

    def __post_init__(self) -> None:
        if self.distribution not in get_args(DelayDistribution):
            raise ConfigError(f"a delay is {_DELAY_FORMS}, got {self.distribution!r}")
        for value in (self.low, self.high):
            if not 0 <= value <= MAX_FAULT_DELAY:
                raise ConfigError(f"a delay is 0 to {MAX_FAULT_DELAY:g} s, got {value:g}")
        if self.distribution == "uniform" and self.high < self.low:
            raise ConfigError(f"uniform:{self.low:g}:{self.high:g}: the high end is below the low")

    @classmethod
    def parse(cls, text: str) -> Delay:
        """``fixed:S``, ``uniform:LOW:HIGH`` or ``exponential:MEAN``."""
        name, _, rest = text.strip().partition(":")
        parts = rest.split(":") if rest else []
        wanted = {"fixed": 1, "uniform": 2, "exponential": 1}.get(name)
        if wanted is None or len(parts) != wanted:
            raise ConfigError(f"a delay is {_DELAY_FORMS}, got {text!r}")
        try:
            values = [parse_seconds(part, MAX_FAULT_DELAY) for part in parts]
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{text!r}: {exc}") from exc
        return cls(name, values[0], values[1] if len(values) > 1 else 0.0)  # type: ignore[arg-type]

    def text(self) -> str:
        if self.distribution == "uniform":
            return f"uniform:{self.low:g}:{self.high:g}"
        return f"{self.distribution}:{self.low:g}"


@dataclass(frozen=True, slots=True)
class FaultsConfig:
    """The faults a served meter injects into its Modbus TCP and MQTT answers (meter_sim/faults.py):
    the share of requests each fault takes (``drop``, ``lose_ack``, ``disconnect`` and
    ``corrupt`` exclude one another: they add up to at most 1), how late a delayed answer is and
    the share of answers delayed, and the seed of the draws."""

    drop: float = 0.0
    delay: Delay | None = None
    delay_rate: float = 1.0
    lose_ack: float = 0.0
    disconnect: float = 0.0
    corrupt: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("drop", "delay_rate", "lose_ack", "disconnect", "corrupt"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise ConfigError(f"{name} is a share of requests, 0 to 1, got {value!r}")
        total = self.drop + self.lose_ack + self.disconnect + self.corrupt
        if total > 1 + 1e-9:
            raise ConfigError(
                f"drop, lose_ack, disconnect and corrupt add up to at most 1, got {total:g}"
            )
        if type(self.seed) is not int or not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed is an integer 0 to 2**63 - 1, got {self.seed!r}")

    @property
    def active(self) -> bool:
        """Some fault can happen."""
        delayed = self.delay is not None and self.delay_rate > 0 and self.delay.low > 0
        return delayed or self.drop + self.lose_ack + self.disconnect + self.corrupt > 0

    def text(self) -> str:
        """The ``--faults`` form: ``drop=0.05,delay=uniform:0.1:0.5,...``."""
        parts = [f"{name}={getattr(self, name):g}" for name in ("drop", "lose_ack")]
        parts += [f"{name}={getattr(self, name):g}" for name in ("disconnect", "corrupt")]
        if self.delay is not None:
            parts += [f"delay={self.delay.text()}", f"delay_rate={self.delay_rate:g}"]
        return ",".join([*parts, f"seed={self.seed}"])


@dataclass(frozen=True, slots=True)
class TariffConfig:
    """Time-of-use: a unit price per rate and the rate in force by time of day.

    ``weekday`` / ``weekend`` are switch points ``(minute of day, rate)``, the first at 00:00.
    """

    prices: tuple[int, ...] = (2500, 1200)  # minor currency units per kWh, rates 1..n
    weekday: tuple[tuple[int, int], ...] = ((0, 2), (7 * 60, 1), (23 * 60, 2))
    weekend: tuple[tuple[int, int], ...] = ((0, 2),)

    def __post_init__(self) -> None:
        if not 1 <= len(self.prices) <= 4:
            raise ConfigError("a tariff has 1 to 4 rates")
        if any(type(p) is not int or p < 0 for p in self.prices):
            raise ConfigError("unit prices are non-negative integers (minor units per kWh)")
        for name in ("weekday", "weekend"):
            table = getattr(self, name)
            if not table or table[0][0] != 0:
                raise ConfigError(f"tariff.{name} must start at 00:00")
            minutes = [m for m, _ in table]
            if minutes != sorted(set(minutes)) or minutes[-1] >= 1440:
                raise ConfigError(f"tariff.{name} switch times must increase within the day")
            for _, rate in table:
                if not 1 <= rate <= len(self.prices):
                    raise ConfigError(f"tariff.{name} names rate {rate}, not 1..{len(self.prices)}")

    def rate_at(self, minute_of_day: int, weekend: bool) -> int:
        table = self.weekend if weekend else self.weekday
        rate = table[0][1]
        for start, candidate in table:
            if minute_of_day >= start:
                rate = candidate
            else:
                break
        return rate


@dataclass(frozen=True, slots=True)
class LoadConfig:
    model: LoadModelName = "residential"
    watts: int = 1000  # constant model
    mean_watts: int = 450  # residential model: daily mean
    seed: int | None = None  # residential model; default derived from the meter id
    csv_path: str | None = None  # csv model: rows of (ISO-8601 timestamp, watts)


@dataclass(frozen=True, slots=True)
class StsConfig:
    """Keypad (STS) parameters; the decoder key is derived from them as the vending side does."""

    vending_key: str  # 16 hex digits (DKGA02) or 40 hex digits (DKGA04)
    drn: str  # 11- or 13-digit meter number
    sgc: int = 123456
    ti: int = 1
    krn: int = 1
    kt: int = 2
    ken: int = 255
    base_date: int = 2014  # 1993 ran out on 2024-11-24; meters moved to 2014 by key change


@dataclass(frozen=True, slots=True)
class MeterConfig:
    meter_id: str
    serial: str = ""
    manufacturer: str = "PHS"
    model: str = "SIM-1P"
    firmware: str = "1.0.0"
    # account
    credit_unit: CreditUnitName = "money"  # money: minor currency units; energy: Wh
    currency: str = "KES"
    currency_scale: int = -2  # power of ten of the minor unit (COSEM Account): -2 for cents
    initial_credit: int = 0
    low_credit_threshold: int = 5000
    max_credit: int = 100_000_000  # most credit the meter holds
    min_topup: int = 1
    max_topup: int = 10_000_000
    emergency_credit: int = 2000  # 0: no emergency credit
    emergency_auto: bool = False  # invoke emergency credit by itself when credit runs out
    # open the relay by itself when credit runs out; False: the head-end decides (its policy)
    local_disconnect: bool = True
    # no disconnection for credit from 18:00 to 06:00 and all Sunday (ISO weekday 7)
    friendly_hours: tuple[tuple[int, int], ...] = ((0, 6 * 60), (18 * 60, 24 * 60))
    friendly_days: tuple[int, ...] = (7,)
    debt_recovery_percent: int = 100  # share of each top-up that repays debt first
    # relay and limiter
    control_mode: int = 6
    limiter_watts: int = 0  # 0: limiter off
    limiter_over_seconds: int = 60
    limiter_under_seconds: int = 300
    # load and measurement
    tariff: TariffConfig = field(default_factory=TariffConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    nominal_voltage_dv: int = 2300
    nominal_frequency_chz: int = 5000
    timezone_minutes: int = 0
    # records
    profile_period: int = 900
    profile_entries: int = 2880
    event_entries: int = 1000
    # transports
    modbus_unit: int = 1
    gateway: str | None = None  # the declared gateway this meter stands behind
    word_order: WordOrder = "big"
    auth_key: str | None = None  # hex; None: commands need no tag (lab use)
    mqtt_password: str | None = None
    sts: StsConfig | None = None
    faults: FaultsConfig | None = None  # None: the fleet's [faults], if any

    def __post_init__(self) -> None:
        if not is_meter_id(self.meter_id):
            raise ConfigError(
                f"meter id {self.meter_id!r}: letters, digits, _ . - (max {METER_ID_MAX_LENGTH})"
            )
        if self.credit_unit not in get_args(CreditUnitName):
            raise ConfigError(f"credit_unit is money or energy, got {self.credit_unit!r}")
        if self.control_mode not in range(7):
            raise ConfigError(f"control_mode is 0..6, got {self.control_mode!r}")
        if not 1 <= self.modbus_unit <= 247:
            raise ConfigError(f"modbus_unit is 1..247, got {self.modbus_unit!r}")
        if self.word_order not in get_args(WordOrder):
            raise ConfigError(f"word_order is big or little, got {self.word_order!r}")
        if type(self.currency_scale) is not int or not -4 <= self.currency_scale <= 0:
            raise ConfigError(f"currency_scale is -4..0, got {self.currency_scale!r}")
        try:
            Money(0, self.currency, -self.currency_scale)
        except ValidationError as exc:
            raise ConfigError(f"meter {self.meter_id}: {exc}") from exc
        for name in (
            "initial_credit",
            "low_credit_threshold",
            "emergency_credit",
            "limiter_watts",
            "max_credit",
        ):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ConfigError(f"{name} is a non-negative integer, got {value!r}")
        if self.sts is not None and self.credit_unit != "energy":
            raise ConfigError(
                f"meter {self.meter_id}: an STS keypad meter holds its credit as energy "
                '(STS credit tokens are 0.1 kWh steps): set credit_unit = "energy"'
            )
        if not 1 <= self.debt_recovery_percent <= 100:
            raise ConfigError("debt_recovery_percent is 1..100")
        if not 1 <= self.min_topup <= self.max_topup:
            raise ConfigError("min_topup must be at least 1 and at most max_topup")
        if self.profile_period < 60 or 86400 % self.profile_period:
            raise ConfigError("profile_period is at least 60 s and divides a day")
        if self.auth_key is not None:
            try:
                bytes.fromhex(self.auth_key)
            except ValueError as exc:
                raise ConfigError(f"auth_key of {self.meter_id} is not hex") from exc
        for start, end in self.friendly_hours:
            if not 0 <= start < end <= 1440:
                raise ConfigError("friendly_hours are (from, to) within one day, from < to")
        if any(day not in range(1, 8) for day in self.friendly_days):
            raise ConfigError("friendly_days are ISO weekday numbers 1..7")

    @property
    def key_bytes(self) -> bytes | None:
        return bytes.fromhex(self.auth_key) if self.auth_key else None


@dataclass(frozen=True, slots=True)
class SimulationConfig:
    speed: float = 60.0  # simulated seconds per real second
    start: float | None = None  # simulated start (epoch s); None: now
    state_dir: str = "var/meters"
    tick_seconds: float = 1.0  # real seconds between fleet advances
    step_seconds: int = 60  # longest integration step of the firmware (simulated s)
    save_seconds: float = 30.0  # real seconds between periodic saves of the whole fleet

    def __post_init__(self) -> None:
        if not self.speed > 0:
            raise ConfigError("simulation.speed must be positive")
        if not self.tick_seconds > 0:
            raise ConfigError("simulation.tick_seconds must be positive")
        if not self.save_seconds > 0:
            raise ConfigError("simulation.save_seconds must be positive")
        if not 1 <= self.step_seconds <= 3600:
            raise ConfigError("simulation.step_seconds is 1..3600")


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """The ``[mqtt]`` table: what the fleet's meters need to log in to a broker."""

    password_secret: str | None = None  # 64 hex digits; see FIELD_DOCS

    def __post_init__(self) -> None:
        if self.password_secret is not None and not SECRET.fullmatch(self.password_secret):
            raise ConfigError("mqtt.password_secret is 64 hex digits")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """A ``[[gateways]]`` entry: one Modbus TCP listener, up to 247 meters by unit id."""

    name: str
    port: int | None = None  # None: the serve command's base port + the gateway's index

    def __post_init__(self) -> None:
        if not is_meter_id(self.name):
            raise ConfigError(
                f"gateway name {self.name!r}: letters, digits, _ . - (max {METER_ID_MAX_LENGTH})"
            )
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ConfigError(f"gateway port is 0..65535, got {self.port!r}")


@dataclass(frozen=True, slots=True)
class FleetConfig:
    simulation: SimulationConfig
    meters: tuple[MeterConfig, ...]
    #: the fleet's secret from which the MQTT passwords of meters without ``mqtt_password`` are
    #: derived; None: such meters cannot log in to a broker
    mqtt_password_secret: str | None = None
    #: declared gateways; empty: the meters are spread over gateways (meter_sim/gateways.py)
    gateways: tuple[GatewayConfig, ...] = ()
    #: the ``[faults]`` table: faults of every meter without a ``faults`` table of its own
    faults: FaultsConfig | None = None

    def __post_init__(self) -> None:
        if not self.meters:
            raise ConfigError("the fleet has no meters: add a [[meters]] entry")
        MqttConfig(self.mqtt_password_secret)
        seen: set[str] = set()
        for meter in self.meters:
            if meter.meter_id in seen:
                raise ConfigError(f"meter id {meter.meter_id} appears twice")
            seen.add(meter.meter_id)
        self._check_gateways()

    def _check_gateways(self) -> None:
        names = [gateway.name for gateway in self.gateways]
        for name in names:
            if names.count(name) > 1:
                raise ConfigError(f"gateway {name} is declared twice")
        ports = [g.port for g in self.gateways if g.port]
        for port in ports:
            if ports.count(port) > 1:
                raise ConfigError(f"two gateways listen on port {port}")
        units: dict[tuple[str, int], str] = {}
        for meter in self.meters:
            if meter.gateway is None:
                if self.gateways:
                    raise ConfigError(
                        f"meter {meter.meter_id} names no gateway: the fleet declares "
                        "[[gateways]], so give every meter gateway = <name>"
                    )
                continue
            if meter.gateway not in names:
                raise ConfigError(
                    f"meter {meter.meter_id}: gateway {meter.gateway} is not declared in "
                    "[[gateways]]"
                )
            other = units.setdefault((meter.gateway, meter.modbus_unit), meter.meter_id)
            if other != meter.meter_id:
                raise ConfigError(
                    f"meters {other} and {meter.meter_id} share unit id {meter.modbus_unit} "
                    f"behind gateway {meter.gateway}"
                )

    def faults_of(self, meter: MeterConfig) -> FaultsConfig | None:
        """The faults ``meter`` injects: its own table, else the fleet's (None: none)."""
        return meter.faults if meter.faults is not None else self.faults

    def meters_without_mqtt_password(self) -> list[str]:
        """Meters that need ``mqtt_password_secret`` to log in to a broker."""
        return [m.meter_id for m in self.meters if m.mqtt_password is None]


def new_password_secret() -> str:
    """A fresh per-fleet secret for the meters' derived MQTT passwords (``[mqtt]``)."""
    return secrets.token_hex(32)


# -- the schema of a fleet file -------------------------------------------------------------------
#
# Every key of the TOML form, with its type and range, in one table per section. The loader
# converts a fleet file through these with msgspec (strict: no "5" for 5), so a wrong type, a value
# out of range and an unknown key are all refused with the key's path; the dataclasses above then
# check what spans several keys. tests/test_config.py checks that the tables and the dataclasses
# name the same keys.

HHMM_PATTERN = r"^(([01]?\d|2[0-3]):[0-5]\d|24:00)$"
HHMM = Annotated[str, Meta(pattern=HHMM_PATTERN)]
MAX_AMOUNT = 10**15  # minor currency units or Wh
MAX_WATTS = 1_000_000
Price = Annotated[int, Meta(ge=0, le=MAX_AMOUNT)]
Rate = Annotated[int, Meta(ge=1, le=4)]
IsoWeekday = Annotated[int, Meta(ge=1, le=7)]


def _int(low: int, high: int) -> Any:
    return Annotated[int, Meta(ge=low, le=high)]


def _text(pattern: str | None = None, min_length: int = 0, max_length: int = 256) -> Any:
    return Annotated[str, Meta(pattern=pattern, min_length=min_length, max_length=max_length)]


SIMULATION_KEYS: dict[str, Any] = {
    "speed": Annotated[float, Meta(gt=0, le=1e9)],
    "start": datetime | Annotated[float, Meta(ge=0, le=253_402_300_799)],
    "state_dir": _text(min_length=1, max_length=4096),
    "tick_seconds": Annotated[float, Meta(gt=0, le=3600)],
    "step_seconds": _int(1, 3600),
    "save_seconds": Annotated[float, Meta(gt=0, le=86400)],
}
TARIFF_KEYS: dict[str, Any] = {
    "prices": Annotated[tuple[Price, ...], Meta(min_length=1, max_length=4)],
    "weekday": Annotated[tuple[tuple[HHMM, Rate], ...], Meta(min_length=1)],
    "weekend": Annotated[tuple[tuple[HHMM, Rate], ...], Meta(min_length=1)],
}
LOAD_KEYS: dict[str, Any] = {
    "model": LoadModelName,
    "watts": _int(0, MAX_WATTS),
    "mean_watts": _int(0, MAX_WATTS),
    "seed": _int(0, 2**32 - 1),
    "csv_path": _text(min_length=1, max_length=4096),
}
STS_KEYS: dict[str, Any] = {
    "vending_key": _text(r"^([0-9a-fA-F]{16}|[0-9a-fA-F]{40})$"),
    "drn": _text(r"^(\d{11}|\d{13})$"),
    "sgc": _int(0, 999_999),
    "ti": _int(0, 99),
    "krn": _int(1, 15),
    "kt": _int(0, 3),
    "ken": _int(0, 255),
    "base_date": Literal[1993, 2014, 2035],
}
MQTT_KEYS: dict[str, Any] = {"password_secret": _text(SECRET.pattern)}
Share = Annotated[float, Meta(ge=0, le=1)]
DELAY_PATTERN = r"^\s*(fixed|uniform|exponential)\s*:[0-9a-z.: ]+$"
FAULT_KEYS: dict[str, Any] = {
    "drop": Share,
    "delay": _text(DELAY_PATTERN, min_length=1, max_length=64),
    "delay_rate": Share,
    "lose_ack": Share,
    "disconnect": Share,
    "corrupt": Share,
    "seed": _int(0, 2**63 - 1),
}
GATEWAY_KEYS: dict[str, Any] = {
    "name": _text(METER_ID_PATTERN, max_length=METER_ID_MAX_LENGTH),
    "port": _int(0, 65535),
}


def _table(name: str, keys: dict[str, Any], required: tuple[str, ...] = ()) -> Any:
    """A msgspec Struct of ``keys``: unknown keys refused, a key left out is UNSET."""
    specs: list[tuple[str, Any] | tuple[str, Any, Any]] = [(key, keys[key]) for key in required]
    specs += [(key, kind | UnsetType, UNSET) for key, kind in keys.items() if key not in required]
    return msgspec.defstruct(name, specs, forbid_unknown_fields=True, frozen=True)


def _many(kind: Any) -> Any:
    """``tuple[kind, ...]`` of a table made at run time."""
    return tuple.__class_getitem__((kind, ...))


TariffTable = _table("TariffTable", TARIFF_KEYS)
LoadTable = _table("LoadTable", LOAD_KEYS)
StsTable = _table("StsTable", STS_KEYS, required=("vending_key", "drn"))
MqttTable = _table("MqttTable", MQTT_KEYS)
GatewayTable = _table("GatewayTable", GATEWAY_KEYS, required=("name",))
FaultsTable = _table("FaultsTable", FAULT_KEYS)

#: a meter's keys as written in TOML (``id`` is MeterConfig.meter_id)
METER_KEYS: dict[str, Any] = {
    "id": _text(METER_ID_PATTERN, max_length=METER_ID_MAX_LENGTH),
    "serial": _text(max_length=32),  # the lengths of the identification registers
    "manufacturer": _text(max_length=8),
    "model": _text(max_length=16),
    "firmware": _text(max_length=16),
    "credit_unit": CreditUnitName,
    "currency": _text(r"^[A-Z]{3}$"),
    "currency_scale": _int(-4, 0),
    "initial_credit": _int(0, MAX_AMOUNT),
    "low_credit_threshold": _int(0, MAX_AMOUNT),
    "max_credit": _int(0, MAX_AMOUNT),
    "min_topup": _int(1, MAX_AMOUNT),
    "max_topup": _int(1, MAX_AMOUNT),
    "emergency_credit": _int(0, MAX_AMOUNT),
    "emergency_auto": bool,
    "local_disconnect": bool,
    "friendly_hours": tuple[tuple[HHMM, HHMM], ...],
    "friendly_days": tuple[IsoWeekday, ...],
    "debt_recovery_percent": _int(1, 100),
    "control_mode": _int(0, 6),
    "limiter_watts": _int(0, MAX_WATTS),
    "limiter_over_seconds": _int(0, 86400),
    "limiter_under_seconds": _int(0, 86400),
    "tariff": TariffTable,
    "load": LoadTable,
    "nominal_voltage_dv": _int(1, 65535),
    "nominal_frequency_chz": _int(1, 65535),
    "timezone_minutes": _int(-720, 840),
    "profile_period": _int(60, 86400),
    "profile_entries": _int(1, 100_000),
    "event_entries": _int(1, 100_000),
    "modbus_unit": _int(1, 247),
    "gateway": _text(METER_ID_PATTERN, max_length=METER_ID_MAX_LENGTH),
    "word_order": WordOrder,
    "auth_key": _text(r"^([0-9a-fA-F]{2}){1,64}$"),
    "mqtt_password": _text(min_length=1),
    "sts": StsTable,
    "faults": FaultsTable,
}
#: keys of a ``[[meters]]`` entry that are not a meter's: ``count`` meters named
#: ``<id_prefix><n>`` instead of one named ``id``
ENTRY_KEYS: dict[str, Any] = {
    "count": _int(1, 100_000),
    "id_prefix": _text(r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,55})?$"),
}
DefaultsTable = _table("DefaultsTable", {k: v for k, v in METER_KEYS.items() if k != "id"})
MeterTable = _table("MeterTable", {**METER_KEYS, **ENTRY_KEYS})
SimulationTable = _table("SimulationTable", SIMULATION_KEYS)
FleetTable = msgspec.defstruct(
    "FleetTable",
    [
        ("meters", Annotated[_many(MeterTable), Meta(min_length=1)]),
        ("simulation", SimulationTable | UnsetType, UNSET),
        ("defaults", DefaultsTable | UnsetType, UNSET),
        ("mqtt", MqttTable | UnsetType, UNSET),
        ("gateways", _many(GatewayTable) | UnsetType, UNSET),
        ("faults", FaultsTable | UnsetType, UNSET),
    ],
    forbid_unknown_fields=True,
    frozen=True,
)

#: section -> (its keys, the dataclass they configure); every dataclass field is a key
SCHEMA: dict[str, tuple[dict[str, Any], type[Any]]] = {
    "simulation": (SIMULATION_KEYS, SimulationConfig),
    "meter": (METER_KEYS, MeterConfig),
    "tariff": (TARIFF_KEYS, TariffConfig),
    "load": (LOAD_KEYS, LoadConfig),
    "sts": (STS_KEYS, StsConfig),
    "mqtt": (MQTT_KEYS, MqttConfig),
    "gateway": (GATEWAY_KEYS, GatewayConfig),
    "faults": (FAULT_KEYS, FaultsConfig),
}

#: what a key whose value must have a form looks like, for the error message
_FORMS = {
    "id": "letters, digits, _ . - (1 to 64, starting with a letter or digit)",
    "id_prefix": "letters, digits, _ . - (up to 56)",
    "gateway": "letters, digits, _ . - (1 to 64, starting with a letter or digit)",
    "name": "letters, digits, _ . - (1 to 64, starting with a letter or digit)",
    "currency": "a 3-letter ISO 4217 code such as KES",
    "auth_key": "hex digits, 1 to 64 bytes",
    "vending_key": "16 or 40 hex digits",
    "drn": "11 or 13 digits",
    "password_secret": "64 hex digits (meter-sim init writes one)",
    "delay": _DELAY_FORMS,
}
_PATH = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_TYPE_NAMES = {"object": "table", "array": "array", "str": "string"}


def _choices(key: str) -> str:
    for keys, _cls in SCHEMA.values():
        kind = keys.get(key)
        if kind is not None and get_args(kind) and get_origin(kind) is Literal:
            return " or ".join(repr(value) for value in get_args(kind))
    return ""


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _schema_error(exc: msgspec.ValidationError, root: str = "") -> ConfigError:
    """One line naming the key's path: ``meters[2].count: expected int, got string``."""
    match = _PATH.match(str(exc))
    assert match is not None  # the pattern matches any text
    what = match["what"]
    path = (root + (match["path"] or "")).removeprefix(".")
    names = re.findall(r"[A-Za-z_]+", path)
    key = names[-1] if names else ""
    if found := re.match(r"Object contains unknown field `(.+)`", what):
        path, message = _join(path, found[1]), "unknown key"
    elif found := re.match(r"Object missing required field `(.+)`", what):
        path, message = _join(path, found[1]), "required key is missing"
        if path == "meters":
            message = "the fleet has no meters: add a [[meters]] entry"
    elif found := re.match(r"Expected `([^`]+)`, got `([^`]+)`", what):
        expected, got = (_TYPE_NAMES.get(name, name) for name in found.groups())
        expected = expected.replace(" | ", " or ")
        message = f"expected {expected}, got {got}"
    elif found := re.match(r"Expected `(?:int|float)` (.+)", what):
        message = "must be " + re.sub(r"(\d)\.0\b", r"\1", found[1])
    elif found := re.match(r"Expected `str` of length (.+)", what):
        message = f"must be a string of length {found[1]}"
    elif what.startswith("Expected `str` matching regex"):
        message = f"must be {_FORMS.get(key, 'of the documented form')}"
        if HHMM_PATTERN in what.replace("\\\\", "\\"):
            message = "must be a time of day HH:MM (00:00 to 24:00)"
    elif found := re.match(r"Expected `array` of length (.+)", what):
        message = f"must have {found[1].replace('>=', 'at least').replace('<=', 'at most')} "
        message += "entries"
        if path == "meters":
            message = "the fleet has no meters: add a [[meters]] entry"
    elif found := re.match(r"Invalid enum value (.+)", what):
        message = f"{found[1]} is not {_choices(key) or 'allowed'}"
    else:
        message = what[:1].lower() + what[1:]
    return ConfigError(f"{path or 'the fleet file'}: {message}")


def _present(table: Any) -> dict[str, Any]:
    return {
        name: getattr(table, name)
        for name in table.__struct_fields__
        if getattr(table, name) is not UNSET
    }


def _epoch(value: datetime | float) -> float:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    return float(value)


def _meter_kwargs(table: Any) -> dict[str, Any]:
    """MeterConfig keyword arguments from a validated meter (or defaults) table."""
    kwargs: dict[str, Any] = {}
    for key, value in _present(table).items():
        if key in ENTRY_KEYS:
            continue
        if key == "id":
            kwargs["meter_id"] = value
        elif key == "friendly_hours":
            kwargs[key] = tuple((parse_hhmm(a), parse_hhmm(b)) for a, b in value)
        elif key == "tariff":
            tariff = _present(value)
            for name in ("weekday", "weekend"):
                if name in tariff:
                    tariff[name] = tuple((parse_hhmm(t), rate) for t, rate in tariff[name])
            kwargs[key] = TariffConfig(**tariff)
        elif key == "load":
            kwargs[key] = LoadConfig(**_present(value))
        elif key == "sts":
            kwargs[key] = StsConfig(**_present(value))
        elif key == "faults":
            kwargs[key] = _build("faults", partial(_faults, value))
        else:
            kwargs[key] = value
    return kwargs


def _faults(table: Any) -> FaultsConfig:
    """A FaultsConfig from a validated faults table."""
    keys = _present(table)
    if "delay" in keys:
        keys["delay"] = _build("delay", partial(Delay.parse, keys["delay"]))
    return FaultsConfig(**keys)


def faults_from_text(text: str) -> FaultsConfig:
    """The faults of ``--faults``: ``key=value`` items separated by commas with the keys of a
    ``[faults]`` table (``drop=0.05,delay=uniform:0.1:0.5,lose_ack=0.1``), checked by the same
    schema; ConfigError naming the item for anything else."""
    raw: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not item.strip():
            raise ConfigError(f"an empty item in {text!r}: give key=value items, e.g. drop=0.05")
        if not sep or not key or not value:
            raise ConfigError(f"{item.strip()!r}: give key=value, e.g. drop=0.05")
        if key not in FAULT_KEYS:
            raise ConfigError(f"{key}: unknown fault key (known: {', '.join(FAULT_KEYS)})")
        if key in raw:
            raise ConfigError(f"{key}: given twice")
        raw[key] = value
    try:
        table: Any = msgspec.convert(raw, FaultsTable, strict=False)
    except msgspec.ValidationError as exc:
        raise _schema_error(exc) from exc
    return _faults(table)


def _build(where: str, build: Callable[[], T]) -> T:
    """``build()``, its refusal (what spans several keys) prefixed by where it was."""
    try:
        return build()
    except (ConfigError, ValidationError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def meter_from_mapping(raw: dict[str, Any]) -> MeterConfig:
    """A MeterConfig from one TOML table of meter keys (as in docs/configuration.md)."""
    try:
        table: Any = msgspec.convert(raw, MeterTable, strict=True)
    except msgspec.ValidationError as exc:
        raise _schema_error(exc, "meter") from exc
    kwargs = _build("meter", lambda: _meter_kwargs(table))
    if "meter_id" not in kwargs or table.count is not UNSET or table.id_prefix is not UNSET:
        raise ConfigError("meter: one meter has an id (count and id_prefix are for a fleet)")
    return _build("meter", lambda: MeterConfig(**kwargs))


def fleet_from_mapping(raw: dict[str, Any]) -> FleetConfig:
    """A FleetConfig from a parsed fleet file; every problem is one ConfigError with the key's
    path."""
    try:
        document: Any = msgspec.convert(raw, FleetTable, strict=True)
    except msgspec.ValidationError as exc:
        raise _schema_error(exc) from exc
    sim = _present(document.simulation) if document.simulation is not UNSET else {}
    if "start" in sim:
        sim["start"] = _epoch(sim["start"])
    simulation = _build("simulation", lambda: SimulationConfig(**sim))
    defaults: dict[str, Any] = {}
    if document.defaults is not UNSET:
        defaults = _build("defaults", lambda: _meter_kwargs(document.defaults))
    meters: list[MeterConfig] = []
    for index, entry in enumerate(document.meters):
        where = f"meters[{index}]"
        kwargs = {**defaults, **_build(where, partial(_meter_kwargs, entry))}
        if entry.count is UNSET:
            if entry.id_prefix is not UNSET:
                raise ConfigError(f"{where}.id_prefix: goes with count")
            if "meter_id" not in kwargs:
                raise ConfigError(f"{where}.id: required key is missing (or give count)")
            meters.append(_build(where, partial(MeterConfig, **kwargs)))
            continue
        if entry.id is not UNSET:
            raise ConfigError(f"{where}: give id (one meter) or count, not both")
        prefix = "MTR-" if entry.id_prefix is UNSET else entry.id_prefix
        first_unit = kwargs.pop("modbus_unit", 1)
        width = max(4, len(str(entry.count)))
        for n in range(1, entry.count + 1):
            meter = {
                **kwargs,
                "meter_id": f"{prefix}{n:0{width}d}",
                "modbus_unit": (first_unit + n - 2) % 247 + 1,
            }
            meters.append(_build(where, partial(MeterConfig, **meter)))
    secret = None
    if document.mqtt is not UNSET and document.mqtt.password_secret is not UNSET:
        secret = document.mqtt.password_secret
    gateways: list[GatewayConfig] = []
    if document.gateways is not UNSET:
        for index, entry in enumerate(document.gateways):
            gateways.append(_build(f"gateways[{index}]", partial(GatewayConfig, **_present(entry))))
    faults = None
    if document.faults is not UNSET:
        faults = _build("faults", partial(_faults, document.faults))
    return _build(
        "the fleet file",
        lambda: FleetConfig(simulation, tuple(meters), secret, tuple(gateways), faults),
    )


def load_fleet(path: Path) -> FleetConfig:
    """Read a fleet file; every problem is a ConfigError naming the file."""
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    try:
        return fleet_from_mapping(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def default_fleet(count: int = 3, **overrides: Any) -> FleetConfig:
    """A small fleet with every default and a fresh MQTT password secret, for the demo and
    tests."""
    meters = tuple(
        replace(MeterConfig(f"MTR-{n:04d}"), modbus_unit=(n - 1) % 247 + 1, **overrides)
        for n in range(1, count + 1)
    )
    return FleetConfig(SimulationConfig(), meters, new_password_secret())


# -- documentation: every key, generated into docs/configuration.md -------------------------------

_TIME_PAIRS = {"friendly_hours"}

#: (table, key) -> what it means. A test checks that every field of every table is described.
FIELD_DOCS: dict[tuple[str, str], str] = {
    ("simulation", "speed"): "Simulated seconds per real second (3600: an hour a second).",
    ("simulation", "start"): "Simulated start time (ISO-8601 or epoch s); default: where the "
    "last run stopped, or now.",
    ("simulation", "state_dir"): "Directory of the meters' non-volatile state (`meters.db`, "
    "SQLite in WAL mode; a directory of per-meter JSON files of before is read as well).",
    ("simulation", "tick_seconds"): "Real seconds between two advances of the whole fleet.",
    ("simulation", "step_seconds"): "Longest integration step of a meter, in simulated seconds "
    "(tariff switches are seen at this resolution; each step draws the load of its start). "
    "`meter-sim run --integration events` gives the same results as taking the steps one by "
    "one, faster.",
    ("simulation", "save_seconds"): "Real seconds between periodic saves of every meter's "
    "state while serving or running (commands and top-ups are saved at once, before they are "
    "acknowledged); a save that fails is logged and retried, the meters keep serving.",
    ("meter", "meter_id"): "The meter's id (`id` in TOML); letters, digits, `_ . -`, up to 64.",
    ("meter", "serial"): "Serial number (OBIS 0.0.96.1.0.255); default: the meter id.",
    ("meter", "manufacturer"): "Manufacturer shown in the identification block.",
    ("meter", "model"): "Model shown in the identification block.",
    ("meter", "firmware"): "Firmware version shown in the identification block.",
    ("meter", "credit_unit"): "`money`: credit in minor currency units, charged at the unit price "
    "of the rate in force; `energy`: credit in Wh (STS tokens add 0.1 kWh steps).",
    ("meter", "currency"): "ISO 4217 code of a monetary account.",
    ("meter", "currency_scale"): "Power of ten of the account's minor unit, -4..0 (-2: amounts "
    "are in cents; 0 for a currency without decimals), as the snapshot and the COSEM Account "
    "carry it.",
    ("meter", "initial_credit"): "Credit of a new meter, in the account's unit.",
    ("meter", "low_credit_threshold"): "A low-credit event when available credit falls below it.",
    ("meter", "max_credit"): "Most credit the meter may hold; a larger top-up is refused.",
    ("meter", "min_topup"): "Smallest top-up accepted.",
    ("meter", "max_topup"): "Largest top-up accepted.",
    ("meter", "emergency_credit"): "Emergency credit the customer may invoke once credit is low "
    "(0: none); repaid from the next top-up.",
    ("meter", "emergency_auto"): "Invoke the emergency credit by itself when credit runs out.",
    ("meter", "local_disconnect"): "Open the relay by itself when credit and emergency credit "
    "are used up; `false`: the meter keeps supply (and records debt) until the head-end "
    "disconnects it remotely, by its policy.",
    ("meter", "friendly_hours"): 'Daily periods `[["18:00", "24:00"], ...]` when the meter does '
    "not disconnect for lack of credit; debt accrues instead.",
    ("meter", "friendly_days"): "ISO weekdays (1 Monday .. 7 Sunday) friendly all day.",
    ("meter", "debt_recovery_percent"): "Share of each top-up that repays debt before it "
    "becomes credit.",
    ("meter", "control_mode"): "Disconnect control mode 0..6 (DLMS class 70); see "
    "[the mode table](register-map.md#disconnect-control-modes). 6: remote disconnect, "
    "local disconnect for credit, automatic local reconnection after a top-up, remote "
    "reconnection to ready-for-reconnection.",
    ("meter", "limiter_watts"): "Power limit in W (0: limiter off).",
    ("meter", "limiter_over_seconds"): "How long power must exceed the limit before the relay "
    "trips.",
    ("meter", "limiter_under_seconds"): "How long after a trip the relay recloses by itself "
    "(modes 5 and 6).",
    ("meter", "tariff"): "Time-of-use tariff (table below).",
    ("meter", "load"): "Load model (table below).",
    ("meter", "nominal_voltage_dv"): "Nominal voltage in 0.1 V.",
    ("meter", "nominal_frequency_chz"): "Nominal frequency in 0.01 Hz.",
    ("meter", "timezone_minutes"): "Local time offset from UTC in minutes (tariffs, friendly "
    "hours).",
    ("meter", "profile_period"): "Load profile capture period in seconds (divides a day).",
    ("meter", "profile_entries"): "Load profile rows kept (ring buffer).",
    ("meter", "event_entries"): "Event log entries kept (ring buffer).",
    ("meter", "modbus_unit"): "Modbus unit id 1..247 (distinct among the meters of one gateway).",
    ("meter", "gateway"): "Name of the `[[gateways]]` entry the meter stands behind; unset "
    "(and no gateways declared): meters are spread over gateways by unit id, 247 to a gateway.",
    ("meter", "word_order"): "Modbus word order of 32/64-bit values: `big` (high word first) or "
    "`little`.",
    ("meter", "auth_key"): "Hex key for command authentication tags (HMAC-SHA256); unset: "
    "commands need no tag (lab use).",
    ("meter", "mqtt_password"): "The meter's MQTT password; unset: derived from the fleet's "
    "`[mqtt] password_secret` (serving MQTT without either is refused).",
    ("meter", "sts"): "STS keypad parameters (table below); unset: no keypad.",
    ("meter", "faults"): "Faults this meter injects into its Modbus TCP and MQTT answers "
    "(table below); unset: the fleet's `[faults]`, if any.",
    ("tariff", "prices"): "Unit price of each rate (1..4), minor currency units per kWh.",
    ("tariff", "weekday"): 'Rate switch points Monday-Friday: `[["00:00", 2], ["07:00", 1], '
    '["23:00", 2]]`.',
    ("tariff", "weekend"): "Rate switch points Saturday and Sunday.",
    ("load", "model"): "`residential` (seeded synthetic household: daily and weekly shape, "
    "noise and appliance spikes, constant over each five-minute slot), `constant` or `csv` "
    "(held from row to row).",
    ("load", "watts"): "Power of the constant model.",
    ("load", "mean_watts"): "Long-run mean power of the residential model.",
    ("load", "seed"): "Seed of the residential model; default: derived from the meter id.",
    ("load", "csv_path"): "CSV of `timestamp,watts` rows replayed in a loop (csv model).",
    ("sts", "vending_key"): "Vending key: 16 hex digits (DKGA02) or 40 (DKGA04).",
    ("sts", "drn"): "11- or 13-digit STS meter number (with its Luhn digit).",
    ("sts", "sgc"): "Supply group code.",
    ("sts", "ti"): "Tariff index.",
    ("sts", "krn"): "Key revision number.",
    ("sts", "kt"): "Key type (2: unique decoder key).",
    ("sts", "ken"): "Key expiry number (255: never expires).",
    ("sts", "base_date"): "Base date of token ids: 1993, 2014 or 2035.",
    ("mqtt", "password_secret"): "The fleet's secret (64 hex digits; `meter-sim init` writes a "
    "fresh one): a meter without `mqtt_password` logs in to the broker with the first 32 hex "
    "digits of HMAC-SHA256 over its id keyed with this secret, so a broker's password file can "
    "be generated from the fleet file. Keep it out of version control. Unset: every meter that "
    "serves MQTT needs its own `mqtt_password`.",
    ("faults", "drop"): "Share of requests lost on the way in: not executed, not answered.",
    ("faults", "delay"): "How late a delayed answer is: `fixed:S`, `uniform:LOW:HIGH` or "
    "`exponential:MEAN` (seconds or durations such as `250ms`, at most 60 s); unset: none.",
    ("faults", "delay_rate"): "Share of the answers that are sent which are delayed (a corrupt "
    "one included), when `delay` is set.",
    ("faults", "lose_ack"): "Share of requests whose write (Modbus 6, 16, 23; an MQTT command) "
    "is executed and its answer lost; a read it falls on is answered.",
    ("faults", "disconnect"): "Share of requests met by a lost connection instead of being "
    "executed: the Modbus TCP connection is closed, the MQTT session dropped without a "
    "DISCONNECT (the broker publishes the meter's will; it reconnects after its back-off).",
    ("faults", "corrupt"): "Share of requests executed and answered malformed: a Modbus TCP PDU "
    "one byte short of what its byte count promises, an MQTT payload that is not JSON.",
    ("faults", "seed"): "Seed of the draws (each meter's generator is seeded with it and the "
    "meter's id): the same requests in the same order meet the same faults.",
    ("gateway", "name"): "The gateway's name, which meters give as `gateway`.",
    ("gateway", "port"): "Modbus TCP port it listens on (0: a free port); unset: "
    "`meter-sim serve --modbus-port` plus the gateway's index in the file.",
}

DOC_TABLES: tuple[tuple[str, str, type[Any]], ...] = (
    ("simulation", "[simulation]", SimulationConfig),
    ("meter", "[defaults] and [[meters]]", MeterConfig),
    ("tariff", "tariff (inside a meter or [defaults])", TariffConfig),
    ("load", "load (inside a meter or [defaults])", LoadConfig),
    ("sts", "sts (inside a meter or [defaults])", StsConfig),
    ("mqtt", "[mqtt]", MqttConfig),
    ("gateway", "[[gateways]]", GatewayConfig),
    ("faults", "[faults] and faults (inside a meter or [defaults])", FaultsConfig),
)


def _default_text(cls: type[Any], name: str) -> str:
    spec = next(f for f in fields(cls) if f.name == name)
    if spec.default is not MISSING:
        value = spec.default
    elif spec.default_factory is not MISSING:
        return "(table)"
    else:
        return "required"
    if name in _TIME_PAIRS or (cls is TariffConfig and name in ("weekday", "weekend")):
        pairs = [(format_hhmm(a), format_hhmm(b) if name in _TIME_PAIRS else b) for a, b in value]
        return "`" + str([list(p) for p in pairs]).replace("'", '"') + "`"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, tuple):
        return "`" + str(list(value)) + "`"
    return f"`{value}`"


def render_markdown() -> str:
    """docs/configuration.md, from the dataclasses and FIELD_DOCS."""
    lines = [
        "# Configuration",
        "",
        "<!-- Generated by `python -m cli.gendocs` from meter_sim/config.py. Do not edit. -->",
        "",
        "A fleet file is TOML. `[simulation]` sets the clock; `[defaults]` sets keys for every "
        "meter; each `[[meters]]` entry is one meter (`id = ...`) or `count` meters named "
        "`<id_prefix><n>` with consecutive Modbus unit ids from `modbus_unit`. "
        "`meter-sim init` writes a starting file. Every key is optional except a meter's id. "
        "Each key is checked for the type and range its table gives, and an unknown key is "
        "refused: a problem is one line naming the file and the key's path, e.g. "
        "`fleet.toml: meters[2].count: expected int, got string`.",
        "",
        "Over Modbus TCP the meters stand behind gateways, up to 247 each, by unit id: without "
        "`[[gateways]]` a fleet of N meters with consecutive unit ids (as `count` makes them) is "
        "spread over ceil(N/247) gateways on consecutive ports from `meter-sim serve "
        "--modbus-port` (each meter goes to the first gateway where its unit id is free). "
        "With `[[gateways]]` entries every meter names its gateway (`gateway = ...`) and the "
        "unit ids behind one gateway are distinct. "
        "[The register map](register-map.md#addressing-a-fleet) says how a master addresses them.",
        "",
        "```toml",
        "[simulation]",
        "speed = 3600",
        "",
        "[defaults]",
        'credit_unit = "money"',
        'currency = "KES"',
        "initial_credit = 20000",
        "",
        "[defaults.load]",
        'model = "residential"',
        "mean_watts = 450",
        "",
        "[[meters]]",
        'id_prefix = "MTR-"',
        "count = 100",
        "",
        "[[meters]]",
        'id = "LAB-1"',
        'credit_unit = "energy"',
        "limiter_watts = 3000",
        'auth_key = "00112233445566778899aabbccddeeff"',
        "",
        "[mqtt]",
        'password_secret = "<64 hex digits written by meter-sim init>"',
        "```",
        "",
    ]
    for section, title, cls in DOC_TABLES:
        keys = SCHEMA[section][0]
        lines += [f"## {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for spec in fields(cls):
            key = "id" if spec.name == "meter_id" else spec.name
            meaning = FIELD_DOCS[(section, spec.name)]
            kind = _type_text(msgspec.inspect.type_info(keys[key]), key)
            lines.append(f"| `{key}` | {kind} | {_default_text(cls, spec.name)} | {meaning} |")
        lines.append("")
    return "\n".join([*lines, FAULTS_TEXT])


FAULTS_TEXT = """## Faults

`meter-sim serve` can make meters misbehave over Modbus TCP and MQTT, so that a head-end's
retries and exactly-once delivery are tested under chaos end to end (a serial line's faults are
the rig's, scripted in time: [hil](hil.md)). A meter injects the faults of its own `faults`
table, else those of the fleet's `[faults]` table; `meter-sim serve --faults` gives every
meter the same faults instead, with the keys of the table as `key=value` items, and
`--faults-seed` sets every seed:

```toml
[faults]                # every meter without a faults table of its own
drop = 0.05
lose_ack = 0.1
delay = "uniform:0.1:0.5"
delay_rate = 0.2
seed = 7

[[meters]]
id = "LAB-1"
faults = { corrupt = 0.02, disconnect = 0.01 }
```

```sh
meter-sim serve --faults-seed 7 \\
    --faults "drop=0.05,delay=uniform:0.1:0.5,lose_ack=0.1,disconnect=0.01,corrupt=0.02"
```

Each request a meter receives (a Modbus request to its unit id, an MQTT command or read
request) takes one draw from the meter's generator: at most one of `drop`, `lose_ack`,
`disconnect` and `corrupt` (their shares add up to at most 1), and, for an answer that is
sent, a delay with probability `delay_rate`. A `drop` is not executed; a `lose_ack` is a
write that is executed and never acknowledged, the case an exactly-once protocol exists for
(over Modbus, `drop` and `lose_ack` of a function-23 command differ only in whether the
command ran); a `disconnect` closes the TCP connection or drops the MQTT session without
executing the request. Every injected fault is logged in one line (WARNING: the meter, the
kind, what it hit) and counted: `--ready-json` prints each meter's faults with the endpoints,
and when serving ends a last JSON line `{"stopped": true, "faults": {"totals": {...},
"meters": {...}}}` with the counts per meter and kind; without `--ready-json` the counts are
logged in one line.

What the head-end makes of a `corrupt` answer: the command may have run, so its confirmed
execution takes the answer as lost, asks the meter for its last result and resends only if
the meter did not run it; it is confirmed only by an answer that decodes. Over MQTT the
malformed payload fails the waiting call at once (`DecodeError`, logged by the link hub).
Over Modbus TCP, pymodbus cannot decode the short PDU and does not tell its caller: its
framer raises inside the protocol's `data_received`, asyncio logs that at ERROR with a
traceback (logger `asyncio`, "Fatal error: protocol.data_received() call failed") and closes
the connection. The head-end's Modbus link notices the connection drop through pymodbus'
`trace_connect` hook and ends the request at once with `LinkCorrupt` (a WARNING line with the
bytes received) instead of waiting out its time-out; a read is then tried again on a new
connection, a command asked about.
"""


def _number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


def _bounds(info: Any) -> str:
    if info.gt is not None:
        return f" > {_number(info.gt)}" + (f", at most {_number(info.le)}" if info.le else "")
    if info.ge is not None and info.le is not None:
        return f" {_number(info.ge)}..{_number(info.le)}"
    return ""


def _type_text(info: Any, key: str = "") -> str:
    """A key's type and range as the schema checks them, for the tables of the document."""
    inspect = msgspec.inspect
    if isinstance(info, inspect.IntType):
        return "integer" + _bounds(info)
    if isinstance(info, inspect.FloatType):
        return "number" + _bounds(info)
    if isinstance(info, inspect.BoolType):
        return "boolean"
    if isinstance(info, inspect.LiteralType):
        return " or ".join(f"`{value!r}`".replace("'", '"') for value in info.values)
    if isinstance(info, inspect.StrType):
        if info.pattern == HHMM_PATTERN:
            return "HH:MM"
        if key in _FORMS:
            return _FORMS[key].removesuffix(" (meter-sim init writes one)")
        if info.max_length is not None and info.max_length < 256:
            return f"string (up to {info.max_length})"
        return "string"
    if isinstance(info, inspect.VarTupleType):
        items = f"array of {_type_text(info.item_type)}"
        if info.max_length is not None:
            items += f" ({info.min_length or 0}..{info.max_length})"
        return items
    if isinstance(info, inspect.TupleType):
        return "[" + ", ".join(_type_text(item) for item in info.item_types) + "]"
    if isinstance(info, inspect.StructType):
        return "table"
    if isinstance(info, inspect.DateTimeType):
        return "date-time (UTC unless given)"
    if isinstance(info, inspect.UnionType):
        return " or ".join(_type_text(member, key) for member in info.types)
    return "value"
