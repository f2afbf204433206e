"""Meter and fleet configuration, read from TOML. Every key has a default (docs/configuration.md).

A fleet file has a ``[simulation]`` table, a ``[defaults]`` table whose keys apply to every meter,
and ``[[meters]]`` entries: one meter each, or ``count`` meters named ``<id_prefix><n>``.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import MISSING, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

from protocols.errors import ConfigError, ValidationError
from protocols.units import Money

CreditUnitName = Literal["money", "energy"]
LoadModelName = Literal["residential", "constant", "csv"]
WordOrder = Literal["big", "little"]
METER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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
    currency_exponent: int = 2
    initial_credit: int = 0
    low_credit_threshold: int = 5000
    max_credit: int = 100_000_000  # most credit the meter holds
    min_topup: int = 1
    max_topup: int = 10_000_000
    emergency_credit: int = 2000  # 0: no emergency credit
    emergency_auto: bool = False  # invoke emergency credit by itself when credit runs out
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
    word_order: WordOrder = "big"
    auth_key: str | None = None  # hex; None: commands need no tag (lab use)
    mqtt_password: str | None = None
    sts: StsConfig | None = None

    def __post_init__(self) -> None:
        if not METER_ID.fullmatch(self.meter_id):
            raise ConfigError(f"meter id {self.meter_id!r}: letters, digits, _ . - (max 64)")
        if self.credit_unit not in get_args(CreditUnitName):
            raise ConfigError(f"credit_unit is money or energy, got {self.credit_unit!r}")
        if self.control_mode not in range(7):
            raise ConfigError(f"control_mode is 0..6, got {self.control_mode!r}")
        if not 1 <= self.modbus_unit <= 247:
            raise ConfigError(f"modbus_unit is 1..247, got {self.modbus_unit!r}")
        if self.word_order not in get_args(WordOrder):
            raise ConfigError(f"word_order is big or little, got {self.word_order!r}")
        try:
            Money(0, self.currency, self.currency_exponent)
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

    def __post_init__(self) -> None:
        if not self.speed > 0:
            raise ConfigError("simulation.speed must be positive")
        if not self.tick_seconds > 0:
            raise ConfigError("simulation.tick_seconds must be positive")
        if not 1 <= self.step_seconds <= 3600:
            raise ConfigError("simulation.step_seconds is 1..3600")


@dataclass(frozen=True, slots=True)
class FleetConfig:
    simulation: SimulationConfig
    meters: tuple[MeterConfig, ...]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for meter in self.meters:
            if meter.meter_id in seen:
                raise ConfigError(f"meter id {meter.meter_id} appears twice")
            seen.add(meter.meter_id)


# -- reading TOML ---------------------------------------------------------------------------------

_TIME_PAIRS = {"friendly_hours"}


def _parse_time(value: Any) -> float:
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
        return moment.timestamp()
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ConfigError(f"not an ISO-8601 time: {value!r}") from exc
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    if isinstance(value, int | float):
        return float(value)
    raise ConfigError(f"not a time: {value!r}")


def _tariff(raw: dict[str, Any]) -> TariffConfig:
    allowed = {"prices", "weekday", "weekend"}
    _unknown(raw, allowed, "tariff")
    kwargs: dict[str, Any] = {}
    if "prices" in raw:
        kwargs["prices"] = tuple(raw["prices"])
    for name in ("weekday", "weekend"):
        if name in raw:
            kwargs[name] = tuple((parse_hhmm(t), int(r)) for t, r in raw[name])
    return TariffConfig(**kwargs)


def _unknown(raw: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(raw) - allowed)
    if extra:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(extra)}")


def meter_from_mapping(raw: dict[str, Any]) -> MeterConfig:
    """A MeterConfig from a TOML table (keys as in docs/configuration.md)."""
    raw = dict(raw)
    meter_fields = {f.name for f in fields(MeterConfig)} - {"meter_id"}
    _unknown(raw, meter_fields | {"id"}, "a meter")
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "id":
            kwargs["meter_id"] = str(value)
        elif key == "tariff":
            kwargs["tariff"] = _tariff(value)
        elif key == "load":
            _unknown(value, {f.name for f in fields(LoadConfig)}, "load")
            kwargs["load"] = LoadConfig(**value)
        elif key == "sts":
            _unknown(value, {f.name for f in fields(StsConfig)}, "sts")
            kwargs["sts"] = StsConfig(**value)
        elif key in _TIME_PAIRS:
            kwargs[key] = tuple((parse_hhmm(a), parse_hhmm(b)) for a, b in value)
        elif key == "friendly_days":
            kwargs[key] = tuple(int(d) for d in value)
        else:
            kwargs[key] = value
    try:
        return MeterConfig(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"meter configuration: {exc}") from exc
    except ValidationError as exc:
        raise ConfigError(str(exc)) from exc


def fleet_from_mapping(raw: dict[str, Any]) -> FleetConfig:
    _unknown(raw, {"simulation", "defaults", "meters"}, "the fleet file")
    sim_raw = dict(raw.get("simulation", {}))
    _unknown(sim_raw, {f.name for f in fields(SimulationConfig)}, "simulation")
    if "start" in sim_raw:
        sim_raw["start"] = _parse_time(sim_raw["start"])
    simulation = SimulationConfig(**sim_raw)
    defaults = dict(raw.get("defaults", {}))
    meters: list[MeterConfig] = []
    for raw_entry in raw.get("meters", []):
        entry = {**defaults, **raw_entry}
        count = entry.pop("count", None)
        if count is None:
            meters.append(meter_from_mapping(entry))
            continue
        prefix = str(entry.pop("id_prefix", "MTR-"))
        first_unit = int(entry.pop("modbus_unit", 1))
        width = max(4, len(str(count)))
        for n in range(1, int(count) + 1):
            unit = (first_unit + n - 2) % 247 + 1
            meters.append(
                meter_from_mapping({**entry, "id": f"{prefix}{n:0{width}d}", "modbus_unit": unit})
            )
    return FleetConfig(simulation, tuple(meters))


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
    """A small fleet with every default, for the demo and tests."""
    meters = tuple(
        replace(MeterConfig(f"MTR-{n:04d}"), modbus_unit=(n - 1) % 247 + 1, **overrides)
        for n in range(1, count + 1)
    )
    return FleetConfig(SimulationConfig(), meters)


# -- documentation: every key, generated into docs/configuration.md -------------------------------

#: (table, key) -> what it means. A test checks that every field of every table is described.
FIELD_DOCS: dict[tuple[str, str], str] = {
    ("simulation", "speed"): "Simulated seconds per real second (3600: an hour a second).",
    ("simulation", "start"): "Simulated start time (ISO-8601 or epoch s); default: where the "
    "last run stopped, or now.",
    ("simulation", "state_dir"): "Directory of the meters' non-volatile state files.",
    ("simulation", "tick_seconds"): "Real seconds between two advances of the whole fleet.",
    ("simulation", "step_seconds"): "Longest integration step of a meter, in simulated seconds "
    "(tariff switches are seen at this resolution).",
    ("meter", "meter_id"): "The meter's id (`id` in TOML); letters, digits, `_ . -`, up to 64.",
    ("meter", "serial"): "Serial number (OBIS 0.0.96.1.0.255); default: the meter id.",
    ("meter", "manufacturer"): "Manufacturer shown in the identification block.",
    ("meter", "model"): "Model shown in the identification block.",
    ("meter", "firmware"): "Firmware version shown in the identification block.",
    ("meter", "credit_unit"): "`money`: credit in minor currency units, charged at the unit price "
    "of the rate in force; `energy`: credit in Wh (STS tokens add 0.1 kWh steps).",
    ("meter", "currency"): "ISO 4217 code of a monetary account.",
    ("meter", "currency_exponent"): "Decimals of the currency (2: amounts are in cents).",
    ("meter", "initial_credit"): "Credit of a new meter, in the account's unit.",
    ("meter", "low_credit_threshold"): "A low-credit event when available credit falls below it.",
    ("meter", "max_credit"): "Most credit the meter may hold; a larger top-up is refused.",
    ("meter", "min_topup"): "Smallest top-up accepted.",
    ("meter", "max_topup"): "Largest top-up accepted.",
    ("meter", "emergency_credit"): "Emergency credit the customer may invoke once credit is low "
    "(0: none); repaid from the next top-up.",
    ("meter", "emergency_auto"): "Invoke the emergency credit by itself when credit runs out.",
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
    ("meter", "modbus_unit"): "Modbus unit id 1..247.",
    ("meter", "word_order"): "Modbus word order of 32/64-bit values: `big` (high word first) or "
    "`little`.",
    ("meter", "auth_key"): "Hex key for command authentication tags (HMAC-SHA256); unset: "
    "commands need no tag (lab use).",
    ("meter", "mqtt_password"): "The meter's MQTT password; unset: derived for local brokers.",
    ("meter", "sts"): "STS keypad parameters (table below); unset: no keypad.",
    ("tariff", "prices"): "Unit price of each rate (1..4), minor currency units per kWh.",
    ("tariff", "weekday"): 'Rate switch points Monday-Friday: `[["00:00", 2], ["07:00", 1], '
    '["23:00", 2]]`.',
    ("tariff", "weekend"): "Rate switch points Saturday and Sunday.",
    ("load", "model"): "`residential` (seeded synthetic household), `constant` or `csv`.",
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
}

DOC_TABLES: tuple[tuple[str, str, type[Any]], ...] = (
    ("simulation", "[simulation]", SimulationConfig),
    ("meter", "[defaults] and [[meters]]", MeterConfig),
    ("tariff", "tariff (inside a meter or [defaults])", TariffConfig),
    ("load", "load (inside a meter or [defaults])", LoadConfig),
    ("sts", "sts (inside a meter or [defaults])", StsConfig),
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
        "`meter-sim init` writes a starting file. Every key is optional except a meter's id.",
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
        "```",
        "",
    ]
    for section, title, cls in DOC_TABLES:
        lines += [f"## {title}", "", "| key | default | meaning |", "|---|---|---|"]
        for spec in fields(cls):
            key = "id" if spec.name == "meter_id" else spec.name
            meaning = FIELD_DOCS[(section, spec.name)]
            lines.append(f"| `{key}` | {_default_text(cls, spec.name)} | {meaning} |")
        lines.append("")
    return "\n".join(lines)
