"""MQTT, version 1: the topic scheme, the payload schemas and their codecs. Pure: no I/O.

Every topic lives under a configurable prefix and carries the scheme's version, so a v2 can run
beside v1 on the same broker::

    <prefix>/v1/meters/<meter-id>/telemetry    meter -> head-end   QoS 1   periodic readings
    <prefix>/v1/meters/<meter-id>/events       meter -> head-end   QoS 1   one event log entry
    <prefix>/v1/meters/<meter-id>/state        meter -> head-end   QoS 1   retained; online/offline
    <prefix>/v1/meters/<meter-id>/cmd          head-end -> meter   QoS 1   a command envelope
    <prefix>/v1/meters/<meter-id>/cmd/result   meter -> head-end   QoS 1   the command's result
    <prefix>/v1/meters/<meter-id>/req          head-end -> meter   QoS 1   a read request
    <prefix>/v1/meters/<meter-id>/reply        meter -> head-end   QoS 1   the request's reply
    <prefix>/v1/deadletter                     head-end            QoS 1   malformed messages

A meter publishes and subscribes only under its own ``<prefix>/v1/meters/<meter-id>/`` (the
broker's ACL enforces it); the head-end may use every topic, and its workers may subscribe
through MQTT shared subscriptions ``$share/<group>/<filter>`` to split the load.

Payloads are JSON objects defined once here as msgspec Structs; each carries ``"v": 1`` and the
meter id, and the same schema validates them at both ends. Unknown fields are ignored (a later
v1 may add optional fields); wrong types, out-of-range values and a different version are
refused. Every ``decode_*`` returns a payload or raises :class:`~protocols.errors.DecodeError`,
never anything else, whatever the bytes.

De-duplication keys (QoS 1 delivers at least once; a meter agent re-sends what the broker did
not acknowledge): telemetry ``(meter_id, boot, n)`` where ``boot`` names one run of the meter's
agent and ``n`` counts its telemetry from 1, in order; events ``(meter_id, seq)`` (the event
log's lifelong sequence); command results ``(meter_id, sequence)``.

``docs/mqtt.md`` is generated from this module by :func:`render_markdown`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass, replace
from enum import Enum
from typing import Annotated, Any, Final, Literal, TypeVar
from urllib.parse import parse_qs, quote, unquote, urlsplit

import msgspec
from msgspec import Meta, Struct

from protocols.commands import (
    TAG_BYTES,
    Command,
    CommandCode,
    CommandEnvelope,
    CommandResult,
    ResultCode,
)
from protocols.disconnect import ControlState
from protocols.errors import ConfigError, DecodeError, ValidationError
from protocols.readings import Event, EventCode, MeterSnapshot, ProfileRow, StatusFlag

SCHEMA_VERSION: Final = 1
TOPIC_VERSION: Final = f"v{SCHEMA_VERSION}"
DEFAULT_PREFIX: Final = "phs"
CONTENT_TYPE: Final = "application/json"
#: MQTT 5 user property that names the payload schema version on every message
SCHEMA_PROPERTY: Final = "schema"
SCHEMA_PROPERTY_VALUE: Final = str(SCHEMA_VERSION)
#: the same rule as meter_sim.config.METER_ID: topic-safe (no / + # or NUL), at most 64 characters
METER_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_METER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_PREFIX_LEVEL = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SHARE_GROUP = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: the most events or profile rows one reply carries
MAX_REPLY_ITEMS: Final = 3000

U16 = Annotated[int, Meta(ge=0, le=2**16 - 1)]
U32 = Annotated[int, Meta(ge=0, le=2**32 - 1)]
U63 = Annotated[int, Meta(ge=0, le=2**63 - 1)]
I64 = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
Seq32 = Annotated[int, Meta(ge=1, le=2**32 - 1)]
#: a counter that a JavaScript consumer still reads exactly (at most 2**53 - 1)
Counter = Annotated[int, Meta(ge=1, le=2**53 - 1)]
MeterIdText = Annotated[str, Meta(pattern=METER_ID_PATTERN, max_length=64)]
Version = Literal[1]


def check_meter_id(meter_id: str) -> str:
    if not isinstance(meter_id, str) or not _METER_ID.fullmatch(meter_id):
        raise ValidationError(f"a meter id is letters, digits, _ . - (max 64), got {meter_id!r}")
    return meter_id


# -- topics ---------------------------------------------------------------------------------------


class TopicKind(Enum):
    """The last level(s) of a meter's topics."""

    TELEMETRY = "telemetry"
    EVENTS = "events"
    STATE = "state"
    CMD = "cmd"
    CMD_RESULT = "cmd/result"
    REQUEST = "req"
    REPLY = "reply"


