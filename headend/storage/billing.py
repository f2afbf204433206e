"""Monthly bills: what the ledger, the payments and the readings say about an account's month
(:func:`bill_inputs`), the bill made from it by :func:`headend.domain.billing.make_bill`, kept
as issued with its gapless number (one per account and month), and the notice that sends it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from headend.domain.billing import (
    BillInputs,
    MeterUsage,
    Month,
    PaymentLine,
    Registers,
    make_bill,
)
from headend.domain.ledger import AccountKind, AccountRef, debt, prepaid
from headend.domain.notices import Channel, Kind
from headend.domain.registry import TariffRecord
from headend.storage import audit
from headend.storage.database import Database, insert_ignore
from headend.storage.ledger import next_number
from headend.storage.notices import notice_row
from headend.storage.registry import tariff_record
from headend.storage.schema import (
    Account,
    Bill,
    Customer,
    Interval,
    LedgerAccount,
    LedgerPosting,
    LedgerTransaction,
    Meter,
    Notification,
    Payment,
    PaymentChannel,
    Reading,
    Receipt,
    Tariff,
)
from protocols.errors import StorageError
from protocols.units import decimal_text


@dataclass(frozen=True, slots=True)
class BillView:
    number: int
    account: str
    month: str
    kind: str
    document: dict[str, Any]
    issued_at: datetime
    new: bool = False  # made by this call (else it was issued before)
    email: str | None = None  # where it can be sent


async def _tariff_of(session: AsyncSession, account_id: str) -> TariffRecord:
    """The tariff of the account's meters (the first active one with a tariff)."""
    row = (
        await session.scalars(
            select(Tariff)
            .join(Meter, Meter.tariff_id == Tariff.id)
            .where(Meter.account_id == account_id)
            .order_by(Meter.status, Meter.id)
            .limit(1)
        )
    ).first()
    if row is None:
        raise StorageError(f"account {account_id} has no meter with a tariff: nothing to bill")
    return tariff_record(row)


async def _balances_before(
    session: AsyncSession, accounts: list[AccountRef], before: datetime
) -> dict[AccountRef, int]:
    codes = {a.code: a for a in accounts}
    rows = await session.execute(
        select(LedgerAccount.code, func.sum(LedgerPosting.amount))
        .join(LedgerPosting, LedgerPosting.account_id == LedgerAccount.id)
        .join(LedgerTransaction, LedgerTransaction.id == LedgerPosting.transaction_id)
        .where(LedgerAccount.code.in_(list(codes)), LedgerTransaction.at < before)
        .group_by(LedgerAccount.code)
    )
    found = {code: int(total or 0) for code, total in rows}
    return {a: a.shown(found.get(a.code, 0)) for a in accounts}


async def _movements(
    session: AsyncSession, owed: AccountRef, held: AccountRef, start: datetime, end: datetime
) -> dict[str, int]:
    """Per ledger transaction kind, what the month moved prepaid less debt by."""
    rows = await session.execute(
        select(LedgerTransaction.kind, LedgerAccount.code, func.sum(LedgerPosting.amount))
        .join(LedgerPosting, LedgerPosting.transaction_id == LedgerTransaction.id)
        .join(LedgerAccount, LedgerAccount.id == LedgerPosting.account_id)
        .where(
            LedgerAccount.code.in_([owed.code, held.code]),
            LedgerTransaction.at >= start,
            LedgerTransaction.at < end,
        )
        .group_by(LedgerTransaction.kind, LedgerAccount.code)
    )
    out: dict[str, int] = defaultdict(int)
    for kind, code, total in rows:
        account = held if code == held.code else owed
        shown = account.shown(int(total or 0))
        out[str(kind)] += shown if account is held else -shown
    return dict(out)


