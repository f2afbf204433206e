"""A channel's settlement file against the ledger and the meters (see
:mod:`headend.domain.reconcile`), and what ``--apply`` posts for the findings it can place.

Nothing changes without ``apply``. With it, each finding below is one ledger transaction with
its entry on the audit trail, once per channel, reference and finding (a report applied again
posts nothing new):

* ``missing_in_ledger``: the channel collected money no payment explains: a ``settlement``
  transaction, clearing +amount, suspense -amount, until someone places it;
* ``amount_mismatch``: an ``adjustment`` of the payment's transaction by the difference
  (clearing +difference, suspense -difference);
* ``missing_in_file``: the channel has not settled a payment the ledger holds: an
  ``adjustment`` moving it from clearing to suspense (clearing -amount, suspense +amount).

Currency mismatches, reversed payments and duplicates are for a person to look at.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from headend.domain.ledger import AccountKind, TransactionKind, build, clearing, utility
from headend.domain.reconcile import (
    Finding,
    Item,
    LedgerPayment,
    SettlementRow,
    delivery_state,
    reconcile,
)
from headend.storage.database import Database
from headend.storage.ledger import post
from headend.storage.schema import (
    CreditTransfer,
    Payment,
    PaymentChannel,
    Reading,
    SettlementAdjustment,
    Tariff,
)
from protocols.errors import StorageError

APPLIED = (Finding.MISSING_IN_LEDGER, Finding.AMOUNT_MISMATCH, Finding.MISSING_IN_FILE)


@dataclass(frozen=True, slots=True)
class Delivery:
    payment_id: int
    reference: str
    meter_id: str
    kind: str | None
    number: int | None
    state: str | None
    reported: int | None
    meter_says: str
    agrees: bool

    def document(self) -> dict[str, Any]:
        return {
            "payment_id": self.payment_id,
            "reference": self.reference,
            "meter": self.meter_id,
            "kind": self.kind,
            "number": self.number,
            "state": self.state,
            "meter_last_transfer": self.reported,
            "meter_says": self.meter_says,
            "agrees": self.agrees,
        }


@dataclass(frozen=True, slots=True)
class Report:
    channel: str
    day: date
    items: list[Item]
    deliveries: list[Delivery]
    applied: list[dict[str, Any]]

    def counts(self) -> dict[str, int]:
        out = {str(f): 0 for f in Finding}
        for item in self.items:
            out[str(item.finding)] += 1
        return out

    def document(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "date": self.day.isoformat(),
            "counts": self.counts(),
            "items": [item.document() for item in self.items],
            "deliveries": [d.document() for d in self.deliveries],
            "deliveries_disagreeing": sum(not d.agrees for d in self.deliveries),
            "applied": self.applied,
        }


async def currency_exponents(db: Database) -> dict[str, int]:
    """The currencies the tariffs price in, with their decimals."""
    async with db.read() as session:
        rows = (await session.execute(select(Tariff.currency, Tariff.currency_scale))).all()
    return {currency: -int(scale) for currency, scale in rows}


def _day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time(), UTC)
    return start, start + timedelta(days=1)


async def _ledger(
    session: AsyncSession, channel_id: int, rows: list[SettlementRow], day: date
) -> list[LedgerPayment]:
    start, end = _day_bounds(day)
    references = sorted({row.reference for row in rows})
    in_day = (Payment.paid_at >= start) & (Payment.paid_at < end)
    found = (
        await session.scalars(
            select(Payment)
            .where(
                Payment.channel_id == channel_id,
                or_(in_day, Payment.reference.in_(references)) if references else in_day,
            )
            .order_by(Payment.id)
        )
    ).all()
    scales = dict((await session.execute(select(Tariff.currency, Tariff.currency_scale))).all())
    return [
        LedgerPayment(
            p.id,
            p.transaction_id,
            p.reference,
            p.amount,
            p.currency,
            int(scales.get(p.currency, -2)),
            p.state,
            p.paid_at,
            p.meter_id,
        )
        for p in found
    ]


async def _deliveries(
    session: AsyncSession, ledger: list[LedgerPayment], day: date
) -> list[Delivery]:
    start, end = _day_bounds(day)
    of_day = [p for p in ledger if start <= p.paid_at < end]
    if not of_day:
        return []
    transfers = {
        t.payment_id: t
        for t in (
            await session.scalars(
                select(CreditTransfer).where(
                    CreditTransfer.payment_id.in_([p.payment_id for p in of_day])
                )
            )
        ).all()
    }
    meters = sorted({p.meter_id for p in of_day})
    reported = dict(
        (
            await session.execute(
                select(Reading.meter_id, func.max(Reading.last_transfer))
                .where(Reading.meter_id.in_(meters))
                .group_by(Reading.meter_id)
            )
        ).all()
    )
    out = []
    for payment in of_day:
        transfer = transfers.get(payment.payment_id)
        last = reported.get(payment.meter_id)
        kind = None if transfer is None else transfer.kind
        number = None if transfer is None else transfer.number
        state = None if transfer is None else transfer.state
        says, agrees = delivery_state(kind, state, number, None if last is None else int(last))
        out.append(
            Delivery(
                payment.payment_id,
                payment.reference,
                payment.meter_id,
                kind,
                number,
                state,
                None if last is None else int(last),
                says,
                agrees,
            )
        )
    return out


async def reconcile_channel(
    db: Database,
    channel: str,
    day: date,
    rows: list[SettlementRow],
    now: datetime,
    *,
    actor: str,
    apply: bool = False,
) -> Report:
    """Reconcile ``rows`` (the channel's settlement of ``day``, UTC) with the ledger and the
    meters; with ``apply``, post what the module says, in one transaction."""
    async with db.begin() if apply else db.read() as session:
        found = (
            await session.scalars(select(PaymentChannel).where(PaymentChannel.name == channel))
        ).first()
        if found is None:
            raise StorageError(f"no channel {channel!r}")
        ledger = await _ledger(session, found.id, rows, day)
        items = reconcile(rows, ledger, day)
        deliveries = await _deliveries(session, ledger, day)
        applied: list[dict[str, Any]] = []
        if apply:
            by_id = {p.payment_id: p for p in ledger}
            for item in items:
                if item.finding in APPLIED:
                    outcome = await _apply(
                        session, found, item, day=day, payments=by_id, now=now, actor=actor
                    )
                    applied.append(outcome)
    return Report(channel, day, items, deliveries, applied)


async def _apply(
    session: AsyncSession,
    channel: PaymentChannel,
    item: Item,
    *,
    day: date,
    payments: dict[int, LedgerPayment],
    now: datetime,
    actor: str,
) -> dict[str, Any]:
    done = (
        await session.scalars(
            select(SettlementAdjustment).where(
                SettlementAdjustment.channel_id == channel.id,
                SettlementAdjustment.reference == item.reference,
                SettlementAdjustment.finding == str(item.finding),
            )
        )
    ).first()
    shown = {"finding": str(item.finding), "reference": item.reference}
    if done is not None:
        return shown | {"transaction": done.transaction_id, "new": False}
    currency = item.currency
    assert currency is not None
    corrects = None
    if item.finding is Finding.MISSING_IN_LEDGER:
        assert item.file_amount is not None
        kind, amount = TransactionKind.SETTLEMENT, item.file_amount
        memo = f"settled by {channel.name} without a payment: {item.reference}"
    else:
        assert item.payment_id is not None
        assert item.ledger_amount is not None
        corrects = payments[item.payment_id].transaction_id
        kind = TransactionKind.ADJUSTMENT
        if item.finding is Finding.AMOUNT_MISMATCH:
            assert item.file_amount is not None
            amount = item.file_amount - item.ledger_amount
            memo = f"{channel.name} settled {item.reference} for a different amount"
        else:
            amount = -item.ledger_amount
            memo = f"{channel.name} did not settle {item.reference}"
    transaction = build(
        kind,
        [
            (clearing(channel.name, currency), amount),
            (utility(AccountKind.SUSPENSE, currency), -amount),
        ],
        memo,
        corrects,
    )
    transaction_id = await post(
        session,
        transaction,
        now,
        actor=actor,
        subject=f"channel:{channel.name}",
        reason=f"reconciliation of {day.isoformat()}: {item.finding}",
        detail={"reference": item.reference, "finding": str(item.finding), "day": day.isoformat()},
    )
    session.add(
        SettlementAdjustment(
            channel_id=channel.id,
            day=day.isoformat(),
            reference=item.reference,
            finding=str(item.finding),
            transaction_id=transaction_id,
            applied_at=now,
        )
    )
    await session.flush()
    return shown | {"transaction": transaction_id, "new": True, "amount": amount}


__all__ = ["APPLIED", "Delivery", "Report", "currency_exponents", "reconcile_channel"]
