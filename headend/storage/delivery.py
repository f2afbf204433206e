"""The credit deliverer's store: claiming the transfers that are due, signing their envelopes,
and writing each step behind a fence, with its audit entry, its ledger posting and its notices.

* :func:`claim_transfers` hands out due transfers (``pending_delivery`` or ``sending``), only
  the lowest-numbered unfinished one of each meter (a meter refuses a transfer number below
  its last), each under a lease (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; the write lock every
  SQLite transaction takes at BEGIN).
* :func:`start_attempt` marks a transfer ``sending`` before its envelope goes out; the first
  time (or after the meter's command sequence moved past the envelope's) it signs the envelope
  with the meter's next command sequence, the counter the command store uses too, and stores it.
  It does not take a new sequence while a command of the meter's may still be sent (queued,
  sent or retrying): that command's lower sequence would then be refused.
* :func:`accept_tokens` marks an STS token delivered once its meter reports the token's TID
  accepted (an event read by a poll or pushed over MQTT), with the same posting and notice.
* :func:`confirm` marks it ``delivered`` and, in the same transaction, posts the delivery (the
  credit's value from the customer's prepaid balance to revenue), its audit entry and the
  customer's "payment received" notice; :func:`give_up` marks it ``failed`` and tells
  operators; :func:`retry_later` gives it back to wait. Each writes only while the transfer is
  in the state the worker saw and under the worker's lease: a worker whose lease was taken
  over writes nothing, and a transfer is confirmed (and posted) once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Generic, Literal, TypeVar, cast

import psycopg
from sqlalchemy import and_, bindparam, exists, func, literal_column, or_, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from headend.domain.commands import CommandState, pack_envelope, unpack_envelope
from headend.domain.delivery import WORKABLE, TransferState
from headend.domain.ledger import (
    AccountKind,
    Transaction,
    TransactionKind,
    build,
    prepaid,
    utility,
)
from headend.domain.notices import Channel, QuietHours, deliver_at
from headend.domain.notices import Kind as NoticeKind
from headend.storage import audit
from headend.storage.commands import claim_rows, recipients
from headend.storage.database import Database, insert_ignore, storage_errors
from headend.storage.groups import GroupCommit
from headend.storage.ledger import _Posting as Posting
from headend.storage.ledger import post, post_many
from headend.storage.notices import notice_row
from headend.storage.schema import (
    CommandRow,
    CreditTransfer,
    KeyMaterial,
    Meter,
    MeterEvent,
    MeterStateRow,
    Notification,
    Payment,
    Reading,
)
from protocols.commands import Command, CommandEnvelope
from protocols.errors import StorageError
from protocols.readings import EventCode
from protocols.units import decimal_text

T = TypeVar("T")
log = logging.getLogger(__name__)

#: the channel a commit that writes credit transfers notifies on PostgreSQL (migration 0009)
TRANSFERS_CHANNEL = "hes_credit_transfers"

#: the command states in which a command may still go out under its (lower) sequence
_MAY_SEND = (CommandState.QUEUED.value, CommandState.SENT.value, CommandState.RETRYING.value)


@dataclass(frozen=True, slots=True)
class Held:
    """A transfer as a worker holds it under its lease."""

    id: int
    meter_id: str
    payment_id: int
    number: int
    amount: int
    value: int
    state: TransferState
    attempts: int
    envelope: CommandEnvelope | None
    endpoint: str
    transport: str
    gateway: str
    worker: str


@dataclass(frozen=True, slots=True)
class TransferView:
    id: int
    meter_id: str
    payment_id: int
    kind: str
    number: int
    unit: str
    amount: int
    value: int
    token: str | None
    state: str
    attempts: int
    sequence: int | None
    created_at: datetime
    updated_at: datetime
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    last_error: str | None
    lease_owner: str | None
    lease_until: datetime | None

    def as_dict(self) -> dict[str, Any]:
        def iso(at: datetime | None) -> str | None:
            return None if at is None else at.isoformat()

        return {
            "id": self.id,
            "meter_id": self.meter_id,
            "payment_id": self.payment_id,
            "kind": self.kind,
            "number": self.number,
            "unit": self.unit,
            "amount": self.amount,
            "value": self.value,
            "token": self.token,
            "state": self.state,
            "attempts": self.attempts,
            "sequence": self.sequence,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "next_attempt_at": iso(self.next_attempt_at),
            "delivered_at": iso(self.delivered_at),
            "last_error": self.last_error,
            "lease_owner": self.lease_owner,
            "lease_until": iso(self.lease_until),
        }


def _view(row: CreditTransfer) -> TransferView:
    sequence = None if row.envelope is None else unpack_envelope(row.envelope).sequence
    return TransferView(
        row.id,
        row.meter_id,
        row.payment_id,
        row.kind,
        row.number,
        row.unit,
        row.amount,
        row.value,
        row.token,
        row.state,
        row.attempts,
        sequence,
        row.created_at,
        row.updated_at,
        row.next_attempt_at,
        row.delivered_at,
        row.last_error,
        row.lease_owner,
        row.lease_until,
    )


def _claim_statements(narrowed: bool) -> tuple[Any, Any]:
    """The look (is anything due?) and the lease (UPDATE … RETURNING the ids) of
    :func:`claim_transfers`, with bind parameters ``now``, ``until``, ``worker``, ``most`` (and
    ``meters`` when ``narrowed``): built once, as building them costs more than running them."""
    lower = aliased(CreditTransfer)
    workable = [s.value for s in WORKABLE]
    now: Any = bindparam("now")
    due_now = or_(CreditTransfer.next_attempt_at.is_(None), CreditTransfer.next_attempt_at <= now)
    candidates = (
        select(CreditTransfer.id)
        .where(CreditTransfer.kind == "transfer")
        .where(CreditTransfer.state.in_(workable))
        .where(due_now)
        .where(or_(CreditTransfer.lease_until.is_(None), CreditTransfer.lease_until < now))
        .where(
            ~exists().where(
                and_(
                    lower.meter_id == CreditTransfer.meter_id,
                    lower.kind == "transfer",
                    lower.number < CreditTransfer.number,
                    lower.state.in_(workable),
                )
            )
        )
        .order_by(CreditTransfer.id)
        .limit(bindparam("most"))
        .with_for_update(skip_locked=True, of=CreditTransfer)
    )
    due = select(CreditTransfer.id).where(
        CreditTransfer.kind == "transfer", CreditTransfer.state.in_(workable), due_now
    )
    if narrowed:
        meters = CreditTransfer.meter_id.in_(bindparam("meters", expanding=True))
        candidates, due = candidates.where(meters), due.where(meters)
    lease = (
        update(CreditTransfer)
        .where(CreditTransfer.id.in_(candidates.scalar_subquery()))
        .values(lease_owner=bindparam("worker"), lease_until=bindparam("until"))
        .returning(CreditTransfer.id)
    )
    return due.limit(1), lease


_CLAIM = {narrowed: _claim_statements(narrowed) for narrowed in (False, True)}


async def claim_transfers(
    db: Database,
    worker: str,
    now: datetime,
    lease_until: datetime,
    limit: int,
    *,
    meter_ids: Sequence[str] | None = None,
) -> list[Held]:
    """Claim up to ``limit`` due transfers, the lowest-numbered unfinished one of each meter,
    not leased by a live worker; ``meter_ids`` narrows it to those meters."""
    due, statement = _CLAIM[meter_ids is not None]
    named: dict[str, Any] = {"now": now, "until": lease_until, "worker": worker, "most": limit}
    if meter_ids is not None:
        named["meters"] = list(meter_ids)
    rows = await claim_rows(
        db, CreditTransfer, due, statement, "claiming credit transfers", parameters=named
    )
    return [
        Held(
            row.id,
            row.meter_id,
            row.payment_id,
            row.number,
            row.amount,
            row.value,
            TransferState(row.state),
            row.attempts,
            None if row.envelope is None else unpack_envelope(row.envelope),
            endpoint,
            transport,
            gateway,
            worker,
        )
        for row, endpoint, transport, gateway in rows
    ]


# what a batch of steps reads (see _Batch.load), built once
_LOCK_TRANSFERS = (
    select(CreditTransfer)
    .where(CreditTransfer.id.in_(bindparam("ids", expanding=True)))
    .order_by(CreditTransfer.id)
    .with_for_update()
    .execution_options(populate_existing=True)
)
_LOCK_METERS = (
    select(Meter)
    .where(Meter.id.in_(bindparam("meters", expanding=True)))
    .order_by(Meter.id)
    .with_for_update(key_share=True)
    .execution_options(populate_existing=True)
)
_COMMANDED = (
    select(CommandRow.meter_id)
    .where(CommandRow.meter_id.in_(bindparam("meters", expanding=True)))
    .where(CommandRow.state.in_(_MAY_SEND))
    .distinct()
)
_SEEN = select(MeterStateRow.meter_id, MeterStateRow.last_command_seq).where(
    MeterStateRow.meter_id.in_(bindparam("meters", expanding=True))
)
_METERS = select(Meter).where(Meter.id.in_(bindparam("meters", expanding=True)))
_PAYMENTS = select(Payment).where(Payment.id.in_(bindparam("ids", expanding=True)))


class _Batch:
    """One transaction's steps of the deliverer: the rows they need read once for all of them
    (the transfers locked, and for the ones that sign or post, their meters, payments, the
    meters' pending commands, last seen sequences and keys), and what they write besides the
    transfers themselves (audit entries, ledger postings, notices) gathered and written at the
    end with one statement per table."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self.transfers: dict[int, CreditTransfer] = {}
        self.meters: dict[str, Meter] = {}
        self.payments: dict[int, Payment] = {}
        self.commanded: set[str] = set()  # meters with a command that may still go out
        self.seen: dict[str, int] = {}  # a meter's command sequence at its latest reading
        self.keys: dict[int, bytes] = {}
        self.audit: list[audit.Pending] = []
        self.postings: list[Posting] = []
        self.notices: list[dict[str, Any]] = []
        self.told: list[_Told] = []

    async def load(self, jobs: Sequence[_Job[Any]]) -> None:
        session = self.session
        ids = sorted({job.held.id for job in jobs})
        self.transfers = {
            row.id: row for row in (await session.scalars(_LOCK_TRANSFERS, {"ids": ids})).all()
        }
        signing = sorted({job.held.meter_id for job in jobs if job.signs})
        others = sorted({job.held.meter_id for job in jobs if job.posts} - set(signing))
        if signing:
            # FOR NO KEY UPDATE: it guards the sequence without blocking a payment that inserts
            # rows naming the meter (their foreign keys' KEY SHARE), which, holding the audit
            # trail's lock this transaction waits for, would deadlock
            named = {"meters": signing}
            locked = await session.scalars(_LOCK_METERS, named)
            self.meters.update({m.id: m for m in locked.all()})
            self.commanded = set((await session.scalars(_COMMANDED, named)).all())
            self.seen = {str(m): int(s) for m, s in (await session.execute(_SEEN, named)).all()}
            key_ids = sorted(
                {m.command_key_id for m in self.meters.values() if m.command_key_id is not None}
            )
            if key_ids:
                found = await session.execute(
                    select(KeyMaterial.id, KeyMaterial.secret).where(KeyMaterial.id.in_(key_ids))
                )
                self.keys = {int(i): bytes(k) for i, k in found.all()}
        if others:
            plain = await session.scalars(_METERS, {"meters": others})
            self.meters.update({m.id: m for m in plain.all()})
        payment_ids = sorted({job.held.payment_id for job in jobs if job.posts})
        if payment_ids:
            paid = await session.scalars(_PAYMENTS, {"ids": payment_ids})
            self.payments = {p.id: p for p in paid.all()}

    def fenced(self, held: Held) -> CreditTransfer | None:
        """The transfer's row, locked, if it is still in the state and under the lease the
        worker holds it in."""
        row = self.transfers.get(held.id)
        if row is None or row.state != held.state.value or row.lease_owner != held.worker:
            return None
        return row

    def sign(self, row: CreditTransfer) -> CommandEnvelope | None:
        """The transfer's envelope under the meter's next command sequence, taken from the
        counter the command store uses (the meter's row locked); None while one of the meter's
        commands may still go out under a lower sequence."""
        if row.meter_id in self.commanded:
            return None
        meter = self.meters[row.meter_id]
        sequence = max(meter.last_command_seq, self.seen.get(row.meter_id, 0)) + 1
        meter.last_command_seq = sequence
        key = None if meter.command_key_id is None else self.keys.get(meter.command_key_id)
        return CommandEnvelope.signed(
            row.meter_id, sequence, Command.credit_transfer(row.number, row.amount), key
        )

    def post_delivery(
        self, row: CreditTransfer, payment: Payment, now: datetime, *, actor: str, how: str
    ) -> None:
        """The delivery's ledger transaction (see :func:`_post_delivery`), written at the
        end."""
        detail = {"transfer": row.id, "kind": row.kind, "number": row.number,
                  "payment": payment.id}  # fmt: skip
        if row.value <= 0:
            self.audit.append(
                audit.Pending(now, actor, "transfer.deliver", row.meter_id, how,
                              TransferState.DELIVERED.value, detail)
            )  # fmt: skip
            return
        self.postings.append(
            Posting(_delivery(row, payment), now, actor, row.meter_id, how, detail)
        )

    async def flush(self) -> None:
        session = self.session
        await audit.append_many(session, self.audit)  # (flushes the rows changed in place)
        await post_many(session, self.postings)
        if self.told:
            found = await recipients(session, {told.row.meter_id for told in self.told})
            for told in self.told:
                target = found.get(told.row.meter_id)
                if target is not None:
                    self.notices.append(_payment_notice_row(told, target))
        if self.notices:
            await insert_ignore(session, Notification, self.notices)


@dataclass(frozen=True, slots=True)
class _Job(Generic[T]):
    """A step for the group writer: what it does in a batch, and what it needs loaded (a
    signature: the meter's sequence; a posting: its payment and meter)."""

    held: Held
    step: Callable[[_Batch], Awaitable[T]]
    signs: bool = False
    posts: bool = False


class GroupWriter:
    """Group commit of the deliverer's steps: the ones concurrent attempts ask for while a
    write is under way go into the next transaction together (at most ``most``), each behind
    its own fence, with the rows they read read once and what they write written with one
    statement per table, so a deliverer working many meters at once makes a few transactions
    of a few statements each, not one transaction of some twenty statements per step. Each
    caller gets its own step's result; when a batch's transaction fails, every caller in it
    gets the StorageError and nothing of the batch is written."""

    def __init__(self, db: Database, most: int = 256) -> None:
        self.db = db
        self._group: GroupCommit[_Job[Any], Any] = GroupCommit(
            lambda jobs: _run_jobs(db, jobs),
            most=most,
            name="credit transfer steps",
            turn=db.writing,  # on SQLite: made up once the process's turn to write comes
        )

    @property
    def transactions(self) -> int:
        """How many transactions it made, for measurements."""
        return self._group.batches

    async def run(self, job: _Job[T]) -> T:
        return cast(T, await self._group.submit(job))


async def _run_jobs(db: Database, jobs: Sequence[_Job[Any]]) -> list[Any]:
    with storage_errors("writing credit transfer steps"):
        async with db.begin() as session:
            batch = _Batch(session)
            await batch.load(jobs)
            results = [await job.step(batch) for job in jobs]
            await batch.flush()
            return results


async def _write(db: Database, writer: GroupWriter | None, job: _Job[T]) -> T:
    """Run ``job`` in a transaction of its own, or in ``writer``'s next group."""
    if writer is not None:
        return await writer.run(job)
    (result,) = await _run_jobs(db, [job])
    return cast(T, result)


async def start_attempt(
    db: Database,
    held: Held,
    now: datetime,
    *,
    resign: bool = False,
    writer: GroupWriter | None = None,
) -> Held | Literal["busy"] | None:
    """Mark the transfer ``sending`` (one more attempt) before its envelope goes out, signing
    the envelope first when it has none or ``resign``; "busy" (nothing written) while one of
    the meter's commands may still go out; None when the fence did not hold."""
    signs = held.envelope is None or resign

    async def step(batch: _Batch) -> Held | Literal["busy"] | None:
        row = batch.fenced(held)
        if row is None:
            return None
        envelope = held.envelope
        if envelope is None or resign:
            envelope = batch.sign(row)
            if envelope is None:
                return "busy"
            row.envelope = pack_envelope(envelope)
        row.state = TransferState.SENDING.value
        row.attempts += 1
        row.updated_at = now
        batch.audit.append(
            audit.Pending(
                now,
                held.worker,
                "transfer.send",
                held.meter_id,
                "first attempt" if row.attempts == 1 else f"attempt {row.attempts}",
                TransferState.SENDING.value,
                {
                    "transfer": held.id,
                    "number": held.number,
                    "sequence": envelope.sequence,
                    "resigned": resign,
                },
            )
        )
        return replace(held, state=TransferState.SENDING, attempts=row.attempts,
                       envelope=envelope)  # fmt: skip

    return await _write(db, writer, _Job(held, step, signs=signs))


def _balance_text(unit: str, credit: int, scale: int, currency: str) -> str:
    if unit == "energy":
        return f"{decimal_text(credit, -3)} kWh"
    return f"{decimal_text(credit, scale)} {currency}"


async def confirm(
    db: Database,
    held: Held,
    now: datetime,
    *,
    how: str,
    credit: int | None,
    quiet: QuietHours,
    expiry: timedelta,
    writer: GroupWriter | None = None,
) -> bool:
    """Mark the transfer delivered (``how``: what showed it) and post its delivery, its audit
    entry and the customer's "payment received" notice (``credit``: the meter's credit
    afterwards, if it was read); False when the fence did not hold (nothing written)."""

    async def step(batch: _Batch) -> bool:
        row = batch.fenced(held)
        if row is None:
            return False
        payment = batch.payments.get(row.payment_id)
        meter = batch.meters.get(row.meter_id)
        if payment is None or meter is None:  # pragma: no cover - foreign keys keep them
            raise StorageError(f"transfer {row.id} names no payment or meter")
        after = credit if credit is not None else await _credit_after(batch.session, row)
        row.state = TransferState.DELIVERED.value
        row.delivered_at = row.updated_at = now
        row.lease_owner = row.lease_until = None
        row.next_attempt_at = None
        batch.post_delivery(row, payment, now, actor=held.worker, how=how)
        batch.told.append(_Told(row, payment, meter, after, now, quiet, expiry))
        return True

    return await _write(db, writer, _Job(held, step, posts=True))


def _delivery(row: CreditTransfer, payment: Payment) -> Transaction:
    """A delivery's ledger transaction: the credit's value from the customer's prepaid balance
    to revenue."""
    currency = payment.currency
    return build(
        TransactionKind.DELIVERY,
        [
            (prepaid(payment.account_id, currency), row.value),
            (utility(AccountKind.REVENUE, currency), -row.value),
        ],
        f"delivery of {row.kind} {row.number} to {row.meter_id} (payment {payment.id})",
    )


async def _post_delivery(
    session: AsyncSession,
    row: CreditTransfer,
    payment: Payment,
    now: datetime,
    *,
    actor: str,
    how: str,
) -> None:
    """The delivery's ledger transaction: the credit's value from the customer's prepaid
    balance to revenue, on the audit trail's hash chain (its entry names the transfer)."""
    detail = {"transfer": row.id, "kind": row.kind, "number": row.number, "payment": payment.id}
    if row.value <= 0:  # nothing to move: the audit entry alone
        await audit.append(
            session,
            at=now,
            actor=actor,
            action="transfer.deliver",
            subject=row.meter_id,
            reason=how,
            outcome=TransferState.DELIVERED.value,
            detail=detail,
        )
        return
    await post(
        session,
        _delivery(row, payment),
        now,
        actor=actor,
        subject=row.meter_id,
        reason=how,
        detail=detail,
    )


async def _credit_after(
    session: AsyncSession, row: CreditTransfer, accepted_at: int | None = None
) -> int | None:
    """The meter's credit after the transfer, from its latest stored reading when the meter
    was not read, plus the transfer when that reading predates it (by its last transfer
    number; a token: by the time the meter accepted it, ``accepted_at``)."""
    latest = (
        await session.execute(
            select(Reading.credit, Reading.last_transfer, Reading.meter_time)
            .where(Reading.meter_id == row.meter_id)
            .order_by(Reading.meter_time.desc())
            .limit(1)
        )
    ).first()
    if latest is None:
        return None
    credit, last_transfer, meter_time = latest
    if row.kind == "transfer" and int(last_transfer) < row.number:
        return int(credit) + row.amount
    if row.kind == "token" and accepted_at is not None and int(meter_time) < accepted_at:
        return int(credit) + row.amount
    return int(credit)


@dataclass(frozen=True, slots=True)
class _Told:
    """A "payment received" notice to write, once its customer is looked up."""

    row: CreditTransfer
    payment: Payment
    meter: Meter
    credit: int | None  # the meter's credit after the transfer, if known
    now: datetime
    quiet: QuietHours
    expiry: timedelta


def _payment_notice_row(told: _Told, target: tuple[str, str, str, str | None]) -> dict[str, Any]:
    row, payment, meter, credit, now = told.row, told.payment, told.meter, told.credit, told.now
    channel, address, language, account_id = target
    balance = (
        "not read yet"
        if credit is None
        else _balance_text(meter.credit_unit, credit, meter.currency_scale, meter.currency)
    )
    token = "" if row.token is None else f" Token: {row.token}."
    values = {
        "meter": row.meter_id,
        "amount": f"{decimal_text(payment.amount, meter.currency_scale)} {payment.currency}",
        "balance": balance,
        "token_line": token,
    }
    kind = NoticeKind.PAYMENT_RECEIVED
    return notice_row(
        key=f"{kind.value}:payment:{payment.id}",
        kind=kind.value,
        channel=channel,
        address=address,
        language=language,
        values=values,
        now=now,
        deliver_at=deliver_at(kind, Channel(channel), now, told.quiet),
        expires_at=now + told.expiry,
        meter_id=row.meter_id,
        account_id=account_id,
    )


async def _payment_notice(session: AsyncSession, told: _Told) -> None:
    target = (await recipients(session, {told.row.meter_id})).get(told.row.meter_id)
    if target is not None:
        await insert_ignore(session, Notification, [_payment_notice_row(told, target)])


async def retry_later(
    db: Database,
    held: Held,
    now: datetime,
    when: datetime,
    why: str,
    *,
    writer: GroupWriter | None = None,
) -> bool:
    """Give the transfer back in its state, due again at ``when``, with ``why`` kept as its
    last error (an audit entry for a transfer that was sent); False when the fence did not
    hold."""

    async def step(batch: _Batch) -> bool:
        row = batch.fenced(held)
        if row is None:
            return False
        row.lease_owner = row.lease_until = None
        row.next_attempt_at = when
        row.last_error = why
        row.updated_at = now
        if held.state is TransferState.SENDING:
            batch.audit.append(
                audit.Pending(
                    now,
                    held.worker,
                    "transfer.retry",
                    held.meter_id,
                    why,
                    f"again at {when.isoformat()}",
                    {"transfer": held.id, "number": held.number, "attempts": held.attempts},
                )
            )
        return True

    return await _write(db, writer, _Job(held, step))


async def give_up(
    db: Database,
    held: Held,
    now: datetime,
    why: str,
    *,
    expiry: timedelta,
    writer: GroupWriter | None = None,
) -> bool:
    """Mark the transfer failed (the meter refused it and does not have it), with its audit
    entry and a notice to operators; the payment may then be reversed (its credit is
    cancelled). False when the fence did not hold."""

    async def step(batch: _Batch) -> bool:
        row = batch.fenced(held)
        if row is None:
            return False
        row.state = TransferState.FAILED.value
        row.lease_owner = row.lease_until = None
        row.last_error = why
        row.updated_at = now
        batch.audit.append(
            audit.Pending(
                now,
                held.worker,
                "transfer.fail",
                held.meter_id,
                why,
                TransferState.FAILED.value,
                {"transfer": held.id, "number": held.number, "payment": held.payment_id},
            )
        )
        batch.notices.append(
            notice_row(
                key=f"{NoticeKind.COMMAND_FAILED.value}:transfer:{held.id}",
                kind=NoticeKind.COMMAND_FAILED.value,
                channel="webhook",
                address="operators",
                language="en",
                values={
                    "meter": held.meter_id,
                    "command": f"credit transfer {held.number}",
                    "reason": why,
                },
                now=now,
                deliver_at=now,
                expires_at=now + expiry,
                meter_id=held.meter_id,
            )
        )
        return True

    return await _write(db, writer, _Job(held, step))


async def listen_for_transfers(
    db: Database, written: Callable[[], None], stop: asyncio.Event, *, again: float = 5.0
) -> None:
    """On PostgreSQL, call ``written`` each time a commit of any worker wrote credit
    transfers (the notifications of migration 0009), until ``stop``; a lost connection is
    logged and opened again after ``again`` seconds (``written`` is called once it listens
    again, for what it may have missed). Returns at once on SQLite."""
    if db.dialect != "postgresql":
        return
    conninfo = make_url(db.url).set(drivername="postgresql").render_as_string(hide_password=False)
    while not stop.is_set():
        try:
            async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                await conn.execute(f"LISTEN {TRANSFERS_CHANNEL}")
                written()
                while not stop.is_set():
                    async for _ in conn.notifies(timeout=1.0):
                        written()
        except psycopg.Error as exc:
            log.warning("listening for credit transfers: %s; again in %g s", exc, again)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), again)