async def _payments(
    session: AsyncSession, account_id: str, currency: str, start: datetime, end: datetime
) -> list[PaymentLine]:
    rows = (
        await session.execute(
            select(Payment, PaymentChannel.name, Receipt.number)
            .join(PaymentChannel, PaymentChannel.id == Payment.channel_id)
            .join(Receipt, Receipt.payment_id == Payment.id)
            .join(LedgerTransaction, LedgerTransaction.id == Payment.transaction_id)
            .where(
                Payment.account_id == account_id,
                LedgerTransaction.at >= start,
                LedgerTransaction.at < end,
            )
            .order_by(Payment.id)
        )
    ).all()
    ids = [payment.transaction_id for payment, _, _ in rows]
    nets: dict[tuple[int, str], int] = {}
    if ids:
        legs = await session.execute(
            select(LedgerPosting.transaction_id, LedgerAccount.kind, LedgerPosting.amount)
            .join(LedgerAccount, LedgerAccount.id == LedgerPosting.account_id)
            .where(
                LedgerPosting.transaction_id.in_(ids),
                LedgerAccount.kind.in_([str(AccountKind.FEES), str(AccountKind.SERVICE)]),
                LedgerAccount.currency == currency,
            )
        )
        nets = {(tid, str(kind)): -int(amount) for tid, kind, amount in legs}
    out = []
    for payment, channel, receipt in rows:
        fee_tax = payment.fee - nets.get((payment.transaction_id, "fees"), 0)
        service_tax = payment.service_charge - nets.get((payment.transaction_id, "service"), 0)
        out.append(
            PaymentLine(
                payment_id=payment.id,
                receipt=receipt,
                channel=channel,
                reference=payment.reference,
                paid_at=payment.paid_at,
                state=payment.state,
                amount=payment.amount,
                debt_recovered=payment.debt_recovered,
                fee=payment.fee,
                fee_tax=fee_tax,
                service_charge=payment.service_charge,
                service_tax=service_tax,
                energy_gross=payment.amount
                - payment.debt_recovered
                - payment.fee
                - payment.service_charge,
                energy_tax=payment.tax - fee_tax - service_tax,
            )
        )
    return out


def _registers(reading: Reading | None) -> Registers | None:
    if reading is None:
        return None
    return Registers(
        reading.energy_import_wh,
        (reading.rate1_wh, reading.rate2_wh, reading.rate3_wh, reading.rate4_wh),
    )


async def _usage(session: AsyncSession, meter_id: str, start: int, end: int) -> MeterUsage:
    """A meter's registers around the month ``[start, end)`` (meter clock, seconds) and its
    load-profile energy in it."""
    base = select(Reading).where(Reading.meter_id == meter_id)
    first = (
        await session.scalars(
            base.where(Reading.meter_time < start).order_by(Reading.meter_time.desc()).limit(1)
        )
    ).first()
    if first is None:
        first = (
            await session.scalars(
                base.where(Reading.meter_time >= start, Reading.meter_time < end)
                .order_by(Reading.meter_time)
                .limit(1)
            )
        ).first()
    last = (
        await session.scalars(
            base.where(Reading.meter_time >= start, Reading.meter_time < end)
            .order_by(Reading.meter_time.desc())
            .limit(1)
        )
    ).first()
    profile = await session.execute(
        select(Interval.estimated, func.coalesce(func.sum(Interval.energy_wh), 0))
        .where(Interval.meter_id == meter_id, Interval.start >= start, Interval.start < end)
        .group_by(Interval.estimated)
    )
    energy = {bool(estimated): int(total) for estimated, total in profile}
    return MeterUsage(
        meter_id,
        _registers(first),
        _registers(last),
        energy.get(False, 0),
        energy.get(True, 0),
    )


async def bill_inputs(session: AsyncSession, account_id: str, month: Month) -> BillInputs:
    """Everything the account's bill for ``month`` is made of, read in one session."""
    found = (
        await session.execute(
            select(Account, Customer)
            .join(Customer, Customer.id == Account.customer_id)
            .where(Account.id == account_id)
        )
    ).first()
    if found is None:
        raise StorageError(f"no account {account_id!r}")
    account, customer = found
    tariff = await _tariff_of(session, account_id)
    start, end = month.bounds(tariff.calendar.utc_offset_minutes)
    held, owed = prepaid(account_id, tariff.currency), debt(account_id, tariff.currency)
    opening = await _balances_before(session, [held, owed], start)
    closing = await _balances_before(session, [held, owed], end)
    meters = (
        await session.scalars(
            select(Meter.id).where(Meter.account_id == account_id).order_by(Meter.id)
        )
    ).all()
    usage = [
        await _usage(session, meter_id, int(start.timestamp()), int(end.timestamp()))
        for meter_id in meters
    ]
    return BillInputs(
        account=account.id,
        customer=customer.name,
        tax_id=customer.tax_id,
        month=month,
        tariff=tariff,
        opening=(opening[held], opening[owed]),
        closing=(closing[held], closing[owed]),
        movements=await _movements(session, owed, held, start, end),
        payments=await _payments(session, account_id, tariff.currency, start, end),
        meters=usage,
        addresses=(customer.email, customer.phone),
    )


def _view(row: Bill, new: bool, email: str | None) -> BillView:
    return BillView(
        row.number, row.account_id, row.month, row.kind, json.loads(row.document),
        row.issued_at, new, email,
    )  # fmt: skip


