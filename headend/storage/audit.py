"""The audit log: append-only, each entry chained to the one before by its SHA-256.

Entries are appended in the transaction of the action they record, one writer at a time (on
PostgreSQL a transaction-scoped advisory lock; on SQLite the write lock every transaction
takes), so positions have no gaps and the chain no forks.

Every ledger transaction has its entry (action ``ledger.<kind>``), whose detail records the
transaction with all its postings; :func:`verify_chain` checks, after the chain, that the
ledger's tables still say what their entries say, so a posting edited, added or deleted by
hand is named as well.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from headend.domain.audit import GENESIS, Broken, Entry, chain_hash, check_link
from headend.storage.database import Database
from headend.storage.readings import insert_all
from headend.storage.schema import (
    AuditEntry,
    LedgerAccount,
    LedgerPosting,
    LedgerTransaction,
    Meter,
)
from protocols.errors import StorageError

#: the advisory lock that serialises appends on PostgreSQL ("audit" in ASCII)
_LOCK = 0x6175646974
#: where a session keeps the chain's end after an append: (transaction, position, hash)
_END = "hes_audit_end"


async def append(
    session: AsyncSession,
    *,
    at: datetime,
    actor: str,
    action: str,
    subject: str,
    reason: str,
    outcome: str,
    detail: dict[str, Any] | None = None,
) -> Entry:
    """Append one entry in ``session``'s transaction; returns it."""
    (entry,) = await append_many(
        session, [Pending(at, actor, action, subject, reason, outcome, detail or {})]
    )
    return entry


@dataclass(frozen=True, slots=True)
class Pending:
    """An entry to append: what :func:`append` takes, for :func:`append_many`."""

    at: datetime
    actor: str
    action: str
    subject: str
    reason: str
    outcome: str
    detail: dict[str, Any]


_CHAIN_END = (
    select(AuditEntry.position, AuditEntry.hash).order_by(AuditEntry.position.desc()).limit(1)
)


async def append_many(session: AsyncSession, pending: Sequence[Pending]) -> list[Entry]:
    """Append several entries in ``session``'s transaction, in order, with one read of the
    chain's end and one insert (the same chain as that many :func:`append` calls)."""
    if not pending:
        return []
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK})
    await session.flush()  # entries added to this session before count too
    # the chain's end as this transaction's last append left it (the lock is still held), else
    # read; keyed by the innermost transaction, so a savepoint rolled back is never trusted
    transaction = session.get_nested_transaction() or session.get_transaction()
    kept = session.info.get(_END)
    if kept is not None and kept[0] is transaction:
        position, previous = kept[1] + 1, kept[2]
    else:
        last = (await session.execute(_CHAIN_END)).first()
        position, previous = (1, GENESIS) if last is None else (last[0] + 1, last[1])
    entries: list[Entry] = []
    rows: list[dict[str, Any]] = []
    for n, p in enumerate(pending):
        entry = Entry(position + n, p.at, p.actor, p.action, p.subject, p.reason, p.outcome,
                      p.detail)  # fmt: skip
        digest = chain_hash(entry, previous)
        rows.append(
            {
                "position": entry.position,
                "at": entry.at,
                "actor": entry.actor,
                "action": entry.action,
                "subject": entry.subject,
                "reason": entry.reason,
                "outcome": entry.outcome,
                "detail": json.dumps(entry.detail, sort_keys=True),
                "prev_hash": previous,
                "hash": digest,
            }
        )
        entries.append(entry)
        previous = digest
    await insert_all(session, AuditEntry, rows)
    session.info[_END] = (transaction, entries[-1].position, previous)
    return entries


def _entry(row: AuditEntry) -> Entry:
    return Entry(
        row.position,
        row.at,
        row.actor,
        row.action,
        row.subject,
        row.reason,
        row.outcome,
        json.loads(row.detail),
    )


