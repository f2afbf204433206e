"""What the poller needs from the store: the meters to read, and claims on them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from headend.storage.database import (
    STATISTICS_AFTER,
    Database,
    refresh_statistics,
    storage_errors,
)
from headend.storage.schema import Meter, PollHealth


@dataclass(frozen=True, slots=True)
class PollTarget:
    """A registered meter as the poller reads it."""

    meter_id: str
    endpoint: str
    transport: str
    gateway: str
    profile_period: int
    poll_group: str


async def active_targets(db: Database, meter_ids: list[str] | None = None) -> list[PollTarget]:
    """The active meters (all, or those named), in id order."""
    query = (
        select(
            Meter.id, Meter.endpoint, Meter.transport, Meter.gateway, Meter.profile_period,
            Meter.poll_group,
        )
        .where(Meter.status == "active")
        .order_by(Meter.id)
    )  # fmt: skip
    if meter_ids is not None:
        query = query.where(Meter.id.in_(meter_ids))
    async with db.read() as session:
        rows = (await (await session.connection()).execute(query)).all()
    return [PollTarget(*row) for row in rows]


async def ensure_health_rows(db: Database) -> int:
    """A poll-health row for every active meter (new meters get theirs here); how many were
    added. After many, the planner's statistics of the fleet's tables are refreshed."""
    insert = postgresql.insert if db.dialect == "postgresql" else sqlite.insert
    source = select(Meter.id).where(Meter.status == "active")
    statement = (
        insert(PollHealth)
        .from_select(["meter_id"], source)
        .on_conflict_do_nothing()
        .returning(PollHealth.meter_id)
    )
    async with db.begin() as session:
        added = len((await (await session.connection()).execute(statement)).all())
    if added >= STATISTICS_AFTER:
        await refresh_statistics(db, PollHealth.__tablename__, Meter.__tablename__)
    return added


async def claim_due(
    db: Database, worker: str, now: datetime, lease_until: datetime, limit: int
) -> list[str]:
    """Claim up to ``limit`` meters that are due (never read, or next_due passed) and not
    leased by another live worker; returns their ids. One statement: on PostgreSQL the
    candidates are locked with SKIP LOCKED, so two workers never claim one meter; on SQLite the
    write lock taken at BEGIN does the same."""
    candidates = (
        select(PollHealth.meter_id)
        .join(Meter, Meter.id == PollHealth.meter_id)
        .where(Meter.status == "active")
        .where(or_(PollHealth.next_due.is_(None), PollHealth.next_due <= now))
        .where(or_(PollHealth.lease_until.is_(None), PollHealth.lease_until < now))
        .order_by(PollHealth.next_due.is_(None).desc(), PollHealth.next_due)
        .limit(limit)
        .with_for_update(skip_locked=True, of=PollHealth)
        .scalar_subquery()
    )
    statement = (
        update(PollHealth)
        .where(PollHealth.meter_id.in_(candidates))
        .values(lease_owner=worker, lease_until=lease_until)
        .returning(PollHealth.meter_id)
    )
    with storage_errors("claiming meters to read"):
        async with db.begin() as session:
            claimed = (await session.execute(statement)).scalars().all()
    return sorted(claimed)


async def release(db: Database, worker: str, meter_id: str, next_due: datetime | None) -> None:
    """Give a claimed meter back, due again at ``next_due``."""
    async with db.begin() as session:
        await session.execute(
            update(PollHealth)
            .where(PollHealth.meter_id == meter_id, PollHealth.lease_owner == worker)
            .values(lease_owner=None, lease_until=None, next_due=next_due)
        )


async def health_counts(db: Database) -> dict[str, int]:
    """Active meters by read health (a meter without a health row counts as unknown)."""
    query = (
        select(func.coalesce(PollHealth.health, "unknown"), func.count())
        .select_from(Meter)
        .outerjoin(PollHealth, PollHealth.meter_id == Meter.id)
        .where(Meter.status == "active")
        .group_by(func.coalesce(PollHealth.health, "unknown"))
    )
    with storage_errors("counting meters by health"):
        async with db.read() as session:
            rows = (await session.execute(query)).all()
    return {str(health): int(count) for health, count in rows}


async def release_all(db: Database, worker: str) -> int:
    """Give back every claim ``worker`` holds (a restarted worker whose earlier run was killed
    takes its meters back at once instead of after the lease); returns how many."""
    statement = (
        update(PollHealth)
        .where(PollHealth.lease_owner == worker)
        .values(lease_owner=None, lease_until=None)
        .returning(PollHealth.meter_id)
    )
    with storage_errors("releasing earlier claims"):
        async with db.begin() as session:
            return len((await session.execute(statement)).all())
