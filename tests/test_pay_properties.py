"""Any sequence of payments, identical repeats, reused references, reversals and deliveries
leaves the ledger balanced (every currency sums to zero, each cached balance equals its
postings), gives every payment exactly one receipt, numbered 1..n without gaps, never
applies a repeat twice, and keeps the audit trail (with the ledger checked against it) intact.
On SQLite, through the storage calls the CLI makes."""

from __future__ import annotations

import asyncio
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, update

from headend.domain.pricing import PaymentRefused
from headend.domain.registry import Block, MeterRecord, TariffRecord
from headend.services.registry import route_of
from headend.storage import open_database
from headend.storage.audit import verify_chain
from headend.storage.database import Database
from headend.storage.ledger import (
    PaymentRequest,
    add_channel,
    check_balances,
    list_payments,
    pay,
    reverse_payment,
    set_keypad,
)
from headend.storage.registry import add_tariff, import_meters
from headend.storage.schema import CreditTransfer, Receipt
from headend.vending import VendingKeyData
from protocols.sts import Pan

START = datetime(2026, 3, 30, 12, 0, tzinfo=UTC)  # payments cross into April: a new month
METERS = ("M-1", "E-1", "K-1")
CHANNELS = ("MPESA", "BANK")

Operation = tuple[str, int, int, int]  # kind, channel or payment index, meter, amount


async def _setup(url: str) -> Database:
    database = await open_database(url, check=False)
    await database.upgrade()
    tariff = TariffRecord(
        "T", "KES", -2, (3000,), 0, 0, blocks=(Block(20_000, 1200),), fee=500,
        service_charge=3000, vat_bp=1600, debt_share_bp=5000, min_vend=100,
    )  # fmt: skip
    await add_tariff(database, tariff, START, actor="t")
    rows = [
        (n, MeterRecord(meter, f"tcp://127.0.0.1:1/{n}", route_of(f"tcp://127.0.0.1:1/{n}"),
                        customer=f"C{n}", account=f"A-{n}", tariff="T",
                        credit_unit="money" if meter == "M-1" else "energy"))
        for n, meter in enumerate(METERS, 1)
    ]  # fmt: skip
    await import_meters(database, rows, [], START, actor="t")
    key = VendingKeyData(bytes.fromhex("abababababababab"), Pan.parse("47123456783"))
    await set_keypad(database, "K-1", key, START, actor="t")
    for channel in CHANNELS:
        await add_channel(database, channel, "mobile", START, actor="t")
    return database


operations = st.lists(
    st.tuples(
        st.sampled_from(["pay", "pay", "pay", "repeat", "conflict", "reverse", "deliver"]),
        st.integers(0, 9),
        st.integers(0, len(METERS) - 1),
        st.integers(1, 200_000),
    ),
    min_size=1,
    max_size=14,
)


async def _run(url: str, ops: list[Operation]) -> None:
    database = await _setup(url)
    try:
        taken: list[tuple[PaymentRequest, int]] = []  # request, payment id
        now = START
        for kind, index, meter, amount in ops:
            now += timedelta(hours=7)
            if kind == "pay" or not taken:
                request = PaymentRequest(
                    CHANNELS[index % 2], f"R-{len(taken)}-{index}", METERS[meter],
                    f"{amount // 100}.{amount % 100:02d}",
                )  # fmt: skip
                try:
                    answer = await pay(database, request, now, actor="t")
                except PaymentRefused:
                    continue
                if not answer.replayed:
                    taken.append((request, answer.answer["payment_id"]))
            elif kind == "repeat":
                request, payment_id = taken[index % len(taken)]
                again = await pay(database, request, now, actor="t")
                assert again.replayed
                assert again.answer["payment_id"] == payment_id
            elif kind == "conflict":
                request, _ = taken[index % len(taken)]
                changed = "9.98" if request.amount == "9.99" else "9.99"  # never the same body
                other = PaymentRequest(
                    request.channel, request.reference, request.meter_id, changed
                )
                try:
                    await pay(database, other, now, actor="t")
                except PaymentRefused as refused:
                    assert refused.code == "reference_conflict"
                else:
                    raise AssertionError("a different body under a used reference was taken")
            elif kind == "reverse":
                try:
                    await reverse_payment(
                        database, taken[index % len(taken)][1], "r", now, actor="t"
                    )
                except PaymentRefused as refused:
                    assert refused.code == "already_reversed"
            else:  # the dispatcher's part, as far as this state goes: the meter acknowledged
                async with database.begin() as session:
                    await session.execute(
                        update(CreditTransfer)
                        .where(CreditTransfer.payment_id == taken[index % len(taken)][1])
                        .where(CreditTransfer.state == "pending_delivery")
                        .values(state="delivered")
                    )
        checks = await check_balances(database)
        assert [c for c in checks if c.cached != c.from_postings] == []
        assert sum(c.cached for c in checks) == 0
        payments = await list_payments(database, limit=1000)
        assert len(payments) == len(taken)
        async with database.read() as session:
            receipts = (await session.scalars(select(Receipt.number))).all()
        assert sorted(receipts) == list(range(1, len(taken) + 1))
        assert sorted(p.receipt for p in payments) == sorted(receipts)
        result = await verify_chain(database)
        assert result.broken is None
    finally:
        await database.close()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
def test_any_sequence_keeps_the_ledger_balanced_and_receipts_gapless(ops: list[Operation]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_run(f"sqlite:///{Path(tmp) / 'hes.db'}", ops))
