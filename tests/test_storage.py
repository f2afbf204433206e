"""The head-end's database: migrations, the schema check, exactly-once inserts; on SQLite and
on PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, func, insert, select, text, update
from typer.testing import CliRunner

from cli.hes import app
from headend.storage import SchemaBehind, open_database
from headend.storage.database import head_revision, insert_ignore
from headend.storage.schema import Customer, Meter, MeterEvent, Reading, metadata
from protocols.errors import ConfigError, StorageError
from tests.databases import db_url, postgres_server

__all__ = ["db_url", "postgres_server"]  # fixtures

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _diff(conn: Connection) -> list[object]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


async def test_an_empty_database_upgrades_to_head_and_matches_the_models(db_url: str) -> None:
    db = await open_database(db_url, check=False)
    try:
        assert await db.revision() is None
        before, after = await db.upgrade()
        assert (before, after) == (None, head_revision())
        async with db.engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
        assert await db.upgrade() == (head_revision(), head_revision())  # idempotent
        await db.check_schema()
    finally:
        await db.close()


async def test_a_schema_behind_is_refused_with_what_to_do(db_url: str) -> None:
    with pytest.raises(SchemaBehind) as refused:
        await open_database(db_url)
    assert str(refused.value) == (
        f"database schema is at nothing (empty database), this hes needs {head_revision()}: "
        "run 'hes db upgrade'"
    )


async def _meter(db_url: str) -> None:
    db = await open_database(db_url, check=False)
    await db.upgrade()
    async with db.begin() as session:
        session.add(
            Meter(
                id="MTR-0001",
                serial="S1",
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
    await db.close()


def _reading(meter_time: int, energy: int) -> dict[str, object]:
    return {
        "meter_id": "MTR-0001",
        "meter_time": meter_time,
        "received_at": NOW,
        "source": "poll",
        "energy_import_wh": energy,
        "rate1_wh": energy,
        "rate2_wh": 0,
        "rate3_wh": 0,
        "rate4_wh": 0,
        "power_w": 600,
        "voltage_dv": 2300,
        "current_ma": 2600,
        "power_factor_milli": 980,
        "frequency_chz": 5000,
        "credit": 50_000,
        "emergency_credit": 0,
        "debt": 0,
        "low_credit_threshold": 5000,
        "control_state": 1,
        "control_mode": 6,
        "status": 1,
        "last_event_seq": 3,
        "last_transfer": 0,
        "last_command_seq": 0,
    }


async def test_a_repeated_delivery_is_stored_once_and_counted(db_url: str) -> None:
    await _meter(db_url)
    db = await open_database(db_url)
    try:
        table = Reading
        async with db.begin() as session:
            assert await insert_ignore(session, table, [_reading(100, 1), _reading(200, 2)]) == 2
        async with db.begin() as session:
            # one new, one repeat: the repeat keeps the first stored values
            assert await insert_ignore(session, table, [_reading(200, 99), _reading(300, 3)]) == 1
            assert await insert_ignore(session, table, []) == 0
        async with db.begin() as session:
            rows = await session.execute(select(Reading.meter_time, Reading.energy_import_wh))
            assert sorted(tuple(row) for row in rows) == [(100, 1), (200, 2), (300, 3)]
        event = {"meter_id": "MTR-0001", "boot": 7, "seq": 1, "meter_time": 100, "code": 2,
                 "a": 0, "b": 0, "received_at": NOW}  # fmt: skip
        async with db.begin() as session:
            assert await insert_ignore(session, MeterEvent, [event, event]) == 1
            count = await session.scalar(select(func.count()).select_from(MeterEvent))
            assert count == 1
    finally:
        await db.close()


async def test_times_come_back_in_utc_and_naive_times_are_refused(db_url: str) -> None:
    await _meter(db_url)
    db = await open_database(db_url)
    try:
        local = NOW.astimezone(timezone(timedelta(hours=8)))
        async with db.begin() as session:
            session.add(Customer(name="Wanjiru", created_at=local))
        async with db.begin() as session:
            stored = await session.scalar(select(Customer.created_at))
            assert stored == NOW
            assert stored is not None
            assert stored.tzinfo is not None
        with pytest.raises(StorageError):
            async with db.begin() as session:
                session.add(Customer(name="naive", created_at=datetime(2026, 3, 1)))
        async with db.begin() as session:
            assert await session.scalar(select(func.count()).select_from(Customer)) == 1
    finally:
        await db.close()


async def test_a_foreign_key_is_enforced_on_sqlite_too(db_url: str) -> None:
    await _meter(db_url)
    db = await open_database(db_url)
    try:
        row = _reading(100, 1) | {"meter_id": "NO-SUCH-METER"}
        with pytest.raises(StorageError):
            async with db.begin() as session:
                await insert_ignore(session, Reading, [row])
    finally:
        await db.close()


async def test_a_statement_gives_its_rows_row_count_and_errors(db_url: str) -> None:
    # on SQLite, each statement's results come back whole in one call (headend/storage/sqlite.py)
    await _meter(db_url)
    db = await open_database(db_url)
    try:
        async with db.begin() as session:
            await insert_ignore(session, Reading, [_reading(t, t) for t in (100, 200, 300)])
            moved = await session.execute(
                update(Reading).where(Reading.meter_time >= 200).values(energy_import_wh=7)
            )
            assert moved.rowcount == 2  # type: ignore[attr-defined]
            rows = await session.execute(
                select(Reading.meter_time, Reading.energy_import_wh).order_by(Reading.meter_time)
            )
            assert [tuple(r) for r in rows] == [(100, 100), (200, 7), (300, 7)]
            customer = Customer(name="Baraka", created_at=NOW)
            session.add(customer)
            await session.flush()
            assert customer.id is not None
            empty = await session.execute(select(Reading).where(Reading.meter_time > 1000))
            assert empty.all() == []
        with pytest.raises(StorageError, match="IntegrityError"):
            async with db.begin() as session:
                await session.execute(insert(Reading), [_reading(100, 1)])
    finally:
        await db.close()


async def test_a_write_transaction_runs_its_small_statements_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # headend/storage/sqlite.py: after BEGIN IMMEDIATE, small statements skip the trip to the
    # connection's thread; large ones, reads and the commit still take it
    import aiosqlite

    from headend.storage import sqlite as hes_sqlite

    db = await open_database(f"sqlite:///{tmp_path / 'hes.db'}", check=False)
    await db.upgrade()
    trips: list[str] = []
    real = aiosqlite.Connection._execute

    async def counted(
        self: aiosqlite.Connection, fn: object, *args: object, **kwargs: object
    ) -> object:
        trips.append(str(args[1]) if len(args) > 1 else getattr(fn, "__name__", "?"))
        return await real(self, fn, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(aiosqlite.Connection, "_execute", counted)
    monkeypatch.setattr(hes_sqlite, "IN_PLACE_MOST", 5 * 16)  # a reading has 15 values
    try:
        await _meter(db.url)
        async with db.begin() as session:
            await session.connection()  # BEGIN IMMEDIATE, in the thread
            trips.clear()
            await insert_ignore(session, Reading, [_reading(t, t) for t in (100, 200)])
            await session.execute(update(Reading).values(energy_import_wh=7))
            assert trips == []  # in place
            await insert_ignore(session, Reading, [_reading(t, t) for t in range(300, 1300, 100)])
            assert len(trips) == 1  # 150 values: to the thread
        assert "commit" in trips  # and its sync, in the thread
        async with db.read() as session:
            trips.clear()
            assert await session.scalar(select(func.count()).select_from(Reading)) == 12
            assert any("SELECT count" in t for t in trips)  # a read goes to the thread
        monkeypatch.setattr(hes_sqlite, "_SLOW", set())
        monkeypatch.setattr(hes_sqlite, "_SLOWER", {})
        monkeypatch.setattr(hes_sqlite, "IN_PLACE_SLOW", -1.0)  # every statement too slow
        async with db.begin() as session:
            await session.connection()
            trips.clear()
            for _ in range(2):
                await session.execute(update(Reading).values(energy_import_wh=6))
            assert trips == []  # in place twice, found slow twice
            await session.execute(update(Reading).values(energy_import_wh=6))
            assert len(trips) == 1  # the same SQL: to the thread from then on
        monkeypatch.setattr(hes_sqlite, "IN_PLACE_SLOW", 0.002)
        with pytest.raises(StorageError, match="IntegrityError"):
            async with db.begin() as session:
                await session.execute(insert(Reading), [_reading(100, 1)])  # in place, fails
        async with db.begin() as session:  # the connection is clean again
            await session.execute(update(Reading).values(energy_import_wh=8))
        async with db.read() as session:
            found = await session.scalars(select(Reading.energy_import_wh).distinct())
            assert found.all() == [8]
    finally:
        await db.close()


async def test_a_durable_transaction_syncs_its_commit_and_the_others_do_not(
    tmp_path: Path,
) -> None:
    db = await open_database(f"sqlite:///{tmp_path / 'hes.db'}", check=False)
    try:
        for durable, wanted in ((True, 2), (False, 1), (True, 2)):  # FULL, NORMAL
            async with db.begin(durable=durable) as session:
                assert await session.scalar(text("PRAGMA synchronous")) == wanted
    finally:
        await db.close()


async def test_the_task_holding_the_turn_to_write_may_ask_again(tmp_path: Path) -> None:
    db = await open_database(f"sqlite:///{tmp_path / 'hes.db'}", check=False)
    try:
        order: list[str] = []

        async def other() -> None:
            async with db.writing():
                order.append("other")

        async with db.writing():
            waiting = asyncio.create_task(other())
            await asyncio.sleep(0)
            async with db.writing():  # the same task: no wait for itself
                order.append("again")
            await asyncio.sleep(0)
            assert not waiting.done()  # another task waits for its turn
        await waiting
        assert order == ["again", "other"]
    finally:
        await db.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://x@localhost/db", "sqlite:// or postgresql:// only"),
        ("not a url", "not a database URL"),
        ("sqlite:////no/such/directory/hes.db", "does not exist"),
    ],
)
def test_a_bad_database_url_is_refused(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        asyncio.run(open_database(url))


def test_hes_db_upgrade_and_current(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    monkeypatch.chdir(tmp_path)
    behind = runner.invoke(app, ["db", "current", "--json"])
    assert behind.exit_code == 0, behind.output
    assert '"current": false' in behind.output
    assert (tmp_path / "hes.db").exists()  # the default: sqlite:///hes.db here
    first = runner.invoke(app, ["db", "upgrade"])
    assert first.exit_code == 0, first.output
    assert f"empty -> {head_revision()}" in first.output
    again = runner.invoke(app, ["db", "upgrade"])
    assert "already at" in again.output
    other = tmp_path / "other.db"
    monkeypatch.setenv("HES_DB", f"sqlite:///{other}")
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    assert other.exists()
    bad = runner.invoke(app, ["db", "upgrade", "--db", "mysql://x@localhost/db"])
    assert bad.exit_code == 1
    assert "error: database URL" in bad.output
    assert "Traceback" not in bad.output


def test_a_postgres_password_is_not_printed(postgres_server: str | None, tmp_path: Path) -> None:
    if postgres_server is None:
        pytest.skip("PostgreSQL at 127.0.0.1:5432 does not answer")
    runner = CliRunner()
    url = postgres_server.replace("postgres@", "postgres:s3cret@")
    done = runner.invoke(app, ["db", "current", "--db", url])
    assert "s3cret" not in done.output


def test_only_the_storage_package_imports_sqlalchemy() -> None:
    import ast

    root = Path(__file__).resolve().parent.parent
    for package in ("protocols", "meter_sim", "headend", "cli"):
        for path in (root / package).rglob("*.py"):
            if (root / "headend" / "storage") in path.parents:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = (
                    [alias.name for alias in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                bad = [n for n in names if n.split(".")[0] in {"sqlalchemy", "alembic"}]
                assert not bad, f"{path.relative_to(root)} imports {bad}"


async def test_an_sqlite_too_old_is_refused_with_its_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    from headend.storage import database

    database._check_sqlite.cache_clear()
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.31.1")
    try:
        with pytest.raises(ConfigError, match=r"SQLite is 3\.31\.1: hes needs 3\.35\.0 or newer"):
            await open_database(f"sqlite:///{tmp_path / 'old.db'}", check=False)
    finally:
        database._check_sqlite.cache_clear()
    assert not (tmp_path / "old.db").exists()
