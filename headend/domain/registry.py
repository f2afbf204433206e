"""The meter registry's rules: what a meter record is, and reading one from a CSV file.

Pure: the CSV text comes in, records and per-row refusals go out. Applying them (all or
nothing) is storage's job.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Final, Literal

from headend.domain.policy import Calendar
from protocols.errors import ConfigError, DecodeError, ValidationError
from protocols.units import Money

CreditUnit = Literal["money", "energy"]
Transport = Literal["tcp", "rtu", "mqtt"]
#: what a meter, account or tariff id may be
ID_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_ID: Final = re.compile(ID_PATTERN)


@dataclass(frozen=True, slots=True)
class Route:
    """How a meter is reached: what its endpoint says, as the registry keeps it."""

    transport: Transport
    gateway: str  # host:port, serial device or broker: the meters that share it share a queue
    unit_id: int | None


#: how the registry learns a meter's route from its endpoint (the links own endpoint syntax)
RouteOf = Callable[[str], Route]


@dataclass(frozen=True, slots=True)
class MeterRecord:
    meter_id: str
    endpoint: str
    route: Route
    serial: str = ""
    customer: str = ""
    account: str = ""
    tariff: str = ""
    control_mode: int = 6
    credit_unit: CreditUnit = "money"
    currency: str = "KES"
    currency_scale: int = -2  # power of ten of the minor unit, as in the snapshot
    poll_group: str = "default"
    profile_period: int = 900
    auth_key: bytes | None = None

    def __post_init__(self) -> None:
        if not _ID.fullmatch(self.meter_id):
            raise ValidationError(f"meter_id {self.meter_id!r}: letters, digits, _ . - (max 64)")
        if self.control_mode not in range(7):
            raise ValidationError(f"control_mode is 0..6, got {self.control_mode}")
        if self.credit_unit not in ("money", "energy"):
            raise ValidationError(f"credit_unit is money or energy, got {self.credit_unit!r}")
        Money(0, self.currency, -self.currency_scale)  # refuses a bad code or scale
        if not _ID.fullmatch(self.poll_group):
            raise ValidationError(
                f"poll_group {self.poll_group!r}: letters, digits, _ . - (max 64)"
            )
        if self.account and not _ID.fullmatch(self.account):
            raise ValidationError(f"account {self.account!r}: letters, digits, _ . - (max 64)")
        if self.profile_period < 60 or 86400 % self.profile_period:
            raise ValidationError("profile_period is at least 60 s and divides a day")
        if self.account and not self.customer:
            raise ValidationError("an account needs its customer's name")


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    required: bool
    meaning: str


#: the columns of a meters CSV file, in the order `hes meters import` documents them
COLUMNS: Final = (
    Column("meter_id", True, "The meter's id: letters, digits, `_ . -`, at most 64."),
    Column(
        "endpoint",
        True,
        "How to reach it: tcp://host:port/unit, rtu://DEVICE?unit=N, "
        "mqtt://host:port/METER_ID (see `hes read --help`).",
    ),
    Column("serial", False, "The serial number printed on the meter."),
    Column("customer", False, "The customer's name (created with the account if new)."),
    Column("account", False, "The account id; created for the customer if it does not exist."),
    Column("tariff", False, "A tariff id registered with `hes tariffs add`."),
    Column("control_mode", False, "Disconnect control mode 0..6 (default 6)."),
    Column("credit_unit", False, "`money` (minor currency units) or `energy` (Wh)."),
    Column("currency", False, "ISO 4217 code (default KES)."),
    Column("currency_scale", False, "Power of ten of the minor unit, -4..0 (default -2: cents)."),
    Column("poll_group", False, "The group whose poll plan reads it (default `default`)."),
    Column("profile_period", False, "The meter's load-profile period in seconds (default 900)."),
    Column("auth_key", False, "The meter's command key, hex (none: commands carry no tag)."),
)
_NAMES: Final = frozenset(column.name for column in COLUMNS)
_REQUIRED: Final = tuple(column.name for column in COLUMNS if column.required)


@dataclass(frozen=True, slots=True)
class RowRefusal:
    line: int  # the line of the file (the header is line 1)
    meter_id: str
    reason: str


def _int(row: dict[str, str], name: str, default: int) -> int:
    text = row.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError as exc:
        raise ValidationError(f"{name} is a whole number, got {text!r}") from exc


def record_from_row(row: dict[str, str], route_of: RouteOf) -> MeterRecord:
    """One CSV row (header names as keys) as a record; ValidationError/ConfigError if not."""
    for name in _REQUIRED:
        if not row.get(name, "").strip():
            raise ValidationError(f"{name} is missing")
    endpoint = row["endpoint"].strip()
    key_text = row.get("auth_key", "").strip()
    try:
        key = bytes.fromhex(key_text) if key_text else None
    except ValueError as exc:
        raise ValidationError("auth_key is not hex") from exc
    unit = row.get("credit_unit", "").strip() or "money"
    if unit not in ("money", "energy"):
        raise ValidationError(f"credit_unit is money or energy, got {unit!r}")
    return MeterRecord(
        meter_id=row["meter_id"].strip(),
        endpoint=endpoint,
        route=route_of(endpoint),
        serial=row.get("serial", "").strip(),
        customer=row.get("customer", "").strip(),
        account=row.get("account", "").strip(),
        tariff=row.get("tariff", "").strip(),
        control_mode=_int(row, "control_mode", 6),
        credit_unit="energy" if unit == "energy" else "money",
        currency=row.get("currency", "").strip() or "KES",
        currency_scale=_int(row, "currency_scale", -2),
        poll_group=row.get("poll_group", "").strip() or "default",
        profile_period=_int(row, "profile_period", 900),
        auth_key=key,
    )


def parse_meters_csv(
    text: str, route_of: RouteOf
) -> tuple[list[tuple[int, MeterRecord]], list[RowRefusal]]:
    """Every row as (line, record) or a refusal naming the line and why. An unknown or missing
    header is a DecodeError for the whole file; a meter id twice refuses the second row."""
    reader = csv.DictReader(io.StringIO(text), strict=True)
    header = [name.strip() for name in reader.fieldnames or []]
    if not header:
        raise DecodeError("the file is empty: a header row names the columns (meter_id,endpoint,…)")
    unknown = [name for name in header if name not in _NAMES]
    if unknown:
        known = ", ".join(column.name for column in COLUMNS)
        raise DecodeError(f"unknown column(s) {', '.join(unknown)}; known: {known}")
    missing = [name for name in _REQUIRED if name not in header]
    if missing:
        raise DecodeError(f"the header lacks the column(s) {', '.join(missing)}")
    if len(set(header)) != len(header):
        raise DecodeError("a column appears twice in the header")
    reader.fieldnames = header
    records: list[tuple[int, MeterRecord]] = []
    refusals: list[RowRefusal] = []
    seen: set[str] = set()
    try:
        for row in reader:
            line = reader.line_num
            meter_id = (row.get("meter_id") or "").strip()
            if None in row:
                refusals.append(RowRefusal(line, meter_id, "more fields than the header has"))
                continue
            values = {name: value or "" for name, value in row.items() if name is not None}
            try:
                record = record_from_row(values, route_of)
            except (ValidationError, ConfigError) as exc:
                refusals.append(RowRefusal(line, meter_id, str(exc)))
                continue
            if record.meter_id in seen:
                refusals.append(RowRefusal(line, meter_id, "meter_id appears twice in the file"))
                continue
            seen.add(record.meter_id)
            records.append((line, record))
    except csv.Error as exc:
        raise DecodeError(f"line {reader.line_num}: {exc}") from exc
    return records, refusals


TariffKind = Literal["flat", "tou", "block"]
NoticeChannel = Literal["sms", "email", "webhook", "none"]
NOTICE_CHANNELS: Final = ("sms", "email", "webhook", "none")
LANGUAGES: Final = ("en", "zh")


def calendar_document(calendar: Calendar) -> dict[str, object]:
    return {
        "friendly_hours": [list(span) for span in calendar.friendly_hours],
        "friendly_weekdays": sorted(calendar.friendly_weekdays),
        "holidays": sorted(day.isoformat() for day in calendar.holidays),
        "utc_offset_minutes": calendar.utc_offset_minutes,
    }


def calendar_from(document: dict[str, Any]) -> Calendar:
    return Calendar(
        tuple((int(a), int(b)) for a, b in document.get("friendly_hours", [])),
        frozenset(int(d) for d in document.get("friendly_weekdays", [])),
        frozenset(date.fromisoformat(d) for d in document.get("holidays", [])),
        int(document.get("utc_offset_minutes", 0)),
    )


def parse_friendly_hours(text: str) -> tuple[tuple[int, int], ...]:
    """``18:00-06:00`` -> the spans of the day it covers (one crossing midnight is two)."""
    match = re.fullmatch(r"(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})", text.strip())
    if match is None:
        raise ValidationError(f"friendly hours are HH:MM-HH:MM, got {text!r}")
    start = int(match[1]) * 60 + int(match[2])
    end = int(match[3]) * 60 + int(match[4])
    if not (0 <= start <= 1440 and 0 <= end <= 1440) or int(match[2]) > 59 or int(match[4]) > 59:
        raise ValidationError(f"not a time of day in {text!r}")
    if start == end:
        raise ValidationError(f"friendly hours {text!r} are empty")
    return (
        ((start, end),)
        if start < end
        else tuple(span for span in ((start, 1440), (0, end)) if span[0] < span[1])
    )


def parse_utc_offset(text: str) -> int:
    """``+03:00``, ``-05:30`` or ``Z`` -> minutes."""
    if text in ("Z", "+00:00", "0"):
        return 0
    match = re.fullmatch(r"([+-])(\d{2}):(\d{2})", text)
    if match is None:
        raise ValidationError(f"a UTC offset is like +03:00, got {text!r}")
    minutes = int(match[2]) * 60 + int(match[3])
    return minutes if match[1] == "+" else -minutes


@dataclass(frozen=True, slots=True)
class Block:
    """A step of a block tariff: energy bought in a month up to ``upto_wh`` (counted from the
    month's first Wh) costs ``price`` minor units per kWh."""

    upto_wh: int
    price: int


BASIS_POINTS: Final = 10_000  # 100 %


@dataclass(frozen=True, slots=True)
class TariffRecord:
    """A tariff as the registry keeps it: unit prices (minor units per kWh, net of VAT) per
    rate, rate 1 first (one price: flat), and the balance thresholds of its accounts in minor
    units. What a payment pays besides energy: a ``fee`` per payment, a ``service_charge`` per
    month (collected from the month's first payments), VAT at ``vat_bp`` basis points (prices
    and charges are VAT-inclusive in what a customer pays), ``debt_share_bp`` of each payment
    towards the account's debt, and payments from ``min_vend`` to ``max_vend`` (None: no top).
    ``blocks`` make it a block tariff: the month's energy is priced step by step, the single
    price applying beyond the last block."""

    tariff_id: str
    currency: str
    currency_scale: int
    prices: tuple[int, ...]
    low_threshold: int
    critical_threshold: int
    calendar: Calendar = field(default_factory=Calendar)  # when supply is never cut for credit
    blocks: tuple[Block, ...] = ()
    fee: int = 0
    service_charge: int = 0
    vat_bp: int = 0
    debt_share_bp: int = 0
    min_vend: int = 0
    max_vend: int | None = None

    def __post_init__(self) -> None:
        if not _ID.fullmatch(self.tariff_id):
            raise ValidationError(f"tariff id {self.tariff_id!r}: letters, digits, _ . - (max 64)")
        Money(0, self.currency, -self.currency_scale)
        if not 1 <= len(self.prices) <= 4:
            raise ValidationError("a tariff has 1 to 4 rate prices")
        if any(type(price) is not int or price < 0 for price in self.prices):
            raise ValidationError("unit prices are non-negative whole minor units per kWh")
        if not 0 <= self.critical_threshold <= self.low_threshold:
            raise ValidationError("thresholds: 0 <= critical <= low")
        if self.blocks:
            if len(self.prices) != 1:
                raise ValidationError(
                    "a block tariff has one --price (beyond its last block), not rates"
                )
            upto = 0
            for block in self.blocks:
                if type(block.upto_wh) is not int or block.upto_wh <= upto:
                    raise ValidationError("block limits are whole Wh, each above the one before")
                if type(block.price) is not int or block.price < 0:
                    raise ValidationError("block prices are non-negative whole minor units")
                upto = block.upto_wh
        for name in ("fee", "service_charge", "min_vend"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValidationError(f"{name} is a non-negative whole number of minor units")
        for name in ("vat_bp", "debt_share_bp"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= BASIS_POINTS:
                raise ValidationError(f"{name} is 0..{BASIS_POINTS} basis points (0..100 %)")
        if self.max_vend is not None and (
            type(self.max_vend) is not int or self.max_vend < max(self.min_vend, 1)
        ):
            raise ValidationError("max_vend is at least 1 and at least min_vend")

    @property
    def kind(self) -> TariffKind:
        if self.blocks:
            return "block"
        return "flat" if len(self.prices) == 1 else "tou"


def tariff_document(tariff: TariffRecord) -> dict[str, Any]:
    """What the tariffs table's JSON ``definition`` holds (integers only)."""
    document: dict[str, Any] = {
        "prices": list(tariff.prices),
        "calendar": calendar_document(tariff.calendar),
    }
    if tariff.blocks:
        document["blocks"] = [[block.upto_wh, block.price] for block in tariff.blocks]
    for name in ("fee", "service_charge", "vat_bp", "debt_share_bp", "min_vend"):
        if getattr(tariff, name):
            document[name] = getattr(tariff, name)
    if tariff.max_vend is not None:
        document["max_vend"] = tariff.max_vend
    return document


def tariff_from(
    tariff_id: str,
    *,
    currency: str,
    currency_scale: int,
    low_threshold: int,
    critical_threshold: int,
    document: dict[str, Any],
) -> TariffRecord:
    """A tariff from its table row's columns and its ``definition`` (older definitions, with
    prices and a calendar only, read as tariffs without charges)."""
    max_vend = document.get("max_vend")
    return TariffRecord(
        tariff_id,
        currency,
        currency_scale,
        tuple(int(p) for p in document["prices"]),
        low_threshold,
        critical_threshold,
        calendar_from(document.get("calendar", {})),
        tuple(Block(int(upto), int(price)) for upto, price in document.get("blocks", [])),
        int(document.get("fee", 0)),
        int(document.get("service_charge", 0)),
        int(document.get("vat_bp", 0)),
        int(document.get("debt_share_bp", 0)),
        int(document.get("min_vend", 0)),
        None if max_vend is None else int(max_vend),
    )


def parse_percent(text: str, option: str) -> int:
    """``"16"``, ``"7.5"`` percent -> basis points (1600, 750); at most two decimals."""
    match = re.fullmatch(r"(\d{1,3})(?:\.(\d{1,2}))?", text.strip())
    if match is None:
        raise ValidationError(f"{option} is a percentage such as 16 or 7.5, got {text!r}")
    points = int(match[1]) * 100 + int((match[2] or "").ljust(2, "0"))
    if points > BASIS_POINTS:
        raise ValidationError(f"{option} is 0 to 100 %, got {text!r}")
    return points


def parse_block(text: str) -> tuple[int, int]:
    """``"50:1200"``: the month's energy up to 50 kWh costs 1200 minor units per kWh ->
    (50000 Wh, 1200). The limit may have up to three decimals (kWh to the Wh)."""
    match = re.fullmatch(r"(\d+)(?:\.(\d{1,3}))?:(\d+)", text.strip())
    if match is None:
        raise ValidationError(f"--block is KWH:PRICE such as 50:1200, got {text!r}")
    wh = int(match[1]) * 1000 + int((match[2] or "").ljust(3, "0"))
    return wh, int(match[3])


def account_id(text: str) -> str:
    """An account id as the registry keeps it; ValidationError if it is not one."""
    if not _ID.fullmatch(text):
        raise ValidationError(f"account {text!r}: letters, digits, _ . - (max 64)")
    return text


def notice_channel(text: str) -> NoticeChannel:
    for channel in NOTICE_CHANNELS:
        if channel == text:
            return channel
    raise ValidationError(f"notice channel is one of {', '.join(NOTICE_CHANNELS)}, got {text!r}")


@dataclass(frozen=True, slots=True)
class CustomerRecord:
    name: str
    email: str | None = None
    phone: str | None = None
    notice_channel: NoticeChannel = "sms"
    language: str = "en"
    #: a business customer's tax id (VAT registration number): their bills are e-invoices
    tax_id: str | None = None

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValidationError("a customer has a name")
        if self.tax_id is not None and not re.fullmatch(
            r"[A-Za-z0-9][A-Za-z0-9./-]{0,39}", self.tax_id
        ):
            raise ValidationError(
                f"--tax-id is 1 to 40 letters, digits, . / - (no spaces), got {self.tax_id!r}"
            )
        if self.notice_channel not in NOTICE_CHANNELS:
            raise ValidationError(f"notice channel is one of {', '.join(NOTICE_CHANNELS)}")
        if self.language not in LANGUAGES:
            raise ValidationError(
                f"language is one of {', '.join(LANGUAGES)}, got {self.language!r}"
            )
        if self.email is not None and not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", self.email):
            raise ValidationError(f"not an e-mail address: {self.email!r}")
        if self.phone is not None and not re.fullmatch(r"\+?[0-9]{6,15}", self.phone):
            raise ValidationError(f"a phone number is 6 to 15 digits, + first: {self.phone!r}")
        needs = {"sms": self.phone, "email": self.email}
        if self.notice_channel in needs and needs[self.notice_channel] is None:
            what = "phone" if self.notice_channel == "sms" else "email"
            raise ValidationError(f"notices by {self.notice_channel} need the customer's {what}")


__all__ = [
    "BASIS_POINTS",
    "COLUMNS",
    "Block",
    "CustomerRecord",
    "MeterRecord",
    "Route",
    "RouteOf",
    "RowRefusal",
    "TariffRecord",
    "account_id",
    "notice_channel",
    "parse_block",
    "parse_meters_csv",
    "parse_percent",
    "record_from_row",
    "tariff_document",
    "tariff_from",
]
