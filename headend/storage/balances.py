"""The balance monitor's query: every account whose balance level changed, found set-wise in
SQL over each meter's latest reading (one statement however large the fleet)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from headend.storage.schema import Account, Customer, Meter, Reading, Tariff

LEVEL_NONE, LEVEL_LOW, LEVEL_CRITICAL, LEVEL_EXHAUSTED = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class LevelChange:
    account_id: str
    meter_id: str
    old: int
    new: int
    credit: int
    meter_time: int
    credit_unit: str
    currency: str
    currency_scale: int
    channel: str
    email: str | None
    phone: str | None
    language: str


def _levels(low: object, critical: object, margin_percent: int) -> tuple[object, object]:
    """The level the latest credit is at, and the level with every threshold raised by the
    hysteresis margin (a level is left upwards only above that)."""
    credit = Reading.credit
    out = and_(credit <= 0, Reading.emergency_credit <= 0)
    level = case(
        (out, LEVEL_EXHAUSTED),
        (credit <= critical, LEVEL_CRITICAL),
        (credit <= low, LEVEL_LOW),
        else_=LEVEL_NONE,
    )
    factor = 100 + margin_percent
    raised = case(
        (credit <= 0, LEVEL_EXHAUSTED),
        (credit * 100 <= critical * factor, LEVEL_CRITICAL),  # type: ignore[operator]
        (credit * 100 <= low * factor, LEVEL_LOW),  # type: ignore[operator]
        else_=LEVEL_NONE,
    )
    return level, raised


async def level_changes(session: AsyncSession, margin_percent: int = 10) -> list[LevelChange]:
    """Accounts whose stored alert level must change: the level fell (a notice is due) or the
    balance climbed back above a threshold plus the margin (the alert re-arms)."""
    latest = (
        select(Reading.meter_id, func.max(Reading.meter_time).label("meter_time"))
        .group_by(Reading.meter_id)
        .subquery()
    )
    low = func.coalesce(Account.low_threshold, Tariff.low_threshold, Reading.low_credit_threshold)
    critical = func.coalesce(Account.critical_threshold, Tariff.critical_threshold, 0)
    level, raised = _levels(low, critical, margin_percent)
    rows = (
        select(
            Account.id.label("account_id"),
            Meter.id.label("meter_id"),
            Account.alert_level.label("old"),
            level.label("level"),  # type: ignore[attr-defined]
            raised.label("raised"),  # type: ignore[attr-defined]
            Reading.credit,
            Reading.meter_time,
            Meter.credit_unit,
            Meter.currency,
            Meter.currency_scale,
            Customer.notice_channel,
            Customer.email,
            Customer.phone,
            Customer.language,
        )
        .join(Meter, and_(Meter.account_id == Account.id, Meter.status == "active"))
        .join(Customer, Customer.id == Account.customer_id)
        .join(latest, latest.c.meter_id == Meter.id)
        .join(
            Reading,
            and_(Reading.meter_id == Meter.id, Reading.meter_time == latest.c.meter_time),
        )
        .outerjoin(Tariff, Tariff.id == Meter.tariff_id)
        .where(Account.status == "active")
        .subquery()
    )
    query = select(rows).where(or_(rows.c.level > rows.c.old, rows.c.raised < rows.c.old))
    changes: list[LevelChange] = []
    for row in (await session.execute(query)).all():
        new = row.level if row.level > row.old else row.raised
        changes.append(
            LevelChange(
                row.account_id,
                row.meter_id,
                row.old,
                new,
                row.credit,
                row.meter_time,
                row.credit_unit,
                row.currency,
                row.currency_scale,
                row.notice_channel,
                row.email,
                row.phone,
                row.language,
            )
        )
    return changes


async def set_level(session: AsyncSession, account_id: str, old: int, new: int) -> bool:
    """Compare-and-set the account's alert level: False if another worker changed it first."""
    result = await session.execute(
        update(Account)
        .where(Account.id == account_id, Account.alert_level == old)
        .values(alert_level=new)
        .returning(Account.id)
    )
    return result.first() is not None


