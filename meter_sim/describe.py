"""Human-readable views of a meter, shared by the CLI and the demo."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from meter_sim.firmware import Meter
from protocols.readings import Event, EventCode, MeterSnapshot, RelayCause, StatusFlag
from protocols.units import decimal_text


def amount_text(snapshot: MeterSnapshot, amount: int) -> str:
    """An amount in the account's unit: ``12.50 KES``, ``500 JPY`` or ``3.250 kWh``."""
    if snapshot.credit_unit == 1:
        return f"{decimal_text(amount, -3)} kWh"
    return f"{decimal_text(amount, snapshot.currency_scale)} {snapshot.currency}"


def status_names(flags: StatusFlag) -> list[str]:
    return [flag.name.lower() for flag in StatusFlag if flag in flags and flag.name]


def snapshot_rows(snapshot: MeterSnapshot) -> list[tuple[str, str]]:
    """(label, value) rows of a meter's standard readings."""
    rates = ", ".join(f"{decimal_text(wh, -3)}" for wh in snapshot.energy_rates_wh)
    return [
        ("meter", snapshot.meter_id),
        ("clock", iso_time(snapshot.time)),
        ("energy import", f"{decimal_text(snapshot.energy_import_wh, -3)} kWh"),
        ("energy per rate", f"{rates} kWh"),
        ("power", f"{snapshot.power_w} W"),
        ("voltage", f"{decimal_text(snapshot.voltage_dv, -1)} V"),
        ("current", f"{decimal_text(snapshot.current_ma, -3)} A"),
        ("power factor", decimal_text(snapshot.power_factor_milli, -3)),
        ("frequency", f"{decimal_text(snapshot.frequency_chz, -2)} Hz"),
        ("credit", amount_text(snapshot, snapshot.credit)),
        ("emergency credit", amount_text(snapshot, snapshot.emergency_credit)),
        ("debt", amount_text(snapshot, snapshot.debt)),
        ("low-credit threshold", amount_text(snapshot, snapshot.low_credit_threshold)),
        ("relay", snapshot.control_state.name.lower().replace("_", " ")),
        ("control mode", str(snapshot.control_mode)),
        ("status", ", ".join(status_names(snapshot.status)) or "-"),
        ("last transfer", str(snapshot.last_transfer)),
        ("last command", str(snapshot.last_command_seq)),
        ("last event", str(snapshot.last_event_seq)),
    ]


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
