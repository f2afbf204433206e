"""The command store: each meter's commands, their sequence numbers and signed envelopes, the
claims the dispatcher works under, and every transition with its audit entry and notices.

* :func:`queue_command` allocates the meter's next sequence number, signs the envelope and
  stores it before anything is sent, in one transaction with the audit entry; a command of a
  kind already in flight for the meter is not queued twice, and a newer disconnect supersedes a
  pending reconnect (and the reverse).
* :func:`claim_commands` hands out the commands that are due, only the oldest unfinished one
  per meter, each under a lease (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; the write lock every
  SQLite transaction takes at BEGIN); :func:`record` writes a transition only while the lease
  and the state are still what the worker saw (a fence), so a worker whose lease was taken
  over, or whose command an operator cancelled, writes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.orm import aliased

from headend.domain.commands import (
    COMMAND_OF,
    IN_FLIGHT,
    OPPOSITES,
    CommandState,
    Kind,
    Transition,
    Trigger,
    advance,
    pack_envelope,
    unpack_envelope,
)
from headend.storage import audit
from headend.storage.database import Database, storage_errors
from headend.storage.notices import enqueue
from headend.storage.schema import (
    Account,
    CommandRow,
    CommandTransition,
    Customer,
    KeyMaterial,
    Meter,
    Reading,
)
from protocols.commands import CommandEnvelope
from protocols.errors import StorageError, ValidationError

#: the states a dispatcher works on (the others wait for nothing, or are final)
WORKABLE = (
    CommandState.QUEUED,
    CommandState.SENT,
    CommandState.ACKNOWLEDGED,
    CommandState.RETRYING,
)


@dataclass(frozen=True, slots=True)
class Queued:
    command_id: int
    sequence: int
    created: bool  # False: a command of this kind was in flight for the meter already
    superseded: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Claimed:
    """A command as a worker holds it under its lease."""

    id: int
    meter_id: str
    kind: Kind
    state: CommandState
    attempts: int
    envelope: CommandEnvelope
    reason: str
    expires_at: datetime
    endpoint: str
    transport: str
    gateway: str
    worker: str


@dataclass(frozen=True, slots=True)
class NoticeToSend:
    """A notice the transition raises, written in its transaction."""

    kind: str
    values: dict[str, str]
    deliver_at: datetime
    expires_at: datetime
    to_operators: bool = False


@dataclass(frozen=True, slots=True)
class TransitionView:
    at: datetime
    old: str
    new: str
    trigger: str
    actor: str
    reason: str


@dataclass(frozen=True, slots=True)
class CommandView:
    id: int
    meter_id: str
    kind: str
    sequence: int
    state: str
    reason: str
    actor: str
    attempts: int
    result_code: int | None
    superseded_by: int | None
    created_at: datetime
    updated_at: datetime
    expires_at: datetime
    next_attempt_at: datetime
    last_error: str | None
    transitions: tuple[TransitionView, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "meter_id": self.meter_id,
            "kind": self.kind,
            "sequence": self.sequence,
            "state": self.state,
            "reason": self.reason,
            "actor": self.actor,
            "attempts": self.attempts,
            "result_code": self.result_code,
            "superseded_by": self.superseded_by,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "next_attempt_at": self.next_attempt_at.isoformat(),
            "last_error": self.last_error,
            "transitions": [
                {
                    "at": t.at.isoformat(),
                    "old": t.old,
                    "new": t.new,
                    "trigger": t.trigger,
                    "actor": t.actor,
                    "reason": t.reason,
                }
                for t in self.transitions
            ],
        }


def _view(row: CommandRow, transitions: Sequence[CommandTransition] = ()) -> CommandView:
    return CommandView(
        row.id,
        row.meter_id,
        row.kind,
        row.sequence,
        row.state,
        row.reason,
        row.actor,
        row.attempts,
        row.result_code,
        row.superseded_by,
        row.created_at,
        row.updated_at,
        row.expires_at,
        row.next_attempt_at,
        row.last_error,
        tuple(
            TransitionView(t.at, t.old, t.new, t.trigger, t.actor, t.reason) for t in transitions
        ),
    )


async def _write_transition(
    session: Any,
    command: CommandRow | Claimed,
    step: Transition,
    *,
    actor: str,
    now: datetime,
    detail: dict[str, Any] | None = None,
) -> None:
    sequence = command.sequence if isinstance(command, CommandRow) else command.envelope.sequence
    session.add(
        CommandTransition(
            command_id=command.id,
            at=now,
            old=step.old.value,
            new=step.new.value,
            trigger=step.trigger.value,
            actor=actor,
            reason=step.reason,
        )
    )
    await audit.append(
        session,
        at=now,
        actor=actor,
        action=f"command.{step.trigger.value}",
        subject=command.meter_id,
        reason=step.reason,
        outcome=step.new.value,
        detail={
            "command": command.id,
            "kind": command.kind,
            "sequence": sequence,
            **(detail or {}),
        },
    )


async def queue_command(
    db: Database,
    *,
    meter_id: str,
    kind: Kind,
    reason: str,
    actor: str,
    now: datetime,
    expires_at: datetime,
) -> Queued:
    """Queue ``kind`` for the meter, its envelope signed and stored (see the module)."""
    if not reason.strip():
        raise ValidationError("a command needs a reason")
    if expires_at <= now:
        raise ValidationError("a command's deadline is after the time it is queued")
    with storage_errors("queueing a command"):
        async with db.begin() as session:
            meter = (
                await session.scalars(select(Meter).where(Meter.id == meter_id).with_for_update())
            ).first()
            if meter is None:
                raise StorageError(f"no meter {meter_id!r} is registered")
            if meter.status != "active":
                raise ValidationError(f"meter {meter_id} is {meter.status}: it takes no commands")
            pending = (
                await session.scalars(
                    select(CommandRow)
                    .where(CommandRow.meter_id == meter_id)
                    .where(CommandRow.state.in_([s.value for s in IN_FLIGHT]))
                    .order_by(CommandRow.id)
                )
            ).all()
            for row in pending:
                if row.kind == kind.value:
                    return Queued(row.id, row.sequence, created=False)
            seen = (
                await session.execute(
                    select(Reading.last_command_seq)
                    .where(Reading.meter_id == meter_id)
                    .order_by(Reading.meter_time.desc())
                    .limit(1)
                )
            ).scalar()
            sequence = max(meter.last_command_seq, seen or 0) + 1
            meter.last_command_seq = sequence
            key = None
            if meter.command_key_id is not None:
                material = await session.get(KeyMaterial, meter.command_key_id)
                key = material.secret if material is not None else None
            envelope = CommandEnvelope.signed(meter_id, sequence, COMMAND_OF[kind](), key)
            row = CommandRow(
                meter_id=meter_id,
                kind=kind.value,
                sequence=sequence,
                envelope=pack_envelope(envelope),
                state=CommandState.QUEUED.value,
                reason=reason,
                actor=actor,
                attempts=0,
                created_at=now,
                updated_at=now,
                expires_at=expires_at,
                next_attempt_at=now,
            )
            session.add(row)
            await session.flush()
            superseded: list[int] = []
            for older in pending:
                if older.kind != OPPOSITES[kind.value]:
                    continue
                state = CommandState(older.state)
                if state not in (CommandState.QUEUED, CommandState.RETRYING):
                    continue  # sent: it may have run; the new command follows it
                step = advance(state, Trigger.SUPERSEDE, f"superseded by {kind} {row.id}: {reason}")
                older.state = step.new.value
                older.superseded_by = row.id
                older.updated_at = now
                older.lease_owner = older.lease_until = None
                await _write_transition(session, older, step, actor=actor, now=now)
                superseded.append(older.id)
            session.add(
                CommandTransition(
                    command_id=row.id,
                    at=now,
                    old="",
                    new=CommandState.QUEUED.value,
                    trigger="queue",
                    actor=actor,
                    reason=reason,
                )
            )
            await audit.append(
                session,
                at=now,
                actor=actor,
                action="command.queue",
                subject=meter_id,
                reason=reason,
                outcome=CommandState.QUEUED.value,
                detail={"command": row.id, "kind": kind.value, "sequence": sequence},
            )
            return Queued(row.id, sequence, created=True, superseded=tuple(superseded))


async def claim_commands(
    db: Database,
    worker: str,
    now: datetime,
    lease_until: datetime,
    limit: int,
    *,
    meter_ids: Sequence[str] | None = None,
) -> list[Claimed]:
    """Claim up to ``limit`` due commands, the oldest unfinished one of each meter, not leased
    by a live worker; ``meter_ids`` narrows it to those meters."""
    older = aliased(CommandRow)
    workable = [s.value for s in WORKABLE]
    candidates = (
        select(CommandRow.id)
        .where(CommandRow.state.in_(workable))
        .where(CommandRow.next_attempt_at <= now)
        .where(or_(CommandRow.lease_until.is_(None), CommandRow.lease_until < now))
        .where(
            ~exists().where(
                and_(
                    older.meter_id == CommandRow.meter_id,
                    older.id < CommandRow.id,
                    older.state.in_([s.value for s in IN_FLIGHT]),
                )
            )
        )
        .order_by(CommandRow.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=CommandRow)
    )
    if meter_ids is not None:
        candidates = candidates.where(CommandRow.meter_id.in_(list(meter_ids)))
    statement = (
        update(CommandRow)
        .where(CommandRow.id.in_(candidates.scalar_subquery()))
        .values(lease_owner=worker, lease_until=lease_until)
        .returning(CommandRow.id)
    )
    with storage_errors("claiming commands"):
        async with db.begin() as session:
            ids = (await session.execute(statement)).scalars().all()
            if not ids:
                return []
            rows = (
                await session.execute(
                    select(CommandRow, Meter.endpoint, Meter.transport, Meter.gateway)
                    .join(Meter, Meter.id == CommandRow.meter_id)
                    .where(CommandRow.id.in_(ids))
                    .order_by(CommandRow.id)
                )
            ).all()
    return [
        Claimed(
            row.id,
            row.meter_id,
            Kind(row.kind),
            CommandState(row.state),
            row.attempts,
            unpack_envelope(row.envelope),
            row.reason,
            row.expires_at,
            endpoint,
            transport,
            gateway,
            worker,
        )
        for row, endpoint, transport, gateway in rows
    ]


async def _recipient(session: Any, meter_id: str) -> tuple[str, str, str, str | None] | None:
    """(channel, address, language, account) of the meter's customer, None if they take no
    notices."""
    row = (
        await session.execute(
            select(
                Customer.notice_channel,
                Customer.phone,
                Customer.email,
                Customer.language,
                Account.id,
            )
            .select_from(Meter)
            .join(Account, Account.id == Meter.account_id)
            .join(Customer, Customer.id == Account.customer_id)
            .where(Meter.id == meter_id)
        )
    ).first()
    if row is None:
        return None
    channel, phone, email, language, account_id = row
    if channel == "sms" and phone:
        return "sms", phone, language, account_id
    if channel == "email" and email:
        return "email", email, language, account_id
    return None


async def record(
    db: Database,
    command: Claimed,
    step: Transition,
    *,
    now: datetime,
    keep_lease: bool = False,
    next_attempt_at: datetime | None = None,
    result_code: int | None = None,
    error: str | None = None,
    notices: Sequence[NoticeToSend] = (),
) -> Claimed | None:
    """Write ``step`` for a claimed command, with its audit entry and ``notices``, if the
    command is still in ``step.old`` under this worker's lease; returns the command in its new
    state, or None when the fence did not hold (nothing is written then)."""
    values: dict[str, Any] = {"state": step.new.value, "updated_at": now}
    if step.trigger is Trigger.SEND:
        values["attempts"] = CommandRow.attempts + 1
    if next_attempt_at is not None:
        values["next_attempt_at"] = next_attempt_at
    if result_code is not None:
        values["result_code"] = result_code
    if error is not None:
        values["last_error"] = error
    if not keep_lease:
        values["lease_owner"] = None
        values["lease_until"] = None
    statement = (
        update(CommandRow)
        .where(CommandRow.id == command.id)
        .where(CommandRow.state == step.old.value)
        .where(CommandRow.lease_owner == command.worker)
        .values(**values)
        .returning(CommandRow.attempts)
    )
    with storage_errors("recording a command transition"):
        async with db.begin() as session:
            attempts = (await session.execute(statement)).scalar()
            if attempts is None:
                return None
            await _write_transition(session, command, step, actor=command.worker, now=now)
            if notices:
                recipient = await _recipient(session, command.meter_id)
                for notice in notices:
                    if notice.to_operators:
                        target: tuple[str, str, str, str | None] | None = (
                            "webhook",
                            "operators",
                            "en",
                            None,
                        )
                    else:
                        target = recipient
                    if target is None:
                        continue
                    channel, address, language, account_id = target
                    await enqueue(
                        session,
                        key=f"{notice.kind}:command:{command.id}",
                        kind=notice.kind,
                        channel=channel,
                        address=address,
                        language=language,
                        values=notice.values,
                        now=now,
                        deliver_at=notice.deliver_at,
                        expires_at=notice.expires_at,
                        meter_id=command.meter_id,
                        account_id=account_id,
                    )
    return Claimed(
        command.id,
        command.meter_id,
        command.kind,
        step.new,
        attempts,
        command.envelope,
        command.reason,
        command.expires_at,
        command.endpoint,
        command.transport,
        command.gateway,
        command.worker,
    )


async def release_command(db: Database, command: Claimed, when: datetime, why: str) -> bool:
    """Give a claimed command back in its state, due again at ``when`` (a queued command whose
    meter could not be reached, an acknowledged one whose relay could not be read back)."""
    statement = (
        update(CommandRow)
        .where(CommandRow.id == command.id)
        .where(CommandRow.state == command.state.value)
        .where(CommandRow.lease_owner == command.worker)
        .values(lease_owner=None, lease_until=None, next_attempt_at=when, last_error=why)
        .returning(CommandRow.id)
    )
    with storage_errors("releasing a command"):
        async with db.begin() as session:
            return (await session.execute(statement)).first() is not None


async def cancel_command(
    db: Database, command_id: int, *, actor: str, reason: str, now: datetime
) -> CommandView:
    """Cancel a command that has not been sent (queued, or waiting to retry); IllegalTransition
    for one that may have run already."""
    if not reason.strip():
        raise ValidationError("cancelling a command needs a reason")
    with storage_errors("cancelling a command"):
        async with db.begin() as session:
            row = (
                await session.scalars(
                    select(CommandRow).where(CommandRow.id == command_id).with_for_update()
                )
            ).first()
            if row is None:
                raise StorageError(f"no command {command_id}")
            step = advance(CommandState(row.state), Trigger.CANCEL, reason)
            row.state = step.new.value
            row.updated_at = now
            row.lease_owner = row.lease_until = None
            await _write_transition(session, row, step, actor=actor, now=now)
    return await get_command(db, command_id)


async def get_command(db: Database, command_id: int) -> CommandView:
    with storage_errors("reading a command"):
        async with db.read() as session:
            row = await session.get(CommandRow, command_id)
            if row is None:
                raise StorageError(f"no command {command_id}")
            transitions = (
                await session.scalars(
                    select(CommandTransition)
                    .where(CommandTransition.command_id == command_id)
                    .order_by(CommandTransition.id)
                )
            ).all()
            return _view(row, transitions)


async def list_commands(
    db: Database,
    *,
    meter_id: str | None = None,
    states: Sequence[str] | None = None,
    limit: int = 100,
) -> list[CommandView]:
    """The newest commands first."""
    query = select(CommandRow).order_by(CommandRow.id.desc()).limit(limit)
    if meter_id is not None:
        query = query.where(CommandRow.meter_id == meter_id)
    if states:
        query = query.where(CommandRow.state.in_(list(states)))
    with storage_errors("listing commands"):
        async with db.read() as session:
            if meter_id is not None and await session.get(Meter, meter_id) is None:
                raise StorageError(f"no meter {meter_id!r} is registered")
            return [_view(row) for row in (await session.scalars(query)).all()]


async def recently_commanded(
    db: Database, seen: dict[str, int], retry_after: datetime
) -> set[tuple[str, str]]:
    """(meter, kind) pairs the policy must leave alone now: a command of that kind in flight;
    one executed whose effect the meter's latest reading cannot show yet (its sequence is
    above the reading's ``last_command_seq``, ``seen[meter]``); or one that failed or expired
    after ``retry_after`` (it is not tried again at every pass)."""
    meters = list(seen)
    in_flight = [s.value for s in IN_FLIGHT]
    given_up = [CommandState.FAILED.value, CommandState.EXPIRED.value]
    busy_query = select(CommandRow.meter_id, CommandRow.kind).where(
        CommandRow.meter_id.in_(meters),
        or_(
            CommandRow.state.in_(in_flight),
            and_(CommandRow.state.in_(given_up), CommandRow.updated_at >= retry_after),
        ),
    )
    done_query = (
        select(CommandRow.meter_id, CommandRow.kind, func.max(CommandRow.sequence))
        .where(CommandRow.meter_id.in_(meters))
        .where(CommandRow.state == CommandState.VERIFIED.value)
        .group_by(CommandRow.meter_id, CommandRow.kind)
    )
    with storage_errors("reading recent commands"):
        async with db.read() as session:
            busy = {(m, k) for m, k in (await session.execute(busy_query)).all()}
            for meter_id, kind, sequence in (await session.execute(done_query)).all():
                if sequence > seen[meter_id]:
                    busy.add((meter_id, kind))
    return busy
