"""What a meter reports: the standard snapshot, status flags, events and load-profile rows.

These are the values that the Modbus register map, the MQTT payloads and the head-end's storage
all carry; each is defined once here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from enum import IntEnum, IntFlag
from typing import Any

from protocols.cosem import (
    OBIS_ACCOUNT,
    OBIS_CLOCK,
    OBIS_CURRENT,
    OBIS_DISCONNECT,
    OBIS_EMERGENCY_CREDIT,
    OBIS_ENERGY_IMPORT,
    OBIS_ENERGY_RATES,
    OBIS_FREQUENCY,
    OBIS_POWER,
    OBIS_POWER_FACTOR,
    OBIS_TOKEN_CREDIT,
    OBIS_VOLTAGE,
    CreditUnit,
)
from protocols.disconnect import ControlState
from protocols.meter_id import check_meter_id
from protocols.obis import Obis


class StatusFlag(IntFlag):
    """The meter's status bits (Modbus status block, MQTT telemetry ``status``)."""

    IN_CREDIT = 1 << 0
    LOW_CREDIT = 1 << 1
    OUT_OF_CREDIT = 1 << 2
    EMERGENCY_CREDIT_IN_USE = 1 << 3
    FRIENDLY_PERIOD = 1 << 4
    TAMPER = 1 << 5
    LIMITER_TRIPPED = 1 << 6
    EMERGENCY_CREDIT_AVAILABLE = 1 << 7
    CLOCK_INVALID = 1 << 8


class EventCode(IntEnum):
    """Event log codes (numbers follow the DLMS UA standard event log where one exists); the
    event code table says what each means and what its details a and b hold."""

    POWER_DOWN = 1
    POWER_UP = 2
    CLOCK_SET = 3
    CLOCK_BACKWARDS = 4
    RELAY_DISCONNECTED = 10
    RELAY_CONNECTED = 11
    RELAY_READY_FOR_RECONNECTION = 12
    LOW_CREDIT = 20
    CREDIT_EXHAUSTED = 21
    EMERGENCY_CREDIT_INVOKED = 22
    EMERGENCY_CREDIT_EXHAUSTED = 23
    FRIENDLY_PERIOD_START = 24
    FRIENDLY_PERIOD_END = 25
    TOPUP_ACCEPTED = 30
    TOPUP_REFUSED = 31
    TOPUP_DUPLICATE = 32
    TOKEN_ACCEPTED = 33
    TOKEN_REFUSED = 34
    TOKEN_TID = 35  # right after TOKEN_ACCEPTED, for a token that carries a TID
    COMMAND_REFUSED = 40
    AUTH_FAILED = 41
    REPLAY_REFUSED = 42
    CONTROL_MODE_CHANGED = 43
    THRESHOLD_CHANGED = 44
    SEQUENCE_RESET = 45
    TAMPER_DETECTED = 50
    TAMPER_CLEARED = 51
    LIMITER_TRIP = 60
    LIMITER_RESTORED = 61
    RELAY_WELDED = 62
    KEY_CHANGED = 70
    POWER_LIMIT_SET = 71
    CREDIT_CLEARED = 72


class RelayCause(IntEnum):
    """Why the relay changed (event detail)."""

    REMOTE = 1
    MANUAL = 2
    CREDIT = 3
    LIMITER = 4
    TOPUP = 5
    MODE_CHANGE = 6
    FRIENDLY_PERIOD = 7


