"""The balance monitor's query: every account whose balance level changed, found set-wise in
SQL over each meter's latest state (``meter_state``: one row a meter, however long its
history; one statement however large the fleet)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from headend.domain.pricing import PaymentRefused, energy_for, vat_included
from headend.storage.registry import tariff_record
from headend.storage.schema import Account, Customer, Meter, MeterStateRow, Reading, Tariff

State = MeterStateRow

LEVEL_NONE, LEVEL_LOW, LEVEL_CRITICAL, LEVEL_EXHAUSTED = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class Recipient:
    """An account's meter at its latest reading, and how its customer takes notices."""

    credit: int
    meter_time: int
    credit_unit: str
    currency: str
    currency_scale: int
    channel: str
    email: str | None
    phone: str | None
    language: str


#: the columns a Recipient is made of, in its fields' order (after the rows' own columns)
_RECIPIENT = (
    State.credit,
    State.meter_time,
    Meter.credit_unit,
    Meter.currency,
    Meter.currency_scale,
    Customer.notice_channel,
    Customer.email,
    Customer.phone,
    Customer.language,
)


def _accounts_at_latest(query: Any) -> Any:
    """``query`` over active accounts joined to their active meter, its latest state, its
    customer and (if any) its tariff."""
    return (
        query.join(Meter, and_(Meter.account_id == Account.id, Meter.status == "active"))
        .join(Customer, Customer.id == Account.customer_id)
        .join(State, State.meter_id == Meter.id)
        .outerjoin(Tariff, Tariff.id == Meter.tariff_id)
        .where(Account.status == "active")
    )


@dataclass(frozen=True, slots=True)
class LevelChange:
    account_id: str
    meter_id: str
    old: int
    new: int
    recipient: Recipient


def _levels(low: object, critical: object, margin_percent: int) -> tuple[object, object]:
    """The level the latest credit is at, and the level with every threshold raised by the
    hysteresis margin (a level is left upwards only above that)."""
    credit = State.credit
    out = and_(credit <= 0, State.emergency_credit <= 0)
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


def _energy(money: int, tariff: Tariff) -> int | None:
    """The Wh ``money`` minor units (VAT included) buy at the start of a month on ``tariff``;
    None if the tariff cannot price energy."""
    record = tariff_record(tariff)
    try:
        return energy_for(record, 0, money - vat_included(money, record.vat_bp))
    except PaymentRefused:
        return None


async def thresholds(session: AsyncSession) -> tuple[Any, Any]:
    """The low and critical thresholds each account's meter is judged by, as SQL expressions in
    the meter's own credit unit: the account's own; else the tariff's, which are money, so for
    a meter whose credit is energy the energy that money buys on the tariff; else the meter's
    own low-credit threshold (and no critical one)."""
    tariffs = (await session.scalars(select(Tariff))).all()
    low_wh = {t.id: _energy(t.low_threshold, t) for t in tariffs}
    critical_wh = {t.id: _energy(t.critical_threshold, t) for t in tariffs}
    energy = Meter.credit_unit == "energy"

    def tariff_threshold(money: Any, wh: dict[str, int | None]) -> Any:
        if not wh:
            return money
        return case((energy, case(wh, value=Tariff.id, else_=None)), else_=money)

    low = func.coalesce(
        Account.low_threshold,
        tariff_threshold(Tariff.low_threshold, low_wh),
        State.low_credit_threshold,
    )
    critical = func.coalesce(
        Account.critical_threshold, tariff_threshold(Tariff.critical_threshold, critical_wh), 0
    )
    return low, critical


async def level_changes(session: AsyncSession, margin_percent: int = 10) -> list[LevelChange]:
    """Accounts whose stored alert level must change: the level fell (a notice is due) or the
    balance climbed back above a threshold plus the margin (the alert re-arms)."""
    low, critical = await thresholds(session)
    level, raised = _levels(low, critical, margin_percent)
    rows = _accounts_at_latest(
        select(
            Account.id.label("account_id"),
            Meter.id.label("meter_id"),
            Account.alert_level.label("old"),
            level.label("level"),  # type: ignore[attr-defined]
            raised.label("raised"),  # type: ignore[attr-defined]
            *_RECIPIENT,
        )
    ).subquery()
    query = select(rows).where(or_(rows.c.level > rows.c.old, rows.c.raised < rows.c.old))
    changes: list[LevelChange] = []
    for account_id, meter_id, old, level_now, raised_now, *recipient in (
        await session.execute(query)
    ).all():
        new = level_now if level_now > old else raised_now
        changes.append(LevelChange(account_id, meter_id, old, new, Recipient(*recipient)))
    return changes


async def set_level(session: AsyncSession, account_id: str, old: int, new: int) -> bool:
    """Compare-and-set the account's alert level: False if another worker changed it first."""
    return account_id in await set_levels(session, [(account_id, old, new)])


#: accounts compared-and-set by one statement at most (SQLite's bound parameters)
_CHUNK = 5000


