"""Auto-debit mandates and their charges.

A crossing of an account's low threshold, seen by the balance monitor, writes one pending
charge in the monitor's own transaction (:func:`note_crossing`; its reference is derived from
the crossing and unique, so a crossing is one charge however often it is seen). The collector
(:func:`collect_charges`) then decides each charge's amount under the monthly cap, keeps it,
and takes the payment through the ordinary payment path with that reference and the charge's
time: a collector that dies between the two finds the charge again and gets the same payment's
answer, never a second payment.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from headend.domain.mandates import (
    MandateTerms,
    charge_amount,
    charge_reference,
    mandate_mode,
    month_of,
)
from headend.domain.pricing import PaymentRefused
from headend.storage import audit
from headend.storage.database import Database, insert_ignore, storage_errors
from headend.storage.ledger import PaymentRequest, parse_amount, pay
from headend.storage.schema import (
    Account,
    Mandate,
    MandateCharge,
    Meter,
    PaymentChannel,
    Tariff,
)
from protocols.errors import StorageError, ValidationError

log = logging.getLogger(__name__)
#: a charge's states: pending (just seen), charging (amount decided), paid, capped, refused
OPEN = ("pending", "charging")


@dataclass(frozen=True, slots=True)
class MandateView:
    mandate_id: int
    account: str
    channel: str
    terms: MandateTerms
    currency: str
    status: str
    created_at: datetime
    paid_this_month: int

    def document(self) -> dict[str, Any]:
        return {
            "mandate_id": self.mandate_id,
            "account": self.account,
            "channel": self.channel,
            "mode": self.terms.mode,
            "amount": self.terms.amount,
            "monthly_cap": self.terms.monthly_cap,
            "currency": self.currency,
            "status": self.status,
            "created_at": self.created_at.isoformat(),
            "paid_this_month": self.paid_this_month,
        }


async def add_mandate(
    db: Database,
    account: str,
    channel: str,
    *,
    mode: str,
    amounts: tuple[str | int, str | int],
    now: datetime,
    actor: str,
) -> MandateView:
    """Give ``account`` a mandate paid through ``channel`` (a channel of kind autodebit):
    ``amounts`` are its amount and monthly cap (decimal text in the account's currency, or
    minor units). An account holds one active mandate at a time."""
    kind = mandate_mode(mode)
    async with db.begin() as session:
        found = (
            await session.scalars(select(PaymentChannel).where(PaymentChannel.name == channel))
        ).first()
        if found is None:
            raise StorageError(f"--channel: no channel {channel!r}")
        if found.kind != "autodebit":
            raise ValidationError(
                f"--channel {channel} is a {found.kind} channel: a mandate is paid through a "
                "channel of kind autodebit"
            )
        row = await session.get(Account, account)
        if row is None:
            raise StorageError(f"no account {account!r}")
        if row.status == "closed":
            raise StorageError(f"account {account} is closed")
        meter = (
            await session.scalars(
                select(Meter)
                .where(Meter.account_id == account, Meter.status == "active")
                .order_by(Meter.id)
            )
        ).first()
        if meter is None or meter.tariff_id is None:
            raise StorageError(f"account {account} has no active meter with a tariff")
        if kind == "topup" and meter.credit_unit != "money":
            raise ValidationError(
                f"--mode topup tops up a money credit; meter {meter.id}'s credit is energy: "
                "use --mode fixed"
            )
        active = await session.scalar(
            select(Mandate.id).where(Mandate.account_id == account, Mandate.status == "active")
        )
        if active is not None:
            raise StorageError(f"account {account} has mandate {active} already: cancel it first")
        tariff = await session.get(Tariff, meter.tariff_id)
        assert tariff is not None
        minor = [
            _minor(option, text, tariff.currency, -tariff.currency_scale)
            for option, text in zip(("--amount", "--cap"), amounts, strict=True)
        ]
        terms = MandateTerms(kind, minor[0], minor[1])
        mandate = Mandate(
            account_id=account,
            channel_id=found.id,
            mode=terms.mode,
            amount=terms.amount,
            monthly_cap=terms.monthly_cap,
            currency=tariff.currency,
            status="active",
            created_at=now,
        )
        session.add(mandate)
        await session.flush()
        await audit.append(
            session,
            at=now,
            actor=actor,
            action="mandate.add",
            subject=f"account:{account}",
            reason="operator",
            outcome="active",
            detail={
                "mandate": mandate.id,
                "channel": channel,
                "mode": terms.mode,
                "amount": terms.amount,
                "monthly_cap": terms.monthly_cap,
            },
        )
        return await _view(session, mandate, channel, now)


def _minor(option: str, text: str | int, currency: str, exponent: int) -> int:
    try:
        return parse_amount(text, currency, exponent)
    except PaymentRefused as exc:
        raise ValidationError(f"{option}: {exc.detail}") from exc


async def _paid(session: AsyncSession, mandate_id: int, month: str, but: int | None = None) -> int:
    """What the mandate paid, or is paying, in ``month``."""
    query = select(func.coalesce(func.sum(MandateCharge.amount), 0)).where(
        MandateCharge.mandate_id == mandate_id,
        MandateCharge.month == month,
        MandateCharge.state.in_(("charging", "paid")),
    )
    if but is not None:
        query = query.where(MandateCharge.id != but)
    return int(await session.scalar(query) or 0)


async def _view(session: AsyncSession, row: Mandate, channel: str, now: datetime) -> MandateView:
    terms = MandateTerms(mandate_mode(row.mode), row.amount, row.monthly_cap)
    paid = await _paid(session, row.id, month_of(now))
    return MandateView(
        row.id, row.account_id, channel, terms, row.currency, row.status, row.created_at, paid
    )


async def list_mandates(
    db: Database, now: datetime, *, account: str | None = None
) -> list[MandateView]:
    query = (
        select(Mandate, PaymentChannel.name)
        .join(PaymentChannel, PaymentChannel.id == Mandate.channel_id)
        .order_by(Mandate.id)
    )
    if account is not None:
        query = query.where(Mandate.account_id == account)
    async with db.read() as session:
        if account is not None and await session.get(Account, account) is None:
            raise StorageError(f"no account {account!r}")
        rows = (await session.execute(query)).all()
        return [await _view(session, row, name, now) for row, name in rows]


async def cancel_mandate(
    db: Database, mandate_id: int, reason: str, now: datetime, *, actor: str
) -> bool:
    """Cancel a mandate (no charge is made for later crossings); False if it was already."""
    if not reason.strip():
        raise ValidationError("--reason: a cancellation says why")
    async with db.begin() as session:
        row = await session.get(Mandate, mandate_id, with_for_update=True)
        if row is None:
            raise StorageError(f"no mandate {mandate_id}")
        if row.status == "cancelled":
            return False
        row.status, row.cancelled_at = "cancelled", now
        await audit.append(
            session,
            at=now,
            actor=actor,
            action="mandate.cancel",
            subject=f"account:{row.account_id}",
            reason=reason,
            outcome="cancelled",
            detail={"mandate": mandate_id},
        )
    return True


async def note_crossing(
    session: AsyncSession,
    account_id: str,
    meter_id: str,
    *,
    meter_time: int,
    credit: int,
    now: datetime,
) -> bool:
    """In the transaction that records a crossing of the low threshold: one pending charge
    for the account's active mandate, if it has one. False: no mandate, or seen before."""
    mandate_id = await session.scalar(
        select(Mandate.id).where(Mandate.account_id == account_id, Mandate.status == "active")
    )
    if mandate_id is None:
        return False
    row = {
        "mandate_id": mandate_id,
        "reference": charge_reference(int(mandate_id), meter_id, meter_time),
        "meter_id": meter_id,
        "credit": credit,
        "month": month_of(now),
        "amount": 0,
        "state": "pending",
        "created_at": now,
        "updated_at": now,
    }
    return await insert_ignore(session, MandateCharge, [row]) == 1