#: event code -> (what happened, the meaning of detail ``a``, of detail ``b``); "" when unused
EVENT_DETAILS: dict[EventCode, tuple[str, str, str]] = {
    EventCode.POWER_DOWN: ("the meter lost power (logged at its last saved moment)", "", ""),
    EventCode.POWER_UP: ("the meter powered up", "seconds it was off", ""),
    EventCode.CLOCK_SET: ("the clock was set", "old time", "new time"),
    EventCode.CLOCK_BACKWARDS: ("the clock was set back", "old time", "new time"),
    EventCode.RELAY_DISCONNECTED: (
        "relay disconnected",
        "cause (relay cause table)",
        "transition letter as a character code (98: b, 99: c); 0 after a mode change",
    ),
    EventCode.RELAY_CONNECTED: (
        "relay connected",
        "cause (relay cause table)",
        "transition letter as a character code (97: a, 101: e, 104: h); 0 after a mode change",
    ),
    EventCode.RELAY_READY_FOR_RECONNECTION: (
        "relay open, waiting for the customer's button",
        "cause (relay cause table)",
        "transition letter as a character code (100: d, 102: f, 103: g); 0 after a mode change",
    ),
    EventCode.LOW_CREDIT: ("available credit fell below the threshold", "available", "threshold"),
    EventCode.CREDIT_EXHAUSTED: ("credit ran out", "available", ""),
    EventCode.EMERGENCY_CREDIT_INVOKED: ("emergency credit taken", "amount", ""),
    EventCode.EMERGENCY_CREDIT_EXHAUSTED: ("emergency credit used up", "", ""),
    EventCode.FRIENDLY_PERIOD_START: ("a friendly period began", "available", ""),
    EventCode.FRIENDLY_PERIOD_END: ("a friendly period ended", "available", ""),
    EventCode.TOPUP_ACCEPTED: ("credit transfer applied", "transfer number", "amount"),
    EventCode.TOPUP_REFUSED: ("credit transfer refused", "transfer number", "result code"),
    EventCode.TOPUP_DUPLICATE: (
        "credit transfer number seen before: acknowledged, not applied",
        "transfer number",
        "",
    ),
    EventCode.TOKEN_ACCEPTED: (
        "STS token accepted",
        "token class",
        "value: Wh, W, clear mask, key revision or test control",
    ),
    EventCode.TOKEN_REFUSED: ("STS token refused", "token gateway status", "keypad refusal"),
    EventCode.TOKEN_TID: (
        "the TID of the STS token just accepted (what a head-end matches it by)",
        "TID",
        "token class",
    ),
    EventCode.COMMAND_REFUSED: (
        "a command (or the button) was refused",
        "command code (0: the customer's button)",
        "result code",
    ),
    EventCode.AUTH_FAILED: ("a command's tag did not match", "command code", "sequence"),
    EventCode.REPLAY_REFUSED: ("a command's sequence was used before", "command code", "sequence"),
    EventCode.CONTROL_MODE_CHANGED: ("disconnect control mode changed", "old mode", "new mode"),
    EventCode.THRESHOLD_CHANGED: ("low-credit threshold changed", "old", "new"),
    EventCode.SEQUENCE_RESET: (
        "a new command key: the command sequence starts again",
        "last sequence under the old key",
        "0",
    ),
    EventCode.TAMPER_DETECTED: ("terminal cover opened (tamper)", "", ""),
    EventCode.TAMPER_CLEARED: ("tamper flag cleared", "", ""),
    EventCode.LIMITER_TRIP: ("load limiter opened the relay", "demand W", "threshold W"),
    EventCode.LIMITER_RESTORED: ("load limiter closed the relay again", "", ""),
    EventCode.RELAY_WELDED: (
        "the relay was switched open but its contacts stay closed (welded): supply stays on",
        "the control state it was switched to",
        "",
    ),
    EventCode.KEY_CHANGED: ("STS key changed", "key revision", "tariff index"),
    EventCode.POWER_LIMIT_SET: ("power limit set by token", "limit W", ""),
    EventCode.CREDIT_CLEARED: ("credit cleared by token", "amount cleared", ""),
}

#: relay cause -> what it means (event detail ``a`` of the relay events)
RELAY_CAUSE_TEXT: dict[RelayCause, str] = {
    RelayCause.REMOTE: "a head-end command",
    RelayCause.MANUAL: "the customer's button",
    RelayCause.CREDIT: "credit ran out",
    RelayCause.LIMITER: "the load limiter",
    RelayCause.TOPUP: "a top-up restored credit",
    RelayCause.MODE_CHANGE: "a change of control mode",
    RelayCause.FRIENDLY_PERIOD: "a friendly period began",
}


@dataclass(frozen=True, slots=True)
class Event:
    """One event log entry; ``seq`` increases by one per event for the meter's whole life."""

    seq: int
    time: int  # meter clock, seconds since the epoch
    code: EventCode
    a: int = 0  # detail values; their meaning depends on the code (see EventCode)
    b: int = 0

    def to_row(self) -> tuple[int, int, int, int, int]:
        return (self.time, self.seq, int(self.code), self.a, self.b)

    @classmethod
    def from_row(cls, row: tuple[int, ...]) -> Event:
        time, seq, code, a, b = row
        return cls(seq, time, EventCode(code), a, b)


