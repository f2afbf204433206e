"""Auto-debit mandates on SQLite and PostgreSQL: a crossing of the low threshold seen by the
balance monitor makes one payment (never two, with two monitors or a collector that died
half-way), never above the monthly cap; top-up-to amounts; cancelled mandates charge nothing;
the CLI refuses what it cannot honour."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select, update
from typer.testing import CliRunner

from cli.hes import app
from headend.domain.mandates import MandateTerms, charge_amount
from headend.domain.registry import CustomerRecord, MeterRecord, TariffRecord
from headend.domain.validation import Findings
from headend.services.monitor import BalanceMonitor
from headend.services.registry import route_of
from headend.storage import Database, open_database
from headend.storage.ledger import add_channel, check_balances
from headend.storage.mandates import (
    add_mandate,
    cancel_mandate,
    collect_charges,
    list_charges,
    list_mandates,
)
from headend.storage.readings import reading_row, store_readings
from headend.storage.registry import add_customer, add_tariff, import_meters
from headend.storage.schema import MandateCharge, Payment
from protocols.clock import ManualClock
from protocols.errors import StorageError, ValidationError
from tests.databases import db_url, postgres_server
from tests.test_domain_readings import SNAP, T0

__all__ = ["db_url", "postgres_server"]  # fixtures

runner = CliRunner()
NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)


async def _setup(url: str) -> None:
    database = await open_database(url, check=False)
    try:
        await database.upgrade()
        await add_tariff(database, TariffRecord("RES", "KES", -2, (2500,), 5000, 1000), NOW,
                         actor="t")  # fmt: skip
        rows = []
        for n in (1, 2):
            record = CustomerRecord(f"C{n}", None, f"+25470000000{n}", "sms")
            await add_customer(database, record, f"ACC-{n}", NOW, actor="t")
            endpoint = f"tcp://127.0.0.1:1/{n}"
            rows.append((n, MeterRecord(meter_id=f"MTR-{n}", endpoint=endpoint,
                                        route=route_of(endpoint), customer=f"C{n}",
                                        account=f"ACC-{n}", tariff="RES")))  # fmt: skip
        assert (await import_meters(database, rows, [], NOW, actor="t")).applied
        await add_channel(database, "AUTO", "autodebit", NOW, actor="t")
        await add_channel(database, "COUNTER", "counter", NOW, actor="t")
    finally:
        await database.close()


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    await _setup(db_url)
    database = await open_database(db_url)
    try:
        yield database
    finally:
        await database.close()


async def _read(db: Database, meter: str, n: int, credit: int) -> None:
    snapshot = replace(SNAP, meter_id=meter, time=T0 + 900 * n, credit=credit)
    async with db.begin() as session:
        await store_readings(session, [reading_row(snapshot, Findings(), NOW, "poll")])


async def _payments(db: Database) -> list[tuple[str, str, int]]:
    async with db.read() as session:
        rows = await session.execute(
            select(Payment.reference, Payment.meter_id, Payment.amount).order_by(Payment.id)
        )
        return [(r, m, a) for r, m, a in rows]


async def test_one_payment_per_crossing_under_the_cap(db: Database) -> None:
    mandate = await add_mandate(
        db, "ACC-1", "AUTO", mode="fixed", amounts=("100.00", "150.00"), now=NOW, actor="t"
    )
    monitor = BalanceMonitor(db, ManualClock(NOW.timestamp()))
    steps = [(10_000, 0), (4_000, 1), (3_000, 0), (6_000, 0), (4_500, 1), (6_000, 0), (4_000, 0)]
    for n, (credit, debits) in enumerate(steps, start=1):
        await _read(db, "MTR-1", n, credit)
        assert (await monitor.evaluate()).debits == debits, f"step {n}"
        assert (await monitor.evaluate()).debits == 0  # seen again: nothing more
    first, second = T0 + 900 * 2, T0 + 900 * 5
    assert await _payments(db) == [
        (f"AD-{mandate.mandate_id}-MTR-1-{first}", "MTR-1", 10_000),
        (f"AD-{mandate.mandate_id}-MTR-1-{second}", "MTR-1", 5_000),  # what the cap leaves
    ]
    charges = await list_charges(db, mandate.mandate_id)
    assert [(c["state"], c["amount"]) for c in charges] == [
        ("paid", 10_000), ("paid", 5_000), ("capped", 0),
    ]  # fmt: skip
    assert "cap" in charges[2]["detail"]
    (view,) = await list_mandates(db, NOW, account="ACC-1")
    assert view.paid_this_month == 15_000
    assert all(c.cached == c.from_postings for c in await check_balances(db))


async def test_top_up_to_and_cancelled(db: Database) -> None:
    mandate = await add_mandate(
        db, "ACC-2", "AUTO", mode="topup", amounts=("200.00", "1000.00"), now=NOW, actor="t"
    )
    monitor = BalanceMonitor(db, ManualClock(NOW.timestamp()))
    await _read(db, "MTR-2", 1, 3_500)
    assert (await monitor.evaluate()).debits == 1
    assert [a for _, _, a in await _payments(db)] == [20_000 - 3_500]
    assert await cancel_mandate(db, mandate.mandate_id, "moved out", NOW, actor="t")
    assert not await cancel_mandate(db, mandate.mandate_id, "moved out", NOW, actor="t")
    await _read(db, "MTR-2", 2, 9_000)
    await monitor.evaluate()
    await _read(db, "MTR-2", 3, 3_000)
    assert (await monitor.evaluate()).debits == 0
    assert len(await _payments(db)) == 1


async def test_two_monitors_and_a_collector_that_died_make_one_payment(
    db: Database, db_url: str
) -> None:
    await add_mandate(
        db, "ACC-1", "AUTO", mode="fixed", amounts=("100.00", "500.00"), now=NOW, actor="t"
    )
    other = await open_database(db_url)
    try:
        await _read(db, "MTR-1", 1, 4_000)
        clock = ManualClock(NOW.timestamp())
        await asyncio.gather(BalanceMonitor(db, clock).evaluate(),
                             BalanceMonitor(other, clock).evaluate())  # fmt: skip
    finally:
        await other.close()
    assert len(await _payments(db)) == 1
    # a collector that died after paying, before recording it: the charge is still open
    async with db.begin() as session:
        await session.execute(update(MandateCharge).values(state="charging", payment_id=None))
    assert (await collect_charges(db, NOW, actor="t")).paid == 1  # the same payment's answer
    assert len(await _payments(db)) == 1
    async with db.read() as session:
        states = (await session.scalars(select(MandateCharge.state))).all()
        paid = await session.scalar(select(func.count()).select_from(MandateCharge))
    assert (list(states), paid) == (["paid"], 1)


async def test_mandates_refuse_what_they_cannot_honour(db: Database) -> None:
    with pytest.raises(ValidationError, match="kind autodebit"):
        await add_mandate(db, "ACC-1", "COUNTER", mode="fixed", amounts=("1.00", "2.00"),
                          now=NOW, actor="t")  # fmt: skip
    with pytest.raises(ValidationError, match="--cap is at least"):
        await add_mandate(db, "ACC-1", "AUTO", mode="fixed", amounts=("5.00", "2.00"),
                          now=NOW, actor="t")  # fmt: skip
    with pytest.raises(ValidationError, match=r"--amount: .*more than 2 decimals"):
        await add_mandate(db, "ACC-1", "AUTO", mode="fixed", amounts=("5.001", "20.00"),
                          now=NOW, actor="t")  # fmt: skip
    await add_mandate(db, "ACC-1", "AUTO", mode="fixed", amounts=("5.00", "20.00"), now=NOW,
                      actor="t")  # fmt: skip
    with pytest.raises(StorageError, match="cancel it first"):
        await add_mandate(db, "ACC-1", "AUTO", mode="fixed", amounts=("5.00", "20.00"),
                          now=NOW, actor="t")  # fmt: skip
    with pytest.raises(StorageError, match="no account"):
        await add_mandate(db, "NOPE", "AUTO", mode="fixed", amounts=("5.00", "20.00"),
                          now=NOW, actor="t")  # fmt: skip


def test_charge_amounts() -> None:
    fixed = MandateTerms("fixed", 1000, 2500)
    assert [charge_amount(fixed, 0, paid) for paid in (0, 1000, 2000, 2500, 3000)] == [
        1000, 1000, 500, 0, 0,
    ]  # fmt: skip
    topup = MandateTerms("topup", 5000, 6000)
    assert [charge_amount(topup, credit, 0) for credit in (-200, 0, 4000, 5000, 7000)] == [
        5000, 5000, 1000, 0, 0,
    ]  # fmt: skip
    assert charge_amount(topup, 1000, 5000) == 1000


def test_the_cli(db_url: str) -> None:
    asyncio.run(_setup(db_url))

    def hes(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, [*args, "--db", db_url], env={"HES_OPERATOR": "amina"})
        assert "Traceback" not in result.output, result.output
        return result.exit_code, result.output

    code, out = hes("mandates", "add", "ACC-1", "--channel", "AUTO", "--amount", "100.00",
                    "--cap", "300.00", "--json")  # fmt: skip
    assert code == 0, out
    made = json.loads(out)
    assert (made["mode"], made["amount"], made["monthly_cap"]) == ("fixed", 10_000, 30_000)
    code, out = hes("mandates", "list", "--json")
    assert [m["mandate_id"] for m in json.loads(out)] == [made["mandate_id"]]
    code, out = hes("mandates", "show", str(made["mandate_id"]), "--json")
    assert (code, json.loads(out)) == (0, [])
    code, out = hes("mandates", "add", "ACC-2", "--channel", "COUNTER", "--amount", "1",
                    "--cap", "2")  # fmt: skip
    assert code == 1
    assert "kind autodebit" in out
    code, out = hes("mandates", "cancel", str(made["mandate_id"]), "--reason", "closed")
    assert (code, out.strip()) == (0, f"mandate {made['mandate_id']}: cancelled")
