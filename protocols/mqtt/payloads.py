"""MQTT version 1 payloads: msgspec Structs, defined once, and their codecs. Pure: no I/O.

Every ``decode_*`` returns a payload or raises :class:`~protocols.errors.DecodeError`, never
anything else, whatever the bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, Self, TypeVar

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
from protocols.errors import DecodeError, ValidationError
from protocols.meter_id import METER_ID_MAX_LENGTH, METER_ID_PATTERN, is_meter_id
from protocols.mqtt.topics import MAX_REPLY_ITEMS
from protocols.readings import (
    SNAPSHOT_FIELDS,
    SNAPSHOT_VALUE_FIELDS,
    Event,
    EventCode,
    FieldSpec,
    MeterSnapshot,
    ProfileRow,
)

U16 = Annotated[int, Meta(ge=0, le=2**16 - 1)]
U32 = Annotated[int, Meta(ge=0, le=2**32 - 1)]
U63 = Annotated[int, Meta(ge=0, le=2**63 - 1)]
I64 = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
Seq32 = Annotated[int, Meta(ge=1, le=2**32 - 1)]
#: a counter that a JavaScript consumer still reads exactly (at most 2**53 - 1)
Counter = Annotated[int, Meta(ge=1, le=2**53 - 1)]
MeterIdText = Annotated[str, Meta(pattern=METER_ID_PATTERN, max_length=METER_ID_MAX_LENGTH)]
Version = Literal[1]


# -- payloads -------------------------------------------------------------------------------------


class _Payload(Struct, frozen=True, kw_only=True):
    def __post_init__(self) -> None:
        meter_id = getattr(self, "meter_id", None)
        if meter_id is not None and not is_meter_id(meter_id):
            raise ValueError(f"bad meter id {meter_id!r}")


_READING_DOC = (
    "A meter's standard readings at one moment (its id is in the message around them). "
    "Integers only: voltage in 0.1 V, current in mA, power factor in 0.001, frequency in "
    "0.01 Hz; credit, debt and thresholds in the account's unit (minor currency units, or Wh "
    "when `credit_unit` is 1)."
)


class _ReadingBase(Struct, frozen=True, kw_only=True):
    """What :data:`Reading` adds to its fields: the conversions to and from a snapshot."""

    @classmethod
    def from_snapshot(cls, snapshot: MeterSnapshot) -> Self:
        return cls(**snapshot.to_values())

    def to_snapshot(self, meter_id: str) -> MeterSnapshot:
        return MeterSnapshot.from_values(meter_id, msgspec.structs.asdict(self))


def _json_type(spec: FieldSpec) -> Any:
    """The msgspec type of one snapshot field in JSON, from its one definition."""
    meta = Meta(description=spec.description.format(n=f"1..{spec.count}"))
    single: Any
    if spec.enum is not None:
        single = spec.enum
    elif spec.register == "string":
        low, high = spec.json_range or (1, 2 * spec.length)
        single = Annotated[str, Meta(min_length=low, max_length=high)]
    else:
        bounds = spec.json_range or (spec.minimum, spec.maximum)
        single = Annotated[int, Meta(ge=bounds[0], le=bounds[1])]
    if spec.count == 1:
        return Annotated[single, meta]
    return Annotated[tuple.__class_getitem__((single,) * spec.count), meta]


if TYPE_CHECKING:
    Reading = _ReadingBase
else:
    #: the snapshot without its meter id, generated from the snapshot's one definition
    Reading = msgspec.defstruct(
        "Reading",
        [
            (name, _json_type(spec))
            for name, spec in SNAPSHOT_FIELDS
            if name in SNAPSHOT_VALUE_FIELDS
        ],
        bases=(_ReadingBase,),
        module=__name__,
        namespace={"__doc__": _READING_DOC},
        frozen=True,
        kw_only=True,
    )


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
    """A command envelope, the same as over Modbus: the meter id, the sequence number, the
    command code, its arguments in order and the authentication tag (32 hex digits; empty for a
    meter without a key). See the command table, the tag and the sequence rule. A 20-digit token
    argument exceeds 2**64: read ``args`` with a decoder that keeps big integers exact."""

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
    """A command's result: the sequence number it answers, the result code and the last credit
    transfer number the meter has applied. ``sequence`` 0 answers a command that could not be
    read at all."""

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