@dataclass(frozen=True, slots=True)
class ProfileRow:
    """One load-profile interval: captured at ``time`` (the interval's end, meter clock)."""

    time: int
    energy_import_wh: int  # register value at capture time
    interval_wh: int  # energy in this interval
    credit: int  # available credit at capture time, in the account's unit
    status: int  # StatusFlag bits

    def to_row(self) -> tuple[int, int, int, int, int]:
        return (self.time, self.energy_import_wh, self.interval_wh, self.credit, self.status)

    @classmethod
    def from_row(cls, row: tuple[int, ...]) -> ProfileRow:
        return cls(*row)


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """How one field of :class:`MeterSnapshot` is carried and shown.

    This is the one definition of the snapshot: the Modbus rows of the measurements, account and
    status blocks, the MQTT ``Reading`` schema, the generated documents and the human-readable
    views are all derived from these specs (``dataclasses.fields(MeterSnapshot)[i].metadata``).
    """

    description: str
    register: str = ""  # register map data type (u16 u32 u64 i16 i32 string); "": no register
    block: str = ""  # register map block: measurements, account or status
    unit: str = ""
    scaler: int = 0  # physical value = value * 10**scaler
    obis: tuple[Obis, ...] = ()  # the COSEM object(s): one per value
    attribute: int | None = None
    element: int | None = None  # index into a structure-valued attribute
    length: int = 0  # registers of a string
    enum: type[IntEnum] | None = None  # the value is a member of this enumeration
    minimum: int | None = None  # the value's range, where narrower than its type's
    maximum: int | None = None
    json_range: tuple[int, int] | None = None  # MQTT's integer range (text: length range)
    count: int = 1  # a tuple of ``count`` values (one register row each)
    row_name: str = ""  # the register rows' name, ``{n}`` numbered from 1; "": the field name
    label: str = ""  # the field in a human-readable view; "": not shown

    def row_names(self, field_name: str) -> tuple[str, ...]:
        if self.count == 1:
            return (self.row_name or field_name,)
        return tuple(self.row_name.format(n=n) for n in range(1, self.count + 1))


def _meta(spec: FieldSpec) -> dict[str, FieldSpec]:
    """The metadata of a dataclass field that carries its :class:`FieldSpec`."""
    return {"spec": spec}


_U63 = (0, 2**63 - 1)
_I64 = (-(2**63), 2**63 - 1)
_U32 = (0, 2**32 - 1)
_ACCOUNT_UNIT = "account unit"


