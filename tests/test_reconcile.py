"""Reconciling a channel's settlement file on SQLite and PostgreSQL: every finding, the meters'
side of each payment, nothing changed without --apply, --apply posting each finding once as a
ledger transaction on the audit trail, and malformed files refused row by row."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update
from typer.testing import CliRunner

from cli.hes import app
from headend.domain.reconcile import BadSettlement, parse_settlement
from headend.domain.registry import MeterRecord, TariffRecord
from headend.domain.validation import Findings
from headend.services.registry import route_of
from headend.storage import open_database
from headend.storage.audit import verify_chain
from headend.storage.ledger import PaymentRequest, add_channel, check_balances, pay
from headend.storage.readings import reading_row, store_readings
from headend.storage.registry import add_tariff, import_meters
from headend.storage.schema import AuditEntry, CreditTransfer, LedgerTransaction, Meter
from tests.databases import db_url, postgres_server
from tests.test_domain_readings import SNAP

__all__ = ["db_url", "postgres_server"]  # fixtures

runner = CliRunner()
DAY = datetime(2026, 11, 3, 9, tzinfo=UTC)
SETTLEMENT = """reference,amount,currency,paid_at,note
R-1,500.00,KES,2026-11-03T12:00:00+03:00,ok
R-2,250.00,KES,2026-11-03T12:05:00+03:00,short in the ledger
R-9,70.00,KES,2026-11-03T13:00:00+03:00,never posted
R-1,500.00,KES,2026-11-03T12:00:00+03:00,sent twice
U-1,100,KES,2026-11-03T14:00:00+03:00,wrong currency
"""


async def _setup(url: str) -> None:
    database = await open_database(url, check=False)
    try:
        await database.upgrade()
        await add_tariff(database, TariffRecord("RES", "KES", -2, (2500,), 5000, 1000), DAY,
                         actor="t")  # fmt: skip
        await add_tariff(database, TariffRecord("UG", "UGX", 0, (700,), 5000, 1000), DAY,
                         actor="t")  # fmt: skip
        rows = [
            (n, MeterRecord(meter_id=meter, endpoint=f"tcp://127.0.0.1:1/{n}",
                            route=route_of(f"tcp://127.0.0.1:1/{n}"), customer=meter,
                            account=f"A-{meter}", tariff=tariff))
            for n, (meter, tariff) in enumerate([("M-1", "RES"), ("M-2", "RES"), ("U", "UG")], 1)
        ]  # fmt: skip
        assert (await import_meters(database, rows, [], DAY, actor="t")).applied
        async with database.begin() as session:
            await session.execute(
                update(Meter).where(Meter.id == "U").values(currency="UGX", currency_scale=0)
            )
        await add_channel(database, "WALLET", "mobile", DAY, actor="t")
        for ref, meter, amount in [
            ("R-1", "M-1", 50_000), ("R-2", "M-2", 20_000), ("R-4", "M-1", 5_000),
            ("U-1", "U", 100),
        ]:  # fmt: skip
            request = PaymentRequest("WALLET", ref, meter, amount, paid_at=DAY)
            await pay(database, request, DAY + timedelta(minutes=1), actor="t")
        request = PaymentRequest("WALLET", "R-7", "M-1", 9_000, paid_at=DAY - timedelta(days=1))
        await pay(database, request, DAY, actor="t")  # another day: not missing from this file
        async with database.begin() as session:  # the meter reports transfer 1 received
            snapshot = replace(SNAP, meter_id="M-1", time=int(DAY.timestamp()) + 600,
                               last_transfer=1)  # fmt: skip
            await store_readings(session, [reading_row(snapshot, Findings(), DAY, "poll")])
            # and R-2's transfer marked delivered while its meter never said so
            await session.execute(
                update(CreditTransfer)
                .where(CreditTransfer.meter_id == "M-2")
                .values(state="delivered")
            )
    finally:
        await database.close()


@pytest.fixture
def db(db_url: str) -> str:
    asyncio.run(_setup(db_url))
    return db_url


def hes(url: str, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, [*args, "--db", url], env={"HES_OPERATOR": "amina"})
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


async def _state(url: str) -> tuple[int, int, dict[str, int]]:
    database = await open_database(url)
    try:
        async with database.read() as session:
            transactions = await session.scalar(select(func.count()).select_from(LedgerTransaction))
            entries = await session.scalar(select(func.count()).select_from(AuditEntry))
        checks = await check_balances(database)
        assert [c for c in checks if c.cached != c.from_postings] == []
        assert (await verify_chain(database)).broken is None
    finally:
        await database.close()
    return int(transactions or 0), int(entries or 0), {c.code: c.cached for c in checks}


def test_findings_and_nothing_changes_without_apply(db: str, tmp_path: Path) -> None:
    (tmp_path / "s.csv").write_text(SETTLEMENT)
    before = asyncio.run(_state(db))
    report_csv = tmp_path / "report.csv"
    code, out = hes(db, "reconcile", "--channel", "WALLET", "--date", "2026-11-03",
                    str(tmp_path / "s.csv"), "--json", "--out", str(report_csv))  # fmt: skip
    assert code == 0, out
    report: dict[str, Any] = json.loads(out)
    found = [(i["finding"], i["reference"], i["line"]) for i in report["items"]]
    assert found == [
        ("matched", "R-1", 2),
        ("amount_mismatch", "R-2", 3),
        ("missing_in_ledger", "R-9", 4),
        ("duplicate_in_file", "R-1", 5),
        ("currency_mismatch", "U-1", 6),
        ("missing_in_file", "R-4", None),
    ]
    assert report["counts"]["matched"] == 1
    says = {d["reference"]: (d["meter_says"], d["agrees"]) for d in report["deliveries"]}
    assert says == {
        "R-1": ("received before it was confirmed", True),
        "R-2": ("delivered, not reported by the meter", False),
        "R-4": ("pending", True),
        "U-1": ("pending", True),
    }
    assert report["deliveries_disagreeing"] == 1
    assert report["applied"] == []
    assert report_csv.read_text().splitlines()[0].startswith("finding,reference,line")
    assert asyncio.run(_state(db)) == before
    code, out = hes(db, "reconcile", "--channel", "WALLET", "--date", "2026-11-03",
                    str(tmp_path / "s.csv"), "--out", str(report_csv))  # fmt: skip
    assert code == 1
    assert "exists already" in out


def test_apply_posts_each_finding_once(db: str, tmp_path: Path) -> None:
    (tmp_path / "s.csv").write_text(SETTLEMENT)
    transactions, _, balances = asyncio.run(_state(db))
    args = ["reconcile", "--channel", "WALLET", "--date", "2026-11-03", str(tmp_path / "s.csv")]
    code, out = hes(db, *args, "--apply", "--json")
    assert code == 0, out
    applied = json.loads(out)["applied"]
    assert [(a["finding"], a["reference"], a["amount"], a["new"]) for a in applied] == [
        ("amount_mismatch", "R-2", 5_000, True),
        ("missing_in_ledger", "R-9", 7_000, True),
        ("missing_in_file", "R-4", -5_000, True),
    ]
    after, _, now = asyncio.run(_state(db))
    assert after == transactions + 3
    assert now["suspense:KES"] == -7_000
    assert now["clearing:WALLET:KES"] == balances["clearing:WALLET:KES"] + 7_000
    code, out = hes(db, *args, "--apply", "--json")
    assert code == 0, out
    assert [a["new"] for a in json.loads(out)["applied"]] == [False, False, False]
    assert asyncio.run(_state(db))[0] == after
    code, out = hes(db, "audit", "verify")
    assert code == 0, out


def test_malformed_rows_are_refused_with_their_line(db: str, tmp_path: Path) -> None:
    bad = (
        "reference,amount,currency,paid_at\n"
        "R-1,500.00,KES,2026-11-03T12:00:00+03:00\n"
        "R-2,5.001,KES,2026-11-03T12:00:00+03:00\n"
        "R-3,5.00,KES,2026-11-03T12:00:00\n"
        "R-4,5.00,XXX,2026-11-03T12:00:00Z\n"
        ",5.00,KES,2026-11-03T12:00:00Z\n"
        "R-6,-1,KES,2026-11-03T12:00:00Z\n"
    )
    (tmp_path / "bad.csv").write_text(bad)
    before = asyncio.run(_state(db))
    code, out = hes(db, "reconcile", "--channel", "WALLET", "--date", "2026-11-03",
                    str(tmp_path / "bad.csv"), "--apply")  # fmt: skip
    assert code == 1
    assert out.startswith("error: 5 malformed row(s), nothing reconciled: line 3: amount")
    for reason in ("line 4: paid_at: give the time zone", "line 5: currency 'XXX'",
                   "line 6: reference", "line 7: amount: more than zero"):  # fmt: skip
        assert reason in out, out
    assert asyncio.run(_state(db)) == before


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("reference,amount\nR-1,5\n", "line 1: the header lacks currency, paid_at"),
        ("reference,amount,currency,paid_at,amount\n", "repeats amount"),
        ("reference,amount,currency,paid_at\nR-1,5\n", "line 2: 2 field(s)"),
        ("reference,amount,currency,paid_at\nR-1,5,KES,soon\n", "line 2: paid_at: not an ISO"),
    ],
)
def test_bad_files(text: str, reason: str) -> None:
    with pytest.raises(BadSettlement, match=re.escape(reason)):
        parse_settlement(text, {"KES": 2})


def test_blank_lines_and_extra_columns_are_fine() -> None:
    rows = parse_settlement(
        "Paid_At,Reference,Currency,Amount,x\n\n2026-11-03T00:00:00Z,R-1,KES,1.5,y\n", {"KES": 2}
    )
    assert [(r.line, r.reference, r.amount) for r in rows] == [(3, "R-1", 150)]
    assert rows[0].paid_at.date() == date(2026, 11, 3)