@dataclass(slots=True)
class Collected:
    paid: int = 0
    capped: int = 0
    refused: int = 0


async def collect_charges(db: Database, now: datetime, *, actor: str) -> Collected:
    """Pay every open charge (see the module)."""
    result = Collected()
    async with db.read() as session:
        ids = list(
            (
                await session.scalars(
                    select(MandateCharge.id)
                    .where(MandateCharge.state.in_(OPEN))
                    .order_by(MandateCharge.id)
                )
            ).all()
        )
    for charge_id in ids:
        outcome = await _collect(db, charge_id, now, actor)
        if outcome:
            setattr(result, outcome, getattr(result, outcome) + 1)
    return result


async def _decide(
    db: Database, charge_id: int, now: datetime
) -> tuple[MandateCharge, str] | str | None:
    """Fix the charge's amount under the cap (once); the charge and its channel, or the
    outcome of one that needs no payment (capped, refused), or None (another collector's)."""
    async with db.begin() as session:
        charge = await session.get(MandateCharge, charge_id, with_for_update=True)
        if charge is None or charge.state not in OPEN:
            return None
        mandate = await session.get(Mandate, charge.mandate_id, with_for_update=True)
        assert mandate is not None
        channel = await session.get(PaymentChannel, mandate.channel_id)
        assert channel is not None
        if charge.state == "pending":
            if mandate.status != "active":
                charge.state, charge.detail = "refused", "the mandate was cancelled"
                charge.updated_at = now
                return "refused"
            terms = MandateTerms(mandate_mode(mandate.mode), mandate.amount, mandate.monthly_cap)
            paid = await _paid(session, mandate.id, charge.month, but=charge.id)
            amount = charge_amount(terms, charge.credit, paid)
            charge.updated_at = now
            if amount == 0:
                charge.state = "capped"
                charge.detail = f"the monthly cap {terms.monthly_cap} is reached ({paid} paid)"
                if terms.mode == "topup" and paid < terms.monthly_cap:
                    charge.detail = "the credit is at the top-up level already"
                return "capped"
            charge.amount, charge.state = amount, "charging"
        return charge, channel.name


