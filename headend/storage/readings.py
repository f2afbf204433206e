"""Readings, intervals, events, gaps and read health: written exactly once by their keys."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Subquery, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from headend.domain.health import Change, Health, after_read
from headend.domain.validation import CheckedInterval, Findings, Flag, Previous
from headend.storage.database import insert_ignore
from headend.storage.schema import (
    Gap,
    HealthChange,
    Interval,
    Meter,
    MeterEvent,
    PollHealth,
    Reading,
    TelemetrySeen,
)
from protocols.readings import Event, MeterSnapshot


def reading_row(
    snapshot: MeterSnapshot, findings: Findings, received_at: datetime, source: str
) -> dict[str, Any]:
    rates = snapshot.energy_rates_wh
    return {
        "meter_id": snapshot.meter_id,
        "meter_time": snapshot.time,
        "received_at": received_at,
        "source": source,
        "energy_import_wh": snapshot.energy_import_wh,
        "rate1_wh": rates[0],
        "rate2_wh": rates[1],
        "rate3_wh": rates[2],
        "rate4_wh": rates[3],
        "power_w": snapshot.power_w,
        "voltage_dv": snapshot.voltage_dv,
        "current_ma": snapshot.current_ma,
        "power_factor_milli": snapshot.power_factor_milli,
        "frequency_chz": snapshot.frequency_chz,
        "credit": snapshot.credit,
        "emergency_credit": snapshot.emergency_credit,
        "debt": snapshot.debt,
        "low_credit_threshold": snapshot.low_credit_threshold,
        "control_state": int(snapshot.control_state),
        "control_mode": snapshot.control_mode,
        "status": int(snapshot.status),
        "last_event_seq": snapshot.last_event_seq,
        "last_transfer": snapshot.last_transfer,
        "last_command_seq": snapshot.last_command_seq,
        "flags": int(findings.flags),
        "flag_reason": findings.reason,
    }


async def latest_reading(session: AsyncSession, meter_id: str) -> Previous | None:
    """The meter's latest stored reading, by meter time."""
    return (await latest_readings(session, [meter_id])).get(meter_id)


