"""How many requests a read costs: the poller asks for the load profile only once the meter
can have captured a new interval, and still backfills everything after an outage; reads that
finish together are stored in one batch (in-memory links over real firmware meters, the store
on SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select

from headend.domain.registry import MeterRecord
from headend.links.memory import FaultPlan, MemoryLink
from headend.services.poller import Poller, PollPlan
from headend.services.registry import route_of
from headend.storage import Database, open_database
from headend.storage.polling import PollTarget
from headend.storage.registry import import_meters
from headend.storage.schema import Interval, MeterEvent, Reading
from meter_sim.config import MeterConfig
from meter_sim.firmware import Meter
from meter_sim.loads import load_for
from protocols.clock import ManualClock
from protocols.readings import Event, MeterSnapshot, ProfileRow
from tests.databases import db_url, postgres_server

__all__ = ["db_url", "postgres_server"]  # fixtures

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z, a multiple of the 900 s period
PLAN = PollPlan(read_deadline=3.0, attempts=2, retry_base=0.01, retry_cap=0.02, lease=10.0)
LOST = FaultPlan(drop_request=1.0)


class CountedLink(MemoryLink):
    """An in-memory link that counts the requests it is asked, by kind."""

    def __init__(self, meter: Meter, counts: Counter[str], faults: FaultPlan, clock: ManualClock):
        super().__init__(meter, faults, clock=clock, timeout=0.01)
        self.counts = counts

    async def read_snapshot(self) -> MeterSnapshot:
        self.counts["snapshot"] += 1
        return await super().read_snapshot()

    async def read_profile(self, start: int, end: int) -> list[ProfileRow]:
        self.counts["profile"] += 1
        return await super().read_profile(start, end)

    async def read_events(self, since_seq: int, limit: int = 100) -> list[Event]:
        self.counts["events"] += 1
        return await super().read_events(since_seq, limit)


class Fleet:
    """A link source over firmware meters; ``offline`` meters lose every request."""

    def __init__(self, clock: ManualClock, meter_ids: list[str]) -> None:
        self.clock = clock
        self.meters = {m: Meter(_config(m), clock.now(), load_for(_config(m))) for m in meter_ids}
        self.counts: Counter[str] = Counter()
        self.offline: set[str] = set()

    async def link(self, target: PollTarget) -> MemoryLink:
        faults = LOST if target.meter_id in self.offline else FaultPlan()
        return CountedLink(self.meters[target.meter_id], self.counts, faults, self.clock)

    async def discard(self, target: PollTarget) -> None:
        return None

    def lanes(self, target: PollTarget) -> int | None:
        return None  # every link is a meter of its own


def _config(meter_id: str) -> MeterConfig:
    return MeterConfig(meter_id, initial_credit=1_000_000)


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = await open_database(db_url, check=False)
    await database.upgrade()
    try:
        yield database
    finally:
        await database.close()


async def _register(db: Database, meter_ids: list[str]) -> None:
    rows = []
    for n, meter_id in enumerate(meter_ids, start=2):
        endpoint = f"tcp://127.0.0.1:1/{n - 1}"
        rows.append(
            (n, MeterRecord(meter_id=meter_id, endpoint=endpoint, route=route_of(endpoint)))
        )
    report = await import_meters(db, rows, [], datetime.now(UTC), actor="test")
    assert report.applied


async def _count(db: Database, model: type[object], meter_id: str | None = None) -> int:
    async with db.read() as session:
        query = select(func.count()).select_from(model)
        if meter_id is not None:
            query = query.where(model.meter_id == meter_id)  # type: ignore[attr-defined]
        return int(await session.scalar(query) or 0)


async def test_the_profile_is_read_only_when_a_new_interval_can_be_there(db: Database) -> None:
    clock = ManualClock(T0)
    ids = ["REQ-1", "REQ-2"]
    fleet = Fleet(clock, ids)
    await _register(db, ids)
    poller = Poller(db, fleet, clock, plan=PLAN)
    clock.advance(300)  # no interval captured yet
    first = await poller.poll_once()
    assert (first.read, first.total("intervals")) == (2, 0)
    assert fleet.counts["profile"] == 2
    for _ in range(3):  # still inside the first interval: snapshots only
        clock.advance(150)
        summary = await poller.poll_once()
        assert (summary.read, summary.total("intervals")) == (2, 0)
    assert (fleet.counts["snapshot"], fleet.counts["profile"]) == (8, 2)
    assert await _count(db, Reading) == 8
    clock.advance(300)  # T0 + 1050: the boundary passed, one new interval each
    summary = await poller.poll_once()
    assert summary.total("intervals") == 2
    assert fleet.counts["profile"] == 4
    clock.advance(200)  # the next interval ends at T0 + 1800
    assert (await poller.poll_once()).total("intervals") == 0
    assert fleet.counts["profile"] == 4
    clock.advance(900)
    assert (await poller.poll_once()).total("intervals") == 2
    assert fleet.counts["profile"] == 6
    assert await _count(db, Interval) == 2 * 2


async def test_a_meter_that_was_away_is_backfilled_on_its_return(db: Database) -> None:
    clock = ManualClock(T0)
    fleet = Fleet(clock, ["REQ-A", "REQ-B"])
    await _register(db, ["REQ-A", "REQ-B"])
    poller = Poller(db, fleet, clock, plan=PLAN)
    clock.advance(900)
    assert (await poller.poll_once()).read == 2
    fleet.offline.add("REQ-A")
    for _ in range(4):
        clock.advance(900)
        summary = await poller.poll_once()
        assert (summary.read, summary.failed) == (1, 1)
    fleet.offline.clear()
    clock.advance(100)
    back = await poller.poll_once()
    outcome = {o.meter_id: o for o in back.outcomes}
    assert outcome["REQ-A"].backfilled
    assert outcome["REQ-A"].intervals == 4
    assert outcome["REQ-B"].intervals == 0  # read every interval: nothing was missing
    expected = [int(T0) + n * 900 for n in range(5)]
    for meter_id in ("REQ-A", "REQ-B"):
        async with db.read() as session:
            starts = await session.scalars(
                select(Interval.start).where(Interval.meter_id == meter_id).order_by(Interval.start)
            )
            assert list(starts) == expected
    stored_events = await _count(db, MeterEvent, "REQ-A")
    assert stored_events == fleet.meters["REQ-A"].snapshot().last_event_seq


async def test_a_new_poller_starts_from_the_store(db: Database) -> None:
    clock = ManualClock(T0)
    fleet = Fleet(clock, ["REQ-S"])
    await _register(db, ["REQ-S"])
    clock.advance(1800)
    await Poller(db, fleet, clock, plan=PLAN).poll_once()
    clock.advance(1800)
    summary = await Poller(db, fleet, clock, plan=PLAN).poll_once()  # e.g. after a restart
    assert summary.outcomes[0].intervals == 2
    assert summary.outcomes[0].duplicates == 0
    assert await _count(db, Interval) == 4


async def test_reads_that_finish_together_share_a_transaction(db: Database) -> None:
    clock = ManualClock(T0)
    ids = [f"REQ-{n:03d}" for n in range(1, 61)]
    fleet = Fleet(clock, ids)
    await _register(db, ids)
    poller = Poller(db, fleet, clock, plan=PLAN)
    clock.advance(1000)
    assert (await poller.poll_once()).read == 60  # each read also asks the store where it was
    assert await _count(db, Interval) == 60
    batches = poller.counts["batches"]
    clock.advance(900)
    assert (await poller.poll_once()).read == 60  # the in-memory reads finish at once
    assert poller.counts["batches"] == batches + 1
    assert await _count(db, Reading) == 120
    assert await _count(db, Interval) == 120


class PacedFleet(Fleet):
    """A fleet whose reads take ``pace`` seconds (``slow`` meters ``slow_seconds``), with the
    most reads it saw in flight at once and the lanes it tells the poller."""

    def __init__(
        self, clock: ManualClock, meter_ids: list[str], lanes: int | None, pace: float = 0.02
    ) -> None:
        super().__init__(clock, meter_ids)
        self.lane_count = lanes
        self.pace = pace
        self.slow: set[str] = set()
        self.slow_seconds = 30.0
        self.in_flight = 0
        self.most_in_flight = 0
        self.reading = asyncio.Event()  # set once a read is in flight

    async def link(self, target: PollTarget) -> MemoryLink:
        delay = self.slow_seconds if target.meter_id in self.slow else self.pace
        return PacedLink(self, self.meters[target.meter_id], delay, self.clock)

    def lanes(self, target: PollTarget) -> int | None:
        return self.lane_count


class PacedLink(MemoryLink):
    def __init__(self, fleet: PacedFleet, meter: Meter, delay: float, clock: ManualClock):
        super().__init__(meter, clock=clock, timeout=60.0)
        self.fleet = fleet
        self.delay = delay

    async def read_snapshot(self) -> MeterSnapshot:
        fleet = self.fleet
        fleet.in_flight += 1
        fleet.reading.set()
        fleet.most_in_flight = max(fleet.most_in_flight, fleet.in_flight)
        try:
            await asyncio.sleep(self.delay)
            return await super().read_snapshot()
        finally:
            fleet.in_flight -= 1


@pytest.mark.parametrize(("lanes", "most"), [(None, 3), (1, 1), (2, 2), (8, 3)])
async def test_a_gateway_gets_no_more_readers_than_its_links_carry(
    db: Database, lanes: int | None, most: int
) -> None:
    clock = ManualClock(T0)
    ids = [f"REQ-{n}" for n in range(1, 7)]  # all behind one gateway
    fleet = PacedFleet(clock, ids, lanes)
    await _register(db, ids)
    plan = PollPlan(read_deadline=3.0, lease=10.0, per_gateway={"tcp": 3})
    poller = Poller(db, fleet, clock, plan=plan)
    clock.advance(300)
    summary = await poller.poll_once()
    assert summary.read == 6
    assert fleet.most_in_flight == most


async def test_a_read_past_its_deadline_ends_and_its_gateway_reads_on(db: Database) -> None:
    """The round's reader of a gateway reads its meters under one deadline timer: a meter
    that does not answer in time fails at its own deadline, the ones after it still get
    theirs in full, and the time-out spends none of the task's cancellations."""
    clock = ManualClock(T0)
    ids = [f"REQ-{n}" for n in range(1, 6)]
    fleet = PacedFleet(clock, ids, lanes=1, pace=0.0)
    await _register(db, ids)
    plan = PollPlan(read_deadline=1.0, attempts=1, lease=10.0)
    poller = Poller(db, fleet, clock, plan=plan)
    clock.advance(300)
    assert (await poller.poll_once()).read == 5  # known to the poller: no query in a read
    fleet.pace = 0.4  # three reads take more than one deadline together
    fleet.slow = {"REQ-2", "REQ-4"}
    clock.advance(100)
    loop = asyncio.get_running_loop()
    started = loop.time()
    summary = await poller.poll_once()
    assert loop.time() - started < 10.0  # not the 30 s a slow meter would take
    failures = summary.as_dict()["failures"]
    assert failures == {m: "no complete read within 1 s (slow)" for m in ("REQ-2", "REQ-4")}
    assert summary.read == 3
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0
    target = PollTarget("REQ-4", "tcp://127.0.0.1:1/4", "tcp", "127.0.0.1:1", 900, "")
    read = await poller.read(target)  # a scheduled read: the same deadline
    assert read.error == "no complete read within 1 s (slow)"


async def test_a_cancelled_round_stops_at_once(db: Database) -> None:
    clock = ManualClock(T0)
    ids = ["REQ-1", "REQ-2"]
    fleet = PacedFleet(clock, ids, lanes=1)
    fleet.slow = set(ids)
    await _register(db, ids)
    poller = Poller(db, fleet, clock, plan=PollPlan(read_deadline=20.0, lease=40.0))
    clock.advance(300)
    round_ = asyncio.create_task(poller.poll_once())
    await fleet.reading.wait()
    round_.cancel()
    with pytest.raises(asyncio.CancelledError):
        await round_
    assert fleet.in_flight == 0