_KIND_BY_SUFFIX = {kind.value: kind for kind in TopicKind}


@dataclass(frozen=True, slots=True)
class TopicScheme:
    """The version-1 topic tree under ``prefix`` (one or more levels, e.g. ``utility/site-1``)."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or not all(
            _PREFIX_LEVEL.fullmatch(level) for level in self.prefix.split("/")
        ):
            raise ValidationError(
                f"a topic prefix is levels of letters, digits, _ . - joined by /, "
                f"got {self.prefix!r}"
            )

    @property
    def base(self) -> str:
        """``<prefix>/v1/meters``: the parent of every meter's topics."""
        return f"{self.prefix}/{TOPIC_VERSION}/meters"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}/{TOPIC_VERSION}/deadletter"

    def meter_root(self, meter_id: str) -> str:
        return f"{self.base}/{check_meter_id(meter_id)}"

    def topic(self, meter_id: str, kind: TopicKind) -> str:
        return f"{self.meter_root(meter_id)}/{kind.value}"

    def telemetry(self, meter_id: str) -> str:
        return self.topic(meter_id, TopicKind.TELEMETRY)

    def events(self, meter_id: str) -> str:
        return self.topic(meter_id, TopicKind.EVENTS)

    def state(self, meter_id: str) -> str:
        return self.topic(meter_id, TopicKind.STATE)

    def cmd(self, meter_id: str) -> str:
        return self.topic(meter_id, TopicKind.CMD)

    def cmd_result(self, meter_id: str) -> str:
        return self.topic(meter_id, TopicKind.CMD_RESULT)

    def request(self, meter_id: str) -> str:
        return self.topic(meter_id, TopicKind.REQUEST)

    def reply(self, meter_id: str) -> str:
        return self.topic(meter_id, TopicKind.REPLY)

    def all_meters(self, kind: TopicKind) -> str:
        """The filter for ``kind`` of every meter: ``<prefix>/v1/meters/+/<kind>``."""
        return f"{self.base}/+/{kind.value}"

    def shared(self, kind: TopicKind, group: str | None) -> str:
        """:meth:`all_meters`, as the MQTT 5 shared subscription ``$share/<group>/...`` if a
        group is given: the broker hands each message to one subscriber of the group."""
        plain = self.all_meters(kind)
        if group is None:
            return plain
        if not _SHARE_GROUP.fullmatch(group):
            raise ValidationError(f"a shared-subscription group is a plain name, got {group!r}")
        return f"$share/{group}/{plain}"

    def acl_pattern(self) -> str:
        """The Mosquitto ACL pattern that confines a meter (user name = meter id) to its tree."""
        return f"{self.base}/%u/#"

    def parse(self, topic: str) -> tuple[str, TopicKind]:
        """``(meter_id, kind)`` of a meter topic; DecodeError for any other topic."""
        head = self.base + "/"
        if not isinstance(topic, str) or not topic.startswith(head):
            raise DecodeError(f"not a topic of {self.base}: {topic!r}")
        meter_id, _, suffix = topic[len(head) :].partition("/")
        kind = _KIND_BY_SUFFIX.get(suffix)
        if kind is None or not _METER_ID.fullmatch(meter_id):
            raise DecodeError(f"not a meter topic: {topic!r}")
        return meter_id, kind

    def owns(self, meter_id: str, topic: str) -> bool:
        """True when ``topic`` lies in ``meter_id``'s own tree (where its ACL lets it publish)."""
        root = self.meter_root(meter_id) + "/"
        return topic.startswith(root) and not any(c in topic for c in "+#\0")


# -- payloads -------------------------------------------------------------------------------------


class _Payload(Struct, frozen=True, kw_only=True):
    def __post_init__(self) -> None:
        meter_id = getattr(self, "meter_id", None)
        if meter_id is not None and not _METER_ID.fullmatch(meter_id):
            raise ValueError(f"bad meter id {meter_id!r}")