async def _billable(session: AsyncSession, account: str | None) -> list[str]:
    if account is not None:
        if await session.get(Account, account) is None:
            raise StorageError(f"no account {account!r}")
        return [account]
    rows = await session.scalars(
        select(Account.id)
        .join(Meter, and_(Meter.account_id == Account.id, Meter.tariff_id.is_not(None)))
        .where(Account.status != "closed")
        .distinct()
        .order_by(Account.id)
    )
    return list(rows)


async def make_bills(
    db: Database,
    month: Month,
    now: datetime,
    *,
    actor: str,
    account: str | None = None,
) -> list[BillView]:
    """The bills of ``month`` (of every account with a tariffed meter, or of ``account``):
    each made once, numbered from the gapless counter and kept as issued (with an entry on the
    audit trail); a bill made before is returned as it was issued. A month that has not ended
    is refused: its bill would change."""
    out: list[BillView] = []
    async with db.read() as session:
        accounts = await _billable(session, account)
    for account_id in accounts:
        async with db.begin() as session:
            tariff = await _tariff_of(session, account_id)
            _, end = month.bounds(tariff.calendar.utc_offset_minutes)
            if end > now:
                raise StorageError(
                    f"--month {month} has not ended yet for account {account_id} "
                    f"(it ends {end.isoformat()}): bill it once it has"
                )
            email = await session.scalar(
                select(Customer.email)
                .join(Account, Account.customer_id == Customer.id)
                .where(Account.id == account_id)
            )
            existing = (
                await session.scalars(
                    select(Bill).where(Bill.account_id == account_id, Bill.month == str(month))
                )
            ).first()
            if existing is not None:
                out.append(_view(existing, False, email))
                continue
            inputs = await bill_inputs(session, account_id, month)
            number = await next_number(session, "bill")
            document = make_bill(inputs, number=number, issued_at=now)
            row = Bill(
                number=number,
                account_id=account_id,
                month=str(month),
                kind=document["kind"],
                document=json.dumps(document, sort_keys=True),
                issued_at=now,
            )
            session.add(row)
            await session.flush()
            await audit.append(
                session,
                at=now,
                actor=actor,
                action="bill.issue",
                subject=f"account:{account_id}",
                reason=f"month {month}",
                outcome=document["kind"],
                detail={
                    "number": number,
                    "closing": document["closing"]["balance"],
                    "payments": document["payments"]["total"],
                },
            )
            out.append(_view(row, True, email))
    return out


async def get_bill(db: Database, account: str, month: Month) -> BillView:
    async with db.read() as session:
        row = (
            await session.scalars(
                select(Bill).where(Bill.account_id == account, Bill.month == str(month))
            )
        ).first()
        if row is None:
            if await session.get(Account, account) is None:
                raise StorageError(f"no account {account!r}")
            raise StorageError(
                f"account {account} has no bill for {month}: make it with `hes bills make`"
            )
        email = await session.scalar(
            select(Customer.email)
            .join(Account, Account.customer_id == Customer.id)
            .where(Account.id == account)
        )
    return _view(row, False, email)


async def queue_bill_notice(
    db: Database, bill: BillView, pdf: bytes, now: datetime, *, expires: timedelta
) -> bool:
    """Put the bill's e-mail (its PDF attached) in the notice outbox; False when it was
    queued before (one e-mail per bill) or the customer has no e-mail address."""
    if bill.email is None:
        return False
    document = bill.document
    scale, currency = int(document["currency_scale"]), str(document["currency"])
    values = {
        "account": bill.account,
        "month": bill.month,
        "number": f"{bill.number:08d}",
        "balance": f"{decimal_text(int(document['closing']['balance']), scale)} {currency}",
        "paid": f"{decimal_text(int(document['payments']['total']), scale)} {currency}",
    }
    row = notice_row(
        key=f"{Kind.BILL}:{bill.account}:{bill.month}",
        kind=str(Kind.BILL),
        channel=str(Channel.EMAIL),
        address=bill.email,
        language=await _language(db, bill.account),
        values=values,
        now=now,
        deliver_at=now,
        expires_at=now + expires,
        account_id=bill.account,
    )
    row["attachment_name"] = f"{document['kind']}-{bill.account}-{bill.month}.pdf"
    row["attachment"] = pdf
    async with db.begin() as session:
        return await insert_ignore(session, Notification, [row]) == 1


async def _language(db: Database, account: str) -> str:
    async with db.read() as session:
        language = await session.scalar(
            select(Customer.language)
            .join(Account, Account.customer_id == Customer.id)
            .where(Account.id == account)
        )
    return str(language or "en")


__all__ = [
    "BillView",
    "bill_inputs",
    "get_bill",
    "make_bills",
    "queue_bill_notice",
]
