"""Readings, intervals, events, gaps and read health: written exactly once by their keys."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
from sqlalchemy import (
    Boolean,
    Integer,
    String,
    Subquery,
    Table,
    Text,
    bindparam,
    case,
    cast,
    func,
    literal_column,
    null,
    select,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession

from headend.domain.health import Change, Health, after_read
from headend.domain.validation import CheckedInterval, Findings, Flag, Previous
from headend.storage.database import (
    JsonList,
    in_list,
    insert_ignore,
    list_values,
    storage_errors,
)
from headend.storage.schema import (
    Gap,
    HealthChange,
    Interval,
    Meter,
    MeterEvent,
    MeterStateRow,
    PollHealth,
    Reading,
    UtcDateTime,
)
from protocols.errors import StorageError
from protocols.readings import Event, MeterSnapshot


def _table(model: type[Any]) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


def reading_row(
    snapshot: MeterSnapshot, findings: Findings, received_at: datetime, source: str
) -> dict[str, Any]:
    rates = snapshot.energy_rates_wh
    return {
        "meter_id": snapshot.meter_id,
        "meter_time": snapshot.time,
        "received_at": received_at,
        "source": source,
        "energy_import_wh": snapshot.energy_import_wh,
        "rate1_wh": rates[0],
        "rate2_wh": rates[1],
        "rate3_wh": rates[2],
        "rate4_wh": rates[3],
        "power_w": snapshot.power_w,
        "voltage_dv": snapshot.voltage_dv,
        "current_ma": snapshot.current_ma,
        "power_factor_milli": snapshot.power_factor_milli,
        "frequency_chz": snapshot.frequency_chz,
        "credit": snapshot.credit,
        "emergency_credit": snapshot.emergency_credit,
        "debt": snapshot.debt,
        "low_credit_threshold": snapshot.low_credit_threshold,
        "control_state": int(snapshot.control_state),
        "control_mode": snapshot.control_mode,
        "status": int(snapshot.status),
        "last_event_seq": snapshot.last_event_seq,
        "last_transfer": snapshot.last_transfer,
        "last_command_seq": snapshot.last_command_seq,
        "flags": int(findings.flags),
        "flag_reason": findings.reason,
    }


def values_row(
    meter_id: str,
    values: Mapping[str, Any],
    findings: Findings,
    received_at: datetime,
    source: str,
) -> dict[str, Any]:
    """:func:`reading_row` of a reading given as its snapshot's value fields by name (as
    :meth:`~protocols.readings.MeterSnapshot.to_values` or a decoded MQTT reading gives
    them), without building the snapshot."""
    rates = values["energy_rates_wh"]
    return {
        "meter_id": meter_id,
        "meter_time": values["time"],
        "received_at": received_at,
        "source": source,
        "energy_import_wh": values["energy_import_wh"],
        "rate1_wh": rates[0],
        "rate2_wh": rates[1],
        "rate3_wh": rates[2],
        "rate4_wh": rates[3],
        "power_w": values["power_w"],
        "voltage_dv": values["voltage_dv"],
        "current_ma": values["current_ma"],
        "power_factor_milli": values["power_factor_milli"],
        "frequency_chz": values["frequency_chz"],
        "credit": values["credit"],
        "emergency_credit": values["emergency_credit"],
        "debt": values["debt"],
        "low_credit_threshold": values["low_credit_threshold"],
        "control_state": int(values["control_state"]),
        "control_mode": values["control_mode"],
        "status": int(values["status"]),
        "last_event_seq": values["last_event_seq"],
        "last_transfer": values["last_transfer"],
        "last_command_seq": values["last_command_seq"],
        "flags": int(findings.flags),
        "flag_reason": findings.reason,
    }


async def latest_reading(session: AsyncSession, meter_id: str) -> Previous | None:
    """The meter's latest stored reading, by meter time."""
    return (await latest_readings(session, [meter_id])).get(meter_id)


