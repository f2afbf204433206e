"""The registry's tables: customers, accounts, tariffs and meters, applied all or nothing."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from headend.domain.registry import (
    CustomerRecord,
    MeterRecord,
    RowRefusal,
    TariffRecord,
    notice_channel,
    tariff_document,
    tariff_from,
)
from headend.storage import audit
from headend.storage.database import Database
from headend.storage.schema import Account, Customer, KeyMaterial, Meter, Tariff
from protocols.errors import StorageError


@dataclass(slots=True)
class ImportReport:
    added: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    refused: list[RowRefusal] = field(default_factory=list)
    applied: bool = False


def _same(meter: Meter, record: MeterRecord) -> bool:
    return (
        meter.endpoint == record.endpoint
        and meter.serial == (record.serial or record.meter_id)
        and (meter.account_id or "") == record.account
        and (meter.tariff_id or "") == record.tariff
        and meter.control_mode == record.control_mode
        and meter.credit_unit == record.credit_unit
        and meter.currency == record.currency
        and meter.currency_scale == record.currency_scale
        and meter.poll_group == record.poll_group
        and meter.profile_period == record.profile_period
    )


async def _account(session: AsyncSession, record: MeterRecord, now: datetime) -> str | None:
    """The record's account id, creating the account (and its customer) when new; the reason
    it cannot be used otherwise."""
    if not record.account:
        return None
    account = await session.get(Account, record.account)
    if account is not None:
        customer = await session.get(Customer, account.customer_id)
        if customer is not None and customer.name != record.customer:
            return f"account {record.account} belongs to {customer.name!r}, not {record.customer!r}"
        return None
    # no contact details come with a meter record: notices wait until an operator adds them
    customer = Customer(name=record.customer, notice_channel="none", created_at=now)
    session.add(customer)
    await session.flush()
    session.add(Account(id=record.account, customer_id=customer.id, created_at=now))
    await session.flush()
    return None


async def import_meters(
    db: Database,
    rows: Sequence[tuple[int, MeterRecord]],
    refused: Sequence[RowRefusal],
    now: datetime,
    *,
    actor: str,
    skip_bad_rows: bool = False,
    dry_run: bool = False,
) -> ImportReport:
    """Register ``rows``: all or nothing unless ``skip_bad_rows``. A meter already registered
    with the same values is unchanged (importing a file again changes nothing); with other
    values it is refused."""
    report = ImportReport(refused=list(refused))
    async with db.sessions() as session:
        transaction = await session.begin()
        try:
            for line, record in rows:
                existing = await session.get(Meter, record.meter_id)
                if existing is not None:
                    if _same(existing, record):
                        report.unchanged.append(record.meter_id)
                    else:
                        report.refused.append(
                            RowRefusal(
                                line, record.meter_id, "already registered with other values"
                            )
                        )
                    continue
                if record.tariff and await session.get(Tariff, record.tariff) is None:
                    report.refused.append(
                        RowRefusal(line, record.meter_id, f"unknown tariff {record.tariff!r}")
                    )
                    continue
                async with session.begin_nested():
                    problem = await _account(session, record, now)
                    if problem is not None:
                        report.refused.append(RowRefusal(line, record.meter_id, problem))
                        continue
                    session.add(await _meter(session, record, now))
                    await session.flush()
                    await audit.append(
                        session,
                        at=now,
                        actor=actor,
                        action="meter.register",
                        subject=record.meter_id,
                        reason=f"import, line {line}",
                        outcome="registered",
                        detail={
                            "endpoint": record.endpoint,
                            "account": record.account or None,
                            "tariff": record.tariff or None,
                        },
                    )
                report.added.append(record.meter_id)
            report.refused.sort(key=lambda refusal: refusal.line)
            if dry_run or (report.refused and not skip_bad_rows):
                await transaction.rollback()
            else:
                await transaction.commit()
                report.applied = True
        except BaseException:
            await transaction.rollback()
            raise
    return report


async def _meter(session: AsyncSession, record: MeterRecord, now: datetime) -> Meter:
    key_id = None
    if record.auth_key is not None:
        key = KeyMaterial(kind="command", secret=record.auth_key, created_at=now)
        session.add(key)
        await session.flush()
        key_id = key.id
    return Meter(
        id=record.meter_id,
        serial=record.serial or record.meter_id,
        endpoint=record.endpoint,
        transport=record.route.transport,
        gateway=record.route.gateway,
        unit_id=record.route.unit_id,
        control_mode=record.control_mode,
        credit_unit=record.credit_unit,
        currency=record.currency,
        currency_scale=record.currency_scale,
        account_id=record.account or None,
        tariff_id=record.tariff or None,
        command_key_id=key_id,
        poll_group=record.poll_group,
        profile_period=record.profile_period,
        created_at=now,
    )


async def list_meters(db: Database, *, include_retired: bool = False) -> list[Meter]:
    async with db.read() as session:
        query = select(Meter).order_by(Meter.id)
        if not include_retired:
            query = query.where(Meter.status == "active")
        return list((await session.scalars(query)).all())


async def get_meter(db: Database, meter_id: str) -> Meter:
    async with db.read() as session:
        meter = await session.get(Meter, meter_id)
    if meter is None:
        raise StorageError(f"no meter {meter_id!r} is registered")
    return meter


async def retire_meter(db: Database, meter_id: str, now: datetime, *, actor: str) -> bool:
    """Retire a meter: it is no longer read or commanded; its history stays. False if it was
    retired already."""
    async with db.begin() as session:
        meter = await session.get(Meter, meter_id)
        if meter is None:
            raise StorageError(f"no meter {meter_id!r} is registered")
        if meter.status == "retired":
            return False
        meter.status = "retired"
        meter.retired_at = now
        await audit.append(
            session,
            at=now,
            actor=actor,
            action="meter.retire",
            subject=meter_id,
            reason="operator",
            outcome="retired",
        )
        return True


def meter_dict(meter: Meter) -> dict[str, Any]:
    """A meter as the CLI's --json shows it (never its key)."""
    return {
        "meter_id": meter.id,
        "serial": meter.serial,
        "endpoint": meter.endpoint,
        "transport": meter.transport,
        "gateway": meter.gateway,
        "unit_id": meter.unit_id,
        "account": meter.account_id,
        "tariff": meter.tariff_id,
        "control_mode": meter.control_mode,
        "credit_unit": meter.credit_unit,
        "currency": meter.currency,
        "currency_scale": meter.currency_scale,
        "poll_group": meter.poll_group,
        "profile_period": meter.profile_period,
        "has_command_key": meter.command_key_id is not None,
        "status": meter.status,
        "created_at": meter.created_at.isoformat(),
        "retired_at": meter.retired_at.isoformat() if meter.retired_at else None,
    }


