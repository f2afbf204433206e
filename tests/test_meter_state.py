"""Each meter's latest state (``meter_state``), kept by the transaction that stores readings,
on SQLite and PostgreSQL: it follows the newest reading, ignores a late older one, carries
since when the credit is used up, and the migration that adds it backfills the same values."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from sqlalchemy import insert, select

from headend.domain.policy import Action, decide
from headend.domain.validation import Findings
from headend.storage import Database, open_database
from headend.storage.readings import reading_row, store_new_readings, store_readings
from headend.storage.schema import Meter, MeterStateRow, Reading
from headend.storage.supply import policy_inputs
from protocols.disconnect import ControlState
from tests.databases import db_url, postgres_server
from tests.test_domain_readings import SNAP, T0

__all__ = ["db_url", "postgres_server"]  # fixtures

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _meter(meter_id: str) -> Meter:
    return Meter(
        id=meter_id, serial=meter_id, endpoint="tcp://127.0.0.1:5020/1", transport="tcp",
        gateway="127.0.0.1:5020", unit_id=1, control_mode=6, credit_unit="money",
        currency="KES", currency_scale=-2, created_at=NOW,
    )  # fmt: skip


def _row(meter_id: str, n: int, credit: int, **fields: object) -> dict[str, object]:
    snapshot = replace(SNAP, meter_id=meter_id, time=T0 + 900 * n, credit=credit, **fields)
    return reading_row(snapshot, Findings(), NOW, "poll")


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = await open_database(db_url, check=False)
    await database.upgrade()
    async with database.begin() as session:
        session.add_all([_meter("M-1"), _meter("M-2")])
    try:
        yield database
    finally:
        await database.close()


async def _state(db: Database, meter_id: str) -> tuple[int, int, int | None]:
    """(meter time, credit, exhausted since) of the meter's state."""
    async with db.read() as session:
        row = await session.get(MeterStateRow, meter_id)
    assert row is not None
    return row.meter_time, row.credit, row.exhausted_since


async def _store(db: Database, *rows: dict[str, object]) -> list[tuple[str, int]]:
    async with db.begin() as session:
        return await store_new_readings(session, list(rows))


async def test_the_state_follows_the_newest_reading_and_ignores_a_late_one(db: Database) -> None:
    assert await _store(db, _row("M-1", 2, 9000)) == [("M-1", T0 + 1800)]
    assert await _state(db, "M-1") == (T0 + 1800, 9000, None)
    assert await _store(db, _row("M-1", 1, 9500)) == [("M-1", T0 + 900)]  # stored, but older
    assert await _state(db, "M-1") == (T0 + 1800, 9000, None)
    assert await _store(db, _row("M-1", 2, 9000)) == []  # a duplicate changes nothing
    await _store(db, _row("M-1", 3, 8000, control_state=ControlState.DISCONNECTED))
    async with db.read() as session:
        row = await session.get(MeterStateRow, "M-1")
    assert row is not None
    assert (row.meter_time, row.credit, row.control_state) == (T0 + 2700, 8000, 0)
    assert (row.control_mode, row.last_command_seq) == (SNAP.control_mode, SNAP.last_command_seq)


async def test_exhausted_since_is_the_first_reading_of_the_run_without_credit(
    db: Database,
) -> None:
    steps = [
        (1, 500, None),
        (2, 0, T0 + 1800),  # used up from here
        (3, -20, T0 + 1800),  # still: the run goes on
        (4, 0, T0 + 1800),
        (5, 3000, None),  # topped up
        (6, 0, T0 + 5400),  # a new run
    ]
    for n, credit, since in steps:
        await _store(db, _row("M-1", n, credit))
        assert (await _state(db, "M-1"))[2] == since, f"reading {n}"


async def test_a_poll_batch_of_one_reading_a_meter(db: Database) -> None:
    """A poll batch: one reading of each meter (on PostgreSQL one statement stores the readings
    and the states), a repeated one and a late one among them."""
    assert len(await _store(db, _row("M-1", 2, 0), _row("M-2", 2, 700))) == 2
    assert await _state(db, "M-1") == (T0 + 1800, 0, T0 + 1800)
    assert await _state(db, "M-2") == (T0 + 1800, 700, None)
    # M-1's run without credit goes on; M-2's late reading is stored but leaves its state
    assert sorted(await _store(db, _row("M-1", 3, -5), _row("M-2", 1, 0))) == [
        ("M-1", T0 + 2700),
        ("M-2", T0 + 900),
    ]
    assert await _state(db, "M-1") == (T0 + 2700, -5, T0 + 1800)
    assert await _state(db, "M-2") == (T0 + 1800, 700, None)
    # a repeat changes nothing; M-2 runs out
    assert await _store(db, _row("M-1", 3, -5), _row("M-2", 3, 0)) == [("M-2", T0 + 2700)]
    assert await _state(db, "M-1") == (T0 + 2700, -5, T0 + 1800)
    assert await _state(db, "M-2") == (T0 + 2700, 0, T0 + 2700)
    assert await _store(db, _row("M-1", 4, 50)) == [("M-1", T0 + 3600)]  # topped up
    assert await _state(db, "M-1") == (T0 + 3600, 50, None)