async def store_readings(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> int:
    """Store reading rows (from :func:`reading_row`); returns how many were new."""
    return len(await store_new_readings(session, rows))


async def store_new_readings(
    session: AsyncSession, rows: Sequence[dict[str, Any]]
) -> list[tuple[str, int]]:
    """Insert-or-ignore reading rows (from :func:`reading_row`) and bring each meter's
    :class:`~headend.storage.schema.MeterStateRow` up to its newest new reading, in the caller's
    transaction: the one way readings are stored. Returns ``(meter_id, meter_time)`` of each
    row that was new."""
    conn = await session.connection()
    distinct = len({row["meter_id"] for row in rows}) == len(rows)
    if conn.dialect.name == "postgresql" and rows and distinct:
        return await _store_with_state_pg(conn, rows)
    stored = [(str(m), int(t)) for m, t in await insert_rows(session, Reading, rows)]
    if stored and distinct and conn.dialect.name == "sqlite":
        with storage_errors("keeping the meters' latest state"):
            await conn.execute(_STATE_FROM_READINGS_SQLITE, {"keys": stored})
    elif stored:
        await update_meter_state(session, rows, set(stored))
    return stored


async def _store_with_state_pg(conn: Any, rows: Sequence[dict[str, Any]]) -> list[tuple[str, int]]:
    """PostgreSQL, at most one reading a meter (a poll batch): the insert-or-ignore and the
    state upsert in one statement (:func:`_pg_readings_with_state`), which takes each
    meter's state from its reading as inserted, so a repeated reading changes nothing."""
    keys = tuple(rows[0])
    statement = _WITH_STATE.get(keys)
    if statement is None:
        statement = _WITH_STATE[keys] = _pg_readings_with_state(keys)
    with storage_errors("storing readings"):
        result = await conn.execute(statement[0], statement[1](rows))
        return [(str(m), int(t)) for m, t in result]


#: the reading columns a meter's state keeps
_STATE_COLUMNS = (
    "meter_id",
    "meter_time",
    "credit",
    "emergency_credit",
    "low_credit_threshold",
    "control_state",
    "control_mode",
    "last_command_seq",
)


async def update_meter_state(
    session: AsyncSession, rows: Sequence[dict[str, Any]], new: set[tuple[str, int]]
) -> None:
    """Move each meter's state forward to its newest row of ``rows`` that is in ``new``: at
    most two upserts however many readings a meter has in the batch (a poll stores one a
    meter, an MQTT burst many). The upsert writes only over a state older than the reading
    (a late reading changes nothing). ``exhausted_since`` is the first reading of the run
    without credit the newest reading ends: found in the batch when the batch holds a reading
    with credit before that run ("settled"), else carried on from the stored state when its
    credit was used up too, so it is right however a meter's readings are split between
    transactions and workers."""
    per_meter: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if (row["meter_id"], row["meter_time"]) in new:
            per_meter.setdefault(row["meter_id"], []).append(row)
    settled: list[dict[str, Any]] = []
    carried: list[dict[str, Any]] = []
    for meter_rows in per_meter.values():
        if len(meter_rows) > 1:
            meter_rows.sort(key=lambda r: r["meter_time"])
        last = meter_rows[-1]
        state = {k: last[k] for k in _STATE_COLUMNS}
        since = None
        with_credit = False
        for row in meter_rows:
            if row["credit"] > 0:
                since, with_credit = None, True
            elif since is None:
                since = row["meter_time"]
        state["exhausted_since"] = since
        (settled if with_credit else carried).append(state)
    conn = await session.connection()
    dialect = conn.dialect.name
    with storage_errors("keeping the meters' latest state"):
        for states, carry in ((carried, True), (settled, False)):
            if not states:
                continue
            if dialect == "postgresql":
                upsert = _STATE_UPSERTS.get(carry)
                if upsert is None:
                    upsert = _STATE_UPSERTS[carry] = _pg_state_upsert(carry)
                await conn.execute(upsert[0], upsert[1](states))
            else:
                text, order = _sqlite_state_upsert(conn.dialect, carry)
                values = [tuple(s[k] if k else v for k, v in order) for s in states]
                await conn.exec_driver_sql(text, values)


_STATE_KEYS = (*_STATE_COLUMNS, "exhausted_since")


def _pg_state_upsert(carry: bool) -> tuple[Any, _Parameters]:
    """PostgreSQL's state upsert, and what makes its parameters of the states."""
    table = _table(MeterStateRow)
    source, parameters = _pg_source(table, _STATE_KEYS)
    insert = postgresql.insert(table).from_select(list(_STATE_KEYS), source)
    return _state_upsert(insert, carry), parameters


def _pg_readings_with_state(keys: tuple[str, ...]) -> tuple[Any, _Parameters]:
    """``WITH new AS (INSERT INTO readings … ON CONFLICT DO NOTHING RETURNING …), state AS
    (INSERT INTO meter_state SELECT … FROM new ON CONFLICT … DO UPDATE …) SELECT meter_id,
    meter_time FROM new``, and what makes its parameters of the rows. For rows of distinct
    meters only: a meter's one new reading is its state, exhausted since its own time when
    it shows no credit, carried on from the stored state as :func:`update_meter_state` does.
    The readings table is written before the meters' state, as on every other path."""
    table, state = _table(Reading), _table(MeterStateRow)
    source, parameters = _pg_source(table, keys)
    new = (
        postgresql.insert(table)
        .from_select(list(keys), source)
        .on_conflict_do_nothing()
        .returning(*(table.c[k] for k in _STATE_COLUMNS))
        .cte("new")
    )
    states = select(*(new.c[k] for k in _STATE_COLUMNS), _exhausted_since(new.c))
    upsert = _state_upsert(postgresql.insert(state).from_select(list(_STATE_KEYS), states), True)
    statement = select(new.c.meter_id, new.c.meter_time).add_cte(upsert.cte("state"))
    return statement, parameters


_WITH_STATE: dict[tuple[str, ...], tuple[Any, _Parameters]] = {}


def _sqlite_state_from_readings() -> Any:
    """SQLite's form of :func:`_pg_readings_with_state`'s state upsert, once the readings are
    in: ``INSERT INTO meter_state SELECT … FROM json_each(:keys) JOIN readings … ON CONFLICT
    … DO UPDATE …``, each meter's state taken from its one new reading, found by its key
    (``[meter_id, meter_time]`` pairs as one JSON text) along the primary key."""
    table, state = _table(Reading), _table(MeterStateRow)
    pairs = list_values(bindparam("keys", type_=JsonList())).table_valued("value")
    meter_id = func.json_extract(pairs.c.value, "$[0]")
    meter_time = func.json_extract(pairs.c.value, "$[1]")
    states = (
        select(*(table.c[k] for k in _STATE_COLUMNS), _exhausted_since(table.c))
        .select_from(pairs)
        .join(table, (table.c.meter_id == meter_id) & (table.c.meter_time == meter_time))
        .where(true())  # SQLite: a SELECT before ON CONFLICT needs a WHERE
    )
    return _state_upsert(sqlite.insert(state).from_select(list(_STATE_KEYS), states), True)


def _exhausted_since(reading: Any) -> Any:
    """``exhausted_since`` of a meter's state taken from one reading (``reading``: its
    columns): the reading's own time when it shows no credit, else NULL; the upsert carries
    on a run the stored state began."""
    return case((reading.credit > 0, null()), else_=reading.meter_time)


def _state_upsert(insert: Any, carry: bool) -> Any:
    """The state upsert of ``insert`` (of the states' rows); ``carry``: the batch's run
    without credit may go on from the stored state's."""
    table = _table(MeterStateRow)
    new = insert.excluded
    since: Any = new.exhausted_since
    if carry:
        since = case(
            (new.credit > 0, None),
            (table.c.credit > 0, new.exhausted_since),
            else_=func.coalesce(table.c.exhausted_since, new.exhausted_since),
        )
    values: dict[str, Any] = {k: new[k] for k in _STATE_COLUMNS if k != "meter_id"}
    values["exhausted_since"] = since
    return insert.on_conflict_do_update(
        index_elements=[table.c.meter_id],
        set_=values,
        where=table.c.meter_time < new.meter_time,
    )


_STATE_FROM_READINGS_SQLITE = _sqlite_state_from_readings()


_STATE_UPSERTS: dict[bool, tuple[Any, _Parameters]] = {}  # PostgreSQL's, by carry


def _sqlite_state_upsert(dialect: Dialect, carry: bool) -> tuple[str, list[tuple[str | None, Any]]]:
    """The SQLite state upsert as SQL text and, per ``?`` in it, the state key its value comes
    from (or None and the constant it binds), compiled once: the rows then go to the driver's
    executemany as plain tuples, without SQLAlchemy's handling of each row (every column is an
    integer or text, which the driver binds as it is)."""
    compiled = _SQLITE_STATE_UPSERTS.get(carry)
    if compiled is None:
        statement = _state_upsert(sqlite.insert(_table(MeterStateRow)), carry)
        done = statement.compile(dialect=dialect, column_keys=list(_STATE_KEYS))
        order = [
            (name, None) if name in _STATE_KEYS else (None, done.params[name])
            for name in done.positiontup
        ]
        compiled = _SQLITE_STATE_UPSERTS[carry] = (done.string, order)
    return compiled


_SQLITE_STATE_UPSERTS: dict[bool, tuple[str, list[tuple[str | None, Any]]]] = {}


def interval_row(meter_id: str, interval: CheckedInterval) -> dict[str, Any]:
    return {
        "meter_id": meter_id,
        "start": interval.start,
        "period": interval.period,
        "energy_wh": interval.energy_wh,
        "register_wh": interval.register_wh,
        "credit": interval.credit,
        "status": interval.status,
        "estimated": interval.estimated,
        "flags": int(interval.findings.flags),
        "flag_reason": interval.findings.reason,
    }


async def last_interval(session: AsyncSession, meter_id: str) -> CheckedInterval | None:
    """The meter's latest stored interval, actual or estimated."""
    return (await last_intervals(session, [meter_id])).get(meter_id)


async def store_intervals(
    session: AsyncSession, meter_id: str, intervals: Sequence[CheckedInterval]
) -> int:
    return await insert_ignore(session, Interval, [interval_row(meter_id, i) for i in intervals])


async def last_event_seq(session: AsyncSession, meter_id: str) -> int:
    """The highest event sequence stored for the meter (0: none)."""
    return (await last_event_seqs(session, [meter_id])).get(meter_id, 0)


def event_rows(
    meter_id: str, events: Sequence[Event], received_at: datetime, boot: int = 0
) -> list[dict[str, Any]]:
    return [
        {
            "meter_id": meter_id,
            "boot": boot,
            "seq": event.seq,
            "meter_time": event.time,
            "code": int(event.code),
            "a": event.a,
            "b": event.b,
            "received_at": received_at,
        }
        for event in events
    ]


def gap_row(meter_id: str, kind: str, first: int, last: int, found_at: datetime) -> dict[str, Any]:
    return {"meter_id": meter_id, "kind": kind, "first": first, "last": last, "found_at": found_at}


async def store_events(
    session: AsyncSession,
    meter_id: str,
    events: Sequence[Event],
    received_at: datetime,
    boot: int = 0,
) -> int:
    """Store events; ``boot`` 0 for events read from the log (their sequence is lifelong)."""
    return await insert_ignore(session, MeterEvent, event_rows(meter_id, events, received_at, boot))


async def store_gap(
    session: AsyncSession, meter_id: str, kind: str, first: int, last: int, *, found_at: datetime
) -> bool:
    """Record that the meter can no longer give ``first..last`` (interval starts or event
    sequence numbers); False if that gap was recorded already."""
    return await insert_ignore(session, Gap, [gap_row(meter_id, kind, first, last, found_at)]) == 1


@dataclass(frozen=True, slots=True)
class HealthState:
    health: Health
    failures: int


async def record_read(
    session: AsyncSession,
    meter_id: str,
    ok: bool,
    *,
    now: datetime,
    error: str = "",
    next_due: datetime | None = None,
    unreachable_after: int = 3,
) -> Change | None:
    """Update the meter's read health after one read; a change is stored as an event."""
    row = await session.get(PollHealth, meter_id)
    if row is None:
        row = PollHealth(meter_id=meter_id, health=Health.UNKNOWN.value, consecutive_failures=0)
        session.add(row)
    health, failures, change = after_read(
        Health(row.health), row.consecutive_failures, ok, error, unreachable_after
    )
    row.health = health.value
    row.consecutive_failures = failures
    row.last_attempt = now
    if ok:
        row.last_seen = now
        row.last_error = None
    else:
        row.last_error = error
    row.next_due = next_due
    if change is not None:
        session.add(
            HealthChange(
                meter_id=meter_id,
                at=now,
                old=change.old.value,
                new=change.new.value,
                reason=change.reason,
            )
        )
    return change


async def health_of(session: AsyncSession, meter_id: str) -> HealthState:
    row = await session.get(PollHealth, meter_id)
    if row is None:
        return HealthState(Health.UNKNOWN, 0)
    return HealthState(Health(row.health), row.consecutive_failures)


# -- many meters at once (the poller's batches) -----------------------------------------------


def latest_times(*where: Any) -> Subquery:
    """Each meter's latest reading time, ``(meter_id, meter_time)``, of the readings that meet
    ``where``: a subquery to join readings (or anything per meter) on."""
    return (
        select(Reading.meter_id, func.max(Reading.meter_time).label("meter_time"))
        .where(*where)
        .group_by(Reading.meter_id)
        .subquery()
    )


async def latest_readings(session: AsyncSession, meter_ids: Sequence[str]) -> dict[str, Previous]:
    """Each meter's latest stored reading, by meter time, in one query."""
    conn = await session.connection()
    statement = _LATEST_READINGS_PG if conn.dialect.name == "postgresql" else _LATEST_READINGS
    rows = await conn.execute(statement, {"ids": list(meter_ids)})
    return {meter_id: Previous(time, energy) for meter_id, time, energy in rows}


async def last_intervals(
    session: AsyncSession, meter_ids: Sequence[str]
) -> dict[str, CheckedInterval]:
    """Each meter's latest stored interval, in one query."""
    conn = await session.connection()
    statement = _LAST_INTERVALS_PG if conn.dialect.name == "postgresql" else _LAST_INTERVALS
    rows = await conn.execute(statement, {"ids": list(meter_ids)})
    found: dict[str, CheckedInterval] = {}
    for meter_id, start, period, wh, register, credit, status, flags, reason, estimated in rows:
        reasons = tuple(reason.split("; ")) if reason else ()
        found[meter_id] = CheckedInterval(
            start, period, wh, register, credit, status, Findings(Flag(flags), reasons), estimated
        )
    return found


async def last_event_seqs(session: AsyncSession, meter_ids: Sequence[str]) -> dict[str, int]:
    """Each meter's highest stored event sequence (meters without events are left out)."""
    conn = await session.connection()
    rows = await conn.execute(_LAST_SEQS, {"ids": list(meter_ids)})
    return {meter_id: int(seq) for meter_id, seq in rows if seq is not None}


def _ids(column: Any) -> Any:
    return in_list(column, "ids")


def _latest_per_meter(column: Any, key: Any) -> Subquery:
    """``(meter_id, latest)``: each named meter's greatest ``column`` (of the table whose meter
    column is ``key``), or NULL. Driven from the meters table with one correlated ``max()`` per
    meter, which both SQLite and PostgreSQL answer from the primary key's index at its end
    (a GROUP BY over the table would visit every row the meters have)."""
    latest = select(func.max(column)).where(key == Meter.id).scalar_subquery()
    return (
        select(Meter.id.label("meter_id"), latest.label("latest")).where(_ids(Meter.id)).subquery()
    )


_latest_reading = _latest_per_meter(Reading.meter_time, Reading.meter_id)
_LATEST_READINGS = select(Reading.meter_id, Reading.meter_time, Reading.energy_import_wh).join(
    _latest_reading,
    (Reading.meter_id == _latest_reading.c.meter_id)
    & (Reading.meter_time == _latest_reading.c.latest),
)
#: SQLite: each named meter's latest reading (or NULLs) and read health (or NULL)
_LATEST_WITH_HEALTH = (
    select(
        _latest_reading.c.meter_id,
        Reading.meter_time,
        Reading.energy_import_wh,
        PollHealth.health,
    )
    .select_from(_latest_reading)
    .outerjoin(
        Reading,
        (Reading.meter_id == _latest_reading.c.meter_id)
        & (Reading.meter_time == _latest_reading.c.latest),
    )
    .outerjoin(PollHealth, PollHealth.meter_id == _latest_reading.c.meter_id)
)
_latest_interval = _latest_per_meter(Interval.start, Interval.meter_id)
#: an interval's columns as last_intervals reads them (after the meter id)
_INTERVAL_COLUMNS = (
    Interval.start,
    Interval.period,
    Interval.energy_wh,
    Interval.register_wh,
    Interval.credit,
    Interval.status,
    Interval.flags,
    Interval.flag_reason,
    Interval.estimated,
)
_LAST_INTERVALS = select(Interval.meter_id, *_INTERVAL_COLUMNS).join(
    _latest_interval,
    (Interval.meter_id == _latest_interval.c.meter_id)
    & (Interval.start == _latest_interval.c.latest),
)


def _latest_lateral(key: Any, order: Any, *columns: Any) -> Any:
    """PostgreSQL's form of the look-ups above: ``(meter id, *columns)`` of each named meter's
    row with the greatest ``order``, found by one backward step along the primary key's
    index per meter (a LATERAL subquery with LIMIT 1). The join form above, which SQLite
    answers from the index, PostgreSQL planned as a hash join over every row of the table
    (the planner cannot estimate the join on the correlated maximum): a look-up of 200
    meters' latest readings grew with the table, 10 ms at 40,000 readings."""
    latest = select(*columns).where(key == Meter.id).order_by(order.desc()).limit(1).lateral()
    return (
        select(Meter.id, *(latest.c[c.key] for c in columns))
        .select_from(Meter)
        .join(latest, true())
        .where(_ids(Meter.id))
    )


_LATEST_READINGS_PG = _latest_lateral(
    Reading.meter_id, Reading.meter_time, Reading.meter_time, Reading.energy_import_wh
)
_LAST_INTERVALS_PG = _latest_lateral(Interval.meter_id, Interval.start, *_INTERVAL_COLUMNS)
_latest_seq = _latest_per_meter(MeterEvent.seq, MeterEvent.meter_id)
_LAST_SEQS = select(_latest_seq.c.meter_id, _latest_seq.c.latest)
_HEALTH_OF = select(PollHealth.meter_id, PollHealth.health).where(_ids(PollHealth.meter_id))


async def insert_rows(
    session: AsyncSession, model: type[Any], rows: Sequence[dict[str, Any]], *returning: Any
) -> list[tuple[Any, ...]]:
    """Insert-or-ignore ``rows`` (dicts with the same keys) into ``model``'s table in one
    statement, without the ORM; returns, of each row that was new, its ``returning`` columns
    (default: the primary key).

    On SQLite the rows go as multi-row INSERTs (:class:`_SqliteInsert`). On PostgreSQL they go
    as ``INSERT … SELECT`` from one parameter (:func:`_pg_source`: one JSON text, or one array
    a column): the statement's text is the same for any number of rows, so neither
    SQLAlchemy nor psycopg parse it again per batch (a multi-row VALUES list of a few
    thousand parameters is parsed anew each time)."""
    if not rows:
        return []
    table = _table(model)
    conn = await session.connection()
    dialect = conn.dialect.name
    columns = tuple(returning) or tuple(table.primary_key.columns)
    keys = tuple(rows[0])
    key = (dialect, table.name, keys, tuple(c.key for c in columns))
    statement = _INSERTS.get(key)
    if statement is None:
        statement = _insert_statement(conn.dialect, table, keys, columns)
        _INSERTS[key] = statement
    with storage_errors(f"storing {table.name}"):
        if dialect == "postgresql":
            result = await conn.execute(statement[0], statement[1](rows))
        elif isinstance(statement, _SqliteInsert):
            return await statement.run(conn, rows)
        else:
            result = await conn.execute(statement, list(rows))
        return [tuple(row) for row in result]


async def insert_all(
    session: AsyncSession, model: type[Any], rows: Sequence[dict[str, Any]]
) -> None:
    """Insert ``rows`` (dicts with the same keys) into ``model``'s table in one statement, as
    :func:`insert_rows` does but failing on any conflict (for rows that must all go in: the
    audit chain, command transitions)."""
    if not rows:
        return
    table = _table(model)
    conn = await session.connection()
    dialect = conn.dialect.name
    keys = tuple(rows[0])
    with storage_errors(f"storing {table.name}"):
        if dialect != "postgresql":
            await conn.execute(table.insert(), list(rows))
            return
        key = (dialect, table.name, keys, ("insert all",))
        statement = _INSERTS.get(key)
        if statement is None:
            source, parameters = _pg_source(table, keys)
            statement = postgresql.insert(table).from_select(list(keys), source), parameters
            _INSERTS[key] = statement
        await conn.execute(statement[0], statement[1](rows))


async def update_rows(
    session: AsyncSession, model: type[Any], rows: Sequence[dict[str, Any]]
) -> None:
    """Update rows of ``model``'s table by primary key (each dict holds the key and the same
    other columns): on PostgreSQL one ``UPDATE … FROM (SELECT unnest(…), …)``, elsewhere one
    executemany."""
    if not rows:
        return
    table = _table(model)
    conn = await session.connection()
    dialect = conn.dialect.name
    keys = tuple(rows[0])
    primary = [c.key for c in table.primary_key.columns]
    key = (dialect, table.name, keys, ("update",))
    statement: Any = _INSERTS.get(key)
    if statement is None:
        if dialect == "postgresql":
            selected, parameters = _pg_source(table, keys)
            source = selected.subquery("new")
            statement = (
                update(table)
                .where(*(table.c[k] == source.c[k] for k in primary))
                .values({k: source.c[k] for k in keys if k not in primary}),
                parameters,
            )
        else:
            statement = (
                update(table)
                .where(*(table.c[k] == bindparam(f"key_{k}") for k in primary))
                .values({k: bindparam(f"new_{k}") for k in keys if k not in primary})
            )
        _INSERTS[key] = statement
    with storage_errors(f"updating {table.name}"):
        if dialect == "postgresql":
            await conn.execute(statement[0], statement[1](rows))
        else:
            await conn.execute(
                statement,
                [
                    {(f"key_{k}" if k in primary else f"new_{k}"): v for k, v in row.items()}
                    for row in rows
                ],
            )


#: what makes a PostgreSQL statement's parameters of its rows
_Parameters = Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]