@dataclass(frozen=True, slots=True)
class ForecastChange:
    account_id: str
    meter_id: str
    send: bool  # True: the forecast fell below the horizon (a reminder is due); False: re-arm
    days_left: int  # whole days of credit left at the account's own pace (rounded down)
    credit: int
    meter_time: int
    credit_unit: str
    currency: str
    currency_scale: int
    channel: str
    email: str | None
    phone: str | None
    language: str


async def forecast_changes(
    session: AsyncSession, horizon_days: int, window_days: int = 14
) -> list[ForecastChange]:
    """Accounts whose credit, spent at their own pace of the last ``window_days`` (the credit
    each reading lost against the one before; top-ups do not count), lasts fewer than
    ``horizon_days`` while still above the low threshold and no reminder went out; and those
    whose reminder re-arms because the credit now lasts a day more than the horizon."""
    previous = func.lag(Reading.credit).over(
        partition_by=Reading.meter_id, order_by=Reading.meter_time
    )
    newest = select(func.max(Reading.meter_time)).scalar_subquery()
    recent = (
        select(Reading.meter_id, Reading.meter_time, Reading.credit, previous.label("previous"))
        .where(Reading.meter_time >= newest - window_days * 86400)
        .subquery()
    )
    spent = func.sum(
        case((recent.c.previous > recent.c.credit, recent.c.previous - recent.c.credit), else_=0)
    )
    pace = (
        select(
            recent.c.meter_id,
            spent.label("spent"),
            (func.max(recent.c.meter_time) - func.min(recent.c.meter_time)).label("span"),
            func.max(recent.c.meter_time).label("latest"),
        )
        .group_by(recent.c.meter_id)
        .subquery()
    )
    low = func.coalesce(Account.low_threshold, Tariff.low_threshold, Reading.low_credit_threshold)
    # days left = credit / (spent / span * 86400); compared without division
    lasts = Reading.credit * pace.c.span
    per_day = pace.c.spent * 86400
    query = (
        select(
            Account.id,
            Meter.id,
            Account.forecast_sent,
            Reading.credit,
            Reading.meter_time,
            pace.c.spent,
            pace.c.span,
            Meter.credit_unit,
            Meter.currency,
            Meter.currency_scale,
            Customer.notice_channel,
            Customer.email,
            Customer.phone,
            Customer.language,
        )
        .join(Meter, and_(Meter.account_id == Account.id, Meter.status == "active"))
        .join(Customer, Customer.id == Account.customer_id)
        .join(pace, pace.c.meter_id == Meter.id)
        .join(Reading, and_(Reading.meter_id == Meter.id, Reading.meter_time == pace.c.latest))
        .outerjoin(Tariff, Tariff.id == Meter.tariff_id)
        .where(Account.status == "active", pace.c.spent > 0, pace.c.span >= 86400)
        .where(
            or_(
                and_(
                    Account.forecast_sent.is_(False),
                    Reading.credit > low,
                    lasts < per_day * horizon_days,
                ),
                and_(Account.forecast_sent.is_(True), lasts >= per_day * (horizon_days + 1)),
            )
        )
    )
    changes: list[ForecastChange] = []
    for row in (await session.execute(query)).all():
        (
            account_id,
            meter_id,
            sent,
            credit,
            meter_time,
            total,
            span,
            unit,
            currency,
            scale,
            channel,
            email,
            phone,
            language,
        ) = row
        days = int(credit * span // (total * 86400))
        changes.append(
            ForecastChange(
                account_id,
                meter_id,
                not sent,
                days,
                credit,
                meter_time,
                unit,
                currency,
                scale,
                channel,
                email,
                phone,
                language,
            )
        )
    return changes


async def set_forecast_sent(session: AsyncSession, account_id: str, old: bool, new: bool) -> bool:
    result = await session.execute(
        update(Account)
        .where(Account.id == account_id, Account.forecast_sent.is_(old))
        .values(forecast_sent=new)
        .returning(Account.id)
    )
    return result.first() is not None
