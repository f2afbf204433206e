"""Monthly bills on SQLite and PostgreSQL: opening and closing balances from the ledger, the
month's payments by channel and their charges, consumption by rate and by block from the
readings, e-invoices with tax lines for customers with a tax id, bills kept as issued with
gapless numbers, the PDF, and the bill e-mailed with its PDF attached through the notifier."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from typer.testing import CliRunner

from cli.hes import app
from headend.api.pdf import bill_pdf
from headend.broker import free_port
from headend.domain.billing import (
    BadMonth,
    BillInputs,
    BillMismatch,
    MeterUsage,
    Month,
    Registers,
    make_bill,
)
from headend.domain.registry import Block, CustomerRecord, MeterRecord, TariffRecord
from headend.domain.validation import Findings
from headend.services.notifier import Notifier
from headend.services.registry import route_of
from headend.services.senders import SmtpSender
from headend.storage import Database, open_database
from headend.storage.audit import verify_chain
from headend.storage.billing import make_bills, queue_bill_notice
from headend.storage.ledger import (
    PaymentRequest,
    add_channel,
    check_balances,
    pay,
    reverse_payment,
)
from headend.storage.readings import reading_row, store_readings
from headend.storage.registry import add_customer, add_tariff, import_meters
from protocols.clock import ManualClock
from protocols.errors import StorageError, ValidationError
from tests.databases import db_url, postgres_server
from tests.test_domain_readings import SNAP
from tests.test_notifier import Mailbox

__all__ = ["db_url", "postgres_server"]  # fixtures

runner = CliRunner()
OCT = datetime(2026, 10, 20, 9, tzinfo=UTC)
NOV = datetime(2026, 11, 5, 9, tzinfo=UTC)
DEC = datetime(2026, 12, 1, 1, tzinfo=UTC)
RES = TariffRecord(
    "RES", "KES", -2, (2500, 1500), 5000, 1000, vat_bp=1600, fee=3000, service_charge=20000
)
STEP = TariffRecord(
    "STEP", "KES", -2, (3000,), 5000, 1000, blocks=(Block(5_000, 1200),), vat_bp=1600
)


async def _setup(url: str) -> None:
    database = await open_database(url, check=False)
    try:
        await database.upgrade()
        for tariff in (RES, STEP):
            await add_tariff(database, tariff, OCT, actor="t")
        people = [
            ("Wanjiru", "A-1", None, "wanjiru@example.org"),
            ("Acme Ltd", "B-1", "P051234567X", "accounts@acme.example"),
        ]
        for name, account, tax_id, email in people:
            record = CustomerRecord(name, email, None, "email", "en", tax_id)
            await add_customer(database, record, account, OCT, actor="t")
        rows = [
            (n, MeterRecord(meter_id=meter, endpoint=f"tcp://127.0.0.1:1/{n}",
                            route=route_of(f"tcp://127.0.0.1:1/{n}"), customer=name,
                            account=account, tariff=tariff))
            for n, (meter, name, account, tariff) in enumerate(
                [("M-1", "Wanjiru", "A-1", "RES"), ("M-2", "Acme Ltd", "B-1", "STEP")], 1
            )
        ]  # fmt: skip
        assert (await import_meters(database, rows, [], OCT, actor="t")).applied
        await add_channel(database, "COUNTER-1", "counter", OCT, actor="t")
        await add_channel(database, "WALLET", "mobile", OCT, actor="t")
        payments = [
            ("COUNTER-1", "R-0", "M-1", 50_000, OCT),
            ("COUNTER-1", "R-1", "M-1", 100_000, NOV),
            ("WALLET", "W-1", "M-1", 30_000, NOV + timedelta(days=2)),
            ("WALLET", "W-2", "M-1", 20_000, NOV + timedelta(days=3)),
            ("WALLET", "B-9", "M-2", 80_000, NOV + timedelta(days=4)),
        ]
        for channel, ref, meter, amount, at in payments:
            request = PaymentRequest(channel, ref, meter, amount, paid_at=at)
            await pay(database, request, at + timedelta(minutes=1), actor="t")
        await reverse_payment(database, 4, "paid twice", NOV + timedelta(days=10), actor="t")
        readings = [
            ("M-1", datetime(2026, 10, 31, 23, tzinfo=UTC), 10_000, (6_000, 4_000)),
            ("M-1", datetime(2026, 11, 15, tzinfo=UTC), 18_000, (10_000, 8_000)),
            ("M-1", datetime(2026, 11, 30, 22, tzinfo=UTC), 25_000, (14_000, 11_000)),
            ("M-1", datetime(2026, 12, 1, 0, 30, tzinfo=UTC), 26_000, (14_500, 11_500)),
            ("M-2", datetime(2026, 11, 2, tzinfo=UTC), 1_000, (1_000, 0)),
            ("M-2", datetime(2026, 11, 29, tzinfo=UTC), 9_000, (9_000, 0)),
        ]
        async with database.begin() as session:
            await store_readings(
                session,
                [
                    reading_row(
                        replace(
                            SNAP,
                            meter_id=meter,
                            time=int(at.timestamp()),
                            energy_import_wh=wh,
                            energy_rates_wh=(*rates, 0, 0),
                        ),
                        Findings(),
                        at,
                        "poll",
                    )
                    for meter, at, wh, rates in readings
                ],
            )
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


@pytest.fixture
def mailbox() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield box, port
    finally:
        controller.stop()


def _line(document: dict[str, Any], name: str) -> int:
    return int(next(line["amount"] for line in document["summary"] if line["line"] == name))


async def test_a_month_bill_adds_up_from_the_ledger_and_the_readings(db: Database) -> None:
    bills = {bill.account: bill for bill in await make_bills(db, Month(2026, 11), DEC, actor="t")}
    assert sorted((b.number, b.account, b.kind, b.new) for b in bills.values()) == [
        (1, "A-1", "bill", True),
        (2, "B-1", "e-invoice", True),
    ]
    bill = bills["A-1"].document
    # October's payment: 500.00 less the fee and the month's service charge, VAT out of energy
    october_energy = 50_000 - 3000 - 20_000
    october_net = october_energy - (2 * october_energy * 1600 + 11600) // 23200
    assert bill["opening"] == {"balance": october_net, "prepaid": october_net, "debt": 0}
    cached = {c.code: c.cached for c in await check_balances(db)}
    assert bill["closing"]["prepaid"] == -cached["prepaid:A-1:KES"]
    assert sum(line["amount"] for line in bill["summary"][:-1]) == bill["closing"]["balance"]
    assert _line(bill, "payments received") == 150_000  # the reversed one too, with its reversal
    assert _line(bill, "fees") == -3 * 3000
    assert _line(bill, "service charges") == -20_000  # November's, from its first payment
    assert _line(bill, "reversals") < 0
    assert bill["payments"]["by_channel"] == [
        {"channel": "COUNTER-1", "count": 1, "amount": 100_000},
        {"channel": "WALLET", "count": 2, "amount": 50_000},
    ]
    assert [i["state"] for i in bill["payments"]["items"]] == ["accepted", "accepted", "reversed"]
    charges = bill["charges"]
    assert charges["fees"] == {"gross": 9000, "vat": 3 * 414, "net": 9000 - 3 * 414}
    assert charges["energy"]["gross"] == 150_000 - 9000 - 20_000
    # consumption: the reading before the month to the last one in it (not December's)
    consumption = bill["consumption"]
    assert consumption["wh"] == 15_000
    assert [(r["rate"], r["wh"], r["price"]) for r in consumption["by_rate"]] == [
        (1, 8_000, 2500), (2, 7_000, 1500),
    ]  # fmt: skip
    assert consumption["by_rate"][0]["net"] == 20_000
    assert consumption["by_block"] == []
    assert "tax_lines" not in bill

    invoice = bills["B-1"].document
    assert invoice["tax_id"] == "P051234567X"
    assert invoice["consumption"]["by_block"] == [
        {"from_wh": 0, "upto_wh": 5_000, "wh": 5_000, "price": 1200, "net": 6_000},
        {"from_wh": 5_000, "upto_wh": None, "wh": 3_000, "price": 3000, "net": 9_000},
    ]
    total = invoice["tax_total"]
    vat = (2 * 80_000 * 1600 + 11600) // 23200
    assert total == {"net": 80_000 - vat, "vat": vat, "gross": 80_000}
    assert invoice["tax_lines"] == [
        {"line": "energy", "net": 80_000 - vat, "vat_rate_bp": 1600, "vat": vat, "gross": 80_000}
    ]
    assert invoice["charges"]["vat"] == vat

    again = await make_bills(db, Month(2026, 11), DEC + timedelta(days=3), actor="t")
    assert [(b.number, b.new, b.document) for b in again] == [
        (1, False, bill), (2, False, invoice),
    ]  # fmt: skip
    with pytest.raises(StorageError, match="has not ended"):
        await make_bills(db, Month(2026, 12), DEC, actor="t")
    assert (await verify_chain(db)).broken is None


async def test_a_bill_is_e_mailed_with_its_pdf(db: Database, mailbox: tuple[Mailbox, int]) -> None:
    box, port = mailbox
    (bill,) = await make_bills(db, Month(2026, 11), DEC, actor="t", account="B-1")
    pdf = bill_pdf(bill.document)
    assert pdf.startswith(b"%PDF")
    assert b"E-invoice 00000001" in pdf
    assert await queue_bill_notice(db, bill, pdf, DEC, expires=timedelta(days=1))
    assert not await queue_bill_notice(db, bill, pdf, DEC, expires=timedelta(days=1))
    notifier = Notifier(
        db,
        {"email": SmtpSender("127.0.0.1", port, "hes@example.org")},
        ManualClock(DEC.timestamp()),
    )
    assert (await notifier.deliver_once()).sent == 1
    (raw,) = box.messages
    message = message_from_bytes(raw)
    assert message["To"] == "accounts@acme.example"
    assert "00000001" in message["Subject"]
    parts = [p for p in message.walk() if p.get_filename()]
    assert [p.get_filename() for p in parts] == ["e-invoice-B-1-2026-11.pdf"]
    assert parts[0].get_content_type() == "application/pdf"
    assert parts[0].get_payload(decode=True) == pdf


def _hes(url: str, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, [*args, "--db", url], env={"HES_OPERATOR": "amina"})
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


def test_the_cli_makes_writes_and_shows_bills(db_url: str, tmp_path: Path) -> None:
    asyncio.run(_setup(db_url))
    code, out = _hes(
        db_url, "bills", "make", "--month", "2026-11", "--out", str(tmp_path), "--json"
    )
    assert code == 0, out
    made = json.loads(out)
    assert [(b["account"], b["kind"], b["new"]) for b in made] == [
        ("A-1", "bill", True), ("B-1", "e-invoice", True),
    ]  # fmt: skip
    assert (tmp_path / "bill-A-1-2026-11.pdf").read_bytes().startswith(b"%PDF")
    stored = json.loads((tmp_path / "e-invoice-B-1-2026-11.json").read_text())
    assert stored == made[1]["bill"]
    code, out = _hes(db_url, "bills", "show", "B-1", "--month", "2026-11")
    assert code == 0, out
    assert "E-INVOICE 00000002" in out
    assert "tax id      P051234567X" in out
    assert "TAX LINES" in out
    code, out = _hes(db_url, "bills", "show", "A-1", "--month", "2026-10")
    assert code == 1
    assert "no bill for 2026-10" in out
    code, out = _hes(db_url, "bills", "make", "--month", "2026-13")
    assert code == 1
    assert "--month" in out


def test_months_parse_strictly() -> None:
    assert str(Month.parse("2026-11")) == "2026-11"
    assert Month(2026, 12).next() == Month(2027, 1)
    start, end = Month(2026, 11).bounds(180)
    assert start == datetime(2026, 10, 31, 21, tzinfo=UTC)
    assert end == datetime(2026, 11, 30, 21, tzinfo=UTC)
    for bad in ("2026-13", "26-11", "soon", "2026-00"):
        with pytest.raises(BadMonth):
            Month.parse(bad)


def test_a_bill_that_does_not_add_up_is_refused() -> None:
    inputs = BillInputs(
        account="A-1", customer="W", tax_id=None, month=Month(2026, 11), tariff=RES,
        opening=(1000, 0), closing=(1500, 0), movements={"payment": 400}, payments=[],
        meters=[],
    )  # fmt: skip
    with pytest.raises(BillMismatch, match="ledger's payments"):
        make_bill(inputs, number=1, issued_at=DEC)
    with pytest.raises(BillMismatch, match="closing balance"):
        make_bill(replace(inputs, movements={"delivery": 400}), number=1, issued_at=DEC)
    fine = make_bill(replace(inputs, movements={"adjustment": 500}), number=1, issued_at=DEC)
    assert _line(fine, "adjustments") == 500
    back = MeterUsage("M-1", Registers(10, (10, 0, 0, 0)), Registers(5, (5, 0, 0, 0)))
    with pytest.raises(ValidationError, match="went back"):
        make_bill(replace(inputs, movements={"adjustment": 500}, meters=[back]), number=1,
                  issued_at=DEC)  # fmt: skip