async def test_a_burst_of_readings_in_one_call(db: Database) -> None:
    """An MQTT burst: several readings of a meter (out of order) and of another meter at once."""
    rows = [_row("M-1", 3, 0), _row("M-1", 1, 400), _row("M-2", 1, 700), _row("M-1", 2, 0)]
    assert len(await _store(db, *rows)) == 4
    assert await _state(db, "M-1") == (T0 + 2700, 0, T0 + 1800)
    assert await _state(db, "M-2") == (T0 + 900, 700, None)
    assert await _store(db, _row("M-1", 5, -3), _row("M-1", 4, 0)) != []
    assert await _state(db, "M-1") == (T0 + 4500, -3, T0 + 1800)  # the run goes on
    assert await _store(db, _row("M-1", 6, 0), _row("M-1", 7, 100), _row("M-1", 8, 0)) != []
    assert await _state(db, "M-1") == (T0 + 7200, 0, T0 + 7200)  # a new run after the credit
    assert await _store(db, _row("M-1", 9, 100), _row("M-1", 10, 200)) != []
    assert await _state(db, "M-1") == (T0 + 9000, 200, None)


async def test_the_migration_backfills_the_state_from_the_readings(db_url: str) -> None:
    database = await open_database(db_url, check=False)
    try:
        await database.upgrade("0005")
        async with database.begin() as session:
            session.add_all([_meter("M-1"), _meter("M-2"), _meter("M-3")])
            await session.flush()
            rows = [
                *(_row("M-1", n, c) for n, c in ((1, 900), (2, 0), (3, 0))),
                *(_row("M-2", n, c) for n, c in ((1, 0), (2, 50))),
                *(_row("M-3", n, c) for n, c in ((1, 0), (2, -5))),  # never had credit
            ]
            await session.execute(insert(Reading), rows)
        await database.upgrade()
        async with database.read() as session:
            states = {
                m: (t, c, s)
                for m, t, c, s in await session.execute(
                    select(
                        MeterStateRow.meter_id,
                        MeterStateRow.meter_time,
                        MeterStateRow.credit,
                        MeterStateRow.exhausted_since,
                    )
                )
            }
        assert states == {
            "M-1": (T0 + 2700, 0, T0 + 1800),
            "M-2": (T0 + 1800, 50, None),
            "M-3": (T0 + 1800, -5, T0 + 900),
        }
    finally:
        await database.close()


async def test_the_policy_prefilter_keeps_every_meter_a_decision_acts_on(db: Database) -> None:
    """``acting_only`` leaves out in SQL only meters whose decision is no action."""
    connected, off, armed = (
        ControlState.CONNECTED,
        ControlState.DISCONNECTED,
        ControlState.READY_FOR_RECONNECTION,
    )
    cases = [
        (5000, 0, connected, 6),
        (5000, 0, off, 6),
        (5000, 0, off, 4),
        (5000, 0, armed, 6),
        (5000, 0, armed, 1),
        (0, 0, connected, 6),
        (0, 100, connected, 6),
        (0, 0, off, 6),
        (0, 0, connected, 0),
        (-10, 0, armed, 6),
    ]
    async with db.begin() as session:
        session.add_all([_meter(f"P-{i}") for i in range(len(cases))])
        await session.flush()
        for i, (credit, emergency, state, mode) in enumerate(cases):
            await store_readings(
                session,
                [
                    _row(
                        f"P-{i}", 1, credit, emergency_credit=emergency, control_state=state,
                        control_mode=mode,
                    )
                ],
            )  # fmt: skip
    now = datetime.fromtimestamp(T0 + 86400, UTC)
    async with db.read() as session:
        everything = await policy_inputs(session)
        acting = await policy_inputs(session, acting_only=True)
    decided = {r.meter_id: decide(r.account, r.meter, r.calendar, now).action for r in everything}
    kept = {r.meter_id for r in acting}
    assert kept < set(decided)
    assert {m for m, action in decided.items() if action is not Action.NONE} <= kept
    assert len(kept) < len(cases) - 3  # it does leave meters out