# -- tokens ---------------------------------------------------------------------------------------


async def accept_tokens(
    db: Database,
    now: datetime,
    *,
    actor: str,
    quiet: QuietHours,
    expiry: timedelta,
    limit: int = 500,
) -> int:
    """Mark delivered the issued STS tokens their meters reported accepted (an event
    ``TOKEN_TID`` with the token's TID, read by a poll or pushed over MQTT), each with its
    delivery posting, its audit entry and the customer's notice; returns how many. A look
    first: with nothing to mark, no write lock is taken."""
    reported = (
        select(CreditTransfer.id, func.max(MeterEvent.meter_time))
        .join(
            MeterEvent,
            and_(
                MeterEvent.meter_id == CreditTransfer.meter_id,
                # a literal, not a parameter, so the partial index on code 35 applies
                MeterEvent.code == literal_column(str(int(EventCode.TOKEN_TID))),
                MeterEvent.a == CreditTransfer.number,
            ),
        )
        .where(
            CreditTransfer.kind == "token",
            CreditTransfer.state == TransferState.ISSUED.value,
        )
        .group_by(CreditTransfer.id)
        .order_by(CreditTransfer.id)
        .limit(limit)
    )
    with storage_errors("matching accepted tokens"):
        async with db.read() as session:
            found = [(int(i), int(t)) for i, t in (await session.execute(reported)).all()]
        if not found:
            return 0
        done = 0
        async with db.begin() as session:
            for transfer_id, meter_time in found:
                row = (
                    await session.scalars(
                        select(CreditTransfer)
                        .where(CreditTransfer.id == transfer_id)
                        .with_for_update()
                        .execution_options(populate_existing=True)
                    )
                ).one()
                if row.state != TransferState.ISSUED.value:
                    continue  # another worker marked it meanwhile
                payment = await session.get(Payment, row.payment_id)
                meter = await session.get(Meter, row.meter_id)
                assert payment is not None  # foreign keys keep them
                assert meter is not None
                row.state = TransferState.DELIVERED.value
                row.delivered_at = row.updated_at = now
                how = f"the meter reported token TID {row.number} accepted"
                await _post_delivery(session, row, payment, now, actor=actor, how=how)
                credit = await _credit_after(session, row, meter_time)
                await _payment_notice(
                    session, _Told(row, payment, meter, credit, now, quiet, expiry)
                )
                done += 1
        return done