class Reading(Struct, frozen=True, kw_only=True):
    """A :class:`~protocols.readings.MeterSnapshot` without its meter id. Integers only:
    voltage in 0.1 V, current in mA, power factor in 0.001, frequency in 0.01 Hz; credit, debt
    and thresholds in the account's unit (minor currency units, or Wh when ``credit_unit`` is 1)."""

    time: U63
    energy_import_wh: U63
    energy_rates_wh: tuple[U63, U63, U63, U63]
    power_w: I64
    voltage_dv: I64
    current_ma: I64
    power_factor_milli: Annotated[int, Meta(ge=-1000, le=1000)]
    frequency_chz: U32
    credit: I64
    emergency_credit: I64
    debt: I64
    credit_unit: Literal[1, 2]
    currency: Annotated[str, Meta(min_length=1, max_length=8)]
    currency_scale: Annotated[int, Meta(ge=-4, le=0)]  # -2: amounts are in cents; 0 for Wh
    low_credit_threshold: I64
    control_state: ControlState
    control_mode: Annotated[int, Meta(ge=0, le=6)]
    status: U32
    last_event_seq: U63
    last_transfer: U32
    last_command_seq: U32

    @classmethod
    def from_snapshot(cls, snapshot: MeterSnapshot) -> Reading:
        return cls(
            time=snapshot.time,
            energy_import_wh=snapshot.energy_import_wh,
            energy_rates_wh=snapshot.energy_rates_wh,
            power_w=snapshot.power_w,
            voltage_dv=snapshot.voltage_dv,
            current_ma=snapshot.current_ma,
            power_factor_milli=snapshot.power_factor_milli,
            frequency_chz=snapshot.frequency_chz,
            credit=snapshot.credit,
            emergency_credit=snapshot.emergency_credit,
            debt=snapshot.debt,
            credit_unit=_credit_unit(snapshot.credit_unit),
            currency=snapshot.currency,
            currency_scale=snapshot.currency_scale,
            low_credit_threshold=snapshot.low_credit_threshold,
            control_state=ControlState(snapshot.control_state),
            control_mode=snapshot.control_mode,
            status=int(snapshot.status),
            last_event_seq=snapshot.last_event_seq,
            last_transfer=snapshot.last_transfer,
            last_command_seq=snapshot.last_command_seq,
        )

    def to_snapshot(self, meter_id: str) -> MeterSnapshot:
        return MeterSnapshot(
            meter_id=meter_id,
            time=self.time,
            energy_import_wh=self.energy_import_wh,
            energy_rates_wh=self.energy_rates_wh,
            power_w=self.power_w,
            voltage_dv=self.voltage_dv,
            current_ma=self.current_ma,
            power_factor_milli=self.power_factor_milli,
            frequency_chz=self.frequency_chz,
            credit=self.credit,
            emergency_credit=self.emergency_credit,
            debt=self.debt,
            credit_unit=self.credit_unit,
            currency=self.currency,
            currency_scale=self.currency_scale,
            low_credit_threshold=self.low_credit_threshold,
            control_state=self.control_state,
            control_mode=self.control_mode,
            status=StatusFlag(self.status),
            last_event_seq=self.last_event_seq,
            last_transfer=self.last_transfer,
            last_command_seq=self.last_command_seq,
        )


def _credit_unit(value: int) -> Literal[1, 2]:
    if value == 1:
        return 1
    if value == 2:
        return 2
    raise ValidationError(f"credit_unit is 1 (Wh) or 2 (money), got {value!r}")


class Telemetry(_Payload, frozen=True, kw_only=True):
    """Periodic readings. De-duplication key: ``(meter_id, boot, n)``."""

    v: Version = 1
    meter_id: MeterIdText
    boot: Counter  # one run of the meter's agent; a new run draws a new number
    n: Counter  # telemetry number within the run: 1, 2, 3 ... in publication order
    reading: Reading

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.meter_id, self.boot, self.n)

    def snapshot(self) -> MeterSnapshot:
        return self.reading.to_snapshot(self.meter_id)


class EventItem(Struct, frozen=True, kw_only=True):
    """One event log entry; ``a`` and ``b`` are details whose meaning depends on ``code``."""

    seq: Annotated[int, Meta(ge=1, le=2**63 - 1)]
    time: U63
    code: EventCode
    a: I64 = 0
    b: I64 = 0

    @classmethod
    def from_event(cls, event: Event) -> EventItem:
        return cls(seq=event.seq, time=event.time, code=event.code, a=event.a, b=event.b)

    def to_event(self) -> Event:
        return Event(self.seq, self.time, self.code, self.a, self.b)


class EventMessage(_Payload, frozen=True, kw_only=True):
    """One event, published as it happens. De-duplication key: ``(meter_id, event.seq)``."""

    v: Version = 1
    meter_id: MeterIdText
    event: EventItem

    @property
    def key(self) -> tuple[str, int]:
        return (self.meter_id, self.event.seq)


class StateMessage(_Payload, frozen=True, kw_only=True):
    """Retained presence: ``online`` after connecting, ``offline`` as the last will or on a
    clean stop. The latest message wins."""

    v: Version = 1
    meter_id: MeterIdText
    state: Literal["online", "offline"]
    boot: Counter

    @property
    def online(self) -> bool:
        return self.state == "online"


_TAG_HEX = rf"^([0-9a-f]{{{2 * TAG_BYTES}}})?$"


