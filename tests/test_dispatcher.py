"""The command dispatcher and its store on SQLite and PostgreSQL, against real firmware meters
behind in-memory links: a command's whole life, one in flight per meter and kind, supersession,
lost answers and unreachable meters, refusals, cancellation, a restart in every state, two
dispatchers at once, and the policy queueing commands."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from headend.domain.commands import IllegalTransition, Kind, unpack_envelope
from headend.domain.policy import Calendar
from headend.domain.registry import CustomerRecord, MeterRecord, TariffRecord
from headend.domain.validation import Findings
from headend.links.base import MeterLink, RetryPolicy
from headend.links.memory import FaultPlan, MemoryLink
from headend.services.dispatcher import Dispatcher, DispatchSettings
from headend.services.registry import route_of
from headend.storage import Database, open_database
from headend.storage.audit import verify_chain
from headend.storage.commands import Request, cancel_command, get_command, list_commands
from headend.storage.ledger import PaymentRequest, add_channel, pay
from headend.storage.polling import PollTarget
from headend.storage.readings import reading_row, store_readings
from headend.storage.registry import add_customer, add_tariff, import_meters
from headend.storage.schema import Account, CommandRow, Notification
from headend.storage.schema import Meter as MeterRow
from headend.storage.supply import PolicyInput, policy_inputs
from meter_sim.config import MeterConfig
from meter_sim.firmware import Meter
from meter_sim.loads import load_for
from protocols.clock import ManualClock
from protocols.commands import ResultCode
from protocols.disconnect import ControlState
from protocols.errors import LinkError, StorageError, ValidationError
from tests.databases import db_url, postgres_server
from tests.test_domain_readings import SNAP

__all__ = ["db_url", "postgres_server"]  # fixtures

T0 = 1_767_268_800.0  # 2026-01-01T12:00:00Z, a Thursday noon: no friendly hours, no quiet
NOW = datetime.fromtimestamp(T0, UTC)
KEY = bytes.fromhex("00112233445566778899aabbccddeeff")
QUICK = RetryPolicy(backoff=0.001, max_backoff=0.004)
SETTINGS = DispatchSettings(
    attempt_timeout=0.3, retry_base=timedelta(seconds=30), deadline=timedelta(minutes=10)
)


class Links:
    """A link source of in-memory links over firmware meters."""

    def __init__(self, links: dict[str, MemoryLink]) -> None:
        self.links = links
        self.unreachable: set[str] = set()

    async def link(self, target: PollTarget) -> MeterLink:
        if target.meter_id in self.unreachable:
            raise LinkError(f"{target.meter_id}: connection refused")
        return self.links[target.meter_id]

    async def discard(self, target: PollTarget) -> None:
        return None

    def lanes(self, target: PollTarget) -> int | None:
        return None  # every link is a meter of its own


def _meter(meter_id: str, clock: ManualClock, **kw: object) -> Meter:
    config = MeterConfig(meter_id, **({"initial_credit": 10_000, "auth_key": KEY.hex()} | kw))  # type: ignore[arg-type]
    return Meter(config, clock.now(), load_for(config))


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = await open_database(db_url, check=False)
    await database.upgrade()
    await add_tariff(database, TariffRecord("RES", "KES", -2, (2500,), 5000, 1000), NOW, actor="t")
    await add_customer(
        database, CustomerRecord("Amina", None, "+254700000001", "sms"), "ACC-1", NOW, actor="t"
    )
    rows = [
        (
            n + 2,
            MeterRecord(
                meter_id=meter_id,
                endpoint=f"tcp://127.0.0.1:1/{n + 1}",
                route=route_of(f"tcp://127.0.0.1:1/{n + 1}"),
                customer="Amina" if n == 0 else None,
                account="ACC-1" if n == 0 else None,
                tariff="RES",
                auth_key=KEY,
            ),
        )
        for n, meter_id in enumerate(["MTR-1", "MTR-2", "MTR-3"])
    ]
    assert (await import_meters(database, rows, [], NOW, actor="t")).applied
    try:
        yield database
    finally:
        await database.close()


def _setup(
    plan: FaultPlan | None = None, **meter: object
) -> tuple[ManualClock, dict[str, Meter], Links]:
    clock = ManualClock(T0)
    meters = {m: _meter(m, clock, **meter) for m in ("MTR-1", "MTR-2", "MTR-3")}
    links = Links(
        {m: MemoryLink(meter, plan or FaultPlan(), timeout=0.05) for m, meter in meters.items()}
    )
    return clock, meters, links


def _dispatcher(db: Database, links: Links, clock: ManualClock, worker: str = "w1") -> Dispatcher:
    return Dispatcher(db, links, clock, worker=worker, settings=SETTINGS, retry=QUICK)


async def _notices(db: Database) -> list[tuple[str, str]]:
    async with db.read() as session:
        rows = await session.execute(
            select(Notification.kind, Notification.address).order_by(Notification.id)
        )
        return [(kind, address) for kind, address in rows.all()]


async def test_a_disconnect_is_sent_acknowledged_and_verified(db: Database) -> None:
    clock, meters, links = _setup()
    dispatcher = _dispatcher(db, links, clock)
    queued = await dispatcher.queue("MTR-1", Kind.DISCONNECT, "operator test", "op:ann")
    assert queued.created
    assert queued.sequence == 1
    result = await dispatcher.dispatch_once()
    assert result.outcomes == {"verified": 1}
    assert meters["MTR-1"].snapshot().control_state is ControlState.DISCONNECTED
    assert links.links["MTR-1"].executed == 1
    view = await get_command(db, queued.command_id)
    assert view.state == "verified"
    assert view.attempts == 1
    assert view.result_code == 0
    assert [(t.old, t.new) for t in view.transitions] == [
        ("", "queued"),
        ("queued", "sent"),
        ("sent", "acknowledged"),
        ("acknowledged", "verified"),
    ]
    assert view.transitions[0].actor == "op:ann"
    assert await _notices(db) == [("disconnected", "+254700000001")]
    assert (await verify_chain(db)).broken is None
    assert (await dispatcher.dispatch_once()).outcomes == {}  # nothing left to do
    # the send, then the acknowledgement with the verification (after the read-back)
    assert dispatcher.recorder.transactions == 2


async def test_an_acknowledgement_is_kept_when_the_read_back_fails(db: Database) -> None:
    """The acknowledgement goes in with the verification; when the relay cannot be read back,
    it is written alone, and the next claim reads back without sending again."""
    clock, meters, links = _setup()
    links.links["MTR-1"] = MemoryLink(
        meters["MTR-1"], FaultPlan(drop_answer=1.0, only=frozenset({"snapshot"})), timeout=0.05
    )
    dispatcher = _dispatcher(db, links, clock)
    queued = await dispatcher.queue("MTR-1", Kind.DISCONNECT, "read-back test", "op")
    assert (await dispatcher.dispatch_once()).outcomes == {"acknowledged": 1}
    view = await get_command(db, queued.command_id)
    assert view.state == "acknowledged"
    assert [t.new for t in view.transitions] == ["queued", "sent", "acknowledged"]
    executed = links.links["MTR-1"].executed
    links.links["MTR-1"] = MemoryLink(meters["MTR-1"], FaultPlan(), timeout=0.05)
    clock.advance(31)
    assert (await dispatcher.dispatch_once()).outcomes == {"verified": 1}
    assert links.links["MTR-1"].executed == 0  # not sent again
    assert executed == 1
    view = await get_command(db, queued.command_id)
    assert [t.new for t in view.transitions] == ["queued", "sent", "acknowledged", "verified"]
    assert (await verify_chain(db)).broken is None


async def test_one_command_of_a_kind_in_flight_and_the_newer_kind_supersedes(
    db: Database,
) -> None:
    clock, meters, links = _setup()
    dispatcher = _dispatcher(db, links, clock)
    first = await dispatcher.queue("MTR-2", Kind.RECONNECT, "restore", "op")
    again = await dispatcher.queue("MTR-2", Kind.RECONNECT, "restore again", "op")
    assert (again.command_id, again.created) == (first.command_id, False)
    cut = await dispatcher.queue("MTR-2", Kind.DISCONNECT, "changed my mind", "op")
    assert cut.superseded == (first.command_id,)
    assert cut.sequence == first.sequence + 1
    old = await get_command(db, first.command_id)
    assert old.state == "superseded"
    assert old.superseded_by == cut.command_id
    assert (await dispatcher.dispatch_once()).outcomes == {"verified": 1}
    assert links.links["MTR-2"].executed == 1  # the superseded reconnect never went out
    assert meters["MTR-2"].snapshot().control_state is ControlState.DISCONNECTED


async def test_lost_answers_still_run_the_command_once(db: Database) -> None:
    clock, meters, links = _setup(FaultPlan(drop_answer=0.5, seed=3, only=frozenset({"send"})))
    dispatcher = _dispatcher(db, links, clock)
    for n in range(6):
        kind = Kind.DISCONNECT if n % 2 == 0 else Kind.RECONNECT
        await dispatcher.queue("MTR-3", kind, f"round {n}", "op")
        outcome = await dispatcher.dispatch_once()
        assert outcome.outcomes == {"verified": 1}
    snapshot = meters["MTR-3"].snapshot()
    assert snapshot.last_command_seq == 6
    assert links.links["MTR-3"].faults  # answers were lost, and asked for
    commands = await list_commands(db, meter_id="MTR-3")
    assert [c.state for c in commands] == ["verified"] * 6


async def test_an_unreachable_meter_is_retried_then_expires_with_a_notice(db: Database) -> None:
    clock, meters, links = _setup()
    links.unreachable.add("MTR-1")
    dispatcher = _dispatcher(db, links, clock)
    queued = await dispatcher.queue("MTR-1", Kind.DISCONNECT, "test", "op")
    assert (await dispatcher.dispatch_once()).outcomes == {"queued": 1}
    assert (await dispatcher.dispatch_once()).outcomes == {}  # backing off
    clock.advance(31)
    links.unreachable.clear()
    links.links["MTR-1"].plan = FaultPlan(drop_request=1.0)  # reachable, never answers
    assert (await dispatcher.dispatch_once()).outcomes == {"retrying": 1}
    view = await get_command(db, queued.command_id)
    assert view.state == "retrying"
    assert view.last_error
    assert "no confirmation" in view.last_error
    for _ in range(10):
        clock.advance(120)
        if (await dispatcher.dispatch_once()).outcomes.get("expired"):
            break
    view = await get_command(db, queued.command_id)
    assert view.state == "expired"
    assert ("command_failed", "operators") in await _notices(db)
    assert meters["MTR-1"].snapshot().control_state is ControlState.CONNECTED


async def test_a_refused_command_fails_and_tells_operators(db: Database) -> None:
    clock, _meters, links = _setup(control_mode=0)  # mode 0: never disconnected
    dispatcher = _dispatcher(db, links, clock)
    queued = await dispatcher.queue("MTR-2", Kind.DISCONNECT, "test", "op")
    assert (await dispatcher.dispatch_once()).outcomes == {"failed": 1}
    view = await get_command(db, queued.command_id)
    assert view.result_code == int(ResultCode.REFUSED_BY_MODE)
    assert "refused_by_mode" in (view.last_error or "")
    assert await _notices(db) == [("command_failed", "operators")]


async def test_a_reconnect_of_a_connected_meter_is_verified_without_a_change(
    db: Database,
) -> None:
    clock, meters, links = _setup()
    dispatcher = _dispatcher(db, links, clock)
    await dispatcher.queue("MTR-1", Kind.RECONNECT, "make sure", "op")
    assert (await dispatcher.dispatch_once()).outcomes == {"verified": 1}
    assert meters["MTR-1"].snapshot().control_state is ControlState.CONNECTED


async def test_cancel_before_sending_only(db: Database) -> None:
    clock, _meters, links = _setup()
    dispatcher = _dispatcher(db, links, clock)
    queued = await dispatcher.queue("MTR-1", Kind.DISCONNECT, "test", "op")
    with pytest.raises(ValidationError, match="reason"):
        await cancel_command(db, queued.command_id, actor="op", reason=" ", now=NOW)
    view = await cancel_command(db, queued.command_id, actor="op", reason="wrong meter", now=NOW)
    assert view.state == "cancelled"
    assert (await dispatcher.dispatch_once()).outcomes == {}
    assert links.links["MTR-1"].executed == 0
    done = await dispatcher.queue("MTR-1", Kind.DISCONNECT, "test", "op")
    await dispatcher.dispatch_once()
    with pytest.raises(IllegalTransition, match="verified already"):
        await cancel_command(db, done.command_id, actor="op", reason="late", now=NOW)
    with pytest.raises(StorageError, match="no command 999"):
        await cancel_command(db, 999, actor="op", reason="x", now=NOW)
    assert (await verify_chain(db)).broken is None


async def test_bad_requests_change_nothing(db: Database) -> None:
    clock, _meters, links = _setup()
    dispatcher = _dispatcher(db, links, clock)
    with pytest.raises(StorageError, match="no meter 'NOPE'"):
        await dispatcher.queue("NOPE", Kind.DISCONNECT, "x", "op")
    with pytest.raises(ValidationError, match="needs a reason"):
        await dispatcher.queue("MTR-1", Kind.DISCONNECT, "", "op")
    assert await list_commands(db) == []


@pytest.mark.parametrize("state", ["sent", "retrying", "acknowledged"])
async def test_a_restart_resumes_a_command_in_any_state(db: Database, state: str) -> None:
    """The command was on its way when the head-end died: the meter ran it (its answer lost) or
    not; the next dispatcher finds out and ends it verified, run once."""
    for ran in (True, False):
        clock, meters, links = _setup()
        dispatcher = _dispatcher(db, links, clock)
        meter_id = "MTR-1" if ran else "MTR-2"
        queued = await dispatcher.queue(meter_id, Kind.DISCONNECT, "test", "op")
        async with db.begin() as session:
            row = await session.get(CommandRow, queued.command_id)
            assert row is not None
            if ran or state == "acknowledged":
                meters[meter_id].execute(unpack_envelope(row.envelope))
            row.state = state
            row.attempts = 1
            row.lease_owner = "dead-worker"
            row.lease_until = NOW + timedelta(seconds=5)
        assert (await dispatcher.dispatch_once()).outcomes == {}  # the dead worker's lease
        clock.advance(6)
        assert (await dispatcher.dispatch_once()).outcomes == {"verified": 1}
        assert meters[meter_id].snapshot().control_state is ControlState.DISCONNECTED
        expected = 0 if (ran or state == "acknowledged") else 1
        assert links.links[meter_id].executed == expected
        assert meters[meter_id].snapshot().last_command_seq == queued.sequence
        async with db.begin() as session:  # clean slate for the next case
            await session.execute(
                update(CommandRow)
                .where(CommandRow.id == queued.command_id)
                .values(state="verified")
            )


async def test_two_dispatchers_never_work_one_command(db: Database, db_url: str) -> None:
    clock, meters, links = _setup(FaultPlan(delay=1.0, delay_seconds=0.01))
    first = _dispatcher(db, links, clock, "w1")
    other_db = await open_database(db_url)
    try:
        second = _dispatcher(other_db, links, clock, "w2")
        for meter_id in meters:
            await first.queue(meter_id, Kind.DISCONNECT, "race", "op")
        a, b = await asyncio.gather(first.dispatch_once(), second.dispatch_once())
        assert a.outcomes["verified"] + b.outcomes["verified"] == 3
    finally:
        await other_db.close()
    assert sum(link.executed for link in links.links.values()) == 3
    async with db.read() as session:
        actors = (await session.execute(select(CommandRow.id, CommandRow.state))).all()
    assert all(state == "verified" for _, state in actors)


async def _reading(db: Database, meter_id: str, at: datetime, **values: object) -> None:
    """A stored reading saying what the policy should see (meter time = head-end time)."""
    snapshot = replace(SNAP, meter_id=meter_id, time=int(at.timestamp()), **values)  # type: ignore[arg-type]
    async with db.begin() as session:
        await store_readings(session, [reading_row(snapshot, Findings(), at, "poll")])


async def test_the_policy_queues_one_disconnect_and_one_reconnect(db: Database) -> None:
    clock, meters, links = _setup()
    dispatcher = _dispatcher(db, links, clock)
    out = {"credit": 0, "emergency_credit": 0, "control_state": ControlState.CONNECTED}
    await _reading(db, "MTR-1", NOW, **out)
    assert (await dispatcher.apply_policy()).queued == 0  # exhausted just now: grace starts
    clock.advance(2 * 3600)
    later = datetime.fromtimestamp(clock.now(), UTC)
    await _reading(db, "MTR-1", later, **out)
    assert (await dispatcher.apply_policy()).queued == 1
    assert (await dispatcher.apply_policy()).queued == 0  # in flight
    assert (await dispatcher.dispatch_once()).outcomes == {"verified": 1}
    assert (await dispatcher.apply_policy()).queued == 0  # the reading predates the command
    clock.advance(900)
    paid = datetime.fromtimestamp(clock.now(), UTC)
    await _reading(
        db, "MTR-1", paid, credit=5000, control_state=ControlState.DISCONNECTED
    )  # a top-up; the poll shows the relay off
    assert (await dispatcher.apply_policy()).queued == 1
    assert (await dispatcher.dispatch_once()).outcomes == {"verified": 1}
    assert (await dispatcher.apply_policy()).queued == 0
    commands = await list_commands(db, meter_id="MTR-1")
    assert [(c.kind, c.actor, c.state) for c in commands] == [
        ("reconnect", "policy", "verified"),
        ("disconnect", "policy", "verified"),
    ]
    assert meters["MTR-1"].snapshot().control_state is ControlState.READY_FOR_RECONNECTION
    assert [kind for kind, _ in await _notices(db)] == ["disconnected", "ready_for_reconnection"]


async def test_the_policy_leaves_a_protected_account_alone(db: Database) -> None:
    clock, _meters, links = _setup()
    dispatcher = _dispatcher(db, links, clock)
    async with db.begin() as session:
        await session.execute(
            update(Account)
            .where(Account.id == "ACC-1")
            .values(
                protected=True,
                protection_reason="medical",
                protected_until=NOW + timedelta(days=30),
            )
        )
    out = {"credit": 0, "emergency_credit": 0, "control_state": ControlState.CONNECTED}
    await _reading(db, "MTR-1", NOW, **out)
    clock.advance(3 * 3600)
    await _reading(db, "MTR-1", datetime.fromtimestamp(clock.now(), UTC), **out)
    assert (await dispatcher.apply_policy()).queued == 0
    assert await list_commands(db) == []


async def test_the_policy_waits_for_the_friendly_period_to_end(db: Database) -> None:
    clock, _meters, links = _setup()
    dispatcher = _dispatcher(db, links, clock)
    lunch = Calendar(friendly_hours=((11 * 60, 14 * 60),))  # 11:00-14:00 UTC
    tariff = TariffRecord("LUNCH", "KES", -2, (2500,), 5000, 1000, lunch)
    await add_tariff(db, tariff, NOW, actor="t")
    async with db.begin() as session:
        await session.execute(
            update(MeterRow).where(MeterRow.id == "MTR-1").values(tariff_id="LUNCH")
        )
    out = {"credit": 0, "emergency_credit": 0, "control_state": ControlState.CONNECTED}
    await _reading(db, "MTR-1", NOW, **out)
    for minutes, queued in ((90, 0), (125, 1)):  # 13:30: friendly still; 14:05: not
        clock.set(T0 + minutes * 60)
        await _reading(db, "MTR-1", datetime.fromtimestamp(clock.now(), UTC), **out)
        assert (await dispatcher.apply_policy()).queued == queued, minutes


async def test_one_transaction_queues_many_as_one_at_a_time_would(db: Database) -> None:
    clock, _meters, links = _setup()
    dispatcher = _dispatcher(db, links, clock)
    answers = await dispatcher.queue_many(
        [
            Request("MTR-1", Kind.RECONNECT, "a", "op"),
            Request("MTR-1", Kind.RECONNECT, "again", "op"),  # the same kind: not twice
            Request("MTR-1", Kind.DISCONNECT, "b", "op"),  # supersedes the reconnect
            Request("MTR-2", Kind.DISCONNECT, "c", "op"),
        ]
    )
    assert [(q.created, q.sequence) for q in answers] == [
        (True, 1), (False, 1), (True, 2), (True, 1),
    ]  # fmt: skip
    assert answers[1].command_id == answers[0].command_id
    assert answers[2].superseded == (answers[0].command_id,)
    with pytest.raises(StorageError, match="NOPE"):
        await dispatcher.queue_many(
            [
                Request("MTR-3", Kind.DISCONNECT, "d", "op"),
                Request("NOPE", Kind.DISCONNECT, "e", "op"),
            ]
        )
    assert len(await list_commands(db)) == 3  # the refused batch queued nothing
    assert (await dispatcher.dispatch_once()).outcomes == {"verified": 2}
    assert (await verify_chain(db)).broken is None


async def test_the_policy_waits_for_a_payment_on_its_way(db: Database) -> None:
    clock, _meters, links = _setup()
    dispatcher = _dispatcher(db, links, clock)
    out = {"credit": 0, "emergency_credit": 0, "control_state": ControlState.CONNECTED}
    await _reading(db, "MTR-1", NOW, **out)
    clock.advance(2 * 3600)
    later = datetime.fromtimestamp(clock.now(), UTC)
    await _reading(db, "MTR-1", later, **out)
    await add_channel(db, "KIOSK-1", "kiosk", later, actor="t")
    answer = await pay(db, PaymentRequest("KIOSK-1", "R-1", "MTR-1", "100.00"), later, actor="t")
    assert answer.answer["delivery"]["state"] == "pending_delivery"
    row = next(r for r in await policy_inputs_of(db) if r.meter_id == "MTR-1")
    assert row.account.payment_pending
    assert (await dispatcher.apply_policy()).queued == 0  # the credit is on its way


async def policy_inputs_of(db: Database) -> list[PolicyInput]:
    async with db.read() as session:
        return await policy_inputs(session)
