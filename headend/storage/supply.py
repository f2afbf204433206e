"""What the supply-control policy needs to know, per meter, fetched set-wise."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from headend.domain.delivery import UNDELIVERED
from headend.domain.policy import AccountState, Calendar, MeterState
from headend.domain.registry import calendar_from
from headend.storage import audit
from headend.storage.database import Database, storage_errors
from headend.storage.schema import Account, CreditTransfer, Meter, MeterStateRow, Reading, Tariff
from protocols.disconnect import ControlState
from protocols.errors import StorageError, ValidationError


@dataclass(frozen=True, slots=True)
class PolicyInput:
    meter_id: str
    account_id: str | None
    account: AccountState
    meter: MeterState
    calendar: Calendar
    meter_time: int  # of the latest reading the decision rests on
    last_command_seq: int  # the meter's, at that reading


async def policy_inputs(
    session: AsyncSession, meter_ids: list[str] | None = None, *, acting_only: bool = False
) -> list[PolicyInput]:
    """One row per active meter with a reading: its latest state (``meter_state``: latest
    reading, and since when, in meter time, its credit has been used up, if it has), account
    and tariff calendar. ``acting_only`` leaves out in SQL the meters whose state no decision
    can act on (control mode 0; in credit and connected; out of credit and already off or on
    emergency credit): a superset of those :func:`~headend.domain.policy.decide` acts on,
    which still decides."""
    #: meters with credit paid for and not yet on the meter: a transfer the dispatcher has to
    #: deliver, or a token the customer has not keyed in yet
    on_its_way = (
        select(CreditTransfer.meter_id)
        .where(CreditTransfer.state.in_(UNDELIVERED))
        .distinct()
        .subquery()
    )
    latest = MeterStateRow
    query = (
        select(
            Meter.id,
            Meter.account_id,
            latest.credit,
            latest.emergency_credit,
            latest.control_state,
            latest.control_mode,
            latest.meter_time,
            latest.last_command_seq,
            Account.protected,
            Account.protected_until,
            Account.protection_reason,
            Tariff.definition,
            latest.exhausted_since,
            on_its_way.c.meter_id,
        )
        .join(latest, latest.meter_id == Meter.id)
        .outerjoin(Account, Account.id == Meter.account_id)
        .outerjoin(Tariff, Tariff.id == Meter.tariff_id)
        .outerjoin(on_its_way, on_its_way.c.meter_id == Meter.id)
        .where(Meter.status == "active")
        .order_by(Meter.id)
    )
    if acting_only:
        connected = int(ControlState.CONNECTED)
        query = query.where(
            latest.control_mode != 0,
            or_(
                and_(latest.credit > 0, latest.control_state != connected),
                and_(
                    latest.credit <= 0,
                    latest.emergency_credit <= 0,
                    latest.control_state == connected,
                ),
            ),
        )
    if meter_ids is not None:
        query = query.where(Meter.id.in_(meter_ids))
    inputs: list[PolicyInput] = []
    calendars: dict[str | None, Calendar] = {None: Calendar()}  # one per tariff definition
    for (
        meter_id,
        account_id,
        credit,
        emergency,
        control_state,
        control_mode,
        meter_time,
        last_command_seq,
        protected,
        protected_until,
        protection_reason,
        definition,
        since,
        paid,
    ) in (await session.execute(query)).all():
        calendar = calendars.get(definition)
        if calendar is None:
            calendar = calendar_from(json.loads(definition).get("calendar", {}))
            calendars[definition] = calendar
        state = AccountState(
            balance=credit,
            protected_until=protected_until if protected else None,
            protection_reason=(protection_reason or "") if protected else "",
            exhausted_since=None if since is None else datetime.fromtimestamp(since, UTC),
            payment_pending=paid is not None,
        )
        meter = MeterState(ControlState(control_state), control_mode, emergency)
        inputs.append(
            PolicyInput(meter_id, account_id, state, meter, calendar, meter_time, last_command_seq)
        )
    return inputs


@dataclass(frozen=True, slots=True)
class Protection:
    account_id: str
    protected: bool
    reason: str
    until: datetime | None


async def set_protection(
    db: Database,
    account_id: str,
    *,
    until: datetime | None,
    reason: str,
    actor: str,
    now: datetime,
) -> Protection:
    """Protect an account from disconnection until ``until`` (None: lift the protection), with
    the operator's reason, on the audit trail."""
    if not reason.strip():
        raise ValidationError("protecting an account, or lifting it, needs a reason")
    if until is not None and until <= now:
        raise ValidationError("a protection ends in the future")
    with storage_errors("protecting an account"):
        async with db.begin() as session:
            account = await session.get(Account, account_id)
            if account is None:
                raise StorageError(f"no account {account_id!r}")
            account.protected = until is not None
            account.protection_reason = reason if until is not None else None
            account.protected_until = until
            await audit.append(
                session,
                at=now,
                actor=actor,
                action="account.protect" if until is not None else "account.unprotect",
                subject=account_id,
                reason=reason,
                outcome="protected" if until is not None else "unprotected",
                detail={"until": until.isoformat() if until else None},
            )
    return Protection(account_id, until is not None, reason, until)


async def protections(db: Database, now: datetime) -> list[Protection]:
    """The accounts protected now."""
    query = (
        select(Account)
        .where(Account.protected.is_(True))
        .where(Account.protected_until > now)
        .order_by(Account.id)
    )
    with storage_errors("listing protected accounts"):
        async with db.read() as session:
            rows = (await session.scalars(query)).all()
    return [Protection(a.id, True, a.protection_reason or "", a.protected_until) for a in rows]


async def first_exhausted(db: Database, meter_id: str) -> datetime | None:
    """The meter time of the meter's first stored reading with no credit left, if any."""
    query = (
        select(Reading.meter_time)
        .where(Reading.meter_id == meter_id, Reading.credit <= 0)
        .order_by(Reading.meter_time)
        .limit(1)
    )
    with storage_errors("reading a meter's readings"):
        async with db.read() as session:
            first = (await session.execute(query)).scalar()
    return None if first is None else datetime.fromtimestamp(first, UTC)
