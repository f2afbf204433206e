"""Human-readable views of a meter, shared by the CLI and the demo."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from meter_sim.firmware import Meter
from protocols.readings import (
    SNAPSHOT_FIELDS,
    Event,
    EventCode,
    FieldSpec,
    MeterSnapshot,
    RelayCause,
    StatusFlag,
)
from protocols.units import decimal_text


def amount_text(snapshot: MeterSnapshot, amount: int) -> str:
    """An amount in the account's unit: ``12.50 KES``, ``500 JPY`` or ``3.250 kWh``."""
    if snapshot.credit_unit == 1:
        return f"{decimal_text(amount, -3)} kWh"
    return f"{decimal_text(amount, snapshot.currency_scale)} {snapshot.currency}"


def status_names(flags: StatusFlag) -> list[str]:
    return [flag.name.lower() for flag in StatusFlag if flag in flags and flag.name]


def snapshot_rows(snapshot: MeterSnapshot) -> list[tuple[str, str]]:
    """(label, value) rows of a meter's standard readings: every snapshot field that has a label
    in its definition (protocols.readings.SNAPSHOT_FIELDS), in the definition's order."""
    return [
        (spec.label, field_text(snapshot, name, spec))
        for name, spec in SNAPSHOT_FIELDS
        if spec.label
    ]


def field_text(snapshot: MeterSnapshot, name: str, spec: FieldSpec) -> str:
    """One snapshot field in words, from its definition's unit, scaler and enumeration."""
    value = getattr(snapshot, name)
    if spec.count > 1:
        return ", ".join(_value_text(snapshot, spec, item, bare=True) for item in value) + (
            " kWh" if spec.unit == "Wh" else ""
        )
    if name == "status":
        return ", ".join(status_names(value)) or "-"
    return _value_text(snapshot, spec, value)


def _value_text(snapshot: MeterSnapshot, spec: FieldSpec, value: Any, bare: bool = False) -> str:
    if spec.enum is not None:
        return str(value.name).lower().replace("_", " ")
    if spec.unit == "s":
        return iso_time(value)
    if spec.unit == "Wh":
        return decimal_text(value, -3) + ("" if bare else " kWh")
    if spec.unit == "account unit":
        return amount_text(snapshot, value)
    text = decimal_text(value, spec.scaler) if spec.scaler else str(value)
    return f"{text} {spec.unit}" if spec.unit and not bare else text


_CAUSES = {int(cause) for cause in RelayCause}
_CAUSE_CODES = {
    EventCode.RELAY_CONNECTED,
    EventCode.RELAY_DISCONNECTED,
    EventCode.RELAY_READY_FOR_RECONNECTION,
}


def event_text(event: Event) -> str:
    """The event's detail in words."""
    code = event.code
    if code in _CAUSE_CODES:
        cause = RelayCause(event.a).name.lower() if event.a in _CAUSES else str(event.a)
        return f"cause {cause}, transition {chr(event.b) if event.b else '-'}"
    if code in (EventCode.TOPUP_ACCEPTED,):
        return f"transfer {event.a}, amount {event.b}"
    if code in (EventCode.TOPUP_REFUSED, EventCode.TOPUP_DUPLICATE):
        return f"transfer {event.a}" + (f", result {event.b}" if event.b else "")
    if code in (EventCode.CLOCK_SET, EventCode.CLOCK_BACKWARDS):
        return f"{iso_time(event.a)} -> {iso_time(event.b)}"
    if code is EventCode.LOW_CREDIT:
        return f"available {event.a}, threshold {event.b}"
    if code is EventCode.LIMITER_TRIP:
        return f"{event.a} W over {event.b} W"
    if event.a or event.b:
        return f"{event.a} {event.b}"
    return ""


def event_dict(event: Event) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "time": event.time,
        "code": event.code.name.lower(),
        "a": event.a,
        "b": event.b,
        "text": event_text(event),
    }


def iso_time(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


def conservation(meter: Meter) -> tuple[int, int]:
    """(initial + top-ups - charges - cleared, net balance): equal on every healthy meter."""
    return (
        meter.initial_credit + meter.topups_total - meter.charges_total - meter.cleared_total,
        meter.balances.net,
    )
