"""Readings, intervals, events, gaps and health in the store, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from sqlalchemy import select

from headend.domain.health import Health
from headend.domain.validation import Findings, Flag, Previous, check_intervals, estimate_gap
from headend.storage import Database, open_database
from headend.storage.readings import (
    health_of,
    insert_rows,
    last_event_seq,
    last_interval,
    last_intervals,
    latest_reading,
    latest_readings,
    reading_row,
    record_read,
    store_events,
    store_gap,
    store_intervals,
    store_readings,
    values_row,
)
from headend.storage.schema import HealthChange, Interval, Meter, Reading
from protocols.errors import StorageError
from protocols.mqtt import decode_telemetry, encode_telemetry
from protocols.readings import Event, EventCode, ProfileRow
from tests.databases import db_url, postgres_server
from tests.test_domain_readings import LIMITS, SNAP, T0

__all__ = ["db_url", "postgres_server"]  # fixtures

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = await open_database(db_url, check=False)
    await database.upgrade()
    async with database.begin() as session:
        session.add(
            Meter(
                id="M-1", serial="S", endpoint="tcp://127.0.0.1:5020/1", transport="tcp",
                gateway="127.0.0.1:5020", unit_id=1, control_mode=6, credit_unit="money",
                currency="KES", currency_scale=-2, created_at=NOW,
            )
        )  # fmt: skip
    try:
        yield database
    finally:
        await database.close()


async def _add_meters(db: Database, *units: int) -> None:
    """Meters M-<unit> behind the gateway of the fixture's M-1."""
    async with db.begin() as session:
        for n in units:
            session.add(
                Meter(
                    id=f"M-{n}", serial=f"S{n}", endpoint=f"tcp://127.0.0.1:5020/{n}",
                    transport="tcp", gateway="127.0.0.1:5020", unit_id=n, control_mode=6,
                    credit_unit="money", currency="KES", currency_scale=-2, created_at=NOW,
                )
            )  # fmt: skip


async def test_a_reading_is_stored_once_with_its_findings(db: Database) -> None:
    flagged = Findings().add(Flag.CLOCK_SKEW, "meter clock ahead by 90 s")
    async with db.begin() as session:
        assert await latest_reading(session, "M-1") is None
        rows = [reading_row(SNAP, flagged, NOW, "poll")]
        assert await store_readings(session, rows) == 1
    async with db.begin() as session:
        later = replace(SNAP, time=T0 + 900, energy_import_wh=1100)
        new = [reading_row(later, Findings(), NOW, "mqtt"), rows[0]]
        assert await store_readings(session, new) == 1
        previous = await latest_reading(session, "M-1")
        assert previous is not None
        assert (previous.meter_time, previous.energy_import_wh) == (T0 + 900, 1100)


def test_a_row_from_values_is_the_row_from_the_snapshot() -> None:
    flagged = Findings().add(Flag.CLOCK_SKEW, "meter clock ahead by 90 s")
    for findings in (Findings(), flagged):
        expected = reading_row(SNAP, findings, NOW, "mqtt")
        assert values_row("M-1", SNAP.to_values(), findings, NOW, "mqtt") == expected
        decoded = decode_telemetry(encode_telemetry(SNAP, 1, 1))  # enums as msgspec gives them
        values = msgspec.structs.asdict(decoded.reading)
        assert values_row("M-1", values, findings, NOW, "mqtt") == expected


async def test_more_rows_than_one_statement_carries_are_stored_once(db: Database) -> None:
    rows = [
        reading_row(replace(SNAP, time=T0 + 60 * n), Findings(), NOW + timedelta(seconds=n), "mqtt")
        for n in range(1500)  # more than SQLite's 32766 parameters in one statement
    ]
    async with db.begin() as session:
        stored = await insert_rows(session, Reading, rows[:700])
        assert sorted(stored) == [("M-1", T0 + 60 * n) for n in range(700)]
    async with db.begin() as session:
        stored = await insert_rows(session, Reading, rows)
        assert sorted(stored) == [("M-1", T0 + 60 * n) for n in range(700, 1500)]
        assert await insert_rows(session, Reading, rows) == []
        last = await session.scalar(select(Reading).where(Reading.meter_time == T0 + 60 * 1499))
        assert last is not None
        assert last.received_at == NOW + timedelta(seconds=1499)