async def store_readings(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> int:
    """Store reading rows (from :func:`reading_row`); returns how many were new."""
    return await insert_ignore(session, Reading, rows)


def interval_row(meter_id: str, interval: CheckedInterval) -> dict[str, Any]:
    return {
        "meter_id": meter_id,
        "start": interval.start,
        "period": interval.period,
        "energy_wh": interval.energy_wh,
        "register_wh": interval.register_wh,
        "credit": interval.credit,
        "status": interval.status,
        "estimated": interval.estimated,
        "flags": int(interval.findings.flags),
        "flag_reason": interval.findings.reason,
    }


async def last_interval(session: AsyncSession, meter_id: str) -> CheckedInterval | None:
    """The meter's latest stored interval, actual or estimated."""
    return (await last_intervals(session, [meter_id])).get(meter_id)


async def store_intervals(
    session: AsyncSession, meter_id: str, intervals: Sequence[CheckedInterval]
) -> int:
    return await insert_ignore(session, Interval, [interval_row(meter_id, i) for i in intervals])


async def last_event_seq(session: AsyncSession, meter_id: str) -> int:
    """The highest event sequence stored for the meter (0: none)."""
    return (await last_event_seqs(session, [meter_id])).get(meter_id, 0)


def event_rows(
    meter_id: str, events: Sequence[Event], received_at: datetime, boot: int = 0
) -> list[dict[str, Any]]:
    return [
        {
            "meter_id": meter_id,
            "boot": boot,
            "seq": event.seq,
            "meter_time": event.time,
            "code": int(event.code),
            "a": event.a,
            "b": event.b,
            "received_at": received_at,
        }
        for event in events
    ]


def gap_row(meter_id: str, kind: str, first: int, last: int, found_at: datetime) -> dict[str, Any]:
    return {"meter_id": meter_id, "kind": kind, "first": first, "last": last, "found_at": found_at}


async def store_events(
    session: AsyncSession,
    meter_id: str,
    events: Sequence[Event],
    received_at: datetime,
    boot: int = 0,
) -> int:
    """Store events; ``boot`` 0 for events read from the log (their sequence is lifelong)."""
    return await insert_ignore(session, MeterEvent, event_rows(meter_id, events, received_at, boot))


async def store_gap(
    session: AsyncSession, meter_id: str, kind: str, first: int, last: int, *, found_at: datetime
) -> bool:
    """Record that the meter can no longer give ``first..last`` (interval starts or event
    sequence numbers); False if that gap was recorded already."""
    return await insert_ignore(session, Gap, [gap_row(meter_id, kind, first, last, found_at)]) == 1


@dataclass(frozen=True, slots=True)
class HealthState:
    health: Health
    failures: int


async def record_read(
    session: AsyncSession,
    meter_id: str,
    ok: bool,
    *,
    now: datetime,
    error: str = "",
    next_due: datetime | None = None,
    unreachable_after: int = 3,
) -> Change | None:
    """Update the meter's read health after one read; a change is stored as an event."""
    row = await session.get(PollHealth, meter_id)
    if row is None:
        row = PollHealth(meter_id=meter_id, health=Health.UNKNOWN.value, consecutive_failures=0)
        session.add(row)
    health, failures, change = after_read(
        Health(row.health), row.consecutive_failures, ok, error, unreachable_after
    )
    row.health = health.value
    row.consecutive_failures = failures
    row.last_attempt = now
    if ok:
        row.last_seen = now
        row.last_error = None
    else:
        row.last_error = error
    row.next_due = next_due
    if change is not None:
        session.add(
            HealthChange(
                meter_id=meter_id,
                at=now,
                old=change.old.value,
                new=change.new.value,
                reason=change.reason,
            )
        )
    return change


async def health_of(session: AsyncSession, meter_id: str) -> HealthState:
    row = await session.get(PollHealth, meter_id)
    if row is None:
        return HealthState(Health.UNKNOWN, 0)
    return HealthState(Health(row.health), row.consecutive_failures)


# -- many meters at once (the poller's batches) -----------------------------------------------


def latest_times(*where: Any) -> Subquery:
    """Each meter's latest reading time, ``(meter_id, meter_time)``, of the readings that meet
    ``where``: a subquery to join readings (or anything per meter) on."""
    return (
        select(Reading.meter_id, func.max(Reading.meter_time).label("meter_time"))
        .where(*where)
        .group_by(Reading.meter_id)
        .subquery()
    )


async def latest_readings(session: AsyncSession, meter_ids: Sequence[str]) -> dict[str, Previous]:
    """Each meter's latest stored reading, by meter time, in one query."""
    latest = latest_times(Reading.meter_id.in_(meter_ids))
    rows = await session.execute(
        select(Reading.meter_id, Reading.meter_time, Reading.energy_import_wh).join(
            latest,
            (Reading.meter_id == latest.c.meter_id) & (Reading.meter_time == latest.c.meter_time),
        )
    )
    return {meter_id: Previous(time, energy) for meter_id, time, energy in rows}


async def last_intervals(
    session: AsyncSession, meter_ids: Sequence[str]
) -> dict[str, CheckedInterval]:
    """Each meter's latest stored interval, in one query."""
    latest = (
        select(Interval.meter_id, func.max(Interval.start).label("start"))
        .where(Interval.meter_id.in_(meter_ids))
        .group_by(Interval.meter_id)
        .subquery()
    )
    rows = await session.execute(
        select(
            Interval.meter_id,
            Interval.start,
            Interval.period,
            Interval.energy_wh,
            Interval.register_wh,
            Interval.credit,
            Interval.status,
            Interval.flags,
            Interval.flag_reason,
            Interval.estimated,
        ).join(
            latest, (Interval.meter_id == latest.c.meter_id) & (Interval.start == latest.c.start)
        )
    )
    found: dict[str, CheckedInterval] = {}
    for meter_id, start, period, wh, register, credit, status, flags, reason, estimated in rows:
        reasons = tuple(reason.split("; ")) if reason else ()
        found[meter_id] = CheckedInterval(
            start, period, wh, register, credit, status, Findings(Flag(flags), reasons), estimated
        )
    return found


async def last_event_seqs(session: AsyncSession, meter_ids: Sequence[str]) -> dict[str, int]:
    rows = await session.execute(
        select(MeterEvent.meter_id, func.max(MeterEvent.seq))
        .where(MeterEvent.meter_id.in_(meter_ids))
        .group_by(MeterEvent.meter_id)
    )
    return {meter_id: int(seq) for meter_id, seq in rows}


async def record_reads_ok(
    session: AsyncSession, meter_ids: Sequence[str], now: datetime
) -> list[Change]:
    """Good reads of many meters: each is online now; the changes of health are stored."""
    if not meter_ids:
        return []
    await insert_ignore(
        session,
        PollHealth,
        [
            {"meter_id": m, "health": Health.UNKNOWN.value, "consecutive_failures": 0}
            for m in meter_ids
        ],
    )
    before = dict(
        (
            await session.execute(
                select(PollHealth.meter_id, PollHealth.health).where(
                    PollHealth.meter_id.in_(meter_ids)
                )
            )
        ).all()
    )
    changes = [
        Change(Health(before[m]), Health.ONLINE, "read succeeded")
        for m in meter_ids
        if before.get(m) != Health.ONLINE.value
    ]
    changed = [m for m in meter_ids if before.get(m) != Health.ONLINE.value]
    await session.execute(
        update(PollHealth)
        .where(PollHealth.meter_id.in_(meter_ids))
        .values(
            health=Health.ONLINE.value,
            consecutive_failures=0,
            last_attempt=now,
            last_seen=now,
            last_error=None,
            next_due=None,
        )
    )
    if changed:
        await insert_ignore(
            session,
            HealthChange,
            [
                {
                    "meter_id": m,
                    "at": now,
                    "old": c.old.value,
                    "new": c.new.value,
                    "reason": c.reason,
                }
                for m, c in zip(changed, changes, strict=True)
            ],
        )
    return changes


async def record_presence(
    session: AsyncSession, meter_id: str, health: Health, *, now: datetime, reason: str
) -> Change | None:
    """Set the meter's read health from what it says of itself (an MQTT state message: online
    or offline); a change is stored as an event, as a read's is."""
    row = await session.get(PollHealth, meter_id)
    if row is None:
        row = PollHealth(meter_id=meter_id, health=Health.UNKNOWN.value, consecutive_failures=0)
        session.add(row)
    old = Health(row.health)
    row.health = health.value
    if health is Health.ONLINE:
        row.last_seen = now
        row.consecutive_failures = 0
    if old is health:
        return None
    change = Change(old, health, reason)
    session.add(
        HealthChange(meter_id=meter_id, at=now, old=old.value, new=health.value, reason=reason)
    )
    return change


async def meter_status(session: AsyncSession, meter_id: str) -> str | None:
    """The registered meter's status (active, retired); None when it is not registered."""
    return await session.scalar(select(Meter.status).where(Meter.id == meter_id))


async def store_telemetry_seen(
    session: AsyncSession, meter_id: str, boot: int, n: int, meter_time: int
) -> bool:
    """Record that MQTT telemetry ``(meter, boot, n)`` is stored; False if it was already."""
    row = {"meter_id": meter_id, "boot": boot, "n": n, "meter_time": meter_time}
    return await insert_ignore(session, TelemetrySeen, [row]) == 1
