"""What operators look at: the fleet at a glance, one meter's story, exports. Read-only."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from headend.domain.ledger import debt, prepaid
from headend.storage.balances import days_left, spending_pace
from headend.storage.database import Database
from headend.storage.readings import latest_times
from headend.storage.schema import (
    Account,
    Customer,
    HealthChange,
    Interval,
    LedgerAccount,
    Meter,
    MeterEvent,
    PollHealth,
    Reading,
)
from protocols.disconnect import ControlState
from protocols.errors import StorageError
from protocols.readings import EventCode, StatusFlag


def _latest_readings() -> Any:
    """One row per meter: its latest reading by meter time."""
    latest = latest_times()
    return select(Reading).join(
        latest,
        (Reading.meter_id == latest.c.meter_id) & (Reading.meter_time == latest.c.meter_time),
    )


def credit_band(credit: int, threshold: int, status: int) -> str:
    """Where a reading's credit stands: ok, low (at or below the meter's threshold),
    emergency (running on emergency credit) or exhausted."""
    flags = StatusFlag(status)
    if StatusFlag.OUT_OF_CREDIT in flags:
        return "exhausted"
    if StatusFlag.EMERGENCY_CREDIT_IN_USE in flags:
        return "emergency"
    if credit <= threshold or StatusFlag.LOW_CREDIT in flags:
        return "low"
    return "ok"


def relay_name(state: int) -> str:
    try:
        return ControlState(state).name.lower()
    except ValueError:
        return f"unknown ({state})"


@dataclass(slots=True)
class FleetStatus:
    meters: int = 0
    by_health: Counter[str] = field(default_factory=Counter)
    by_relay: Counter[str] = field(default_factory=Counter)
    by_credit: Counter[str] = field(default_factory=Counter)
    stale: list[str] = field(default_factory=list)
    never_read: list[str] = field(default_factory=list)
    last_poll: datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "meters": self.meters,
            "by_health": dict(sorted(self.by_health.items())),
            "by_relay": dict(sorted(self.by_relay.items())),
            "by_credit": dict(sorted(self.by_credit.items())),
            "stale": self.stale,
            "never_read": self.never_read,
            "last_poll": self.last_poll.isoformat() if self.last_poll else None,
        }


async def fleet_status(db: Database, now: datetime, stale_after: timedelta) -> FleetStatus:
    """The active fleet by health, relay state and credit band (from each meter's latest
    reading), with the meters whose data is older than ``stale_after``."""
    status = FleetStatus()
    async with db.read() as session:
        meters = (
            await session.execute(
                select(Meter.id, PollHealth.health, PollHealth.last_seen, PollHealth.last_attempt)
                .outerjoin(PollHealth, PollHealth.meter_id == Meter.id)
                .where(Meter.status == "active")
                .order_by(Meter.id)
            )
        ).all()
        active_latest = (
            _latest_readings()
            .join(Meter, Meter.id == Reading.meter_id)
            .where(Meter.status == "active")
        )
        latest = {row.meter_id: row for row in (await session.scalars(active_latest)).all()}
    status.meters = len(meters)
    attempts = [a for _, _, _, a in meters if a is not None]
    status.last_poll = max(attempts) if attempts else None
    for meter_id, health, last_seen, _ in meters:
        status.by_health[health or "unknown"] += 1
        reading = latest.get(meter_id)
        if reading is None:
            status.never_read.append(meter_id)
            continue
        status.by_relay[relay_name(reading.control_state)] += 1
        status.by_credit[
            credit_band(reading.credit, reading.low_credit_threshold, reading.status)
        ] += 1
        if last_seen is None or now - last_seen > stale_after:
            status.stale.append(meter_id)
    return status


@dataclass(frozen=True, slots=True)
class MeterStory:
    meter: Meter
    customer: str | None
    account_status: str | None
    latest: Reading | None
    health: PollHealth | None
    events: list[MeterEvent]
    flagged: list[Reading]
    health_changes: list[HealthChange]
    daily_wh: list[tuple[str, int, bool]]  # (UTC date, Wh, includes estimates)


async def meter_story(db: Database, meter_id: str, now: datetime, days: int = 14) -> MeterStory:
    async with db.read() as session:
        meter = await session.get(Meter, meter_id)
        if meter is None:
            raise StorageError(f"no meter {meter_id!r} is registered")
        customer = account_status = None
        if meter.account_id is not None:
            account = await session.get(Account, meter.account_id)
            if account is not None:
                account_status = account.status
                owner = await session.get(Customer, account.customer_id)
                customer = owner.name if owner is not None else None
        latest = (
            await session.scalars(
                select(Reading)
                .where(Reading.meter_id == meter_id)
                .order_by(Reading.meter_time.desc())
                .limit(1)
            )
        ).first()
        health = await session.get(PollHealth, meter_id)
        events = list(
            (
                await session.scalars(
                    select(MeterEvent)
                    .where(MeterEvent.meter_id == meter_id)
                    .order_by(MeterEvent.meter_time.desc(), MeterEvent.seq.desc())
                    .limit(10)
                )
            ).all()
        )
        flagged = list(
            (
                await session.scalars(
                    select(Reading)
                    .where(Reading.meter_id == meter_id, Reading.flags != 0)
                    .order_by(Reading.meter_time.desc())
                    .limit(5)
                )
            ).all()
        )
        changes = list(
            (
                await session.scalars(
                    select(HealthChange)
                    .where(HealthChange.meter_id == meter_id)
                    .order_by(HealthChange.id.desc())
                    .limit(5)
                )
            ).all()
        )
        daily = await _daily(session, meter_id, now, days)
    return MeterStory(
        meter, customer, account_status, latest, health, events, flagged, changes, daily
    )


async def _daily(
    session: AsyncSession, meter_id: str, now: datetime, days: int
) -> list[tuple[str, int, bool]]:
    end = int(now.timestamp()) // 86400 * 86400 + 86400
    start = end - days * 86400
    rows = (
        await session.execute(
            select(Interval.start, Interval.energy_wh, Interval.estimated).where(
                Interval.meter_id == meter_id, Interval.start >= start, Interval.start < end
            )
        )
    ).all()
    totals: dict[int, int] = {}
    estimated: set[int] = set()
    for begin, wh, is_estimate in rows:
        day = (begin - start) // 86400
        totals[day] = totals.get(day, 0) + wh
        if is_estimate:
            estimated.add(day)
    if not totals:
        return []
    first = min(totals)  # from the first day with data: a new meter has no empty weeks
    return [
        (
            datetime.fromtimestamp(start + day * 86400, UTC).date().isoformat(),
            totals.get(day, 0),
            day in estimated,
        )
        for day in range(first, days)
    ]


def event_name(code: int) -> str:
    try:
        return EventCode(code).name.lower()
    except ValueError:
        return f"event {code}"


@dataclass(frozen=True, slots=True)
class Export:
    readings: list[Reading]
    intervals: list[Interval]


async def export(
    db: Database, meter_id: str, since: int, until: int, include_estimated: bool
) -> Export:
    """Readings and intervals with ``since <= meter time < until``; actual intervals only
    unless ``include_estimated``."""
    async with db.read() as session:
        if await session.get(Meter, meter_id) is None:
            raise StorageError(f"no meter {meter_id!r} is registered")
        readings = (
            await session.scalars(
                select(Reading)
                .where(
                    Reading.meter_id == meter_id,
                    Reading.meter_time >= since,
                    Reading.meter_time < until,
                )
                .order_by(Reading.meter_time)
            )
        ).all()
        query = select(Interval).where(
            Interval.meter_id == meter_id, Interval.start >= since, Interval.start < until
        )
        if not include_estimated:
            query = query.where(Interval.estimated.is_(False))
        intervals = (await session.scalars(query.order_by(Interval.start))).all()
    return Export(list(readings), list(intervals))


# -- an account, as a payment channel sees it -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class MeterSummary:
    meter_id: str
    credit_unit: str
    keypad: bool
    last_reading_at: datetime | None  # the meter's clock
    credit: int | None  # minor units or Wh, at the last reading
    relay: str | None
    days_left: int | None  # at the account's own pace (the balance monitor's forecast)


@dataclass(frozen=True, slots=True)
class AccountOverview:
    account_id: str
    status: str
    currency: str | None
    currency_scale: int | None
    prepaid: int  # paid for and not yet delivered, and change held (the ledger)
    debt: int
    meters: list[MeterSummary]


async def account_overview(db: Database, account_id: str) -> AccountOverview | None:
    """An account's balances in the ledger, and per active meter its last reading and the
    days its credit lasts at its own pace; None: no such account."""
    async with db.read() as session:
        account = await session.get(Account, account_id)
        if account is None:
            return None
        meters = (
            await session.scalars(
                select(Meter)
                .where(Meter.account_id == account_id, Meter.status == "active")
                .order_by(Meter.id)
            )
        ).all()
        currency = meters[0].currency if meters else None
        scale = meters[0].currency_scale if meters else None
        balances = {"prepaid": 0, "debt": 0}
        if currency is not None:
            for name, ref in (
                ("prepaid", prepaid(account_id, currency)),
                ("debt", debt(account_id, currency)),
            ):
                cached = await session.scalar(
                    select(LedgerAccount.balance).where(LedgerAccount.code == ref.code)
                )
                balances[name] = ref.shown(int(cached or 0))
        summaries = []
        for meter in meters:
            latest = (
                await session.scalars(
                    select(Reading)
                    .where(Reading.meter_id == meter.id)
                    .order_by(Reading.meter_time.desc())
                    .limit(1)
                )
            ).first()
            days = None
            if latest is not None:
                pace = spending_pace(14, Reading.meter_id == meter.id)
                found = (await session.execute(select(pace.c.spent, pace.c.span))).first()
                if found is not None and found[0] is not None:
                    days = days_left(latest.credit, int(found[0]), int(found[1]))
            summaries.append(
                MeterSummary(
                    meter.id,
                    meter.credit_unit,
                    meter.sts_key_id is not None,
                    None if latest is None else datetime.fromtimestamp(latest.meter_time, UTC),
                    None if latest is None else latest.credit,
                    None if latest is None else relay_name(latest.control_state),
                    days,
                )
            )
    return AccountOverview(
        account_id,
        account.status,
        currency,
        scale,
        balances["prepaid"],
        balances["debt"],
        summaries,
    )