async def test_intervals_with_a_gap_and_its_estimate(db: Database) -> None:
    rows = [ProfileRow(T0 + 900, 10, 10, 100, 1), ProfileRow(T0 + 3600, 40, 10, 90, 1)]
    checked, gaps = check_intervals(rows, 900, None, LIMITS)
    estimates = estimate_gap(checked[0], checked[1])
    async with db.begin() as session:
        assert await store_intervals(session, "M-1", [*checked, *estimates]) == 4
        assert await store_intervals(session, "M-1", checked) == 0
        for first, last in gaps:
            assert await store_gap(session, "M-1", "intervals", first, last, found_at=NOW)
            assert not await store_gap(session, "M-1", "intervals", first, last, found_at=NOW)
    async with db.begin() as session:
        stored = (await session.scalars(select(Interval).order_by(Interval.start))).all()
        assert [(i.start - T0, i.energy_wh, i.estimated) for i in stored] == [
            (0, 10, False), (900, 10, True), (1800, 10, True), (2700, 10, False)]  # fmt: skip
        assert stored[3].flags == Flag.GAP_BEFORE
        assert stored[3].flag_reason == "2 interval(s) missing before"
        last = await last_interval(session, "M-1")
        assert last == checked[1]


async def test_events_by_sequence(db: Database) -> None:
    events = [Event(n, T0 + n, EventCode.POWER_UP) for n in (1, 2, 3)]
    async with db.begin() as session:
        assert await last_event_seq(session, "M-1") == 0
        assert await store_events(session, "M-1", events, NOW) == 3
        assert await store_events(session, "M-1", events[1:], NOW) == 0
        assert await store_events(session, "M-1", events[1:], NOW, boot=7) == 2  # MQTT boot
        assert await last_event_seq(session, "M-1") == 3


async def test_health_changes_are_stored_as_events(db: Database) -> None:
    outcomes = [True, False, False, False, False, True]
    async with db.begin() as session:
        for n, ok in enumerate(outcomes):
            at = NOW + timedelta(minutes=15 * n)
            await record_read(session, "M-1", ok, now=at, error="" if ok else "timed out")
    async with db.begin() as session:
        state = await health_of(session, "M-1")
        assert state.health is Health.ONLINE
        assert state.failures == 0
        changes = (await session.scalars(select(HealthChange).order_by(HealthChange.id))).all()
        assert [(c.old, c.new) for c in changes] == [
            ("unknown", "online"), ("online", "degraded"), ("degraded", "unreachable"),
            ("unreachable", "online")]  # fmt: skip
        assert changes[2].reason == "3 consecutive failed read(s): timed out"


async def test_the_latest_reading_and_interval_of_many_meters_at_once(db: Database) -> None:
    """One look-up for many meters (a poll batch's): each meter's newest reading and
    interval, meters without any left out, however the rows were stored."""
    await _add_meters(db, 2, 3)
    times = {"M-1": [T0 + 120, T0, T0 + 60], "M-2": [T0 + 30]}
    async with db.begin() as session:
        for meter_id, stamps in times.items():
            rows = [
                reading_row(
                    replace(SNAP, meter_id=meter_id, time=t, energy_import_wh=1000 + t - T0),
                    Findings(),
                    NOW,
                    "poll",
                )
                for t in stamps
            ]
            await store_readings(session, rows)
        profile = [ProfileRow(T0 + 900 * k, 10, 10, 100, 1) for k in (1, 2, 3)]
        checked, _ = check_intervals(profile, 900, None, LIMITS)
        await store_intervals(session, "M-2", [checked[2], checked[0], checked[1]])
    async with db.read() as session:
        found = await latest_readings(session, ["M-1", "M-2", "M-3"])
        assert found == {"M-1": Previous(T0 + 120, 1120), "M-2": Previous(T0 + 30, 1030)}
        intervals = await last_intervals(session, ["M-1", "M-2", "M-3"])
        assert intervals == {"M-2": checked[2]}