@dataclass(frozen=True, slots=True)
class MeterSnapshot:
    """The standard readings of one meter at one moment. Integers only; scalers are fixed:
    voltage in 0.1 V, current in mA, power factor in 0.001, frequency in 0.01 Hz; credit, debt
    and thresholds in the account's unit (minor currency units, or Wh for an energy account)."""

    meter_id: str = field(metadata=_meta(FieldSpec("meter id", label="meter")))
    time: int = field(
        metadata=_meta(
            FieldSpec(
                "meter clock, seconds since 1970-01-01 UTC",
                "u64",
                "measurements",
                unit="s",
                obis=(OBIS_CLOCK,),
                attribute=2,
                json_range=_U63,
                label="clock",
            )
        )
    )
    energy_import_wh: int = field(
        metadata=_meta(
            FieldSpec(
                "active energy import, total",
                "u64",
                "measurements",
                unit="Wh",
                obis=(OBIS_ENERGY_IMPORT,),
                attribute=2,
                json_range=_U63,
                label="energy import",
            )
        )
    )
    energy_rates_wh: tuple[int, int, int, int] = field(
        metadata=_meta(
            FieldSpec(
                "active energy import, tariff rate {n}",
                "u64",
                "measurements",
                unit="Wh",
                obis=OBIS_ENERGY_RATES,
                attribute=2,
                json_range=_U63,
                count=4,
                row_name="energy_rate{n}_wh",
                label="energy per rate",
            )
        )
    )
    power_w: int = field(
        metadata=_meta(
            FieldSpec(
                "instantaneous active power import",
                "i32",
                "measurements",
                unit="W",
                obis=(OBIS_POWER,),
                attribute=2,
                json_range=_I64,
                label="power",
            )
        )
    )
    voltage_dv: int = field(
        metadata=_meta(
            FieldSpec(
                "voltage L1",
                "u16",
                "measurements",
                unit="V",
                scaler=-1,
                obis=(OBIS_VOLTAGE,),
                attribute=2,
                json_range=_I64,
                label="voltage",
            )
        )
    )
    current_ma: int = field(
        metadata=_meta(
            FieldSpec(
                "current L1",
                "u32",
                "measurements",
                unit="A",
                scaler=-3,
                obis=(OBIS_CURRENT,),
                attribute=2,
                json_range=_I64,
                label="current",
            )
        )
    )
    power_factor_milli: int = field(
        metadata=_meta(
            FieldSpec(
                "power factor",
                "i16",
                "measurements",
                scaler=-3,
                obis=(OBIS_POWER_FACTOR,),
                attribute=2,
                json_range=(-1000, 1000),
                label="power factor",
            )
        )
    )
    frequency_chz: int = field(
        metadata=_meta(
            FieldSpec(
                "frequency",
                "u16",
                "measurements",
                unit="Hz",
                scaler=-2,
                obis=(OBIS_FREQUENCY,),
                attribute=2,
                json_range=_U32,
                label="frequency",
            )
        )
    )
    credit: int = field(
        metadata=_meta(
            FieldSpec(
                "available token credit",
                "u64",
                "account",
                unit=_ACCOUNT_UNIT,
                obis=(OBIS_TOKEN_CREDIT,),
                attribute=2,
                json_range=_I64,
                label="credit",
            )
        )
    )
    emergency_credit: int = field(
        metadata=_meta(
            FieldSpec(
                "emergency credit left while it is in use",
                "u64",
                "account",
                unit=_ACCOUNT_UNIT,
                obis=(OBIS_EMERGENCY_CREDIT,),
                attribute=2,
                json_range=_I64,
                label="emergency credit",
            )
        )
    )
    debt: int = field(
        metadata=_meta(
            FieldSpec(
                "owed (friendly-period use, overshoot, unpaid emergency credit), "
                "repaid by a top-up",
                "u64",
                "account",
                unit=_ACCOUNT_UNIT,
                json_range=_I64,
                label="debt",
            )
        )
    )
    credit_unit: CreditUnit = field(
        metadata=_meta(
            FieldSpec(
                "account unit: 1 consumption (Wh), 2 monetary (minor currency units)",
                "u16",
                "account",
                obis=(OBIS_ACCOUNT,),
                attribute=11,
                element=2,
                enum=CreditUnit,
            )
        )
    )
    currency: str = field(
        metadata=_meta(
            FieldSpec(
                'ISO 4217 code of a monetary account, "Wh" for a consumption account',
                "string",
                "account",
                length=2,
                obis=(OBIS_ACCOUNT,),
                attribute=11,
                element=0,
                json_range=(1, 8),
            )
        )
    )
    currency_scale: int = field(
        metadata=_meta(
            FieldSpec(
                "power of ten of the account unit: -2 when credit is in cents, 0 for Wh",
                "i16",
                "account",
                obis=(OBIS_ACCOUNT,),
                attribute=11,
                element=1,
                minimum=-4,
                maximum=0,
            )
        )
    )
    low_credit_threshold: int = field(
        metadata=_meta(
            FieldSpec(
                "low-credit warning threshold",
                "u64",
                "account",
                unit=_ACCOUNT_UNIT,
                obis=(OBIS_ACCOUNT,),
                attribute=9,
                json_range=_I64,
                label="low-credit threshold",
            )
        )
    )
    control_state: ControlState = field(
        metadata=_meta(
            FieldSpec(
                "disconnect control state: 0 disconnected, 1 connected, 2 ready for reconnection",
                "u16",
                "status",
                obis=(OBIS_DISCONNECT,),
                attribute=3,
                enum=ControlState,
                label="relay",
            )
        )
    )
    control_mode: int = field(
        metadata=_meta(
            FieldSpec(
                "disconnect control mode 0..6",
                "u16",
                "status",
                obis=(OBIS_DISCONNECT,),
                attribute=4,
                minimum=0,
                maximum=6,
                label="control mode",
            )
        )
    )
    status: StatusFlag = field(
        metadata=_meta(
            FieldSpec(
                "status bits, see the status bits table",
                "u32",
                "status",
                json_range=_U32,
                label="status",
            )
        )
    )
    last_event_seq: int = field(
        metadata=_meta(
            FieldSpec(
                "sequence number of the newest event in the log",
                "u32",
                "status",
                json_range=_U63,
                label="last event",
            )
        )
    )
    last_transfer: int = field(
        metadata=_meta(
            FieldSpec(
                "number of the last credit transfer applied",
                "u32",
                "status",
                json_range=_U32,
                label="last transfer",
            )
        )
    )
    last_command_seq: int = field(
        metadata=_meta(
            FieldSpec(
                "sequence of the last command executed (applied or refused by state, argument or "
                "transfer number; not auth failures or replays)",
                "u32",
                "status",
                json_range=_U32,
                label="last command",
            )
        )
    )

    def __post_init__(self) -> None:
        check_meter_id(self.meter_id)

    @property
    def relay_closed(self) -> bool:
        return self.control_state is ControlState.CONNECTED

    def to_values(self) -> dict[str, Any]:
        """Every field but ``meter_id`` by name, as plain values (enums and flags as ints)."""
        return {
            name: (int(value) if isinstance(value, int) else value)
            for name in SNAPSHOT_VALUE_FIELDS
            for value in (getattr(self, name),)
        }

    @classmethod
    def from_values(cls, meter_id: str, values: Mapping[str, Any]) -> MeterSnapshot:
        """The snapshot of ``values`` by field name (as :meth:`to_values` gives them); enums and
        flags are rebuilt from their numbers. ValueError (ValidationError) for a bad value."""
        kwargs: dict[str, Any] = {}
        for name in SNAPSHOT_VALUE_FIELDS:
            value = values[name]
            convert = SNAPSHOT_CONVERTERS.get(name)
            kwargs[name] = convert(value) if convert is not None else value
        kwargs["energy_rates_wh"] = tuple(kwargs["energy_rates_wh"])
        return cls(meter_id=meter_id, **kwargs)


