"""A hypothesis state machine over the whole payment loop on SQLite: payments from several
channels, identical repeats, concurrent retries of one request, different bodies under a used
reference, reversals, delivery passes, lost requests and answers and dropped connections on
the in-memory links, meter restarts, and head-end restarts (a deliverer killed mid-send, before
or after its envelope reached the meter). After every step the ledger balances and each cached
balance equals its postings; at the end, once the faults are gone and the deliverer has
finished, every payment has exactly one receipt, numbered without gaps, none was applied twice,
each meter holds exactly the credit of its delivered transfers, and the audit trail (with the
ledger checked against it) verifies."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sqlalchemy import func, select

from headend.domain.pricing import PaymentRefused
from headend.domain.registry import CustomerRecord, MeterRecord, TariffRecord
from headend.links.base import RetryPolicy
from headend.links.memory import FaultPlan, MemoryLink
from headend.services.delivery import Deliverer, DeliverySettings
from headend.services.registry import route_of
from headend.storage import Database, open_database
from headend.storage.audit import verify_chain, verify_ledger
from headend.storage.delivery import (
    Held,
    claim_transfers,
    list_transfers,
    start_attempt,
    workable_count,
)
from headend.storage.ledger import (
    PaymentRequest,
    add_channel,
    check_balances,
    list_payments,
    pay,
    reverse_payment,
)
from headend.storage.registry import add_customer, add_tariff, import_meters
from headend.storage.schema import LedgerTransaction, Receipt
from meter_sim.config import MeterConfig
from meter_sim.firmware import Meter
from meter_sim.loads import load_for
from protocols.clock import ManualClock
from tests.test_dispatcher import Links

T0 = 1_767_268_800.0  # 2026-01-01T12:00:00Z
NOW = datetime.fromtimestamp(T0, UTC)
KEY = bytes.fromhex("00112233445566778899aabbccddeeff")
METERS = ("MTR-1", "MTR-2")
CHANNELS = ("WALLET", "BANK", "AGENT")
START = 10_000  # each meter's credit at the start, minor units
STEPS = 20  # rules a run takes at most
QUICK = RetryPolicy(backoff=0.001, max_backoff=0.004)
SETTINGS = DeliverySettings(attempt_timeout=0.08, lease=60.0, retry_base=timedelta(seconds=30))
FAULTS = FaultPlan(drop_request=0.25, drop_answer=0.25, disconnect=0.1, seed=7)
LINK_TIMEOUT = 0.02

_template: Path | None = None  # one migrated, registered database per process, copied per run


async def _registered(url: str) -> None:
    database = await open_database(url, check=False)
    try:
        await database.upgrade()
        tariff = TariffRecord("RES", "KES", -2, (2500,), 5000, 1000)
        await add_tariff(database, tariff, NOW, actor="t")
        rows = []
        for n, meter_id in enumerate(METERS):
            customer = CustomerRecord(f"Customer {n}", None, f"+25470000000{n}", "sms")
            await add_customer(database, customer, f"ACC-{n}", NOW, actor="t")
            endpoint = f"tcp://127.0.0.1:1/{n + 1}"
            record = MeterRecord(
                meter_id=meter_id, endpoint=endpoint, route=route_of(endpoint),
                customer=f"Customer {n}", account=f"ACC-{n}", tariff="RES", auth_key=KEY,
            )  # fmt: skip
            rows.append((n + 2, record))
        assert (await import_meters(database, rows, [], NOW, actor="t")).applied
        for channel in CHANNELS:
            await add_channel(database, channel, "mobile", NOW, actor="t")
    finally:
        await database.close()


def _template_file() -> Path:
    global _template
    if _template is None:
        folder = Path(tempfile.mkdtemp(prefix="hes-payment-states-"))
        path = folder / "template.db"
        asyncio.run(_registered(f"sqlite:///{path}"))
        _template = path
    return _template


def _meter(meter_id: str, clock: ManualClock) -> Meter:
    config = MeterConfig(meter_id, initial_credit=START, auth_key=KEY.hex())
    return Meter(config, clock.now(), load_for(config))


class PaymentLoop(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="hes-payment-run-"))
        shutil.copyfile(_template_file(), self.folder / "hes.db")
        self.loop = asyncio.new_event_loop()
        self.db: Database = self.run(open_database(f"sqlite:///{self.folder / 'hes.db'}"))
        self.clock = ManualClock(T0)
        self.plan = FaultPlan()
        self.links = Links(
            {m: MemoryLink(_meter(m, self.clock), self.plan, timeout=LINK_TIMEOUT) for m in METERS}
        )
        self.workers = 0
        self.deliverer = self.new_deliverer()
        self.requests: list[PaymentRequest] = []  # taken, by payment
        self.payment_ids: list[int] = []
        self.references = 0

    def run(self, job: Any) -> Any:
        return self.loop.run_until_complete(job)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.now(), UTC)

    def new_deliverer(self) -> Deliverer:
        self.workers += 1
        worker = f"w{self.workers}"
        return Deliverer(
            self.db, self.links, self.clock, worker=worker, settings=SETTINGS, retry=QUICK
        )

    def request(self, channel: int, meter: int, amount: int) -> PaymentRequest:
        self.references += 1
        return PaymentRequest(
            CHANNELS[channel], f"REF-{self.references}", METERS[meter],
            f"{amount // 100}.{amount % 100:02d}",
        )  # fmt: skip

    def taken(self, request: PaymentRequest, answer: dict[str, Any]) -> None:
        self.requests.append(request)
        self.payment_ids.append(int(answer["payment_id"]))

    # -- what channels do ---------------------------------------------------------------------

    @rule(channel=st.integers(0, 2), meter=st.integers(0, 1), amount=st.integers(1, 60_000))
    def a_payment(self, channel: int, meter: int, amount: int) -> None:
        request = self.request(channel, meter, amount)
        try:
            answer = self.run(pay(self.db, request, self.now(), actor="t"))
        except PaymentRefused as refused:
            assert refused.code == "amount_out_of_bounds"  # below the tariff's minimum vend
            return
        assert not answer.replayed
        self.taken(request, answer.answer)

    @precondition(lambda self: self.requests)
    @rule(index=st.integers(0, 1_000))
    def an_identical_repeat(self, index: int) -> None:
        n = index % len(self.requests)
        again = self.run(pay(self.db, self.requests[n], self.now(), actor="t"))
        assert again.replayed
        assert again.answer["payment_id"] == self.payment_ids[n]

    @rule(channel=st.integers(0, 2), meter=st.integers(0, 1), amount=st.integers(5_000, 60_000))
    def two_concurrent_retries(self, channel: int, meter: int, amount: int) -> None:
        request = self.request(channel, meter, amount)

        async def both() -> list[Any]:
            return list(
                await asyncio.gather(
                    pay(self.db, request, self.now(), actor="t"),
                    pay(self.db, request, self.now(), actor="t"),
                )
            )

        first, second = self.run(both())
        assert first.answer == second.answer
        assert sorted([first.replayed, second.replayed]) == [False, True]
        self.taken(request, first.answer)

    @precondition(lambda self: self.requests)
    @rule(index=st.integers(0, 1_000))
    def a_different_body_under_a_used_reference(self, index: int) -> None:
        used = self.requests[index % len(self.requests)]
        other = replace(used, amount="99.99" if used.amount != "99.99" else "98.00")
        try:
            self.run(pay(self.db, other, self.now(), actor="t"))
        except PaymentRefused as refused:
            assert refused.code == "reference_conflict"
        else:
            raise AssertionError("a different body under a used reference was taken")

    @precondition(lambda self: self.payment_ids)
    @rule(index=st.integers(0, 1_000))
    def a_reversal(self, index: int) -> None:
        payment_id = self.payment_ids[index % len(self.payment_ids)]
        try:
            self.run(reverse_payment(self.db, payment_id, "test", self.now(), actor="t"))
        except PaymentRefused as refused:
            assert refused.code in {"already_reversed", "in_delivery"}

    # -- what the head-end and the meters do --------------------------------------------------

    @rule()
    def a_delivery_pass(self) -> None:
        self.run(self.deliverer.deliver_once())

    @rule(on=st.booleans())
    def faults(self, on: bool) -> None:
        self.plan = FAULTS if on else FaultPlan()
        for link in self.links.links.values():
            link.plan = self.plan

    @rule(meter=st.integers(0, 1))
    def a_meter_restart(self, meter: int) -> None:
        meter_id = METERS[meter]
        old = self.links.links[meter_id].meter
        restarted = Meter.from_state(old.config, old.to_state(), self.clock.now(), old.load)
        self.links.links[meter_id] = MemoryLink(restarted, self.plan, timeout=LINK_TIMEOUT)

    @rule(reached_the_meter=st.booleans())
    def a_head_end_killed_mid_send(self, reached_the_meter: bool) -> None:
        now = self.now()
        held = self.run(claim_transfers(self.db, "killed", now, now + timedelta(seconds=60), 1))
        started = self.run(start_attempt(self.db, held[0], now)) if held else None
        if isinstance(started, Held) and started.envelope is not None and reached_the_meter:
            self.links.links[started.meter_id].meter.execute(started.envelope)
        self.deliverer = self.new_deliverer()
        self.clock.advance(61)  # the dead worker's lease runs out

    @rule(seconds=st.sampled_from([1, 31, 700]))
    def time_passes(self, seconds: int) -> None:
        self.clock.advance(seconds)

    # -- what always holds ---------------------------------------------------------------------

    @invariant()
    def the_ledger_balances(self) -> None:
        checks = self.run(check_balances(self.db))
        assert [c for c in checks if c.cached != c.from_postings] == []
        assert sum(c.cached for c in checks) == 0

    def teardown(self) -> None:
        try:
            self.faults(on=False)
            # a pass delivers one transfer a meter (the lowest-numbered unfinished): as many
            # passes as a run can leave transfers for one meter, and a few for retries
            for _ in range(STEPS + 12):
                self.clock.advance(700)
                self.run(self.deliverer.deliver_once())
                if not self.run(workable_count(self.db)):
                    break
            self.run(self.settled())
        finally:
            self.run(self.db.close())
            self.loop.close()
            shutil.rmtree(self.folder, ignore_errors=True)

    async def settled(self) -> None:
        views = await list_transfers(self.db, limit=10_000)
        assert {v.state for v in views} <= {"delivered", "cancelled"}
        for meter_id in METERS:
            delivered = sum(
                v.amount for v in views if v.meter_id == meter_id and v.state == "delivered"
            )
            assert self.links.links[meter_id].meter.snapshot().credit == START + delivered
        async with self.db.read() as session:
            deliveries = await session.scalar(
                select(func.count()).where(LedgerTransaction.kind == "delivery")
            )
            receipts = (await session.scalars(select(Receipt.number))).all()
        assert deliveries == sum(v.state == "delivered" for v in views)
        payments = await list_payments(self.db, limit=10_000)
        assert sorted(p.payment_id for p in payments) == sorted(self.payment_ids)
        assert sorted(receipts) == list(range(1, len(self.payment_ids) + 1))
        assert sorted(p.receipt for p in payments) == sorted(receipts)
        assert (await verify_chain(self.db)).broken is None
        assert await verify_ledger(self.db) is None


PaymentLoop.TestCase.settings = settings(
    max_examples=8,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPaymentLoop = PaymentLoop.TestCase