# -- reading transfers back -----------------------------------------------------------------------


async def list_transfers(
    db: Database,
    *,
    meter_id: str | None = None,
    states: Sequence[str] | None = None,
    limit: int = 50,
) -> list[TransferView]:
    """The newest transfers and tokens first."""
    query = select(CreditTransfer).order_by(CreditTransfer.id.desc()).limit(limit)
    if meter_id is not None:
        query = query.where(CreditTransfer.meter_id == meter_id)
    if states:
        query = query.where(CreditTransfer.state.in_(list(states)))
    with storage_errors("listing credit transfers"):
        async with db.read() as session:
            if meter_id is not None and await session.get(Meter, meter_id) is None:
                raise StorageError(f"no meter {meter_id!r} is registered")
            return [_view(row) for row in (await session.scalars(query)).all()]


async def get_transfer(db: Database, transfer_id: int) -> TransferView:
    with storage_errors("reading a credit transfer"):
        async with db.read() as session:
            row = await session.get(CreditTransfer, transfer_id)
            if row is None:
                raise StorageError(f"no credit transfer {transfer_id}")
            return _view(row)


async def workable_count(db: Database, meter_ids: Sequence[str] | None = None) -> int:
    """How many transfers are still to deliver (of these meters)."""
    query = select(func.count()).where(
        CreditTransfer.kind == "transfer",
        CreditTransfer.state.in_([s.value for s in WORKABLE]),
    )
    if meter_ids is not None:
        query = query.where(CreditTransfer.meter_id.in_(list(meter_ids)))
    with storage_errors("counting credit transfers"):
        async with db.read() as session:
            return int(await session.scalar(query) or 0)


__all__ = [
    "GroupWriter",
    "Held",
    "TransferView",
    "accept_tokens",
    "claim_transfers",
    "confirm",
    "get_transfer",
    "give_up",
    "list_transfers",
    "listen_for_transfers",
    "retry_later",
    "start_attempt",
    "workable_count",
]