class CommandMessage(_Payload, frozen=True, kw_only=True):
    """The command envelope of :mod:`protocols.commands`, as over Modbus: the same sequence
    number and HMAC tag (hex; empty for an unauthenticated command). A 20-digit token argument
    exceeds 2**64: read ``args`` with a decoder that keeps big integers exact."""

    v: Version = 1
    meter_id: MeterIdText
    sequence: Seq32
    code: U16
    args: Annotated[list[Annotated[int, Meta(ge=0)]], Meta(max_length=8)] = []
    tag: Annotated[str, Meta(pattern=_TAG_HEX)] = ""

    @classmethod
    def from_envelope(cls, envelope: CommandEnvelope) -> CommandMessage:
        return cls(
            meter_id=envelope.meter_id,
            sequence=envelope.sequence,
            code=int(envelope.command.code),
            args=list(envelope.command.args),
            tag=envelope.tag.hex(),
        )

    def to_envelope(self) -> CommandEnvelope:
        """Raises ValidationError for an unknown code or arguments the command does not take."""
        if self.code not in _CODES:
            raise ValidationError(f"unknown command code {self.code}")
        command = Command(CommandCode(self.code), tuple(self.args))
        return CommandEnvelope(self.meter_id, self.sequence, command, bytes.fromhex(self.tag))

    def refusal(self) -> ResultCode | None:
        """The result code a meter answers when :meth:`to_envelope` fails, else None."""
        if self.code not in _CODES:
            return ResultCode.UNKNOWN_COMMAND
        try:
            self.to_envelope()
        except ValidationError:
            return ResultCode.BAD_ARGUMENT
        return None


_CODES = frozenset(int(code) for code in CommandCode)


class ResultItem(Struct, frozen=True, kw_only=True):
    """:class:`~protocols.commands.CommandResult`: ``sequence`` 0 answers a command that could
    not be read at all."""

    sequence: U32
    code: ResultCode
    last_transfer: U32 = 0
    detail: Annotated[str, Meta(max_length=512)] = ""

    @classmethod
    def from_result(cls, result: CommandResult) -> ResultItem:
        return cls(
            sequence=result.sequence,
            code=result.code,
            last_transfer=result.last_transfer,
            detail=result.detail[:512],
        )

    def to_result(self) -> CommandResult:
        return CommandResult(self.sequence, self.code, self.last_transfer, self.detail)


class ResultMessage(_Payload, frozen=True, kw_only=True):
    """A command's result. De-duplication key: ``(meter_id, result.sequence)``."""

    v: Version = 1
    meter_id: MeterIdText
    result: ResultItem

    @property
    def key(self) -> tuple[str, int]:
        return (self.meter_id, self.result.sequence)


class ProfileItem(Struct, frozen=True, kw_only=True):
    """One load-profile interval, captured at ``time`` (the interval's end)."""

    time: U63
    energy_import_wh: U63
    interval_wh: I64
    credit: I64
    status: U32

    @classmethod
    def from_row(cls, row: ProfileRow) -> ProfileItem:
        return cls(
            time=row.time,
            energy_import_wh=row.energy_import_wh,
            interval_wh=row.interval_wh,
            credit=row.credit,
            status=row.status,
        )

    def to_row(self) -> ProfileRow:
        return ProfileRow(
            self.time, self.energy_import_wh, self.interval_wh, self.credit, self.status
        )


# requests (head-end -> meter, on .../req) and replies (meter -> head-end): tagged by "op"


class SnapshotRequest(_Payload, frozen=True, kw_only=True, tag_field="op", tag="snapshot"):
    """Ask for the readings now."""

    v: Version = 1
    meter_id: MeterIdText


class EventsRequest(_Payload, frozen=True, kw_only=True, tag_field="op", tag="events"):
    """Ask for events with ``seq > since_seq``, oldest first, at most ``limit``."""

    v: Version = 1
    meter_id: MeterIdText
    since_seq: U63 = 0
    limit: Annotated[int, Meta(ge=1, le=MAX_REPLY_ITEMS)] = 100


class ProfileRequest(_Payload, frozen=True, kw_only=True, tag_field="op", tag="profile"):
    """Ask for load-profile rows with ``start <= time <= end`` (meter clock)."""

    v: Version = 1
    meter_id: MeterIdText
    start: U63
    end: U63


class LastResultRequest(_Payload, frozen=True, kw_only=True, tag_field="op", tag="last_result"):
    """Ask for the result of the last command the meter answered (sequence and code)."""

    v: Version = 1
    meter_id: MeterIdText


Request = SnapshotRequest | EventsRequest | ProfileRequest | LastResultRequest


class SnapshotReply(_Payload, frozen=True, kw_only=True, tag_field="op", tag="snapshot"):
    v: Version = 1
    meter_id: MeterIdText
    reading: Reading

    def snapshot(self) -> MeterSnapshot:
        return self.reading.to_snapshot(self.meter_id)