# -- tariffs ---------------------------------------------------------------------------------------


async def add_tariff(db: Database, tariff: TariffRecord, now: datetime, *, actor: str) -> bool:
    """Register ``tariff``; False if the same tariff is registered already (a repeat changes
    nothing); StorageError if the id is taken by a different one."""
    definition = json.dumps(tariff_document(tariff))
    async with db.begin() as session:
        existing = await session.get(Tariff, tariff.tariff_id)
        if existing is not None:
            if tariff_record(existing) == tariff:
                return False
            raise StorageError(f"tariff {tariff.tariff_id!r} exists with other values")
        session.add(
            Tariff(
                id=tariff.tariff_id,
                kind=tariff.kind,
                currency=tariff.currency,
                currency_scale=tariff.currency_scale,
                definition=definition,
                low_threshold=tariff.low_threshold,
                critical_threshold=tariff.critical_threshold,
                created_at=now,
            )
        )
        await audit.append(
            session,
            at=now,
            actor=actor,
            action="tariff.register",
            subject=tariff.tariff_id,
            reason="operator",
            outcome="registered",
            detail={"prices": list(tariff.prices)},
        )
    return True


def tariff_record(row: Tariff) -> TariffRecord:
    return tariff_from(
        row.id,
        currency=row.currency,
        currency_scale=row.currency_scale,
        low_threshold=row.low_threshold,
        critical_threshold=row.critical_threshold,
        document=json.loads(row.definition),
    )


async def list_tariffs(db: Database) -> list[tuple[TariffRecord, int]]:
    """Every tariff with the number of active meters on it."""
    async with db.read() as session:
        counted = await session.execute(
            select(Meter.tariff_id, func.count())
            .where(Meter.status == "active")
            .group_by(Meter.tariff_id)
        )
        counts = {tariff_id: count for tariff_id, count in counted}
        rows = (await session.scalars(select(Tariff).order_by(Tariff.id))).all()
    return [(tariff_record(row), counts.get(row.id, 0)) for row in rows]


async def get_tariff(db: Database, tariff_id: str) -> TariffRecord:
    async with db.read() as session:
        row = await session.get(Tariff, tariff_id)
    if row is None:
        raise StorageError(f"no tariff {tariff_id!r} is registered")
    return tariff_record(row)


# -- customers ------------------------------------------------------------------------------------


async def add_customer(
    db: Database, customer: CustomerRecord, account_id: str | None, now: datetime, *, actor: str
) -> int:
    """Register a customer (and, with ``account_id``, an account of theirs); returns the
    customer's id."""
    async with db.begin() as session:
        if account_id is not None and await session.get(Account, account_id) is not None:
            raise StorageError(f"account {account_id!r} exists already")
        row = Customer(
            name=customer.name,
            email=customer.email,
            phone=customer.phone,
            notice_channel=customer.notice_channel,
            language=customer.language,
            created_at=now,
            tax_id=customer.tax_id,
        )
        session.add(row)
        await session.flush()
        if account_id is not None:
            session.add(Account(id=account_id, customer_id=row.id, created_at=now))
        await audit.append(
            session,
            at=now,
            actor=actor,
            action="customer.register",
            subject=f"customer:{row.id}",
            reason="operator",
            outcome="registered",
            detail={"account": account_id, "tax_id": customer.tax_id},
        )
        return row.id


@dataclass(frozen=True, slots=True)
class CustomerView:
    customer_id: int
    record: CustomerRecord
    accounts: tuple[str, ...]
    meters: tuple[str, ...]
    created_at: datetime


async def list_customers(db: Database) -> list[CustomerView]:
    async with db.read() as session:
        customers = (await session.scalars(select(Customer).order_by(Customer.id))).all()
        accounts = (await session.execute(select(Account.customer_id, Account.id))).all()
        meters = (
            await session.execute(
                select(Account.customer_id, Meter.id)
                .join(Meter, Meter.account_id == Account.id)
                .where(Meter.status == "active")
            )
        ).all()
    return [
        CustomerView(
            row.id,
            CustomerRecord(
                row.name,
                row.email,
                row.phone,
                notice_channel(row.notice_channel),
                row.language,
                row.tax_id,
            ),
            tuple(sorted(a for c, a in accounts if c == row.id)),
            tuple(sorted(m for c, m in meters if c == row.id)),
            row.created_at,
        )
        for row in customers
    ]


async def get_customer(db: Database, customer_id: int) -> CustomerView:
    for view in await list_customers(db):
        if view.customer_id == customer_id:
            return view
    raise StorageError(f"no customer {customer_id} is registered")