async def set_levels(session: AsyncSession, changes: Sequence[tuple[str, int, int]]) -> set[str]:
    """Compare-and-set many accounts' alert levels, ``(account_id, old, new)`` each, in one
    UPDATE per (old, new) pair (at most twelve) and chunk: returns the accounts whose level
    was still ``old`` (the others another worker changed first, and keep its level)."""
    return await _compare_and_set(session, Account.alert_level, changes)


async def _compare_and_set(
    session: AsyncSession, column: Any, changes: Sequence[tuple[str, Any, Any]]
) -> set[str]:
    groups: dict[tuple[Any, Any], list[str]] = {}
    for account_id, old, new in changes:
        groups.setdefault((old, new), []).append(account_id)
    won: set[str] = set()
    for (old, new), ids in groups.items():
        for first in range(0, len(ids), _CHUNK):
            result = await session.execute(
                update(Account)
                .where(Account.id.in_(ids[first : first + _CHUNK]), column == old)
                .values({column.key: new})
                .returning(Account.id)
                .execution_options(synchronize_session=False)
            )
            won.update(result.scalars().all())
    return won


@dataclass(frozen=True, slots=True)
class ForecastChange:
    account_id: str
    meter_id: str
    send: bool  # True: the forecast fell below the horizon (a reminder is due); False: re-arm
    days_left: int  # whole days of credit left at the account's own pace (rounded down)
    recipient: Recipient


def spending_pace(window_days: int = 14, *where: Any) -> Any:
    """Per meter (of the readings that meet ``where``), the credit spent over the last
    ``window_days`` before the newest reading (what each reading lost against the one before;
    top-ups do not count) and the span of those readings in seconds: ``(meter_id, spent, span,
    meter_time)``, a subquery."""
    previous = func.lag(Reading.credit).over(
        partition_by=Reading.meter_id, order_by=Reading.meter_time
    )
    newest = (
        select(func.max(Reading.meter_time)).where(*where)
        if where
        else select(func.max(State.meter_time))  # the newest reading of all, from one row a meter
    ).scalar_subquery()
    recent = (
        select(Reading.meter_id, Reading.meter_time, Reading.credit, previous.label("previous"))
        .where(Reading.meter_time >= newest - window_days * 86400, *where)
        .subquery()
    )
    spent = func.sum(
        case((recent.c.previous > recent.c.credit, recent.c.previous - recent.c.credit), else_=0)
    )
    return (
        select(
            recent.c.meter_id,
            spent.label("spent"),
            (func.max(recent.c.meter_time) - func.min(recent.c.meter_time)).label("span"),
            func.max(recent.c.meter_time).label("meter_time"),
        )
        .group_by(recent.c.meter_id)
        .subquery()
    )


def days_left(credit: int, spent: int, span: int) -> int | None:
    """Whole days ``credit`` lasts at the pace of ``spent`` over ``span`` seconds (None: no
    pace yet, under a day of readings or nothing spent)."""
    if spent <= 0 or span < 86400:
        return None
    return max(0, int(credit) * int(span) // (int(spent) * 86400))


async def forecast_changes(
    session: AsyncSession, horizon_days: int, window_days: int = 14
) -> list[ForecastChange]:
    """Accounts whose credit, spent at their own pace of the last ``window_days`` (see
    :func:`spending_pace`), lasts fewer than ``horizon_days`` while still above the low
    threshold and no reminder went out; and those whose reminder re-arms because the credit
    now lasts a day more than the horizon."""
    pace = spending_pace(window_days)
    low, _ = await thresholds(session)
    # days left = credit / (spent / span * 86400); compared without division
    lasts = State.credit * pace.c.span
    per_day = pace.c.spent * 86400
    query = (
        _accounts_at_latest(
            select(
                Account.id, Meter.id, Account.forecast_sent, pace.c.spent, pace.c.span, *_RECIPIENT
            )
        )
        .join(pace, pace.c.meter_id == Meter.id)
        .where(
            pace.c.spent > 0,
            pace.c.span >= 86400,
            or_(
                and_(
                    Account.forecast_sent.is_(False),
                    State.credit > low,
                    lasts < per_day * horizon_days,
                ),
                and_(Account.forecast_sent.is_(True), lasts >= per_day * (horizon_days + 1)),
            ),
        )
    )
    changes: list[ForecastChange] = []
    for account_id, meter_id, sent, total, span, *fields in (await session.execute(query)).all():
        recipient = Recipient(*fields)
        days = days_left(recipient.credit, total, span) or 0
        changes.append(ForecastChange(account_id, meter_id, not sent, days, recipient))
    return changes


async def set_forecast_sent(session: AsyncSession, account_id: str, old: bool, new: bool) -> bool:
    return account_id in await set_forecasts_sent(session, [(account_id, old, new)])


async def set_forecasts_sent(
    session: AsyncSession, changes: Sequence[tuple[str, bool, bool]]
) -> set[str]:
    """Compare-and-set many accounts' ``forecast_sent``, as :func:`set_levels` does."""
    return await _compare_and_set(session, Account.forecast_sent, changes)