async def test_many_new_health_rows_refresh_the_planners_statistics(db: Database) -> None:
    """After a bulk registration the poller's first round adds a health row a meter; on
    PostgreSQL it then analyses the fleet's tables rather than plan on empty ones until
    autovacuum comes round."""
    from sqlalchemy import text

    from headend.storage.database import STATISTICS_AFTER
    from headend.storage.polling import ensure_health_rows

    async with db.begin() as session:
        for n in range(STATISTICS_AFTER):
            session.add(
                Meter(
                    id=f"B-{n:05d}", serial=f"B{n}", endpoint=f"tcp://127.0.0.1:5021/{n % 247 + 1}",
                    transport="tcp", gateway="127.0.0.1:5021", unit_id=n % 247 + 1,
                    control_mode=6, credit_unit="money", currency="KES", currency_scale=-2,
                    created_at=NOW,
                )
            )  # fmt: skip
    assert await ensure_health_rows(db) == STATISTICS_AFTER + 1
    assert await ensure_health_rows(db) == 0
    if db.dialect == "postgresql":
        async with db.read() as session:
            analysed = await session.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_user_tables WHERE relname IN "
                    "('poll_health', 'meters') AND last_analyze IS NOT NULL"
                )
            )
        assert analysed == 2


async def test_a_naive_received_at_is_refused_and_nothing_is_stored(db: Database) -> None:
    """Rows go to PostgreSQL as one JSON text: a datetime without a time zone is refused
    there as the column's own type refuses it on SQLite, and the batch stores nothing."""
    good = reading_row(SNAP, Findings(), NOW, "poll")
    naive = {**reading_row(replace(SNAP, time=SNAP.time + 60), Findings(), NOW, "poll")}
    naive["received_at"] = NOW.replace(tzinfo=None)
    with pytest.raises(StorageError, match="naive datetime"):
        async with db.begin() as session:
            await insert_rows(session, Reading, [good, naive])
    async with db.read() as session:
        assert await latest_reading(session, "M-1") is None


async def test_good_reads_of_many_meters_set_them_online_and_store_each_change(
    db: Database,
) -> None:
    """One call for a poll batch: each meter online afterwards, a change stored for each that
    was not (on PostgreSQL the update itself returns what each was), a meter without a
    health row given one."""
    from headend.storage.readings import record_reads_ok

    await _add_meters(db, 2, 3)
    async with db.begin() as session:
        await record_read(session, "M-1", True, now=NOW)
        for _ in range(3):
            await record_read(session, "M-2", False, now=NOW, error="timed out")
    later = NOW + timedelta(minutes=15)
    async with db.begin() as session:
        changes = await record_reads_ok(session, ["M-1", "M-2", "M-3"], later)
    assert sorted((m, c.old.value, c.new.value) for m, c in changes) == [
        ("M-2", "unreachable", "online"), ("M-3", "unknown", "online")]  # fmt: skip
    async with db.begin() as session:
        for meter_id in ("M-1", "M-2", "M-3"):
            state = await health_of(session, meter_id)
            assert (state.health, state.failures) == (Health.ONLINE, 0)
        rows = (await session.scalars(select(HealthChange).where(HealthChange.at == later))).all()
        assert sorted((c.meter_id, c.old) for c in rows) == [
            ("M-2", "unreachable"),
            ("M-3", "unknown"),
        ]
