"""Monthly partitions of the intervals table on PostgreSQL: the migration, rows kept and stored
once across partitions, new months, retention by dropping months; nothing on SQLite."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, select, text

from headend.domain.validation import CheckedInterval, Findings
from headend.storage import Database, open_database
from headend.storage.database import MIGRATIONS, head_revision
from headend.storage.partitions import (
    DEFAULT,
    SCHEMA,
    Partition,
    drop_partitions_before,
    ensure_partitions,
    list_partitions,
    month_bounds,
)
from headend.storage.readings import store_intervals
from headend.storage.schema import Interval, Meter
from protocols.errors import ValidationError
from tests.databases import drop_postgres, fresh_postgres, postgres_server

__all__ = ["postgres_server"]  # fixtures

JAN = month_bounds(2026, 1)[0]  # 2026-01-01T00:00:00Z
FEB = month_bounds(2026, 2)[0]
MAR = month_bounds(2026, 3)[0]
NOW = datetime(2026, 2, 10, 12, 0, tzinfo=UTC)


@pytest.fixture
def pg_url(postgres_server: str | None) -> Iterator[str]:
    if postgres_server is None:
        pytest.skip("PostgreSQL at 127.0.0.1:5432 does not answer")
    url, name = fresh_postgres(postgres_server)
    try:
        yield url
    finally:
        drop_postgres(postgres_server, name)


async def _migrated(url: str, revision: str = "head") -> Database:
    db = await open_database(url, check=False)
    await db.upgrade(revision)
    return db


@pytest.fixture
async def pg(pg_url: str) -> AsyncIterator[Database]:
    db = await _migrated(pg_url)
    try:
        yield db
    finally:
        await db.close()


def _interval(start: int) -> CheckedInterval:
    return CheckedInterval(start, 900, 10, 1000 + start % 1000, 500, 0, Findings(), False)


async def _meter_with_intervals(db: Database, starts: list[int]) -> int:
    async with db.begin() as session:
        session.add(
            Meter(
                id="MTR-1",
                serial="MTR-1",
                endpoint="tcp://127.0.0.1:5020/1",
                transport="tcp",
                gateway="127.0.0.1:5020",
                unit_id=1,
                control_mode=6,
                credit_unit="money",
                currency="KES",
                currency_scale=-2,
                created_at=NOW,
            )
        )
        await session.flush()
        return await store_intervals(session, "MTR-1", [_interval(s) for s in starts])


async def _starts(db: Database) -> list[int]:
    async with db.begin() as session:
        return list(await session.scalars(select(Interval.start).order_by(Interval.start)))


def _by_name(parts: list[Partition]) -> dict[str, Partition]:
    return {part.name: part for part in parts}


async def test_the_migration_partitions_intervals_by_month(pg: Database) -> None:
    async with pg.engine.connect() as conn:
        strategy = await conn.scalar(
            text(
                "SELECT partstrat FROM pg_partitioned_table "
                "WHERE partrelid = CAST('intervals' AS regclass)"
            )
        )
    assert strategy == "r"  # range
    parts = _by_name(await list_partitions(pg))
    assert parts[DEFAULT] == Partition(DEFAULT, None, None, 0)
    now = datetime.now(UTC)
    this_month = f"intervals_{now.year:04d}_{now.month:02d}"
    assert parts[this_month].start == month_bounds(now.year, now.month)[0]
    assert len(parts) == 3  # default, this month, the next one


async def test_rows_land_in_their_month_and_a_repeat_is_stored_once(pg: Database) -> None:
    starts = [JAN, JAN + 900, FEB - 900, FEB, FEB + 900]
    assert await _meter_with_intervals(pg, starts) == 5  # January and February: default
    assert _by_name(await list_partitions(pg))[DEFAULT].rows == 5
    created = await ensure_partitions(pg, datetime(2026, 1, 5, tzinfo=UTC), ahead=1)
    assert created == ["intervals_2026_01", "intervals_2026_02"]
    parts = _by_name(await list_partitions(pg))
    assert (parts["intervals_2026_01"].rows, parts["intervals_2026_02"].rows) == (3, 2)
    assert parts[DEFAULT].rows == 0
    assert await _starts(pg) == starts
    async with pg.begin() as session:  # the same intervals again: nothing new
        assert await store_intervals(session, "MTR-1", [_interval(s) for s in starts]) == 0
    assert await ensure_partitions(pg, datetime(2026, 1, 5, tzinfo=UTC), ahead=1) == []


async def test_retention_drops_whole_months(pg: Database) -> None:
    starts = [JAN, FEB, MAR, MAR + 900]
    await _meter_with_intervals(pg, starts)
    await ensure_partitions(pg, datetime(2026, 2, 1, tzinfo=UTC), ahead=0)  # Jan stays default
    dropped = await drop_partitions_before(pg, datetime(2026, 3, 20, tzinfo=UTC))
    assert dropped == ["intervals_2026_02"]
    assert await _starts(pg) == [MAR, MAR + 900]  # January's row went from the default too
    assert "intervals_2026_02" not in _by_name(await list_partitions(pg))


async def test_upgrade_keeps_rows_and_downgrade_restores_the_plain_table(pg_url: str) -> None:
    db = await _migrated(pg_url, "0001")
    try:
        await _meter_with_intervals(db, [JAN, FEB, FEB + 900])
        await db.upgrade()
        assert await db.revision() == head_revision()
        parts = _by_name(await list_partitions(db))
        assert (parts["intervals_2026_01"].rows, parts["intervals_2026_02"].rows) == (1, 2)
        assert await _starts(db) == [JAN, FEB, FEB + 900]

        def downgrade(conn: Connection) -> str | None:
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS))
            config.attributes["connection"] = conn
            command.downgrade(config, "0001")
            return MigrationContext.configure(conn).get_current_revision()

        async with db.engine.begin() as conn:
            assert await conn.run_sync(downgrade) == "0001"
            schema = await conn.scalar(
                text("SELECT count(*) FROM pg_namespace WHERE nspname = :name"), {"name": SCHEMA}
            )
            assert schema == 0
        assert await list_partitions(db) == []
        assert await _starts(db) == [JAN, FEB, FEB + 900]
    finally:
        await db.close()


async def test_sqlite_has_no_partitions_to_make(tmp_path: Path) -> None:
    db = await _migrated(f"sqlite:///{tmp_path}/hes.db")
    try:
        assert await ensure_partitions(db, NOW) == []
        assert await drop_partitions_before(db, NOW) == []
        assert await list_partitions(db) == []
        assert await _meter_with_intervals(db, [JAN, FEB]) == 2
        assert await _starts(db) == [JAN, FEB]
    finally:
        await db.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"now": datetime(2026, 1, 1), "ahead": 1}, "time zone"),  # naive: refused
        ({"now": NOW, "ahead": -1}, "ahead is 0..120"),
    ],
)
async def test_bad_arguments_are_refused(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    db = await _migrated(f"sqlite:///{tmp_path}/hes.db")
    try:
        with pytest.raises(ValidationError, match=message):
            await ensure_partitions(db, **kwargs)  # type: ignore[arg-type]
    finally:
        await db.close()
