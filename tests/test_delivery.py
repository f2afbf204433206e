"""The credit deliverer and its store on SQLite and PostgreSQL, against real firmware meters
behind in-memory links: a transfer delivered once with its ledger posting and notice, a lost
answer settled by reading back without a resend, a meter restart, a deliverer killed before
and after the envelope went out, a reversal before delivery (nothing reaches the meter) and
while the transfer is on its way, a command sequence passed by a command, a refusal, a
command still to go out, and two deliverers at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from cli.hes import app
from headend.domain.commands import Kind
from headend.domain.pricing import Code, PaymentRefused
from headend.domain.registry import CustomerRecord, MeterRecord, TariffRecord
from headend.links.base import RetryPolicy, send_command
from headend.links.endpoint import LinkOptions
from headend.links.memory import FaultPlan, MemoryLink
from headend.services.delivery import Deliverer, DeliverySettings
from headend.services.dispatcher import Dispatcher, DispatchSettings
from headend.services.poller import Poller
from headend.services.registry import route_of
from headend.services.serve import ServeSettings, serve
from headend.storage import Database, open_database
from headend.storage.audit import verify_chain, verify_ledger
from headend.storage.delivery import (
    Held,
    claim_transfers,
    get_transfer,
    list_transfers,
    start_attempt,
)
from headend.storage.ledger import (
    PaymentRequest,
    add_channel,
    check_balances,
    pay,
    reverse_payment,
    rotate_keypad,
    set_keypad,
)
from headend.storage.polling import active_targets
from headend.storage.registry import add_customer, add_tariff, import_meters
from headend.storage.schema import LedgerAccount, LedgerTransaction, Notification
from meter_sim.config import MeterConfig, StsConfig
from meter_sim.firmware import Meter
from meter_sim.keypad import key_data_from_config
from meter_sim.loads import load_for
from meter_sim.modbus_server import serve_tcp
from meter_sim.runtime import MeterRuntime
from protocols.clock import ManualClock, SystemClock
from protocols.commands import Command, CommandEnvelope, CommandResult
from protocols.errors import DeviceException, StorageError, ValidationError
from tests.databases import db_url, postgres_server
from tests.test_dispatcher import Links

__all__ = ["db_url", "postgres_server"]  # fixtures

T0 = 1_767_268_800.0  # 2026-01-01T12:00:00Z, a Thursday noon: no quiet hours
NOW = datetime.fromtimestamp(T0, UTC)
KEY = bytes.fromhex("00112233445566778899aabbccddeeff")
QUICK = RetryPolicy(backoff=0.001, max_backoff=0.004)
SETTINGS = DeliverySettings(attempt_timeout=0.3, lease=60.0, retry_base=timedelta(seconds=30))
METERS = ("MTR-1", "MTR-2", "MTR-3")
START = 10_000  # each meter's credit at the start, minor units
runner = CliRunner()


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = await open_database(db_url, check=False)
    await database.upgrade()
    await add_tariff(database, TariffRecord("RES", "KES", -2, (2500,), 5000, 1000), NOW, actor="t")
    rows = []
    for n, meter_id in enumerate(METERS):
        customer = CustomerRecord(f"Customer {n}", None, f"+25470000000{n}", "sms")
        await add_customer(database, customer, f"ACC-{n}", NOW, actor="t")
        endpoint = f"tcp://127.0.0.1:1/{n + 1}"
        record = MeterRecord(
            meter_id=meter_id,
            endpoint=endpoint,
            route=route_of(endpoint),
            customer=f"Customer {n}",
            account=f"ACC-{n}",
            tariff="RES",
            auth_key=KEY,
        )
        rows.append((n + 2, record))
    assert (await import_meters(database, rows, [], NOW, actor="t")).applied
    await add_channel(database, "KIOSK-1", "kiosk", NOW, actor="t")
    try:
        yield database
    finally:
        await database.close()


def _meter(meter_id: str, clock: ManualClock, **kw: object) -> Meter:
    config = MeterConfig(meter_id, **({"initial_credit": START, "auth_key": KEY.hex()} | kw))  # type: ignore[arg-type]
    return Meter(config, clock.now(), load_for(config))


def _setup(plan: FaultPlan | None = None, **meter: object) -> tuple[ManualClock, Links]:
    clock = ManualClock(T0)
    links = Links(
        {
            m: MemoryLink(_meter(m, clock, **meter), plan or FaultPlan(), timeout=0.05)
            for m in METERS
        }
    )
    return clock, links


def _deliverer(db: Database, links: Links, clock: ManualClock, worker: str = "d1") -> Deliverer:
    return Deliverer(db, links, clock, worker=worker, settings=SETTINGS, retry=QUICK)


def _now(clock: ManualClock) -> datetime:
    return datetime.fromtimestamp(clock.now(), UTC)


async def _pay(db: Database, clock: ManualClock, ref: str, meter: str, amount: str) -> int:
    answer = await pay(db, PaymentRequest("KIOSK-1", ref, meter, amount), _now(clock), actor="t")
    assert answer.answer["delivery"]["state"] == "pending_delivery"
    return int(answer.answer["payment_id"])


def _credit(links: Links, meter_id: str) -> int:
    return links.links[meter_id].meter.snapshot().credit


async def _balance(db: Database, code: str) -> int:
    async with db.read() as session:
        return int(
            await session.scalar(select(LedgerAccount.balance).where(LedgerAccount.code == code))
            or 0
        )


async def _deliveries(db: Database) -> int:
    async with db.read() as session:
        return int(
            await session.scalar(select(func.count()).where(LedgerTransaction.kind == "delivery"))
            or 0
        )


async def _notices(db: Database, kind: str) -> list[dict[str, str]]:
    async with db.read() as session:
        rows = (
            await session.scalars(
                select(Notification.payload)
                .where(Notification.kind == kind)
                .order_by(Notification.id)
            )
        ).all()
    return [json.loads(row) for row in rows]


async def _start(db: Database, held: Held, now: datetime) -> Held:
    started = await start_attempt(db, held, now)
    assert isinstance(started, Held)
    return started


async def _consistent(db: Database) -> None:
    assert all(c.cached == c.from_postings for c in await check_balances(db))
    assert (await verify_chain(db)).broken is None
    assert await verify_ledger(db) is None


async def test_a_transfer_is_delivered_once_posted_and_notified(db: Database) -> None:
    clock, links = _setup()
    payment = await _pay(db, clock, "R-1", "MTR-1", "100.00")
    deliverer = _deliverer(db, links, clock)
    assert (await deliverer.deliver_once()).outcomes == {"delivered": 1}
    assert _credit(links, "MTR-1") == START + 10_000
    assert links.links["MTR-1"].meter.snapshot().last_transfer == 1
    assert links.links["MTR-1"].executed == 1
    (view,) = await list_transfers(db)
    assert (view.payment_id, view.state, view.attempts, view.sequence) == (
        payment, "delivered", 1, 1,
    )  # fmt: skip
    assert view.delivered_at is not None
    # the credit's value moved from the prepaid balance to revenue, once
    assert await _balance(db, "prepaid:ACC-0:KES") == 0
    assert await _balance(db, "revenue:KES") == -10_000
    assert await _deliveries(db) == 1
    notices = await _notices(db, "payment_received")
    assert notices == [
        {"meter": "MTR-1", "amount": "100.00 KES", "balance": "200.00 KES", "token_line": ""}
    ]
    # nothing more to do: no second send, no second posting
    assert (await deliverer.deliver_once()).outcomes == {}
    assert links.links["MTR-1"].executed == 1
    assert await _deliveries(db) == 1
    await _consistent(db)


async def test_transfers_of_a_meter_go_in_number_order(db: Database) -> None:
    clock, links = _setup()
    for n in range(3):
        await _pay(db, clock, f"R-{n}", "MTR-1", "10.00")
    await _pay(db, clock, "R-X", "MTR-2", "20.00")
    deliverer = _deliverer(db, links, clock)
    rounds = [await deliverer.deliver_once() for _ in range(3)]
    assert [r.outcomes["delivered"] for r in rounds] == [2, 1, 1]  # one per meter at a time
    assert _credit(links, "MTR-1") == START + 3_000
    assert _credit(links, "MTR-2") == START + 2_000
    assert links.links["MTR-1"].meter.snapshot().last_transfer == 3
    await _consistent(db)


async def test_a_lost_answer_is_settled_by_asking_not_by_a_resend(db: Database) -> None:
    clock, links = _setup(FaultPlan(drop_answer=1.0, only=frozenset({"send"})))
    await _pay(db, clock, "R-1", "MTR-1", "100.00")
    assert (await _deliverer(db, links, clock).deliver_once()).outcomes == {"delivered": 1}
    link = links.links["MTR-1"]
    assert (link.executed, _credit(links, "MTR-1")) == (1, START + 10_000)


async def test_an_unconfirmed_attempt_is_read_back_before_any_resend(db: Database) -> None:
    # every answer is lost: the attempt ends unconfirmed, though the meter applied it
    clock, links = _setup(FaultPlan(drop_answer=1.0))
    await _pay(db, clock, "R-1", "MTR-1", "100.00")
    deliverer = _deliverer(db, links, clock)
    assert (await deliverer.deliver_once()).outcomes == {"sending": 1}
    link = links.links["MTR-1"]
    executed = link.executed
    assert _credit(links, "MTR-1") == START + 10_000
    (view,) = await list_transfers(db)
    assert view.state == "sending"
    assert view.last_error
    with pytest.raises(PaymentRefused) as refused:  # it may be on the meter: not cancelled
        await reverse_payment(db, 1, "paid twice", _now(clock), actor="t")
    assert refused.value.code is Code.IN_DELIVERY
    assert (await deliverer.deliver_once()).outcomes == {}  # backing off
    link.plan = FaultPlan()
    clock.advance(31)
    assert (await deliverer.deliver_once()).outcomes == {"delivered": 1}
    assert link.executed == executed  # read back: nothing sent again
    assert _credit(links, "MTR-1") == START + 10_000
    assert await _deliveries(db) == 1
    await _consistent(db)


async def test_a_meter_restart_loses_nothing_and_applies_nothing_twice(db: Database) -> None:
    clock, links = _setup(FaultPlan(drop_answer=1.0))
    await _pay(db, clock, "R-1", "MTR-1", "100.00")
    await _pay(db, clock, "R-2", "MTR-1", "50.00")
    deliverer = _deliverer(db, links, clock)
    assert (await deliverer.deliver_once()).outcomes == {"sending": 1}
    old = links.links["MTR-1"]
    clock.advance(60)
    restarted = Meter.from_state(old.meter.config, old.meter.to_state(), clock.now(),
                                 old.meter.load)  # fmt: skip
    links.links["MTR-1"] = MemoryLink(restarted, timeout=0.05)
    assert restarted.snapshot().last_transfer == 1
    assert (await deliverer.deliver_once()).outcomes == {"delivered": 1}  # read back
    assert links.links["MTR-1"].executed == 0
    assert (await deliverer.deliver_once()).outcomes == {"delivered": 1}  # the next one
    assert _credit(links, "MTR-1") == START + 15_000
    assert restarted.snapshot().last_transfer == 2
    await _consistent(db)


async def test_a_deliverer_killed_before_the_send_sends_it_after(db: Database) -> None:
    clock, links = _setup()
    await _pay(db, clock, "R-1", "MTR-1", "100.00")
    now = _now(clock)
    (held,) = await claim_transfers(db, "dead", now, now + timedelta(seconds=60), 10)
    started = await _start(db, held, now)
    # killed here: 'sending', its envelope stored, never sent; the lease runs out
    assert (await get_transfer(db, held.id)).state == "sending"
    deliverer = _deliverer(db, links, clock)
    assert (await deliverer.deliver_once()).outcomes == {}  # still leased
    clock.advance(61)
    assert (await deliverer.deliver_once()).outcomes == {"delivered": 1}
    link = links.links["MTR-1"]
    assert (link.executed, _credit(links, "MTR-1")) == (1, START + 10_000)
    view = await get_transfer(db, held.id)
    assert started.envelope is not None
    assert (view.sequence, view.attempts) == (started.envelope.sequence, 2)
    await _consistent(db)


async def test_a_deliverer_killed_after_the_send_does_not_send_again(db: Database) -> None:
    clock, links = _setup()
    await _pay(db, clock, "R-1", "MTR-1", "100.00")
    now = _now(clock)
    (held,) = await claim_transfers(db, "dead", now, now + timedelta(seconds=60), 10)
    started = await _start(db, held, now)
    assert started.envelope is not None
    link = links.links["MTR-1"]
    assert (await link.execute(started.envelope)).code.accepted
    # killed before it recorded the answer
    clock.advance(61)
    deliverer = _deliverer(db, links, clock)
    assert (await deliverer.deliver_once()).outcomes == {"delivered": 1}
    assert (link.executed, _credit(links, "MTR-1")) == (1, START + 10_000)
    await _consistent(db)


async def test_a_reversal_before_delivery_sends_nothing(db: Database) -> None:
    clock, links = _setup()
    payment = await _pay(db, clock, "R-1", "MTR-1", "100.00")
    view = await reverse_payment(db, payment, "paid twice", _now(clock), actor="t")
    assert view.delivery_state == "cancelled"
    assert (await _deliverer(db, links, clock).deliver_once()).outcomes == {}
    assert links.links["MTR-1"].executed == 0
    assert _credit(links, "MTR-1") == START
    assert await _balance(db, "prepaid:ACC-0:KES") == 0
    assert await _deliveries(db) == 0
    await _consistent(db)


async def test_a_reversal_waits_for_a_leased_transfer_and_the_lease_fences_it(
    db: Database,
) -> None:
    clock, links = _setup()
    payment = await _pay(db, clock, "R-1", "MTR-1", "100.00")
    now = _now(clock)
    (held,) = await claim_transfers(db, "slow", now, now + timedelta(seconds=60), 10)
    with pytest.raises(PaymentRefused) as refused:
        await reverse_payment(db, payment, "paid twice", now, actor="t")
    assert refused.value.code is Code.IN_DELIVERY
    clock.advance(61)  # the worker died holding it: its lease ends, the reversal goes through
    await reverse_payment(db, payment, "paid twice", _now(clock), actor="t")
    assert await start_attempt(db, held, _now(clock)) is None  # its fence does not hold
    assert (await _deliverer(db, links, clock).deliver_once()).outcomes == {}
    assert links.links["MTR-1"].executed == 0
    await _consistent(db)


async def test_a_reversal_after_delivery_becomes_debt(db: Database) -> None:
    clock, links = _setup()
    payment = await _pay(db, clock, "R-1", "MTR-1", "100.00")
    assert (await _deliverer(db, links, clock).deliver_once()).outcomes == {"delivered": 1}
    await reverse_payment(db, payment, "chargeback", _now(clock), actor="t")
    assert await _balance(db, "prepaid:ACC-0:KES") == 0
    assert await _balance(db, "debt:ACC-0:KES") == 10_000
    assert await _balance(db, "revenue:KES") == -10_000
    await _consistent(db)


async def test_a_command_that_passed_the_sequence_gets_the_transfer_signed_again(
    db: Database,
) -> None:
    clock, links = _setup()
    await _pay(db, clock, "R-1", "MTR-1", "100.00")
    now = _now(clock)
    (held,) = await claim_transfers(db, "w0", now, now + timedelta(seconds=1), 10)
    await _start(db, held, now)  # signed under sequence 1, never sent
    link = links.links["MTR-1"]
    # a command sent around the head-end takes sequence 1 on the meter first
    await send_command(link, Command.set_clock(int(T0)), KEY)
    clock.advance(31)
    assert (await _deliverer(db, links, clock).deliver_once()).outcomes == {"delivered": 1}
    view = await get_transfer(db, held.id)
    # attempts: the killed one, its envelope again (refused as replayed), signed anew
    assert (view.sequence, view.attempts) == (2, 3)
    assert _credit(links, "MTR-1") == START + 10_000
    await _consistent(db)


async def test_a_command_still_to_go_out_goes_first(db: Database) -> None:
    clock, links = _setup()
    dispatcher = Dispatcher(
        db, links, clock, worker="disp", settings=DispatchSettings(attempt_timeout=0.3),
        retry=QUICK,
    )  # fmt: skip
    queued = await dispatcher.queue("MTR-1", Kind.DISCONNECT, "test", "t")
    await _pay(db, clock, "R-1", "MTR-1", "100.00")
    deliverer = _deliverer(db, links, clock)
    assert (await deliverer.deliver_once()).outcomes == {"pending_delivery": 1}
    assert (await dispatcher.dispatch_once()).outcomes == {"verified": 1}
    clock.advance(6)
    assert (await deliverer.deliver_once()).outcomes == {"delivered": 1}
    assert (await get_transfer(db, 1)).sequence == queued.sequence + 1
    assert _credit(links, "MTR-1") == START + 10_000


async def test_a_refused_transfer_fails_tells_operators_and_can_be_reversed(
    db: Database,
) -> None:
    clock, links = _setup(max_topup=5_000)
    payment = await _pay(db, clock, "R-1", "MTR-1", "100.00")
    await _pay(db, clock, "R-2", "MTR-1", "20.00")
    deliverer = _deliverer(db, links, clock)
    assert (await deliverer.deliver_once()).outcomes == {"failed": 1}
    (failed,) = await _notices(db, "command_failed")
    assert failed["command"] == "credit transfer 1"
    assert "amount_out_of_bounds" in failed["reason"]
    assert (await deliverer.deliver_once()).outcomes == {"delivered": 1}  # the next one
    assert _credit(links, "MTR-1") == START + 2_000
    view = await reverse_payment(db, payment, "the meter refused it", _now(clock), actor="t")
    assert view.delivery_state == "cancelled"
    assert await _balance(db, "prepaid:ACC-0:KES") == 0
    await _consistent(db)


class RefusingLink(MemoryLink):
    """A link whose meter refuses every envelope at the protocol level (an exception reply)."""

    async def send_envelope(self, envelope: CommandEnvelope, timeout: float) -> CommandResult:
        raise DeviceException("exception 4: slave device failure", 4)


async def test_a_protocol_refusal_fails_only_once_read_back_shows_nothing_applied(
    db: Database,
) -> None:
    clock, links = _setup()
    await _pay(db, clock, "R-1", "MTR-1", "100.00")
    await _pay(db, clock, "R-2", "MTR-2", "100.00")
    now = _now(clock)
    (first, _) = await claim_transfers(db, "dead", now, now + timedelta(seconds=60), 10)
    started = await _start(db, first, now)
    assert started.envelope is not None
    links.links["MTR-1"].meter.execute(started.envelope)  # applied; then the worker died
    for meter_id in ("MTR-1", "MTR-2"):
        links.links[meter_id] = RefusingLink(links.links[meter_id].meter, timeout=0.05)
    clock.advance(61)
    outcomes = (await _deliverer(db, links, clock).deliver_once()).outcomes
    assert outcomes == {"delivered": 1, "failed": 1}
    states = {v.meter_id: v.state for v in await list_transfers(db)}
    assert states == {"MTR-1": "delivered", "MTR-2": "failed"}  # read back: MTR-1 has it
    assert (_credit(links, "MTR-1"), _credit(links, "MTR-2")) == (START + 10_000, START)
    await _consistent(db)


async def test_two_deliverers_apply_each_transfer_once(db: Database) -> None:
    clock, links = _setup(FaultPlan(drop_answer=0.3, seed=7))
    paid = {meter_id: 0 for meter_id in METERS}
    for n in range(4):
        for meter_id in METERS:
            await _pay(db, clock, f"R-{meter_id}-{n}", meter_id, f"{n + 1}.00")
            paid[meter_id] += (n + 1) * 100
    first, second = _deliverer(db, links, clock, "d1"), _deliverer(db, links, clock, "d2")
    for _ in range(40):
        await asyncio.gather(first.deliver_once(), second.deliver_once())
        if not await list_transfers(db, states=["pending_delivery", "sending"]):
            break
        clock.advance(700)
    for meter_id in METERS:
        assert _credit(links, meter_id) == START + paid[meter_id]
        assert links.links[meter_id].meter.snapshot().last_transfer == 4
    views = await list_transfers(db)
    assert {v.state for v in views} == {"delivered"}
    assert await _deliveries(db) == 12
    assert len(await _notices(db, "payment_received")) == 12
    await _consistent(db)


@pytest.mark.parametrize("seed", [1, 2])
async def test_money_confirmed_equals_credit_received_after_random_faults(
    db: Database, seed: int
) -> None:
    """Payments, reversals, lost requests and answers, dropped connections, meter restarts and
    deliverers killed mid-pass, at random: at the end every meter holds exactly the credit of
    its delivered transfers, each posted once, and the ledger verifies."""
    rng = random.Random(seed)
    clock = ManualClock(T0)
    faults = FaultPlan(drop_request=0.3, drop_answer=0.3, disconnect=0.1, seed=seed)
    links = Links({m: MemoryLink(_meter(m, clock), faults, timeout=0.02) for m in METERS})
    settings = replace(SETTINGS, attempt_timeout=0.08)  # attempts often end unconfirmed

    def new_deliverer(worker: str) -> Deliverer:
        return Deliverer(db, links, clock, worker=worker, settings=settings, retry=QUICK)

    workers = 0
    deliverer = new_deliverer("w0")
    payments: list[int] = []
    for step in range(60):
        action = rng.random()
        if action < 0.45:
            meter_id = rng.choice(METERS)
            amount = f"{rng.randint(1, 30)}.00"
            payments.append(await _pay(db, clock, f"R-{step}", meter_id, amount))
        elif action < 0.55 and payments:
            with contextlib.suppress(PaymentRefused):  # in delivery, or reversed already
                await reverse_payment(db, rng.choice(payments), "test", _now(clock), actor="t")
        elif action < 0.65:
            meter_id = rng.choice(METERS)
            old = links.links[meter_id].meter
            restarted = Meter.from_state(old.config, old.to_state(), clock.now(), old.load)
            links.links[meter_id] = MemoryLink(restarted, faults, timeout=0.02)
        elif action < 0.75:  # killed mid-send, before or after the envelope went out
            workers += 1
            now = _now(clock)
            held = await claim_transfers(db, f"dead{workers}", now, now + timedelta(seconds=60), 1)
            started = await start_attempt(db, held[0], now) if held else None
            if isinstance(started, Held) and started.envelope is not None and rng.random() < 0.5:
                links.links[started.meter_id].meter.execute(started.envelope)
            deliverer = new_deliverer(f"w{workers}")  # takes over once the lease runs out
            clock.advance(61)
        else:
            await deliverer.deliver_once()
        clock.advance(rng.choice([1, 31, 700]))
    for link in links.links.values():
        link.plan = FaultPlan()
    for _ in range(20):
        clock.advance(700)
        await deliverer.deliver_once()
    views = await list_transfers(db, limit=1000)
    assert {v.state for v in views} <= {"delivered", "cancelled"}
    for meter_id in METERS:
        delivered = sum(v.amount for v in views if v.meter_id == meter_id
                        and v.state == "delivered")  # fmt: skip
        assert _credit(links, meter_id) == START + delivered
    assert await _deliveries(db) == sum(v.state == "delivered" for v in views)
    await _consistent(db)


# -- keypad tokens --------------------------------------------------------------------------------

STS = StsConfig(vending_key="abababababababab", drn="00000000000")


async def _keypad(db: Database, clock: ManualClock) -> tuple[Links, Meter]:
    """A keypad meter KP-1 (energy credit, STS key data kept) behind an in-memory link."""
    endpoint = "tcp://127.0.0.1:1/9"
    record = MeterRecord(
        meter_id="KP-1", endpoint=endpoint, route=route_of(endpoint), customer="Keypad",
        account="ACC-K", tariff="RES", credit_unit="energy",
    )  # fmt: skip
    customer = CustomerRecord("Keypad", None, "+254700000099", "sms")
    await add_customer(db, customer, "ACC-K", NOW, actor="t")
    assert (await import_meters(db, [(2, record)], [], NOW, actor="t")).applied
    assert await set_keypad(db, "KP-1", key_data_from_config(STS), NOW, actor="t")
    meter = _meter("KP-1", clock, credit_unit="energy", sts=STS, initial_credit=1_000)
    return Links({"KP-1": MemoryLink(meter, timeout=0.05)}), meter


async def test_a_token_is_delivered_when_its_meter_reports_it_accepted(db: Database) -> None:
    clock = ManualClock(T0)
    links, meter = await _keypad(db, clock)
    first = await pay(db, PaymentRequest("KIOSK-1", "K-1", "KP-1", "50.00"), NOW, actor="t")
    second = await pay(db, PaymentRequest("KIOSK-1", "K-2", "KP-1", "25.00"), NOW, actor="t")
    token, tid = first.answer["token"], first.answer["delivery"]["number"]
    assert (first.answer["delivery"]["state"], first.answer["split"]["wh"]) == ("issued", 2_000)
    deliverer = _deliverer(db, links, clock)
    assert (await deliverer.deliver_once()).outcomes == {}  # not keyed in yet
    assert meter.enter_token(token).result.accepted  # the customer keys in the first one
    clock.advance(60)
    (target,) = await active_targets(db, ["KP-1"])
    assert (await Poller(db, links, clock).read(target)).ok  # the poll stores the meter's events
    assert (await deliverer.deliver_once()).outcomes == {"token accepted": 1}
    views = {v.payment_id: v for v in await list_transfers(db, meter_id="KP-1")}
    assert views[first.answer["payment_id"]].state == "delivered"
    assert views[first.answer["payment_id"]].number == tid
    assert views[second.answer["payment_id"]].state == "issued"  # the other one is not
    assert await _balance(db, "revenue:KES") == -first.answer["split"]["credit_value"]
    (notice,) = await _notices(db, "payment_received")
    assert notice["amount"] == "50.00 KES"
    assert notice["balance"] == "3.000 kWh"
    assert notice["token_line"] == f" Token: {token}."
    assert (await deliverer.deliver_once()).outcomes == {}  # once
    await _consistent(db)


async def test_a_key_rotation_gives_the_meter_key_change_tokens_it_accepts(
    db: Database,
) -> None:
    clock = ManualClock(T0)
    links, meter = await _keypad(db, clock)
    new_key = bytes.fromhex("0123456789abcdef")
    change = await rotate_keypad(db, "KP-1", new_key, NOW, actor="t", krn=2)
    assert (change.key.krn, change.rollover) == (2, False)
    for token in (change.first, change.second):  # keyed in, in order
        assert meter.enter_token(token.digits).result.accepted
    answer = await pay(db, PaymentRequest("KIOSK-1", "K-1", "KP-1", "50.00"), NOW, actor="t")
    assert meter.enter_token(answer.answer["token"]).result.accepted  # under the new key
    clock.advance(60)
    (target,) = await active_targets(db, ["KP-1"])
    assert (await Poller(db, links, clock).read(target)).ok
    deliverer = _deliverer(db, links, clock)
    assert (await deliverer.deliver_once()).outcomes == {"token accepted": 1}
    with pytest.raises(ValidationError):  # nothing would change
        await rotate_keypad(db, "KP-1", new_key, NOW, actor="t")
    with pytest.raises(StorageError):  # no key data to move from
        await rotate_keypad(db, "MTR-1", new_key, NOW, actor="t")
    await _consistent(db)


# -- end to end -----------------------------------------------------------------------------------


async def test_payments_reach_a_meter_over_modbus_tcp_once(tmp_path: Path) -> None:
    """`hes pay`, then `hes transfers deliver` (one pass now) and `hes serve`, over Modbus TCP
    to a simulated meter: its credit rises by exactly what was credited, and the audit chain
    and the ledger verify."""
    clock = ManualClock(T0)  # the meter's clock stands still: no consumption meanwhile
    runtime = MeterRuntime.open(
        MeterConfig("MTR-9", modbus_unit=1, initial_credit=START, auth_key=KEY.hex()),
        clock,
        tmp_path / "meter",
    )
    url = f"sqlite:///{tmp_path / 'hes.db'}"
    db = await open_database(url, check=False)
    stop = asyncio.Event()

    def hes(*args: str) -> Any:
        return asyncio.to_thread(runner.invoke, app, [*args, "--db", url])

    try:
        async with serve_tcp([runtime]) as service:
            await db.upgrade()
            await add_tariff(db, TariffRecord("RES", "KES", -2, (2500,), 5000, 1000), NOW,
                             actor="t")  # fmt: skip
            await add_customer(db, CustomerRecord("Zawadi", None, "+254700000009", "sms"),
                               "ACC-9", NOW, actor="t")  # fmt: skip
            endpoint = f"tcp://127.0.0.1:{service.port}/1"
            record = MeterRecord(
                meter_id="MTR-9", endpoint=endpoint, route=route_of(endpoint),
                customer="Zawadi", account="ACC-9", tariff="RES", auth_key=KEY,
            )  # fmt: skip
            assert (await import_meters(db, [(2, record)], [], NOW, actor="t")).applied
            assert (await hes("channels", "add", "KIOSK-9", "--kind", "kiosk")).exit_code == 0
            paid = await hes("pay", "--channel", "KIOSK-9", "--ref", "E-1", "--meter", "MTR-9",
                             "--amount", "123.45", "--json")  # fmt: skip
            assert paid.exit_code == 0, paid.output
            delivered = await hes("transfers", "deliver", "--timeout", "10", "--json")
            assert delivered.exit_code == 0, delivered.output
            (first,) = json.loads(delivered.output)
            assert (first["state"], first["number"], first["amount"]) == ("delivered", 1, 12_345)
            assert runtime.snapshot().credit == START + 12_345
            # `hes serve` delivers the next one by itself
            settings = ServeSettings(
                db_url=url, worker="e2e", poll=False, monitor_every=None, dispatch=None,
                link_options=LinkOptions(timeout=2.0, retries=1),
                delivery=DeliverySettings(attempt_timeout=2.0),
            )  # fmt: skip
            task = asyncio.create_task(serve(settings, SystemClock(), stop))
            again = await hes("pay", "--channel", "KIOSK-9", "--ref", "E-2", "--meter", "MTR-9",
                              "--amount", "50.00")  # fmt: skip
            assert again.exit_code == 0, again.output
            async with asyncio.timeout(15):
                while runtime.snapshot().last_transfer < 2:  # noqa: ASYNC110 - nothing signals
                    await asyncio.sleep(0.05)
            stop.set()
            await asyncio.wait_for(task, 10)
            assert runtime.snapshot().credit == START + 12_345 + 5_000
            listed = await hes("transfers", "list", "--json")
            assert [t["state"] for t in json.loads(listed.output)] == ["delivered", "delivered"]
            shown = await hes("transfers", "show", "1")
            assert "delivered" in shown.output
            assert (await hes("audit", "verify")).exit_code == 0
    finally:
        stop.set()
        await db.close()


async def _state_of(db: Database, payment_id: int) -> str:
    (view,) = [t for t in await list_transfers(db) if t.payment_id == payment_id]
    return view.state


async def _until_delivered(db: Database, payment_id: int) -> None:
    async with asyncio.timeout(30):  # the tick is an hour: only a wake-up gets it there
        while await _state_of(db, payment_id) != "delivered":  # noqa: ASYNC110 - no signal
            await asyncio.sleep(0.01)


async def test_a_woken_deliverer_delivers_at_once_and_a_meters_next_transfer_follows(
    db: Database,
) -> None:
    clock, links = _setup()
    first = [await _pay(db, clock, f"R-{n}", "MTR-1", "10.00") for n in range(3)]
    deliverer = _deliverer(db, links, clock)
    stop = asyncio.Event()
    running = asyncio.create_task(deliverer.run(stop, tick=3600.0))
    try:
        # one at a time, each claimed as soon as the one before it ended
        await _until_delivered(db, first[-1])
        assert links.links["MTR-1"].meter.snapshot().last_transfer == 3
        # a payment written while the deliverer waits for its tick: the wake-up brings it
        later = await _pay(db, clock, "R-L", "MTR-2", "20.00")
        deliverer.wake()
        await _until_delivered(db, later)
        assert _credit(links, "MTR-2") == START + 2_000
    finally:
        stop.set()
        await running
    assert links.links["MTR-1"].executed == 3
    await _consistent(db)


async def test_the_api_calls_its_hook_once_per_new_payment(db: Database) -> None:
    import httpx

    from headend.api import create_app

    clock = ManualClock(T0)
    _, key = await add_channel(db, "WALLET-1", "mobile", _now(clock), actor="t")
    calls: list[None] = []
    app = create_app(db, clock, taken=lambda: calls.append(None))
    body = {"reference": "W-1", "meter_id": "MTR-1", "amount": 10_000, "currency": "KES",
            "paid_at": _now(clock).isoformat()}  # fmt: skip
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://hes",
        headers={"Authorization": f"Bearer {key}"},
    ) as client:
        assert (await client.post("/v1/payments", json=body)).status_code == 201
        assert (await client.post("/v1/payments", json=body)).status_code == 200  # a repeat
        refused = await client.post("/v1/payments", json=body | {"meter_id": "NOPE"})
        assert refused.status_code >= 400
    assert len(calls) == 1


async def test_a_payment_another_worker_commits_wakes_a_deliverer_on_postgresql(
    db: Database,
) -> None:
    if db.dialect != "postgresql":
        pytest.skip("commits notify listeners on PostgreSQL; SQLite is woken in process")
    from sqlalchemy import text

    clock, links = _setup()
    deliverer = _deliverer(db, links, clock)
    stop = asyncio.Event()
    running = asyncio.create_task(deliverer.run(stop, tick=3600.0))
    other = await open_database(db.url)  # another worker's
    try:

        async def listening() -> bool:
            async with other.read() as session:
                found = await session.scalar(
                    text("SELECT count(*) FROM pg_stat_activity WHERE query = :q"),
                    {"q": "LISTEN hes_credit_transfers"},
                )
            return bool(found)

        async with asyncio.timeout(30):
            while not await listening():  # noqa: ASYNC110 - nothing else tells
                await asyncio.sleep(0.01)
        payment = await _pay(other, clock, "R-O", "MTR-3", "30.00")
        await _until_delivered(db, payment)  # the tick is an hour away
        assert _credit(links, "MTR-3") == START + 3_000
    finally:
        stop.set()
        await running
        await other.close()
    await _consistent(db)