class EventsReply(_Payload, frozen=True, kw_only=True, tag_field="op", tag="events"):
    v: Version = 1
    meter_id: MeterIdText
    events: Annotated[list[EventItem], Meta(max_length=MAX_REPLY_ITEMS)]


class ProfileReply(_Payload, frozen=True, kw_only=True, tag_field="op", tag="profile"):
    v: Version = 1
    meter_id: MeterIdText
    rows: Annotated[list[ProfileItem], Meta(max_length=MAX_REPLY_ITEMS)]
    truncated: bool = False  # more rows matched than one reply carries


class LastResultReply(_Payload, frozen=True, kw_only=True, tag_field="op", tag="last_result"):
    v: Version = 1
    meter_id: MeterIdText
    result: ResultItem


class ErrorReply(_Payload, frozen=True, kw_only=True, tag_field="op", tag="error"):
    """The meter could not read the request or answer it."""

    v: Version = 1
    meter_id: MeterIdText
    error: Annotated[str, Meta(max_length=512)]


Reply = SnapshotReply | EventsReply | ProfileReply | LastResultReply | ErrorReply

# -- codecs ---------------------------------------------------------------------------------------

P = TypeVar("P")

_ENCODER = msgspec.json.Encoder()
_DECODERS: dict[Any, msgspec.json.Decoder[Any]] = {}


def _decoder(kind: Any) -> msgspec.json.Decoder[Any]:
    decoder = _DECODERS.get(kind)
    if decoder is None:
        decoder = _DECODERS[kind] = msgspec.json.Decoder(kind)
    return decoder


def encode(payload: Struct) -> bytes:
    """The JSON bytes of any payload of this module."""
    return _ENCODER.encode(payload)


def decode(data: bytes, kind: type[P], name: str | None = None) -> P:
    """Parse ``data`` as ``kind`` (a payload class or the ``Request`` / ``Reply`` unions).

    Any input either parses or raises DecodeError; nothing else escapes.
    """
    name = name or getattr(kind, "__name__", "payload")
    try:
        payload: P = _decoder(kind).decode(data)
    except msgspec.ValidationError as exc:
        raise DecodeError(f"invalid {name}: {exc}") from exc
    except (msgspec.DecodeError, RecursionError, ValueError, TypeError) as exc:
        raise DecodeError(f"{name} is not valid JSON: {exc}") from exc
    return payload


def encode_telemetry(snapshot: MeterSnapshot, boot: int, n: int) -> bytes:
    return encode(
        Telemetry(
            meter_id=snapshot.meter_id, boot=boot, n=n, reading=Reading.from_snapshot(snapshot)
        )
    )


def decode_telemetry(data: bytes) -> Telemetry:
    return decode(data, Telemetry)


def encode_event(meter_id: str, event: Event) -> bytes:
    return encode(EventMessage(meter_id=meter_id, event=EventItem.from_event(event)))


def decode_event(data: bytes) -> EventMessage:
    return decode(data, EventMessage)


def encode_state(meter_id: str, online: bool, boot: int) -> bytes:
    return encode(
        StateMessage(meter_id=meter_id, state="online" if online else "offline", boot=boot)
    )


def decode_state(data: bytes) -> StateMessage:
    return decode(data, StateMessage)


def encode_command(envelope: CommandEnvelope) -> bytes:
    return encode(CommandMessage.from_envelope(envelope))


def decode_command_message(data: bytes) -> CommandMessage:
    """The command payload as sent, before its code and arguments are checked (a meter uses
    this to answer UNKNOWN_COMMAND / BAD_ARGUMENT for the right sequence number)."""
    return decode(data, CommandMessage)


def decode_command(data: bytes) -> CommandEnvelope:
    message = decode_command_message(data)
    try:
        return message.to_envelope()
    except ValidationError as exc:
        raise DecodeError(f"invalid command: {exc}") from exc


def encode_result(meter_id: str, result: CommandResult) -> bytes:
    return encode(ResultMessage(meter_id=meter_id, result=ResultItem.from_result(result)))


def decode_result(data: bytes) -> ResultMessage:
    return decode(data, ResultMessage)


def encode_request(request: Request) -> bytes:
    return encode(request)


def decode_request(data: bytes) -> Request:
    return decode(data, Request, "Request")  # type: ignore[arg-type]


def encode_reply(reply: Reply) -> bytes:
    return encode(reply)


def decode_reply(data: bytes) -> Reply:
    return decode(data, Reply, "Reply")  # type: ignore[arg-type]


# -- broker settings and meter credentials --------------------------------------------------------

#: the secret from which a meter's default MQTT password is derived (lab and demo use only; a
#: deployment gives each meter its own ``mqtt_password``)
LAB_METER_SECRET: Final = "prepaid-hes-lab"


