"""What a meter reports: the standard snapshot, status flags, events and load-profile rows.

These are the values that the Modbus register map, the MQTT payloads and the head-end's storage
all carry; each is defined once here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag

from protocols.disconnect import ControlState


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
    """Standard event log codes (numbers follow the DLMS UA standard event log where one exists)."""

    POWER_DOWN = 1
    POWER_UP = 2
    CLOCK_SET = 3  # detail: old time, new time
    CLOCK_BACKWARDS = 4  # detail: old time, new time
    RELAY_DISCONNECTED = 10  # detail: cause
    RELAY_CONNECTED = 11  # detail: cause
    RELAY_READY_FOR_RECONNECTION = 12  # detail: cause
    LOW_CREDIT = 20  # detail: available credit
    CREDIT_EXHAUSTED = 21  # detail: available credit
    EMERGENCY_CREDIT_INVOKED = 22  # detail: amount
    EMERGENCY_CREDIT_EXHAUSTED = 23
    FRIENDLY_PERIOD_START = 24
    FRIENDLY_PERIOD_END = 25
    TOPUP_ACCEPTED = 30  # detail: transfer number, amount
    TOPUP_REFUSED = 31  # detail: transfer number, result code
    TOPUP_DUPLICATE = 32  # detail: transfer number
    TOKEN_ACCEPTED = 33  # detail: token class, value (Wh, W, mask, key revision)
    TOKEN_REFUSED = 34  # detail: token gateway status, keypad refusal code
    COMMAND_REFUSED = 40  # detail: command code, result code
    AUTH_FAILED = 41  # detail: command code, sequence
    REPLAY_REFUSED = 42  # detail: command code, sequence
    CONTROL_MODE_CHANGED = 43  # detail: old mode, new mode
    THRESHOLD_CHANGED = 44  # detail: old, new
    SEQUENCE_RESET = 45  # detail: last sequence under the old key, 0
    TAMPER_DETECTED = 50
    TAMPER_CLEARED = 51
    LIMITER_TRIP = 60  # detail: power W, threshold W
    LIMITER_RESTORED = 61
    KEY_CHANGED = 70  # detail: new key revision, new tariff index
    POWER_LIMIT_SET = 71  # detail: new limit W
    CREDIT_CLEARED = 72  # detail: amount cleared


class RelayCause(IntEnum):
    """Why the relay changed (event detail)."""

    REMOTE = 1
    MANUAL = 2
    CREDIT = 3
    LIMITER = 4
    TOPUP = 5
    MODE_CHANGE = 6
    FRIENDLY_PERIOD = 7


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
class MeterSnapshot:
    """The standard readings of one meter at one moment. Integers only; scalers are fixed:
    voltage in 0.1 V, current in mA, power factor in 0.001, frequency in 0.01 Hz."""

    meter_id: str
    time: int
    energy_import_wh: int
    energy_rates_wh: tuple[int, int, int, int]
    power_w: int
    voltage_dv: int
    current_ma: int
    power_factor_milli: int
    frequency_chz: int
    credit: int  # available token credit, in the account's unit
    emergency_credit: int  # emergency credit left, when in use
    debt: int  # owed: friendly-period consumption and overshoot, repaid by the next top-up
    credit_unit: int  # CurrencyUnit: 1 consumption (Wh), 2 monetary (minor units)
    currency: str  # ISO 4217 for a monetary account, "Wh" for a consumption account
    currency_scale: int  # power of ten of the account unit: -2 for cents, 0 for Wh
    low_credit_threshold: int
    control_state: ControlState
    control_mode: int
    status: StatusFlag
    last_event_seq: int
    last_transfer: int
    last_command_seq: int

    @property
    def relay_closed(self) -> bool:
        return self.control_state is ControlState.CONNECTED