async def _rows(db: Database, batch: int = 5000) -> AsyncIterator[tuple[Entry, str, str]]:
    after = 0
    while True:
        async with db.read() as session:
            rows = (
                await session.scalars(
                    select(AuditEntry)
                    .where(AuditEntry.position > after)
                    .order_by(AuditEntry.position)
                    .limit(batch)
                )
            ).all()
        if not rows:
            return
        for row in rows:
            yield _entry(row), row.prev_hash, row.hash
        after = rows[-1].position


@dataclass(frozen=True, slots=True)
class Verification:
    entries: int
    broken: Broken | None


async def verify_chain(db: Database) -> Verification:
    """Walk the whole log; the first entry that breaks the chain, if any."""
    count, previous = 0, GENESIS
    async for entry, stored_previous, stored in _rows(db):
        count += 1
        broken = check_link(entry, stored_previous, stored, count, previous)
        if broken is not None:
            return Verification(count, broken)
        previous = stored
    return Verification(count, await verify_ledger(db))


def _postings(document: Any) -> list[tuple[str, int]]:
    return sorted((str(code), int(amount)) for code, amount in document)


async def verify_ledger(db: Database, batch: int = 2000) -> Broken | None:
    """The ledger against the audit trail: each transaction and its postings as its entry
    records them, and an existing transaction for every ledger entry."""
    after = 0
    while True:
        async with db.read() as session:
            rows = (
                await session.scalars(
                    select(LedgerTransaction)
                    .where(LedgerTransaction.id > after)
                    .order_by(LedgerTransaction.id)
                    .limit(batch)
                )
            ).all()
            if not rows:
                break
            ids = [row.id for row in rows]
            legs: dict[int, list[tuple[str, int]]] = {i: [] for i in ids}
            found = await session.execute(
                select(LedgerPosting.transaction_id, LedgerAccount.code, LedgerPosting.amount)
                .join(LedgerAccount, LedgerAccount.id == LedgerPosting.account_id)
                .where(LedgerPosting.transaction_id.in_(ids))
            )
            for transaction_id, code, amount in found:
                legs[transaction_id].append((code, amount))
            positions = [row.audit_position for row in rows]
            entries_at = {
                entry.position: entry
                for entry in (
                    await session.scalars(
                        select(AuditEntry).where(AuditEntry.position.in_(positions))
                    )
                ).all()
            }
        for row in rows:
            entry = entries_at.get(row.audit_position)
            recorded = json.loads(entry.detail).get("transaction") if entry else None
            if entry is None or not entry.action.startswith("ledger.") or recorded is None:
                return Broken(
                    row.audit_position,
                    f"ledger transaction {row.id} has no audit entry (inserted by hand)",
                )
            same = (
                recorded.get("kind") == row.kind
                and recorded.get("memo") == row.memo
                and recorded.get("corrects") == row.corrects
                and _postings(recorded.get("postings", [])) == sorted(legs[row.id])
            )
            if not same:
                return Broken(
                    entry.position,
                    f"ledger transaction {row.id} does not match its audit entry "
                    "(its postings were edited)",
                )
        after = rows[-1].id
    async with db.read() as session:
        recorded_positions = (
            await session.scalars(
                select(AuditEntry.position)
                .where(AuditEntry.action.like("ledger.%"))
                .order_by(AuditEntry.position)
            )
        ).all()
        kept = set((await session.scalars(select(LedgerTransaction.audit_position))).all())
    for position in recorded_positions:
        if position not in kept:
            return Broken(position, "its ledger transaction is missing (deleted)")
    return None


async def entries(db: Database, subject: str | None = None, limit: int = 50) -> list[Entry]:
    """The latest ``limit`` entries (about the meter ``subject``, if given), oldest first."""
    query = select(AuditEntry).order_by(AuditEntry.position.desc()).limit(limit)
    if subject is not None:
        query = query.where(AuditEntry.subject == subject)
    async with db.read() as session:
        if subject is not None and await session.get(Meter, subject) is None:
            raise StorageError(f"no meter {subject!r} is registered")
        rows = (await session.scalars(query)).all()
    return [_entry(row) for row in reversed(rows)]