def meter_password(
    meter_id: str, configured: str | None = None, secret: str = LAB_METER_SECRET
) -> str:
    """A meter's MQTT password: ``configured`` if set, else derived from ``secret`` and its id
    (HMAC-SHA256, 32 hex digits) so that the broker helper can provision it too."""
    if configured:
        return configured
    digest = hmac.new(secret.encode(), check_meter_id(meter_id).encode(), hashlib.sha256)
    return digest.hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Where a broker is and how to log in: ``mqtt://user:password@host:port`` or
    ``mqtts://host:port?ca=/path/ca.pem`` (TLS, verifying the broker against that CA)."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    keepalive: int = 30

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("a broker needs a host")
        if type(self.port) is not int or not 1 <= self.port <= 65535:
            raise ConfigError(f"a broker port is 1..65535, got {self.port!r}")
        if self.ca_file and not self.tls:
            raise ConfigError("a CA file is only used with TLS (mqtts://)")
        if not 5 <= self.keepalive <= 65535:
            raise ConfigError("keepalive is 5..65535 s")

    @classmethod
    def parse_url(cls, url: str) -> BrokerSettings:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ConfigError(f"a broker URL starts with mqtt:// or mqtts://, got {url!r}")
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise ConfigError(f"bad port in broker URL {url!r}") from exc
        query = parse_qs(parts.query)
        unknown = sorted(set(query) - {"ca", "keepalive"})
        if unknown:
            raise ConfigError(f"unknown broker URL option(s): {', '.join(unknown)}")
        try:
            keepalive = int(query.get("keepalive", ["30"])[-1])
        except ValueError as exc:
            raise ConfigError(f"keepalive in {url!r} is not a number") from exc
        return cls(
            host=parts.hostname or "",
            port=port,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=tls,
            ca_file=query.get("ca", [None])[-1],
            keepalive=keepalive,
        )

    def url(self, with_password: bool = False) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        auth = ""
        if self.username:
            auth = quote(self.username, safe="")
            if self.password:
                auth += ":" + (quote(self.password, safe="") if with_password else "***")
            auth += "@"
        query = f"?ca={quote(self.ca_file)}" if self.ca_file else ""
        return f"{scheme}://{auth}{self.host}:{self.port}{query}"

    def login(self, username: str, password: str | None) -> BrokerSettings:
        """The same broker with other credentials (e.g. a meter's)."""
        return replace(self, username=username, password=password)


# -- documentation --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TopicSpec:
    kind: TopicKind | None
    topic: str
    direction: str
    qos: int
    retain: bool
    payload: str
    properties: str
    key: str
    doc: str


TOPIC_SPECS: Final[tuple[TopicSpec, ...]] = (
    TopicSpec(
        TopicKind.TELEMETRY,
        "<prefix>/v1/meters/<meter-id>/telemetry",
        "meter → head-end",
        1,
        False,
        "Telemetry",
        "user property `schema`",
        "(meter_id, boot, n)",
        "Readings every telemetry interval. Produced even while offline: the agent buffers them "
        "(bounded, oldest dropped first) and sends them in order after reconnecting.",
    ),
    TopicSpec(
        TopicKind.EVENTS,
        "<prefix>/v1/meters/<meter-id>/events",
        "meter → head-end",
        1,
        False,
        "EventMessage",
        "user property `schema`",
        "(meter_id, event.seq)",
        "One event log entry, as it happens (buffered like telemetry while offline).",
    ),
    TopicSpec(
        TopicKind.STATE,
        "<prefix>/v1/meters/<meter-id>/state",
        "meter → head-end",
        1,
        True,
        "StateMessage",
        "user property `schema`; set as the connection's last will",
        "latest wins",
        "`online` after each connection; `offline` as the last will (the broker publishes it "
        "when the meter vanishes) or before a clean disconnect.",
    ),
    TopicSpec(
        TopicKind.CMD,
        "<prefix>/v1/meters/<meter-id>/cmd",
        "head-end → meter",
        1,
        False,
        "CommandMessage",
        "response topic, correlation data, message expiry interval, user property `schema`",
        "(meter_id, sequence)",
        "A command envelope. The meter keeps a persistent session (clean start off, session "
        "expiry set), so a command sent while it is offline is delivered when it returns, "
        "unless its message expiry has passed. The meter executes each sequence at most once.",
    ),
    TopicSpec(
        TopicKind.CMD_RESULT,
        "<prefix>/v1/meters/<meter-id>/cmd/result",
        "meter → head-end",
        1,
        False,
        "ResultMessage",
        "correlation data (copied from the command), user property `schema`",
        "(meter_id, result.sequence)",
        "The result, published to the command's response topic when it names a topic in the "
        "meter's own tree, else here.",
    ),
    TopicSpec(
        TopicKind.REQUEST,
        "<prefix>/v1/meters/<meter-id>/req",
        "head-end → meter",
        1,
        False,
        "Request (op: snapshot, events, profile, last_result)",
        "response topic, correlation data, message expiry interval, user property `schema`",
        "correlation data",
        "A read request; reading changes nothing in the meter.",
    ),
    TopicSpec(
        TopicKind.REPLY,
        "<prefix>/v1/meters/<meter-id>/reply",
        "meter → head-end",
        1,
        False,
        "Reply (op: snapshot, events, profile, last_result, error)",
        "correlation data (copied from the request), user property `schema`",
        "correlation data",
        "The reply, published to the request's response topic when it lies in the meter's own "
        "tree, else here.",
    ),
    TopicSpec(
        None,
        "<prefix>/v1/deadletter",
        "head-end → operators",
        1,
        False,
        "the original bytes, unchanged",
        "user properties `original-topic`, `reason`, `schema`",
        "none",
        "Messages the ingest could not accept (not JSON, wrong schema, wrong version, a meter "
        "id that does not match the topic), republished as they came, with the reason.",
    ),
)

