"""Automated meter reading end to end: simulated meters on Modbus TCP, the poller, the store
(SQLite and PostgreSQL): full rounds, backfill after an outage, gaps a meter can no longer
fill, a register that goes backwards, health, and claims shared by two workers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from headend.domain.registry import MeterRecord
from headend.domain.validation import Flag
from headend.links.endpoint import LinkOptions
from headend.services.links import EndpointLinks
from headend.services.poller import Poller, PollPlan
from headend.services.registry import route_of
from headend.storage import Database, open_database
from headend.storage.polling import claim_due, ensure_health_rows
from headend.storage.registry import import_meters
from headend.storage.schema import Gap, HealthChange, Interval, MeterEvent, PollHealth, Reading
from meter_sim.config import MeterConfig
from meter_sim.modbus_server import serve_tcp
from meter_sim.runtime import MeterRuntime
from protocols.clock import ManualClock
from tests.databases import db_url, postgres_server

__all__ = ["db_url", "postgres_server"]  # fixtures

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
PLAN = PollPlan(read_deadline=3.0, attempts=2, retry_base=0.05, retry_cap=0.1, lease=10.0)
OPTIONS = LinkOptions(timeout=0.5, retries=0)


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = await open_database(db_url, check=False)
    await database.upgrade()
    try:
        yield database
    finally:
        await database.close()


def _runtime(tmp: Path, clock: ManualClock, meter_id: str, unit: int, **kw: Any) -> MeterRuntime:
    config = MeterConfig(meter_id, modbus_unit=unit, **({"initial_credit": 100_000} | kw))
    return MeterRuntime.open(config, clock, tmp / meter_id)


async def _register(db: Database, endpoints: dict[str, str]) -> None:
    rows = [
        (n, MeterRecord(meter_id=m, endpoint=e, route=route_of(e)))
        for n, (m, e) in enumerate(endpoints.items(), start=2)
    ]
    report = await import_meters(db, rows, [], datetime.now(UTC), actor="test")
    assert report.applied


async def _count(db: Database, model: Any, **where: Any) -> int:
    async with db.begin() as session:
        query = select(func.count()).select_from(model)
        for name, value in where.items():
            query = query.where(getattr(model, name) == value)
        return int(await session.scalar(query) or 0)


async def _starts(db: Database, meter_id: str, estimated: bool | None = None) -> list[int]:
    async with db.begin() as session:
        query = select(Interval.start).where(Interval.meter_id == meter_id)
        if estimated is not None:
            query = query.where(Interval.estimated == estimated)
        return [int(s - T0) for s in (await session.scalars(query.order_by(Interval.start)))]


async def test_rounds_store_every_meter_once_and_backfill(db: Database, tmp_path: Path) -> None:
    clock = ManualClock(T0)
    runtimes = [_runtime(tmp_path, clock, f"MTR-{n}", n) for n in (1, 2, 3)]
    runtimes[0] = _runtime(tmp_path, clock, "MTR-1", 1, initial_credit=5600)  # runs low soon
    links = EndpointLinks(OPTIONS)
    async with serve_tcp(runtimes) as service:
        await _register(db, {r.meter_id: f"tcp://127.0.0.1:{service.port}/{r.config.modbus_unit}"
                             for r in runtimes})  # fmt: skip
        poller = Poller(db, links, clock, plan=PLAN)
        clock.advance(7200)
        first = await poller.poll_once()
        assert (first.read, first.failed) == (3, 0)
        assert first.total("intervals") == 3 * 8
        clock.advance(3600)
        second = await poller.poll_once()
        assert second.total("intervals") == 3 * 4
        assert second.total("backfilled") == 3
        again = await poller.poll_once()  # nothing new on the meters
        assert again.total("duplicates") == 3  # the same readings, stored once
        assert again.total("intervals") == 0
        await links.close()
    assert await _count(db, Reading) == 6
    for runtime in runtimes:
        assert await _starts(db, runtime.meter_id) == list(range(0, 3 * 3600, 900))
    logged = sum(runtime.snapshot().last_event_seq for runtime in runtimes)
    assert logged > 0
    assert await _count(db, MeterEvent) == logged
    assert await _count(db, Gap) == 0


async def test_an_offline_meter_is_unreachable_then_backfilled(
    db: Database, tmp_path: Path
) -> None:
    clock = ManualClock(T0)
    meter = _runtime(tmp_path, clock, "MTR-9", 1)
    links = EndpointLinks(OPTIONS)
    async with AsyncExitStack() as stack:
        service = await stack.enter_async_context(serve_tcp([meter]))
        port = service.port
        await _register(db, {"MTR-9": f"tcp://127.0.0.1:{port}/1"})
        poller = Poller(db, links, clock, plan=PLAN)
        clock.advance(1800)
        assert (await poller.poll_once()).read == 1
        await stack.aclose()  # the meter's gateway goes off the air
        for _ in range(3):
            clock.advance(900)
            summary = await poller.poll_once()
            assert summary.failed == 1
        async with db.begin() as session:
            health = await session.get(PollHealth, "MTR-9")
            assert health is not None
            assert (health.health, health.consecutive_failures) == ("unreachable", 3)
        clock.advance(900)
        async with serve_tcp([meter], port=port):
            back = await poller.poll_once()
        await links.close()
    assert back.read == 1
    assert back.outcomes[0].intervals == 4
    assert back.outcomes[0].backfilled
    assert await _starts(db, "MTR-9") == list(range(0, 6 * 900, 900))
    async with db.begin() as session:
        changes = (await session.scalars(select(HealthChange.new).order_by(HealthChange.id))).all()
    assert list(changes) == ["online", "degraded", "unreachable", "online"]


async def test_a_gap_the_meter_overwrote_is_recorded_and_estimated(
    db: Database, tmp_path: Path
) -> None:
    clock = ManualClock(T0)
    meter = _runtime(tmp_path, clock, "MTR-R", 1, profile_entries=4)
    links = EndpointLinks(OPTIONS)
    async with serve_tcp([meter]) as service:
        await _register(db, {"MTR-R": f"tcp://127.0.0.1:{service.port}/1"})
        poller = Poller(db, links, clock, plan=PLAN)
        clock.advance(1800)
        await poller.poll_once()
        clock.advance(8 * 900)  # the ring of 4 rows is overwritten twice meanwhile
        summary = await poller.poll_once()
        await links.close()
    assert summary.outcomes[0].gaps == 1
    assert summary.outcomes[0].estimated == 4
    assert await _starts(db, "MTR-R", estimated=False) == [0, 900, 5400, 6300, 7200, 8100]
    assert await _starts(db, "MTR-R", estimated=True) == [1800, 2700, 3600, 4500]
    async with db.begin() as session:
        gap = (await session.scalars(select(Gap))).one()
        assert (gap.kind, gap.first - T0, gap.last - T0) == ("intervals", 1800, 4500)
        estimated = await session.scalar(
            select(func.sum(Interval.energy_wh)).where(Interval.estimated.is_(True))
        )
        actual = (await session.scalars(select(Interval).order_by(Interval.start))).all()
    # the estimate spreads exactly what the register moved across the gap
    before = next(i for i in actual if i.start == T0 + 900)
    after = next(i for i in actual if i.start == T0 + 5400)
    assert estimated == after.register_wh - after.energy_wh - before.register_wh
    assert after.flags & Flag.GAP_BEFORE
    assert not after.estimated


async def test_a_replaced_meter_whose_register_went_back_is_flagged(
    db: Database, tmp_path: Path
) -> None:
    clock = ManualClock(T0)
    old = _runtime(tmp_path, clock, "MTR-X", 1)
    links = EndpointLinks(OPTIONS)
    async with serve_tcp([old]) as service:
        port = service.port
        await _register(db, {"MTR-X": f"tcp://127.0.0.1:{port}/1"})
        poller = Poller(db, links, clock, plan=PLAN)
        clock.advance(6 * 3600)
        await poller.poll_once()
    await links.close()
    new = _runtime(tmp_path / "swapped", clock, "MTR-X", 1)  # a new meter: its register at 0
    clock.advance(900)
    async with serve_tcp([new], port=port):
        summary = await poller.poll_once()
    await links.close()
    assert summary.read == 1
    assert summary.total("flagged") >= 1
    async with db.begin() as session:
        latest = (
            await session.scalars(select(Reading).order_by(Reading.meter_time.desc()).limit(1))
        ).one()
    assert latest.flags & Flag.ENERGY_BACKWARDS
    assert latest.flag_reason is not None
    assert "went back" in latest.flag_reason


async def test_two_workers_never_claim_the_same_meter(db: Database, db_url: str) -> None:
    await _register(db, {f"M-{n:03d}": f"tcp://127.0.0.1:1/{n}" for n in range(1, 101)})
    await ensure_health_rows(db)
    other = await open_database(db_url)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    until = now + timedelta(minutes=2)
    try:
        claims = await asyncio.gather(
            *(claim_due(database, name, now, until, 30)
              for database, name in [(db, "a"), (other, "b")] * 3)
        )  # fmt: skip
        claimed = [meter for claim in claims for meter in claim]
        assert len(claimed) == len(set(claimed)) == 100
        assert await claim_due(other, "c", now, until, 30) == []  # all leased
        later = until + timedelta(seconds=1)  # the leases expired: another worker takes over
        assert len(await claim_due(other, "c", later, later + timedelta(minutes=2), 500)) == 100
    finally:
        await other.close()
