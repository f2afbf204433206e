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
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, exists, func, or_, select, update
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
from headend.storage.groups import GroupCommit
from headend.storage.notices import notice_row
from headend.storage.readings import insert_all, insert_rows, update_rows
from headend.storage.schema import (
    Account,
    CommandRow,
    CommandTransition,
    Customer,
    KeyMaterial,
    Meter,
    MeterStateRow,
    Notification,
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


class Writes:
    """The rows a transaction's command steps add besides the commands themselves (their
    transitions, audit entries and notices), written together by :meth:`flush` at its end:
    one insert each, one read of the audit chain's end, one look-up of the recipients."""

    def __init__(self) -> None:
        self.transitions: list[dict[str, Any]] = []
        self.audit: list[audit.Pending] = []
        self.notices: list[tuple[Claimed, NoticeToSend, datetime]] = []

    def step(
        self,
        command: CommandRow | Claimed,
        old: str,
        new: str,
        trigger: str,
        *,
        actor: str,
        reason: str,
        now: datetime,
    ) -> None:
        sequence = (
            command.sequence if isinstance(command, CommandRow) else command.envelope.sequence
        )
        kind = command.kind if isinstance(command.kind, str) else command.kind.value
        self.transitions.append(
            {
                "command_id": command.id,
                "at": now,
                "old": old,
                "new": new,
                "trigger": trigger,
                "actor": actor,
                "reason": reason,
            }
        )
        self.audit.append(
            audit.Pending(
                now,
                actor,
                f"command.{trigger}",
                command.meter_id,
                reason,
                new,
                {"command": command.id, "kind": kind, "sequence": sequence},
            )
        )

    def transition(
        self, command: CommandRow | Claimed, step: Transition, *, actor: str, now: datetime
    ) -> None:
        self.step(
            command,
            step.old.value,
            step.new.value,
            step.trigger.value,
            actor=actor,
            reason=step.reason,
            now=now,
        )

    async def flush(self, session: Any) -> None:
        if self.transitions:
            await insert_all(session, CommandTransition, self.transitions)
        await audit.append_many(session, self.audit)
        if self.notices:
            found = await recipients(session, {c.meter_id for c, _, _ in self.notices})
            rows = []
            for command, notice, now in self.notices:
                target = (
                    ("webhook", "operators", "en", None)
                    if notice.to_operators
                    else found.get(command.meter_id)
                )
                if target is None:
                    continue
                channel, address, language, account_id = target
                rows.append(
                    notice_row(
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
                )
            await insert_rows(session, Notification, rows)
        self.transitions, self.audit, self.notices = [], [], []


@dataclass(frozen=True, slots=True)
class Request:
    """A command to queue."""

    meter_id: str
    kind: Kind
    reason: str
    actor: str


def _check(request: Request, now: datetime, expires_at: datetime) -> None:
    if not request.reason.strip():
        raise ValidationError("a command needs a reason")
    if expires_at <= now:
        raise ValidationError("a command's deadline is after the time it is queued")


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
    (queued,) = await queue_commands(
        db, [Request(meter_id, kind, reason, actor)], now=now, expires_at=expires_at
    )
    return queued


async def queue_commands(
    db: Database, requests: Sequence[Request], *, now: datetime, expires_at: datetime
) -> list[Queued]:
    """Queue several commands in one transaction (the policy's pass): all or none."""
    for request in requests:
        _check(request, now, expires_at)
    with storage_errors("queueing commands"):
        async with db.begin() as session:
            return await _queue_all(session, requests, now, expires_at)


async def _queue_all(
    session: Any, requests: Sequence[Request], now: datetime, expires_at: datetime
) -> list[Queued]:
    """The meters, their unfinished commands, their last sequence numbers seen and their keys
    are read for all requests at once; the new commands are inserted together."""
    if not requests:
        return []
    meter_ids = sorted({r.meter_id for r in requests})
    meters = {
        m.id: m
        for m in (
            await session.scalars(select(Meter).where(Meter.id.in_(meter_ids)).with_for_update())
        ).all()
    }
    for request in requests:
        meter = meters.get(request.meter_id)
        if meter is None:
            raise StorageError(f"no meter {request.meter_id!r} is registered")
        if meter.status != "active":
            raise ValidationError(
                f"meter {request.meter_id} is {meter.status}: it takes no commands"
            )
    pending: dict[str, list[CommandRow]] = {}
    for row in (
        await session.scalars(
            select(CommandRow)
            .where(CommandRow.meter_id.in_(meter_ids))
            .where(CommandRow.state.in_([s.value for s in IN_FLIGHT]))
            .order_by(CommandRow.id)
        )
    ).all():
        pending.setdefault(row.meter_id, []).append(row)
    seen = dict(
        (
            await session.execute(
                select(MeterStateRow.meter_id, MeterStateRow.last_command_seq).where(
                    MeterStateRow.meter_id.in_(meter_ids)
                )
            )
        ).all()
    )
    key_ids = {m.command_key_id for m in meters.values() if m.command_key_id is not None}
    keys = dict(
        (
            await session.execute(
                select(KeyMaterial.id, KeyMaterial.secret).where(KeyMaterial.id.in_(key_ids))
            )
        ).all()
    ) if key_ids else {}  # fmt: skip
    answers: list[tuple[CommandRow, bool]] = []  # (the command, made for this request)
    for request in requests:
        meter = meters[request.meter_id]
        same = [r for r in pending.get(meter.id, []) if r.kind == request.kind.value]
        if same:
            answers.append((same[0], False))
            continue
        sequence = max(meter.last_command_seq, seen.get(meter.id) or 0) + 1
        meter.last_command_seq = sequence
        key = keys.get(meter.command_key_id) if meter.command_key_id is not None else None
        envelope = CommandEnvelope.signed(meter.id, sequence, COMMAND_OF[request.kind](), key)
        row = CommandRow(
            meter_id=meter.id,
            kind=request.kind.value,
            sequence=sequence,
            envelope=pack_envelope(envelope),
            state=CommandState.QUEUED.value,
            reason=request.reason,
            actor=request.actor,
            attempts=0,
            created_at=now,
            updated_at=now,
            expires_at=expires_at,
            next_attempt_at=now,
        )
        session.add(row)
        pending.setdefault(meter.id, []).append(row)  # a second request for it sees this one
        answers.append((row, True))
    await session.flush()  # the new commands' ids
    writes = Writes()
    queued: list[Queued] = []
    for request, (answer, created) in zip(requests, answers, strict=True):
        if not created:
            queued.append(Queued(answer.id, answer.sequence, created=False))
            continue
        superseded: list[int] = []
        for older in pending.get(request.meter_id, []):
            if older.id >= answer.id or older.kind != OPPOSITES[request.kind.value]:
                continue  # only what was queued before it
            state = CommandState(older.state)
            if state not in (CommandState.QUEUED, CommandState.RETRYING):
                continue  # sent: it may have run; the new command follows it
            why = f"superseded by {request.kind} {answer.id}: {request.reason}"
            step = advance(state, Trigger.SUPERSEDE, why)
            older.state = step.new.value
            older.superseded_by = answer.id
            older.updated_at = now
            older.lease_owner = older.lease_until = None
            writes.transition(older, step, actor=request.actor, now=now)
            superseded.append(older.id)
        writes.step(
            answer, "", CommandState.QUEUED.value, "queue",
            actor=request.actor, reason=request.reason, now=now,
        )  # fmt: skip
        queued.append(
            Queued(answer.id, answer.sequence, created=True, superseded=tuple(superseded))
        )
    await writes.flush(session)
    return queued


async def claim_rows(
    db: Database,
    table: Any,
    due: Any,
    lease: Any,
    doing: str,
    *,
    parameters: dict[str, Any] | None = None,
) -> Sequence[Any]:
    """Lease due rows of ``table`` (commands, credit transfers): look first with ``due`` (a
    select of at most one row; nothing due, the usual case, takes no write lock), then run
    ``lease`` (an UPDATE … RETURNING the ids) and read the leased rows back, by id, each with
    its meter's endpoint, transport and gateway. ``parameters`` are the bind parameters of
    ``due`` and ``lease``."""
    named = parameters or {}
    with storage_errors(doing):
        async with db.read() as session:
            if (await session.execute(due, named)).first() is None:
                return []
        async with db.begin() as session:
            ids = (await session.execute(lease, named)).scalars().all()
            if not ids:
                return []
            leased = _LEASED.get(table)
            if leased is None:
                leased = _LEASED[table] = (
                    select(table, Meter.endpoint, Meter.transport, Meter.gateway)
                    .join(Meter, Meter.id == table.meter_id)
                    .where(table.id.in_(bindparam("ids", expanding=True)))
                    .order_by(table.id)
                )
            return (await session.execute(leased, {"ids": list(ids)})).all()


#: the read-back of :func:`claim_rows`, by table, built once
_LEASED: dict[Any, Any] = {}


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
    due = select(CommandRow.id).where(
        CommandRow.state.in_(workable), CommandRow.next_attempt_at <= now
    )
    if meter_ids is not None:
        due = due.where(CommandRow.meter_id.in_(list(meter_ids)))
    rows = await claim_rows(db, CommandRow, due.limit(1), statement, "claiming commands")
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


async def recipients(
    session: Any, meter_ids: set[str]
) -> dict[str, tuple[str, str, str, str | None]]:
    """meter -> (channel, address, language, account) of its customer, for those who take
    notices."""
    rows = (
        await session.execute(
            select(
                Meter.id,
                Customer.notice_channel,
                Customer.phone,
                Customer.email,
                Customer.language,
                Account.id,
            )
            .select_from(Meter)
            .join(Account, Account.id == Meter.account_id)
            .join(Customer, Customer.id == Account.customer_id)
            .where(Meter.id.in_(sorted(meter_ids)))
        )
    ).all()
    found: dict[str, tuple[str, str, str, str | None]] = {}
    for meter_id, channel, phone, email, language, account_id in rows:
        if channel == "sms" and phone:
            found[meter_id] = ("sms", phone, language, account_id)
        elif channel == "email" and email:
            found[meter_id] = ("email", email, language, account_id)
    return found


async def record(
    db: Database,
    command: Claimed,
    step: Transition,
    **options: Any,
) -> Claimed | None:
    """Write ``step`` for a claimed command in a transaction of its own (see
    :func:`record_in`)."""
    with storage_errors("recording a command transition"):
        async with db.begin() as session:
            writes = Writes()
            done = await record_in(session, command, step, writes, **options)
            await writes.flush(session)
            return done


async def record_in(
    session: Any,
    command: Claimed,
    step: Transition,
    writes: Writes,
    **options: Any,
) -> Claimed | None:
    """Write ``step`` for a claimed command in ``session``'s transaction (see
    :func:`record_many`)."""
    (done,) = await record_many(session, [(command, step, options)], writes)
    return done


#: one transition asked for: the claimed command, its step, the step's options
Job = tuple[Claimed, Transition, dict[str, Any]]


async def record_many(
    session: Any,
    jobs: Sequence[Job],
    writes: Writes,
) -> list[Claimed | None]:
    """Write each job's step for its claimed command in ``session``'s transaction, with its
    audit entry and notices, if the command is still in ``step.old`` under this worker's lease
    (read, and on PostgreSQL locked, in one query); returns each command in its new state, or
    None where the fence did not hold (nothing is written for it). The options of a job are
    ``now`` and, optionally, ``keep_lease``, ``next_attempt_at``, ``result_code``, ``error``
    and ``notices``."""
    ids = sorted({command.id for command, _, _ in jobs})
    current = {
        row_id: (state, owner)
        for row_id, state, owner in (
            await session.execute(
                select(CommandRow.id, CommandRow.state, CommandRow.lease_owner)
                .where(CommandRow.id.in_(ids))
                .with_for_update()
            )
        ).all()
    }
    #: each command's row as its steps in this batch leave it (a later step's values over an
    #: earlier one's, as writing them one after the other would)
    rows: dict[int, dict[str, Any]] = {}
    results: list[Claimed | None] = []
    for command, step, options in jobs:
        state, owner = current.get(command.id, (None, None))
        if state != step.old.value or owner != command.worker:
            results.append(None)
            continue
        now: datetime = options["now"]
        keep_lease = bool(options.get("keep_lease", False))
        attempts = command.attempts + 1 if step.trigger is Trigger.SEND else command.attempts
        values = rows.setdefault(command.id, {"id": command.id})
        values.update(state=step.new.value, updated_at=now, attempts=attempts)
        for option in ("next_attempt_at", "result_code"):
            if options.get(option) is not None:
                values[option] = options[option]
        if options.get("error") is not None:
            values["last_error"] = options["error"]
        if not keep_lease:
            values["lease_owner"] = None
            values["lease_until"] = None
        current[command.id] = (step.new.value, command.worker if keep_lease else None)
        writes.transition(command, step, actor=command.worker, now=now)
        writes.notices.extend((command, notice, now) for notice in options.get("notices", ()))
        results.append(replace(command, state=step.new, attempts=attempts))
    groups: dict[frozenset[str], list[dict[str, Any]]] = {}
    for values in rows.values():  # one UPDATE per set of columns written
        groups.setdefault(frozenset(values), []).append(values)
    for group in groups.values():
        await update_rows(session, CommandRow, group)
    return results


class Recorder:
    """Group commit of transitions: the ones that concurrent attempts ask for while a write is
    under way go into the next transaction together (at most ``most``), each behind its own
    fence, so a dispatcher working a thousand meters at once makes a few transactions, not a
    thousand. Each caller gets its own command back (or None: its fence did not hold); when a
    batch's transaction fails, every caller in it gets the StorageError and nothing of the
    batch is written."""

    def __init__(self, db: Database, most: int = 256) -> None:
        self.db = db
        self._group: GroupCommit[Job, Claimed | None] = GroupCommit(
            self._write, most=most, name="command transitions"
        )

    @property
    def transactions(self) -> int:
        """How many transactions it made, for measurements."""
        return self._group.batches

    async def record(self, command: Claimed, step: Transition, **options: Any) -> Claimed | None:
        return await self._group.submit((command, step, options))

    async def record_steps(self, jobs: Sequence[Job]) -> Claimed | None:
        """Several steps of one command, in order, in one transaction when they fit in one
        batch (each behind its fence); the command after the last, or None if a fence did not
        hold."""
        results = await self._group.submit_all(jobs)
        return None if any(r is None for r in results) else results[-1]

    async def _write(self, jobs: Sequence[Job]) -> list[Claimed | None]:
        with storage_errors("recording command transitions"):
            async with self.db.begin() as session:
                writes = Writes()
                results = await record_many(session, jobs, writes)
                await writes.flush(session)
                return results


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
            writes = Writes()
            writes.transition(row, step, actor=actor, now=now)
            await writes.flush(session)
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