_EXAMPLE_SNAPSHOT = MeterSnapshot(
    meter_id="MTR-0001",
    time=1_767_261_600,
    energy_import_wh=1_234_567,
    energy_rates_wh=(800_000, 434_567, 0, 0),
    power_w=1830,
    voltage_dv=2301,
    current_ma=7950,
    power_factor_milli=998,
    frequency_chz=5001,
    credit=48_250,
    emergency_credit=0,
    debt=0,
    credit_unit=2,
    currency="KES",
    currency_scale=-2,
    low_credit_threshold=5000,
    control_state=ControlState.CONNECTED,
    control_mode=6,
    status=StatusFlag.IN_CREDIT,
    last_event_seq=42,
    last_transfer=7,
    last_command_seq=12,
)
_EXAMPLE_ENVELOPE = CommandEnvelope.signed(
    "MTR-0001",
    13,
    Command.credit_transfer(8, 100_000),
    bytes.fromhex("00112233445566778899aabbccddeeff"),
)

EXAMPLES: Final[tuple[tuple[str, Struct], ...]] = (
    (
        "Telemetry",
        Telemetry(
            meter_id="MTR-0001",
            boot=3_141_592_653,
            n=17,
            reading=Reading.from_snapshot(_EXAMPLE_SNAPSHOT),
        ),
    ),
    (
        "EventMessage",
        EventMessage(
            meter_id="MTR-0001",
            event=EventItem.from_event(
                Event(43, 1_767_261_610, EventCode.TOPUP_ACCEPTED, 8, 100_000)
            ),
        ),
    ),
    ("StateMessage", StateMessage(meter_id="MTR-0001", state="offline", boot=3_141_592_653)),
    ("CommandMessage", CommandMessage.from_envelope(_EXAMPLE_ENVELOPE)),
    (
        "ResultMessage",
        ResultMessage(
            meter_id="MTR-0001", result=ResultItem(sequence=13, code=ResultCode.OK, last_transfer=8)
        ),
    ),
    ("SnapshotRequest", SnapshotRequest(meter_id="MTR-0001")),
    ("EventsRequest", EventsRequest(meter_id="MTR-0001", since_seq=40, limit=100)),
    ("ProfileRequest", ProfileRequest(meter_id="MTR-0001", start=1_767_225_600, end=1_767_229_200)),
    ("LastResultRequest", LastResultRequest(meter_id="MTR-0001")),
    (
        "SnapshotReply",
        SnapshotReply(meter_id="MTR-0001", reading=Reading.from_snapshot(_EXAMPLE_SNAPSHOT)),
    ),
    (
        "EventsReply",
        EventsReply(
            meter_id="MTR-0001",
            events=[EventItem(seq=41, time=1_767_261_000, code=EventCode.LOW_CREDIT, a=4900)],
        ),
    ),
    (
        "ProfileReply",
        ProfileReply(
            meter_id="MTR-0001",
            rows=[
                ProfileItem(
                    time=1_767_226_500,
                    energy_import_wh=1_230_000,
                    interval_wh=112,
                    credit=49_000,
                    status=1,
                )
            ],
        ),
    ),
    (
        "LastResultReply",
        LastResultReply(
            meter_id="MTR-0001", result=ResultItem(sequence=13, code=ResultCode.OK, last_transfer=8)
        ),
    ),
    ("ErrorReply", ErrorReply(meter_id="MTR-0001", error="profile: start after end")),
)