async def _collect(db: Database, charge_id: int, now: datetime, actor: str) -> str | None:
    with storage_errors("collecting an auto-debit"):
        decided = await _decide(db, charge_id, now)
    if decided is None or isinstance(decided, str):
        return decided
    charge, channel = decided
    request = PaymentRequest(
        channel, charge.reference, charge.meter_id, charge.amount, paid_at=charge.created_at
    )
    try:
        answer = await pay(db, request, now, actor=actor, source="mandate")
    except PaymentRefused as refused:
        async with db.begin() as session:
            row = await session.get(MandateCharge, charge_id, with_for_update=True)
            assert row is not None
            row.state, row.detail, row.updated_at = "refused", str(refused), now
        log.warning("auto-debit %s refused: %s", charge.reference, refused)
        return "refused"
    async with db.begin() as session:
        row = await session.get(MandateCharge, charge_id, with_for_update=True)
        assert row is not None
        row.state, row.payment_id, row.updated_at = "paid", int(answer.answer["payment_id"]), now
    return "paid"


async def list_charges(db: Database, mandate_id: int) -> list[dict[str, Any]]:
    async with db.read() as session:
        if await session.get(Mandate, mandate_id) is None:
            raise StorageError(f"no mandate {mandate_id}")
        rows = (
            await session.scalars(
                select(MandateCharge)
                .where(MandateCharge.mandate_id == mandate_id)
                .order_by(MandateCharge.id)
            )
        ).all()
    return [
        {
            "reference": r.reference,
            "meter": r.meter_id,
            "credit": r.credit,
            "month": r.month,
            "amount": r.amount,
            "state": r.state,
            "payment_id": r.payment_id,
            "detail": r.detail,
            "at": r.created_at.isoformat(),
        }
        for r in rows
    ]


__all__ = [
    "Collected",
    "MandateView",
    "add_mandate",
    "cancel_mandate",
    "collect_charges",
    "list_charges",
    "list_mandates",
    "note_crossing",
]
