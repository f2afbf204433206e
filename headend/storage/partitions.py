"""Monthly range partitions of the ``intervals`` table, on PostgreSQL.

Migration 0002 turns ``intervals`` into a table partitioned by range of ``start`` (the
interval's start, meter-clock epoch seconds), with a default partition that takes any row no
monthly partition covers, so that an insert never fails for want of a partition. Monthly
partitions cover ``[first second of the month, first second of the next)`` in UTC and are named
``intervals_YYYY_MM``. They live in the schema :data:`SCHEMA`, apart from the models' tables, so
that the schema check (the models against the database) sees the one ``intervals`` table.

* :func:`ensure_partitions` creates the partitions of this month and the next ones; rows
  already in the default partition for such a month move into it in the same transaction.
* :func:`drop_partitions_before` is retention: it drops whole months, which is immediate and
  leaves nothing for VACUUM to do (a ``DELETE`` of the same rows would).
* :func:`list_partitions` says what there is.

On SQLite the table is a plain table: the functions change nothing and report nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, text

from headend.storage.database import Database, storage_errors
from protocols.errors import ValidationError

SCHEMA = "hes_partitions"
TABLE = "intervals"
DEFAULT = f"{TABLE}_default"
_LOCK = 0x4845_5350  # the advisory lock that serialises partition changes ("HESP")
MAX_MONTHS = 120


@dataclass(frozen=True, slots=True)
class Partition:
    """One partition of ``intervals``: ``start <= interval start < end`` (epoch seconds; None
    for the default partition, which has no bounds)."""

    name: str
    start: int | None
    end: int | None
    rows: int


def month_of(when: int) -> tuple[int, int]:
    """(year, month) in UTC of an epoch second."""
    moment = datetime.fromtimestamp(when, UTC)
    return moment.year, moment.month


def next_month(year: int, month: int) -> tuple[int, int]:
    return (year + 1, 1) if month == 12 else (year, month + 1)


def month_bounds(year: int, month: int) -> tuple[int, int]:
    """The epoch seconds ``[start, end)`` of a month in UTC."""
    if not 1 <= month <= 12 or not 1970 <= year <= 9998:
        raise ValidationError(f"no such month: {year}-{month}")
    after = next_month(year, month)
    start = int(datetime(year, month, 1, tzinfo=UTC).timestamp())
    end = int(datetime(after[0], after[1], 1, tzinfo=UTC).timestamp())
    return start, end


def partition_name(year: int, month: int) -> str:
    return f"{TABLE}_{year:04d}_{month:02d}"


def _existing(conn: Connection) -> set[str]:
    rows = conn.execute(
        text(
            "SELECT c.relname FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE i.inhparent = CAST(:parent AS regclass) AND n.nspname = :schema"
        ),
        {"parent": TABLE, "schema": SCHEMA},
    )
    return {row[0] for row in rows}


def create_months(conn: Connection, months: list[tuple[int, int]]) -> list[str]:
    """Create the monthly partitions of ``months`` that do not exist yet, moving their rows out
    of the default partition; returns the names created. PostgreSQL only; runs in the caller's
    transaction (the migration's, or :func:`ensure_partitions`')."""
    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK})
    existing = _existing(conn)
    created: list[str] = []
    for year, month in sorted(set(months)):
        name = partition_name(year, month)
        if name in existing:
            continue
        start, end = month_bounds(year, month)
        qualified = f'"{SCHEMA}"."{name}"'
        # a partition may not be created over rows the default partition holds for its range:
        # build it as a plain table, move those rows in, then attach it
        conn.execute(text(f"CREATE TABLE {qualified} (LIKE {TABLE} INCLUDING DEFAULTS)"))
        conn.execute(
            text(
                f'WITH moved AS (DELETE FROM "{SCHEMA}"."{DEFAULT}" '
                "WHERE start >= :start AND start < :end RETURNING *) "
                f"INSERT INTO {qualified} SELECT * FROM moved"
            ),
            {"start": start, "end": end},
        )
        conn.execute(
            text(
                f"ALTER TABLE {TABLE} ATTACH PARTITION {qualified} "
                f"FOR VALUES FROM ({start}) TO ({end})"
            )
        )
        existing.add(name)
        created.append(name)
    return created


def months_in_default(conn: Connection) -> list[tuple[int, int]]:
    """The months of the rows in the default partition (the migration gives them partitions)."""
    rows = conn.execute(
        text(
            "SELECT DISTINCT date_part('year', to_timestamp(start) AT TIME ZONE 'UTC')::int, "
            "date_part('month', to_timestamp(start) AT TIME ZONE 'UTC')::int "
            f'FROM "{SCHEMA}"."{DEFAULT}"'
        )
    )
    return [(int(row[0]), int(row[1])) for row in rows]


def _months_from(now: datetime, ahead: int) -> list[tuple[int, int]]:
    months = [(now.astimezone(UTC).year, now.astimezone(UTC).month)]
    for _ in range(ahead):
        months.append(next_month(*months[-1]))
    return months


async def ensure_partitions(db: Database, now: datetime, ahead: int = 2) -> list[str]:
    """Create the partitions of ``now``'s month and the ``ahead`` months after it (those that
    do not exist); returns the names created. Run it at least monthly (``hes serve`` or cron);
    safe to run again and from several workers at once. On SQLite: nothing to do, ``[]``."""
    if not 0 <= ahead <= MAX_MONTHS:
        raise ValidationError(f"ahead is 0..{MAX_MONTHS} months, got {ahead}")
    if now.tzinfo is None:
        raise ValidationError("now must carry its time zone")
    if db.dialect != "postgresql":
        return []
    months = _months_from(now, ahead)
    with storage_errors("creating interval partitions"):
        async with db.engine.begin() as conn:
            return await conn.run_sync(create_months, months)


async def drop_partitions_before(db: Database, cutoff: datetime) -> list[str]:
    """Retention: drop the months before ``cutoff``'s month (UTC), whole: their partitions
    with their rows, and the rows of those months that the default partition holds; returns
    the partitions dropped. On SQLite: nothing to do, ``[]`` (delete the rows instead)."""
    if cutoff.tzinfo is None:
        raise ValidationError("cutoff must carry its time zone")
    if db.dialect != "postgresql":
        return []
    moment = cutoff.astimezone(UTC)
    bound = month_bounds(moment.year, moment.month)[0]

    def drop(conn: Connection) -> list[str]:
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK})
        dropped = []
        for part in _partitions(conn):
            if part.end is not None and part.end <= bound:
                conn.execute(text(f'DROP TABLE "{SCHEMA}"."{part.name}"'))
                dropped.append(part.name)
        conn.execute(
            text(f'DELETE FROM "{SCHEMA}"."{DEFAULT}" WHERE start < :bound'), {"bound": bound}
        )
        return dropped

    with storage_errors("dropping interval partitions"):
        async with db.engine.begin() as conn:
            return await conn.run_sync(drop)


def _partitions(conn: Connection) -> list[Partition]:
    rows = conn.execute(
        text(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE i.inhparent = CAST(:parent AS regclass) AND n.nspname = :schema "
            "ORDER BY c.relname"
        ),
        {"parent": TABLE, "schema": SCHEMA},
    ).all()
    out = []
    for name, bound in rows:
        count = conn.execute(text(f'SELECT count(*) FROM "{SCHEMA}"."{name}"')).scalar_one()
        if name == DEFAULT:
            out.append(Partition(name, None, None, int(count)))
            continue
        # "FOR VALUES FROM ('1767225600') TO ('1769904000')"
        numbers = [int(part.strip("'() ")) for part in bound.split("FROM")[1].split("TO")]
        out.append(Partition(name, numbers[0], numbers[1], int(count)))
    return out


async def list_partitions(db: Database) -> list[Partition]:
    """The partitions of ``intervals`` with their bounds and row counts (PostgreSQL; on
    SQLite ``[]``: the table is not partitioned)."""
    if db.dialect != "postgresql":
        return []
    with storage_errors("listing interval partitions"):
        async with db.engine.connect() as conn:
            return await conn.run_sync(_partitions)
