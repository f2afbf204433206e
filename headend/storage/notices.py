"""The notice outbox: notices are written in the transaction of what causes them, claimed by a
sender with a lease, and marked sent, retried or failed."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from headend.storage.database import Database, insert_ignore, storage_errors
from headend.storage.readings import insert_rows
from headend.storage.schema import Notification


@dataclass(frozen=True, slots=True)
class Pending:
    id: int
    idempotency_key: str
    kind: str
    channel: str
    address: str
    language: str
    values: dict[str, str]
    attempts: int
    expires_at: datetime
    meter_id: str | None
    account_id: str | None
    attachment: tuple[str, bytes] | None = None  # (file name, bytes): a bill's PDF


async def enqueue(
    session: AsyncSession,
    *,
    key: str,
    kind: str,
    channel: str,
    address: str,
    language: str,
    values: dict[str, str],
    now: datetime,
    deliver_at: datetime,
    expires_at: datetime,
    meter_id: str | None = None,
    account_id: str | None = None,
) -> bool:
    """Write a notice into the outbox (in the caller's transaction); False if a notice with
    this idempotency key exists already (one notice per cause, however often it is raised)."""
    row = notice_row(
        key=key,
        kind=kind,
        channel=channel,
        address=address,
        language=language,
        values=values,
        now=now,
        deliver_at=deliver_at,
        expires_at=expires_at,
        meter_id=meter_id,
        account_id=account_id,
    )
    return await insert_ignore(session, Notification, [row]) == 1


async def enqueue_many(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> int:
    """Write many notices (rows from :func:`notice_row`) in one insert, in the caller's
    transaction, skipping those whose idempotency key exists already; returns how many were
    new."""
    return len(await insert_rows(session, Notification, rows))


def notice_row(
    *,
    key: str,
    kind: str,
    channel: str,
    address: str,
    language: str,
    values: dict[str, str],
    now: datetime,
    deliver_at: datetime,
    expires_at: datetime,
    meter_id: str | None = None,
    account_id: str | None = None,
) -> dict[str, Any]:
    """The outbox row of a notice (see :func:`enqueue`), for writing many at once."""
    return {
        "idempotency_key": key,
        "kind": kind,
        "account_id": account_id,
        "meter_id": meter_id,
        "channel": channel,
        "address": address,
        "language": language,
        "payload": json.dumps(values, sort_keys=True, ensure_ascii=False),
        "state": "pending",
        "attempts": 0,
        "next_attempt_at": deliver_at,
        "expires_at": expires_at,
        "created_at": now,
    }


def _pending(row: Notification) -> Pending:
    values: dict[str, Any] = json.loads(row.payload)
    return Pending(
        row.id,
        row.idempotency_key,
        row.kind,
        row.channel,
        row.address,
        row.language,
        {str(k): str(v) for k, v in values.items()},
        row.attempts,
        row.expires_at,
        row.meter_id,
        row.account_id,
        None
        if row.attachment_name is None or row.attachment is None
        else (row.attachment_name, row.attachment),
    )


async def claim(
    db: Database,
    worker: str,
    now: datetime,
    lease_until: datetime,
    limit: int = 100,
    *,
    channels: Sequence[str] | None = None,
) -> list[Pending]:
    """Claim due pending notices not leased by a live worker (SKIP LOCKED on PostgreSQL): of
    ``channels`` only (the ones this worker can send on), and any that expired, to close them."""
    candidates = (
        select(Notification.id)
        .where(Notification.state == "pending", Notification.next_attempt_at <= now)
        .where(
            or_(Notification.channel.in_(channels), Notification.expires_at <= now)
            if channels is not None
            else Notification.id.is_not(None)
        )
        .where(or_(Notification.lease_until.is_(None), Notification.lease_until < now))
        .order_by(Notification.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    statement = (
        update(Notification)
        .where(Notification.id.in_(candidates))
        .values(lease_owner=worker, lease_until=lease_until)
        .returning(Notification.id)
    )
    with storage_errors("claiming notices"):
        async with db.begin() as session:
            ids = list((await session.execute(statement)).scalars().all())
            if not ids:
                return []
            rows = (
                await session.scalars(select(Notification).where(Notification.id.in_(ids)))
            ).all()
    return sorted((_pending(row) for row in rows), key=lambda p: p.id)


async def finish(
    session: AsyncSession,
    notice_id: int,
    worker: str,
    *,
    state: str,
    now: datetime,
    error: str | None = None,
    next_attempt_at: datetime | None = None,
) -> bool:
    """Record an attempt's outcome, fenced by the lease: False if another worker took the
    notice meanwhile (its outcome wins)."""
    values: dict[str, Any] = {
        "state": state,
        "attempts": Notification.attempts + 1,
        "last_error": error,
        "lease_owner": None,
        "lease_until": None,
    }
    if state == "sent":
        values["sent_at"] = now
    if next_attempt_at is not None:
        values["next_attempt_at"] = next_attempt_at
    result = await session.execute(
        update(Notification)
        .where(Notification.id == notice_id, Notification.lease_owner == worker)
        .values(**values)
        .returning(Notification.id)
    )
    return result.first() is not None


async def latest(db: Database, state: str | None = None, limit: int = 100) -> list[Notification]:
    """The latest notices (in ``state``, if given), newest first (for operators)."""
    query = select(Notification).order_by(Notification.id.desc()).limit(limit)
    if state is not None:
        query = query.where(Notification.state == state)
    async with db.read() as session:
        return list((await session.scalars(query)).all())


async def failed(db: Database, limit: int = 100) -> list[Notification]:
    """Notices that could not be delivered, newest first."""
    return await latest(db, "failed", limit)