def _pg_source(table: Table, keys: Sequence[str]) -> tuple[Any, _Parameters]:
    """PostgreSQL's ``SELECT`` of rows given in one parameter set, and what makes that set
    of the rows: one JSON text where the columns allow it (:class:`_JsonRows`), else one
    array a column."""
    if _json_ready(table, keys):
        return _json_source(table, keys), _JsonRows(table, keys)

    def arrays(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return {f"new_{k}": [row[k] for row in rows] for k in keys}

    return _unnest(table, keys), arrays


def _unnest(table: Table, keys: Sequence[str]) -> Any:
    """``SELECT unnest(:new_k1) AS k1, unnest(:new_k2) AS k2, …``: rows given as one array
    per column (the parameters are named apart from the columns, as an UPDATE needs)."""
    return select(
        *(
            func.unnest(bindparam(f"new_{k}", type_=postgresql.ARRAY(table.c[k].type))).label(k)
            for k in keys
        )
    )


class _SqliteInsert:
    """Insert-or-ignore of rows with the same keys on SQLite, rendered here rather than by
    SQLAlchemy's "insertmanyvalues": one ``INSERT … VALUES (?, …), (?, …) ON CONFLICT DO
    NOTHING RETURNING …`` per chunk of rows (as many as SQLite's limit of parameters lets one
    statement carry), its parameters one flat tuple through each column's bind processor. The
    text of a full chunk is always the same (the driver's statement cache keeps it prepared),
    and SQLAlchemy's per-row parameter handling, about half the CPU of a stored reading, is
    left out. Only for tables where nothing is filled in on the Python side (no Python-side
    default of a column the rows leave out) and returned columns that need no conversion
    (:func:`_sqlite_insert` checks)."""

    def __init__(
        self,
        sql: Callable[[int], str],
        processors: Sequence[Callable[[Any], Any] | None],
        keys: tuple[str, ...],
    ) -> None:
        self._sql = sql
        self._texts: dict[int, str] = {}
        self._processors = list(zip(keys, processors, strict=True))
        self._chunk = max(1, _SQLITE_PARAMETERS // len(keys))

    async def run(self, conn: Any, rows: Sequence[dict[str, Any]]) -> list[tuple[Any, ...]]:
        found: list[tuple[Any, ...]] = []
        for first in range(0, len(rows), self._chunk):
            chunk = rows[first : first + self._chunk]
            text = self._texts.get(len(chunk))
            if text is None:
                text = self._texts[len(chunk)] = self._sql(len(chunk))
            parameters: list[Any] = []
            for row in chunk:
                for key, process in self._processors:
                    value = row[key]
                    try:
                        parameters.append(value if process is None else process(value))
                    except (TypeError, ValueError) as exc:  # what the column's type refuses
                        raise StorageError(f"{key}: {exc}") from exc
            result = await conn.exec_driver_sql(text, tuple(parameters))
            found += [tuple(row) for row in result]
        return found


#: parameters one SQLite statement may carry (SQLITE_MAX_VARIABLE_NUMBER since SQLite 3.32)
_SQLITE_PARAMETERS = 32766 if sqlite3.sqlite_version_info >= (3, 32) else 999


def _sqlite_insert(
    dialect: Dialect, table: Table, keys: tuple[str, ...], returning: tuple[Any, ...]
) -> _SqliteInsert | None:
    """The :class:`_SqliteInsert` of these rows, or None where SQLAlchemy has to do more
    than bind the values (a Python-side default, a returned value to convert)."""
    if any(c.default is not None for c in table.columns if c.key not in keys):
        return None
    returning = tuple(c.expression for c in returning)  # columns, also of mapped attributes
    if any(c.type.dialect_impl(dialect).result_processor(dialect, None) for c in returning):
        return None
    quote = dialect.identifier_preparer.quote
    columns = ", ".join(quote(table.c[k].name) for k in keys)
    back = ", ".join(quote(c.name) for c in returning)
    row = "(" + ", ".join("?" * len(keys)) + ")"
    head = f"INSERT INTO {quote(table.name)} ({columns}) VALUES "
    tail = f" ON CONFLICT DO NOTHING RETURNING {back}"
    processors = [table.c[k].type.dialect_impl(dialect).bind_processor(dialect) for k in keys]
    return _SqliteInsert(lambda n: head + ", ".join([row] * n) + tail, processors, keys)


def _insert_statement(
    dialect: Dialect, table: Table, keys: tuple[str, ...], returning: tuple[Any, ...]
) -> Any:
    if dialect.name != "postgresql":
        fast = _sqlite_insert(dialect, table, keys, returning) if dialect.name == "sqlite" else None
        return fast or sqlite.insert(table).on_conflict_do_nothing().returning(*returning)
    source, parameters = _pg_source(table, keys)
    statement = (
        postgresql.insert(table)
        .from_select(list(keys), source)
        .on_conflict_do_nothing()
        .returning(*returning)
    )
    return statement, parameters


def _json_ready(table: Table, keys: Sequence[str]) -> bool:
    """Whether rows of these columns go to PostgreSQL as JSON exactly as their bind
    processors would send them: integers, text, booleans and aware datetimes only."""
    return all(
        isinstance(table.c[k].type, Integer | String | Boolean | UtcDateTime)
        and table.c[k].key == table.c[k].name
        for k in keys
    )


def _json_source(table: Table, keys: Sequence[str]) -> Any:
    """``SELECT k1, k2, … FROM json_populate_recordset(NULL::table, :rows)``: rows given as
    one JSON array of objects, each value taking its column's type from the table's row type
    (see :class:`_JsonRows`)."""
    quoted = _POSTGRESQL.identifier_preparer.quote(table.name)
    rowtype: Any = literal_column(f"NULL::{quoted}")
    rows = func.json_populate_recordset(
        rowtype, cast(bindparam("rows", type_=Text()), postgresql.JSON)
    ).table_valued(*keys)
    return select(*(rows.c[k] for k in keys))


class _JsonRows:
    """The parameters of a :func:`_json_source` statement: its rows as one JSON text
    (``:rows``), encoded by msgspec. One parameter however many rows, where one array a
    column (``unnest(:k1), unnest(:k2), …``) had psycopg adapt every value in Python (2.8 ms
    of CPU for 200 readings, against 0.2 ms). Aware datetimes go as RFC 3339 text; a naive
    one is refused, as the column's own type refuses it."""

    def __init__(self, table: Table, keys: Sequence[str]) -> None:
        self._times = [k for k in keys if isinstance(table.c[k].type, UtcDateTime)]

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        for key in self._times:
            for row in rows:
                value = row[key]
                if value is None:
                    continue
                if not isinstance(value, datetime):
                    raise StorageError(f"{key}: a datetime expected, got {type(value).__name__}")
                if value.tzinfo is None:
                    raise StorageError(
                        f"{key}: a naive datetime cannot be stored: give it a time zone"
                    )
        return {"rows": _JSON.encode(rows).decode()}


_JSON = msgspec.json.Encoder()
_POSTGRESQL: Dialect = postgresql.dialect()  # type: ignore[no-untyped-call]


_INSERTS: dict[tuple[str, str, tuple[str, ...], tuple[str, ...]], Any] = {}


@dataclass(slots=True)
class StoredBefore:
    """What the store holds of the meters of a batch before the batch is written: each
    meter's latest reading, read health (None on PostgreSQL: see :func:`stored_before`) and,
    of the meters asked for, latest interval and event sequence."""

    readings: dict[str, Previous]
    health: dict[str, str] | None
    intervals: dict[str, CheckedInterval]
    seqs: dict[str, int]


async def stored_before(
    session: AsyncSession,
    meter_ids: Sequence[str],
    *,
    intervals_of: Sequence[str] = (),
    events_of: Sequence[str] = (),
) -> StoredBefore:
    """One to four queries: latest readings and health of ``meter_ids``; latest intervals of
    ``intervals_of`` and latest event sequences of ``events_of`` only when those are given.
    On PostgreSQL the health is left to :func:`record_reads_ok` (None), whose update returns
    it."""
    conn = await session.connection()
    health: dict[str, str] | None = None
    if conn.dialect.name == "postgresql":
        readings = await latest_readings(session, meter_ids)
    else:  # the latest readings and the health in one query
        with storage_errors("reading what is stored"):
            rows = (await conn.execute(_LATEST_WITH_HEALTH, {"ids": list(meter_ids)})).all()
        readings = {m: Previous(t, e) for m, t, e, _ in rows if t is not None}
        health = {m: h for m, _, _, h in rows if h is not None}
    return StoredBefore(
        readings=readings,
        health=health,
        intervals=await last_intervals(session, intervals_of) if intervals_of else {},
        seqs=await last_event_seqs(session, events_of) if events_of else {},
    )


async def record_reads_ok(
    session: AsyncSession,
    meter_ids: Sequence[str],
    now: datetime,
    health: dict[str, str] | None = None,
) -> list[tuple[str, Change]]:
    """Good reads of many meters: each is online now; the changes of health are stored.
    ``health`` is each meter's read health as the transaction found it (read here when not
    given); a meter without a health row gets one."""
    if not meter_ids:
        return []
    conn = await session.connection()
    updated = False
    if health is None and conn.dialect.name == "postgresql":
        # one statement: set them online and return what each was (the row locked first)
        with storage_errors("recording read health"):
            rows = await conn.execute(_READS_OK_PG, {"ids": list(meter_ids), "now": now})
        health = {m: h for m, h in rows}
        updated = True
    elif health is None:
        health = {m: h for m, h in await conn.execute(_HEALTH_OF, {"ids": list(meter_ids)})}
    missing = [m for m in meter_ids if m not in health]
    if missing:
        await insert_rows(
            session,
            PollHealth,
            [
                {"meter_id": m, "health": Health.UNKNOWN.value, "consecutive_failures": 0}
                for m in missing
            ],
        )
    online = Health.ONLINE.value
    changes = [
        (m, Change(Health(health.get(m, Health.UNKNOWN.value)), Health.ONLINE, "read succeeded"))
        for m in meter_ids
        if health.get(m) != online
    ]
    with storage_errors("recording read health"):
        if not updated:
            await conn.execute(_READS_OK, {"ids": list(meter_ids), "now": now})
        elif missing:  # their rows are new: set them online too
            await conn.execute(_READS_OK, {"ids": missing, "now": now})
    if changes:
        await insert_rows(
            session,
            HealthChange,
            [
                {
                    "meter_id": m,
                    "at": now,
                    "old": c.old.value,
                    "new": c.new.value,
                    "reason": c.reason,
                }
                for m, c in changes
            ],
        )
    return changes


_ONLINE_NOW: dict[str, Any] = {
    "health": Health.ONLINE.value,
    "consecutive_failures": 0,
    "last_attempt": bindparam("now"),
    "last_seen": bindparam("now"),
    "last_error": None,
    "next_due": None,
}
_READS_OK = update(PollHealth).where(_ids(PollHealth.meter_id)).values(_ONLINE_NOW)
_health_before = (
    select(PollHealth.meter_id, PollHealth.health)
    .where(_ids(PollHealth.meter_id))
    .with_for_update()
    .subquery("before")
)
#: PostgreSQL: the meters set online, each returned with its health before (UPDATE … FROM
#: the rows as they were, locked; a concurrent change is waited for and read again)
_READS_OK_PG = (
    update(PollHealth)
    .where(PollHealth.meter_id == _health_before.c.meter_id)
    .values(_ONLINE_NOW)
    .returning(PollHealth.meter_id, _health_before.c.health)
)


async def record_presence(
    session: AsyncSession, meter_id: str, health: Health, *, now: datetime, reason: str
) -> Change | None:
    """Set the meter's read health from what it says of itself (an MQTT state message: online
    or offline); a change is stored as an event, as a read's is."""
    row = await session.get(PollHealth, meter_id)
    if row is None:
        row = PollHealth(meter_id=meter_id, health=Health.UNKNOWN.value, consecutive_failures=0)
        session.add(row)
    old = Health(row.health)
    row.health = health.value
    if health is Health.ONLINE:
        row.last_seen = now
        row.consecutive_failures = 0
    if old is health:
        return None
    change = Change(old, health, reason)
    session.add(
        HealthChange(meter_id=meter_id, at=now, old=old.value, new=health.value, reason=reason)
    )
    return change


async def meter_statuses(session: AsyncSession, meter_ids: Sequence[str]) -> dict[str, str]:
    """The registered meters' statuses (active, retired); unregistered ones are left out."""
    rows = await session.execute(select(Meter.id, Meter.status).where(Meter.id.in_(meter_ids)))
    return {meter_id: status for meter_id, status in rows}
