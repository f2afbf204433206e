"""The balance monitor on SQLite and PostgreSQL: one notice per downward crossing, re-armed
only above the threshold plus the margin, never twice for one crossing (also with two
monitors at once)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from headend.domain.registry import CustomerRecord, MeterRecord, TariffRecord
from headend.domain.validation import Findings
from headend.services.monitor import BalanceMonitor
from headend.services.registry import route_of
from headend.storage import Database, open_database
from headend.storage.readings import reading_row, store_readings
from headend.storage.registry import add_customer, add_tariff, import_meters
from headend.storage.schema import Account, Notification
from protocols.clock import ManualClock
from tests.databases import db_url, postgres_server
from tests.test_domain_readings import SNAP, T0

__all__ = ["db_url", "postgres_server"]  # fixtures

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)  # noon: no quiet hours


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = await open_database(db_url, check=False)
    await database.upgrade()
    await add_tariff(database, TariffRecord("RES", "KES", -2, (2500,), 5000, 1000), NOW, actor="t")
    for n, (name, channel) in enumerate([("Wanjiru", "sms"), ("Quiet", "none")], start=1):
        record = CustomerRecord(
            name,
            None,
            f"+25470000000{n}" if channel == "sms" else None,
            "sms" if channel == "sms" else "none",
        )
        await add_customer(database, record, f"ACC-{n}", NOW, actor="t")
    rows = [
        (
            2,
            MeterRecord(
                meter_id=f"MTR-{n}",
                endpoint=f"tcp://127.0.0.1:1/{n}",
                route=route_of(f"tcp://127.0.0.1:1/{n}"),
                customer=name,
                account=f"ACC-{n}",
                tariff="RES",
            ),
        )
        for n, name in ((1, "Wanjiru"), (2, "Quiet"))
    ]
    assert (await import_meters(database, rows, [], NOW, actor="t")).applied
    try:
        yield database
    finally:
        await database.close()


async def _read(db: Database, meter: str, n: int, credit: int) -> None:
    snapshot = replace(SNAP, meter_id=meter, time=T0 + 900 * n, credit=credit)
    async with db.begin() as session:
        await store_readings(session, [reading_row(snapshot, Findings(), NOW, "poll")])


async def _kinds(db: Database) -> list[str]:
    async with db.begin() as session:
        rows = await session.scalars(select(Notification.kind).order_by(Notification.id))
        return list(rows)


async def test_one_notice_per_crossing_and_hysteresis(db: Database) -> None:
    monitor = BalanceMonitor(db, ManualClock(NOW.timestamp()))
    steps = [
        (10_000, []),
        (4_000, ["low_credit"]),
        (3_900, []),  # still low: no second notice
        (800, ["critical"]),
        (0, ["exhausted"]),
        (5_200, []),  # topped up, but within the margin above the low threshold
        (4_900, []),  # so dipping under it again is not a new crossing
        (6_000, []),  # clear of the margin: re-armed
        (4_500, ["low_credit"]),  # a new crossing, a new notice
    ]
    expected: list[str] = []
    for n, (credit, new) in enumerate(steps, start=1):
        await _read(db, "MTR-1", n, credit)
        await monitor.evaluate()
        await monitor.evaluate()  # evaluating again changes nothing
        expected += new
        assert await _kinds(db) == expected, f"after credit {credit}"
    async with db.begin() as session:
        first = (await session.scalars(select(Notification).order_by(Notification.id))).first()
        assert first is not None
        assert (first.channel, first.address, first.meter_id) == ("sms", "+254700000001", "MTR-1")
        assert "40.00 KES" in first.payload


async def test_a_customer_without_notices_is_tracked_silently(db: Database) -> None:
    monitor = BalanceMonitor(db, ManualClock(NOW.timestamp()))
    await _read(db, "MTR-2", 1, 100)
    result = await monitor.evaluate()
    assert (result.notices, result.silent) == (0, 1)
    assert await _kinds(db) == []


async def test_two_monitors_at_once_make_one_notice(db: Database, db_url: str) -> None:
    other = await open_database(db_url)
    try:
        await _read(db, "MTR-1", 1, 4_000)
        clock = ManualClock(NOW.timestamp())
        await asyncio.gather(
            BalanceMonitor(db, clock).evaluate(), BalanceMonitor(other, clock).evaluate()
        )
        assert await _kinds(db) == ["low_credit"]
    finally:
        await other.close()


async def test_a_forecast_reminder_once_per_run_down(db: Database) -> None:
    monitor = BalanceMonitor(db, ManualClock(NOW.timestamp()), horizon_days=3)
    series = [
        (15_000, []),  # one reading: no pace yet
        (12_000, []),  # 3,000 a day: four days left
        (9_000, []),  # three days: not fewer than three
        (6_000, ["forecast"]),  # two days left, still above the low threshold of 5,000
        (5_500, []),  # reminded already
        (20_000, []),  # topped up: re-armed
    ]
    expected: list[str] = []
    for day, (credit, new) in enumerate(series):
        snapshot = replace(SNAP, meter_id="MTR-1", time=T0 + 86400 * day, credit=credit)
        async with db.begin() as session:
            await store_readings(session, [reading_row(snapshot, Findings(), NOW, "poll")])
        await monitor.evaluate()
        expected += new
        assert await _kinds(db) == expected, f"day {day}"
    async with db.begin() as session:
        notice = (await session.scalars(select(Notification))).one()
        assert '"days": "2"' in notice.payload
        assert "60.00 KES" in notice.payload
        account = await session.get(Account, "ACC-1")
        assert account is not None
        assert account.forecast_sent is False  # re-armed by the top-up


async def test_a_mass_crossing_is_one_notice_an_account_with_two_monitors(
    db: Database, db_url: str
) -> None:
    """Many accounts crossing at once (written set-wise): one notice each, never two, with
    two monitors evaluating together, and none on the next pass."""
    count = 40
    for n in range(3, count + 3):
        record = CustomerRecord(f"C{n}", None, f"+2547100{n:05d}", "sms")
        await add_customer(db, record, f"ACC-{n}", NOW, actor="t")
    rows = [
        (
            2,
            MeterRecord(
                meter_id=f"MTR-{n}",
                endpoint=f"tcp://127.0.0.1:1/{n}",
                route=route_of(f"tcp://127.0.0.1:1/{n}"),
                customer=f"C{n}",
                account=f"ACC-{n}",
                tariff="RES",
            ),
        )
        for n in range(3, count + 3)
    ]
    assert (await import_meters(db, rows, [], NOW, actor="t")).applied
    other = await open_database(db_url)
    clock = ManualClock(NOW.timestamp())
    try:
        for n, credit, kind, level in ((1, 4_000, "low_credit", 1), (2, 0, "exhausted", 3)):
            async with db.begin() as session:
                await store_readings(
                    session,
                    [
                        reading_row(
                            replace(SNAP, meter_id=f"MTR-{m}", time=T0 + 900 * n, credit=credit),
                            Findings(),
                            NOW,
                            "poll",
                        )
                        for m in range(3, count + 3)
                    ],
                )
            first, second = await asyncio.gather(
                BalanceMonitor(db, clock).evaluate(), BalanceMonitor(other, clock).evaluate()
            )
            assert first.notices + second.notices == count
            assert (await BalanceMonitor(db, clock).evaluate()).notices == 0
            async with db.read() as session:
                accounts = list(
                    await session.scalars(
                        select(Notification.account_id).where(Notification.kind == kind)
                    )
                )
                levels = set(
                    await session.scalars(
                        select(Account.alert_level).where(
                            Account.id != "ACC-1", Account.id != "ACC-2"
                        )
                    )
                )
            assert sorted(accounts) == sorted(f"ACC-{m}" for m in range(3, count + 3))
            assert levels == {level}
    finally:
        await other.close()


async def test_an_energy_meter_is_judged_by_the_energy_its_tariff_money_thresholds_buy(
    db: Database,
) -> None:
    """The tariff's thresholds are money (5,000 and 1,000 minor units at 2,500 a kWh: 2 kWh
    and 400 Wh); a meter whose credit is energy crosses them in Wh, not at 5,000 Wh."""
    customer = CustomerRecord("Otieno", None, "+254700000003", "sms")
    await add_customer(db, customer, "ACC-3", NOW, actor="t")
    record = MeterRecord(
        meter_id="KWH-1",
        endpoint="tcp://127.0.0.1:1/3",
        route=route_of("tcp://127.0.0.1:1/3"),
        customer="Otieno",
        account="ACC-3",
        tariff="RES",
        credit_unit="energy",
    )
    assert (await import_meters(db, [(2, record)], [], NOW, actor="t")).applied
    monitor = BalanceMonitor(db, ManualClock(NOW.timestamp()))
    expected: list[str] = []
    for n, (credit, new) in enumerate(
        [(2_871, []), (2_000, ["low_credit"]), (600, []), (400, ["critical"])], start=1
    ):
        await _read(db, "KWH-1", n, credit)
        await monitor.evaluate()
        expected += new
        assert await _kinds(db) == expected, f"after {credit} Wh"