#: (field name, spec) of every snapshot field, in order
SNAPSHOT_FIELDS: tuple[tuple[str, FieldSpec], ...] = tuple(
    (item.name, item.metadata["spec"]) for item in fields(MeterSnapshot)
)
#: the fields a reading carries beside the meter's id
SNAPSHOT_VALUE_FIELDS: tuple[str, ...] = tuple(
    name for name, _ in SNAPSHOT_FIELDS if name != "meter_id"
)
#: a snapshot's fields in order as a plain tuple: ``MeterSnapshot(*values)`` is the snapshot
SnapshotValues = tuple[
    str,
    int,
    int,
    tuple[int, int, int, int],
    int,
    int,
    int,
    int,
    int,
    int,
    int,
    int,
    CreditUnit,
    str,
    int,
    int,
    ControlState,
    int,
    StatusFlag,
    int,
    int,
    int,
]


def snapshot_values(snapshot: MeterSnapshot) -> SnapshotValues:
    """The fields of ``snapshot`` in order (the inverse of ``MeterSnapshot(*values)``)."""
    s = snapshot
    return (
        s.meter_id,
        s.time,
        s.energy_import_wh,
        s.energy_rates_wh,
        s.power_w,
        s.voltage_dv,
        s.current_ma,
        s.power_factor_milli,
        s.frequency_chz,
        s.credit,
        s.emergency_credit,
        s.debt,
        s.credit_unit,
        s.currency,
        s.currency_scale,
        s.low_credit_threshold,
        s.control_state,
        s.control_mode,
        s.status,
        s.last_event_seq,
        s.last_transfer,
        s.last_command_seq,
    )


#: field name -> what rebuilds its enum member or flags from the number carried
SNAPSHOT_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    name: spec.enum for name, spec in SNAPSHOT_FIELDS if spec.enum is not None
}
SNAPSHOT_CONVERTERS["status"] = StatusFlag