def _tidy(value: Any) -> Any:
    """A JSON Schema with its descriptions (docstrings) on one line each."""
    if isinstance(value, dict):
        return {
            key: " ".join(item.split()) if key == "description" else _tidy(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_tidy(item) for item in value]
    return value


def _json_block(value: Any) -> str:
    return "```json\n" + json.dumps(value, indent=2, ensure_ascii=False) + "\n```"


def render_markdown() -> str:
    """``docs/mqtt.md``: topics, QoS, retain, MQTT 5 properties, and each payload's JSON Schema
    with an example. A test fails when the file differs from this."""
    out: list[str] = [
        "# MQTT topics and payloads (schema version 1)",
        "",
        "<!-- Generated by protocols.mqtt.render_markdown(); do not edit by hand. -->",
        "",
        "All topics live under a configurable prefix (default `phs`) and carry the scheme's "
        "version (`v1`). A meter's user name and client id are its meter id; the broker's ACL "
        "lets a meter publish and subscribe only under `<prefix>/v1/meters/<its id>/#`, and the "
        "head-end everywhere. A meter's password is its configured `mqtt_password`, or (lab "
        "fleets) 32 hex digits of HMAC-SHA256 over its id with the fleet's secret, which the "
        "broker helper provisions the same way.",
        "",
        "## Topics",
        "",
        "| topic | direction | QoS | retain | payload | MQTT 5 properties | de-duplication key |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec in TOPIC_SPECS:
        out.append(
            f"| `{spec.topic}` | {spec.direction} | {spec.qos} | {'yes' if spec.retain else 'no'} "
            f"| {spec.payload} | {spec.properties} | {spec.key} |"
        )
    out += [""]
    for spec in TOPIC_SPECS:
        out.append(f"* `{spec.topic}`: {spec.doc}")
    out += [
        "",
        "## MQTT 5 properties",
        "",
        "* Every message carries the user property `schema` = `1`, the payload format "
        "indicator 1 (UTF-8) and the content type `application/json`. A message whose `schema` "
        "property or `v` field is not 1 is refused.",
        "* Commands and requests carry a **response topic** and **correlation data**; the meter "
        "copies the correlation data into its answer. The head-end also correlates command "
        "results by sequence number.",
        "* Commands carry a **message expiry interval**: a command queued for an offline meter "
        "is dropped by the broker when it expires instead of being executed late.",
        "* Meters connect with clean start off and a **session expiry interval**, so their "
        "command subscription and queued commands survive a disconnection; their last will "
        "(retained `offline`) is published by the broker when a meter vanishes.",
        "",
        "## Shared subscriptions",
        "",
        "Head-end ingest workers subscribe to `$share/<group>/<prefix>/v1/meters/+/telemetry` "
        "(and `events`, `state`): the broker hands each message to one worker of the group. "
        "De-duplication keys stay per meter, so a storage that enforces them unique makes the "
        "split safe. MQTT 5 sends no retained messages to shared subscriptions: a worker learns "
        "a meter's state from its next state message.",
        "",
        "## Compatibility",
        "",
        "Unknown fields are ignored, so version 1 may gain optional fields. Removing or "
        "changing a field, or its meaning, makes version 2, on `<prefix>/v2/...`.",
        "",
        "## Payloads",
    ]
    examples = dict(EXAMPLES)
    for name, kind in _DOC_TYPES:
        (schema,), components = msgspec.json.schema_components(
            [kind], ref_template="#/$defs/{name}"
        )
        document: dict[str, Any] = dict(schema)
        if components:
            document = {**document, "$defs": components}
        doc = (getattr(kind, "__doc__", "") or "").strip()
        out += ["", f"### {name}", ""]
        if doc:
            out += [" ".join(doc.split()), ""]
        out += ["JSON Schema:", "", _json_block(_tidy(document)), "", "Example:", ""]
        if name in examples:
            out.append(_json_block(json.loads(encode(examples[name]))))
        else:
            for member in _UNION_MEMBERS[name]:
                out += [f"`{member}`:", "", _json_block(json.loads(encode(examples[member]))), ""]
            out.pop()
    return "\n".join(out) + "\n"


_DOC_TYPES: tuple[tuple[str, Any], ...] = (
    ("Telemetry", Telemetry),
    ("EventMessage", EventMessage),
    ("StateMessage", StateMessage),
    ("CommandMessage", CommandMessage),
    ("ResultMessage", ResultMessage),
    ("Request", Request),
    ("Reply", Reply),
)
_UNION_MEMBERS = {
    "Request": ("SnapshotRequest", "EventsRequest", "ProfileRequest", "LastResultRequest"),
    "Reply": ("SnapshotReply", "EventsReply", "ProfileReply", "LastResultReply", "ErrorReply"),
}
