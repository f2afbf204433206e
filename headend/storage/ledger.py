"""The ledger's tables, payment channels, payments, receipts and the credit owed to meters.

A payment is one database transaction: the payment row (unique per channel and reference,
holding its first answer), its ledger transaction with the cached balances of the accounts it
touches, its entry on the audit trail's hash chain, its receipt (the next gapless number) and
the credit owed to the meter: a remote transfer with the meter's next transfer number, waiting
for the dispatcher ('pending_delivery'), or an STS token from the meter's key data with the
next TID. Refusals (:class:`~headend.domain.pricing.PaymentRefused`) store nothing.

Payments that arrive together (the API's :class:`PaymentIntake`) share one transaction, each
written whole or not at all and answered as if it had been taken alone, in turn; every check
is made before anything of the group is written, and the group's rows go in with one
statement per table.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Table, bindparam, delete, func, insert, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from headend.domain.delivery import UNDELIVERED, TransferState
from headend.domain.ledger import (
    AccountKind,
    AccountRef,
    Transaction,
    TransactionKind,
    build,
    channel_kind,
    channel_name,
    clearing,
    debt,
    prepaid,
    reversal,
    utility,
)
from headend.domain.pricing import (
    AmountOutOfBounds,
    Code,
    PaymentRefused,
    Situation,
    Split,
    split,
)
from headend.domain.registry import TariffRecord
from headend.storage import audit
from headend.storage.database import (
    DURABLE,
    Database,
    insert_ignore,
    insert_new,
    storage_errors,
)
from headend.storage.groups import GroupCommit
from headend.storage.registry import tariff_record
from headend.storage.schema import (
    Account,
    Base,
    ChannelSigning,
    CreditTransfer,
    KeyMaterial,
    LedgerAccount,
    LedgerCounter,
    LedgerPosting,
    LedgerTransaction,
    Meter,
    MeterVending,
    Payment,
    PaymentAttempt,
    PaymentChannel,
    Reading,
    Receipt,
    RequestSignature,
    Tariff,
)
from headend.vending import (
    Rounding,
    VendedToken,
    VendingKeyData,
    vend_credit,
    vend_key_change,
)
from protocols.errors import StorageError, ValidationError
from protocols.sts import Pan
from protocols.units import Money

#: a transfer waiting for the credit deliverer (see headend.domain.delivery for the others)
PENDING = TransferState.PENDING.value
#: credit whose value the prepaid balance holds for the meter (not change): owed, or refused
#: by the meter and waiting for an operator (a reversal cancels it)
HELD = (*UNDELIVERED, TransferState.FAILED.value)
TOKEN_STEP_WH = 100  # an STS electricity token counts 0.1 kWh


# -- channels -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChannelView:
    name: str
    kind: str
    key_prefix: str
    status: str
    created_at: datetime
    require_signature: bool = False
    #: the HMAC key of a channel that signs its requests: set only by :func:`add_channel`
    #: (shown once) and :func:`channel_for_key` (to check a request), never listed
    signing_secret: str | None = field(default=None, repr=False)


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _channel_view(
    row: PaymentChannel, signs: bool = False, secret: str | None = None
) -> ChannelView:
    return ChannelView(
        row.name, row.kind, row.key_prefix, row.status, row.created_at, signs, secret
    )


async def add_channel(
    db: Database,
    name: str,
    kind: str,
    now: datetime,
    *,
    actor: str,
    require_signature: bool = False,
) -> tuple[ChannelView, str]:
    """Register a payment channel; returns it and its API key, which is never stored (only
    its SHA-256) and so cannot be shown again. With ``require_signature`` the view carries
    the channel's signing secret (kept in key_material, as the HMAC needs it) this once."""
    channel_name(name)
    channel_kind(kind)
    key = f"hes_{secrets.token_urlsafe(32)}"
    secret = f"hss_{secrets.token_urlsafe(32)}" if require_signature else None
    async with db.begin() as session:
        if await _channel(session, name) is not None:
            raise StorageError(f"channel {name!r} exists already")
        row = PaymentChannel(
            name=name, kind=kind, key_hash=_key_hash(key), key_prefix=key[:12], created_at=now
        )
        session.add(row)
        await session.flush()
        if secret is not None:
            material = KeyMaterial(kind="channel", secret=secret.encode(), created_at=now)
            session.add(material)
            await session.flush()
            session.add(ChannelSigning(channel_id=row.id, key_id=material.id, created_at=now))
            await session.flush()
        await audit.append(
            session,
            at=now,
            actor=actor,
            action="channel.register",
            subject=f"channel:{name}",
            reason="operator",
            outcome="registered",
            detail={
                "kind": kind,
                "key_prefix": row.key_prefix,
                "require_signature": require_signature,
            },
        )
        return _channel_view(row, secret is not None, secret), key


async def _channel(session: AsyncSession, name: str) -> PaymentChannel | None:
    return (
        await session.scalars(select(PaymentChannel).where(PaymentChannel.name == name))
    ).first()


async def list_channels(db: Database) -> list[ChannelView]:
    async with db.read() as session:
        rows = (
            await session.execute(
                select(PaymentChannel, ChannelSigning.key_id)
                .outerjoin(ChannelSigning, ChannelSigning.channel_id == PaymentChannel.id)
                .order_by(PaymentChannel.name)
            )
        ).all()
    return [_channel_view(row, key_id is not None) for row, key_id in rows]


async def channel_for_key(db: Database, key: str) -> ChannelView | None:
    """The active channel whose API key is ``key``, if any (with its signing secret when it
    signs its requests)."""
    async with db.read() as session:
        found = (
            await session.execute(
                select(PaymentChannel, KeyMaterial.secret)
                .outerjoin(ChannelSigning, ChannelSigning.channel_id == PaymentChannel.id)
                .outerjoin(KeyMaterial, KeyMaterial.id == ChannelSigning.key_id)
                .where(PaymentChannel.key_hash == _key_hash(key), PaymentChannel.status == "active")
            )
        ).first()
    if found is None:
        return None
    row, secret = found
    secret_bytes: bytes | None = secret  # None: an outer join found no signing secret
    if secret_bytes is None:
        return _channel_view(row)
    return _channel_view(row, True, secret_bytes.decode())


async def remember_signature(
    db: Database, channel: str, signature: str, now: datetime, keep: timedelta
) -> bool:
    """Remember a request signature of ``channel``; False if it was seen before (a replay).
    Signatures older than ``keep`` are forgotten in the same transaction: by then their
    timestamp is outside the window and refused anyway."""
    async with db.begin() as session:
        channel_id = await session.scalar(
            select(PaymentChannel.id).where(PaymentChannel.name == channel)
        )
        if channel_id is None:
            raise StorageError(f"no channel {channel!r}")
        await session.execute(delete(RequestSignature).where(RequestSignature.seen_at < now - keep))
        new = await insert_new(
            session,
            RequestSignature,
            [{"channel_id": channel_id, "signature": signature, "seen_at": now}],
        )
    return bool(new)


# -- refused attempts -----------------------------------------------------------------------------

ATTEMPT_TEXT = 4096  # characters of a refused request kept


@dataclass(frozen=True, slots=True)
class AttemptView:
    attempt_id: int
    at: datetime
    channel: str
    reference: str | None
    source: str
    code: str
    detail: str
    request: str

    def document(self) -> dict[str, Any]:
        return {
            "id": self.attempt_id,
            "at": self.at.isoformat(),
            "channel": self.channel,
            "reference": self.reference,
            "source": self.source,
            "code": self.code,
            "detail": self.detail,
            "request": self.request,
        }


async def record_attempt(
    db: Database,
    channel: str,
    *,
    reference: str | None,
    code: str,
    detail: str,
    request: str,
    now: datetime,
    source: str,
) -> None:
    """Keep a refused payment attempt for the operator (it changes no balance)."""

    def kept(text: str, most: int) -> str:  # PostgreSQL's text takes no NUL
        return text.replace("\x00", "\\x00")[:most]

    async with db.begin() as session:
        session.add(
            PaymentAttempt(
                at=now,
                channel=kept(channel, 64),
                reference=None if reference is None else kept(reference, 200),
                source=source,
                code=code,
                detail=kept(detail, 1000),
                request=kept(request, ATTEMPT_TEXT),
            )
        )


async def list_attempts(
    db: Database, *, channel: str | None = None, limit: int = 50
) -> list[AttemptView]:
    """The latest refused payment attempts (of a channel), newest first."""
    query = select(PaymentAttempt).order_by(PaymentAttempt.id.desc()).limit(limit)
    if channel is not None:
        query = query.where(PaymentAttempt.channel == channel)
    async with db.read() as session:
        if channel is not None and await _channel(session, channel) is None:
            raise StorageError(f"no channel {channel!r}")
        rows = (await session.scalars(query)).all()
    return [
        AttemptView(r.id, r.at, r.channel, r.reference, r.source, r.code, r.detail, r.request)
        for r in rows
    ]


# -- keypad meters --------------------------------------------------------------------------------


async def set_keypad(
    db: Database,
    meter_id: str,
    key: VendingKeyData,
    now: datetime,
    *,
    actor: str,
    last_tid: int | None = None,
) -> bool:
    """Keep ``key`` as the meter's STS key data (the vending key in key_material); payments
    to it then vend tokens. False if the meter has this key data already."""
    async with db.begin() as session:
        meter = await session.get(Meter, meter_id)
        if meter is None or meter.status != "active":
            raise StorageError(f"no active meter {meter_id!r} is registered")
        if meter.credit_unit != "energy":
            raise StorageError(
                f"meter {meter_id} counts money: a keypad meter's credit is energy (STS tokens)"
            )
        vending = await _vending(session, meter_id)
        if meter.sts_key_id is not None:
            kept = await session.get(KeyMaterial, meter.sts_key_id)
            if _key_data(meter, vending, kept) == key:
                return False
            raise StorageError(
                f"meter {meter_id} has other STS key data: moving it to new keys takes key "
                "change tokens, which payments do not issue"
            )
        material = KeyMaterial(kind="sts", secret=key.vending_key, created_at=now)
        session.add(material)
        await session.flush()
        meter.sts_key_id = material.id
        vending.pan = key.pan.digits
        vending.sgc, vending.ti, vending.krn, vending.kt = key.sgc, key.ti, key.krn, key.kt
        vending.base_date, vending.ken = key.base_date, key.ken
        if last_tid is not None:
            vending.last_tid = last_tid
        await audit.append(
            session,
            at=now,
            actor=actor,
            action="meter.keypad",
            subject=meter_id,
            reason="operator",
            outcome="key data kept",
            detail={"pan": key.pan.digits, "sgc": key.sgc, "krn": key.krn, "ti": key.ti},
        )
    return True


@dataclass(frozen=True, slots=True)
class KeyChange:
    """Two key change tokens (both under the old key, keyed in in order) and the key data the
    meter's tokens are vended under from now on."""

    meter_id: str
    first: VendedToken
    second: VendedToken
    key: VendingKeyData
    rollover: bool


async def rotate_keypad(
    db: Database,
    meter_id: str,
    vending_key: bytes,
    now: datetime,
    *,
    actor: str,
    sgc: int | None = None,
    ti: int | None = None,
    krn: int | None = None,
    kt: int | None = None,
    base_date: int | None = None,
    ken: int | None = None,
) -> KeyChange:
    """Move a keypad meter to new key data: ``vending_key`` and whichever of sgc, ti, krn, kt,
    base_date and ken are given (the others stay); returns the key change token pair
    (:func:`~headend.vending.vend_key_change`). Its next tokens are vended under the new key;
    a new base date (a rollover) starts its TIDs again. The new key material, the meter's key
    data and the audit entry are one transaction; a change the tokens cannot carry is refused
    and changes nothing."""
    with storage_errors("rotating a keypad meter's key"):
        async with db.begin() as session:
            meter = await session.get(Meter, meter_id, with_for_update=True)
            if meter is None or meter.status != "active":
                raise StorageError(f"no active meter {meter_id!r} is registered")
            vending = await _vending(session, meter_id)
            material = (
                None
                if meter.sts_key_id is None
                else await session.get(KeyMaterial, meter.sts_key_id)
            )
            old = _key_data(meter, vending, material)
            if old is None:
                raise StorageError(
                    f"meter {meter_id} has no STS key data: `hes keypad add` keeps its first"
                )
            new = replace(
                old,
                vending_key=vending_key,
                sgc=old.sgc if sgc is None else sgc,
                ti=old.ti if ti is None else ti,
                krn=old.krn if krn is None else krn,
                kt=old.kt if kt is None else kt,
                base_date=old.base_date if base_date is None else base_date,
                ken=old.ken if ken is None else ken,
            )
            if new == old:
                raise ValidationError("the new key data is the meter's key data already")
            first, second = vend_key_change(old, new)
            rollover = new.base_date != old.base_date
            kept = KeyMaterial(kind="sts", secret=new.vending_key, created_at=now)
            session.add(kept)
            await session.flush()
            meter.sts_key_id = kept.id
            vending.sgc, vending.ti, vending.krn, vending.kt = new.sgc, new.ti, new.krn, new.kt
            vending.base_date, vending.ken = new.base_date, new.ken
            if rollover:
                vending.last_tid = None  # the meter clears its TID memory
            await audit.append(
                session,
                at=now,
                actor=actor,
                action="meter.keypad.rotate",
                subject=meter_id,
                reason="operator",
                outcome="key change tokens issued",
                detail={
                    "pan": new.pan.digits,
                    "sgc": new.sgc,
                    "krn": new.krn,
                    "ti": new.ti,
                    "kt": new.kt,
                    "base_date": new.base_date,
                    "ken": new.ken,
                    "rollover": rollover,
                },
            )
    return KeyChange(meter_id, first, second, new, rollover)


def _key_data(
    meter: Meter, vending: MeterVending, material: KeyMaterial | None
) -> VendingKeyData | None:
    if meter.sts_key_id is None or material is None or vending.pan is None:
        return None
    return VendingKeyData(
        material.secret,
        Pan.parse(vending.pan),
        sgc=vending.sgc or 0,
        ti=vending.ti or 0,
        krn=vending.krn or 1,
        kt=vending.kt or 0,
        base_date=vending.base_date or 1993,
        ken=255 if vending.ken is None else vending.ken,
    )


async def _vending(session: AsyncSession, meter_id: str) -> MeterVending:
    """The meter's vending row, locked for this transaction (created when new)."""
    await insert_ignore(session, MeterVending, [{"meter_id": meter_id, "last_transfer": 0}])
    row = (
        await session.scalars(
            select(MeterVending)
            .where(MeterVending.meter_id == meter_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).one()
    return row


# -- the ledger -----------------------------------------------------------------------------------


async def _account_ids(
    session: AsyncSession, accounts: Sequence[AccountRef], now: datetime
) -> dict[AccountRef, int]:
    """The ledger accounts' ids, creating the ones that are new (a look first: they exist
    but for an account's first payments)."""
    codes = {a.code: a for a in accounts}
    found = await session.execute(_ACCOUNT_IDS, {"codes": list(codes)})
    ids: dict[str, int] = {code: account_id for code, account_id in found}
    new = [a for code, a in codes.items() if code not in ids]
    if new:
        rows = [
            {
                "code": a.code,
                "kind": str(a.kind),
                "owner": a.owner,
                "currency": a.currency,
                "balance": 0,
                "created_at": now,
            }
            for a in new
        ]
        await insert_ignore(session, LedgerAccount, rows)
        found = await session.execute(_ACCOUNT_IDS, {"codes": [a.code for a in new]})
        ids.update({code: account_id for code, account_id in found})
    return {a: ids[a.code] for a in accounts}


@dataclass(frozen=True, slots=True)
class _Posting:
    """A transaction to write with :func:`post_many`, with its audit entry's fields."""

    transaction: Transaction
    at: datetime
    actor: str
    subject: str
    reason: str
    detail: dict[str, Any]


def _table(model: type[Base]) -> Table:
    """A model's table, for Core statements of many rows (no ORM objects made)."""
    table = model.__table__
    assert isinstance(table, Table)
    return table


_TRANSACTIONS = _table(LedgerTransaction)
_POSTINGS = _table(LedgerPosting)
_ACCOUNTS = _table(LedgerAccount)

# The statements of the payment path, built once: building one costs more CPU than running it
# on SQLite (see headend/storage/sqlite.py).
_ACCOUNT_IDS = select(_ACCOUNTS.c.code, _ACCOUNTS.c.id).where(
    _ACCOUNTS.c.code.in_(bindparam("codes", expanding=True))
)
_INSERT_TRANSACTIONS = insert(_TRANSACTIONS).returning(
    _TRANSACTIONS.c.audit_position, _TRANSACTIONS.c.id
)
_INSERT_POSTINGS = insert(_POSTINGS)
_MOVE_BALANCES = (
    update(_ACCOUNTS)
    .where(_ACCOUNTS.c.id == bindparam("account"))
    .values(balance=_ACCOUNTS.c.balance + bindparam("moved"))
)


async def post(
    session: AsyncSession,
    transaction: Transaction,
    now: datetime,
    *,
    actor: str,
    subject: str,
    reason: str,
    detail: dict[str, Any] | None = None,
) -> int:
    """Write ``transaction`` in ``session``'s transaction: its entry on the audit trail's hash
    chain (which records every posting), the transaction, its postings and the accounts'
    cached balances. Returns its id."""
    (transaction_id,) = await post_many(
        session, [_Posting(transaction, now, actor, subject, reason, detail or {})]
    )
    return transaction_id


async def post_many(session: AsyncSession, postings: Sequence[_Posting]) -> list[int]:
    """Write several transactions as :func:`post` does, in order, with one statement per
    table (their audit entries follow each other on the chain); their ids."""
    if not postings:
        return []
    entries = await audit.append_many(
        session,
        [
            audit.Pending(
                p.at,
                p.actor,
                f"ledger.{p.transaction.kind}",
                p.subject,
                p.reason,
                "posted",
                {"transaction": p.transaction.document(), **p.detail},
            )
            for p in postings
        ],
    )
    refs = [leg.account for p in postings for leg in p.transaction.postings]
    ids = await _account_ids(session, refs, min(p.at for p in postings))
    # one multi-row INSERT; each id found by its (unique) audit position, as SQLite promises
    # no order of RETURNING rows (sort_by_parameter_order would insert them one at a time)
    inserted = await session.execute(
        _INSERT_TRANSACTIONS,
        [
            {
                "kind": str(p.transaction.kind),
                "memo": p.transaction.memo,
                "corrects": p.transaction.corrects,
                "at": p.at,
                "audit_position": entry.position,
            }
            for p, entry in zip(postings, entries, strict=True)
        ],
    )
    by_position = {int(position): int(i) for position, i in inserted.all()}
    transaction_ids = [by_position[entry.position] for entry in entries]
    rows = []
    moved: dict[int, int] = {}
    for p, transaction_id in zip(postings, transaction_ids, strict=True):
        for leg in p.transaction.postings:
            account_id = ids[leg.account]
            rows.append(
                {"transaction_id": transaction_id, "account_id": account_id, "amount": leg.amount}
            )
            moved[account_id] = moved.get(account_id, 0) + leg.amount
    await session.execute(_INSERT_POSTINGS, rows)
    balances = [{"account": a, "moved": n} for a, n in sorted(moved.items()) if n]
    if balances:  # in the accounts' order: two writers lock their rows in the same order
        await session.execute(_MOVE_BALANCES, balances)
    return transaction_ids


async def _balance(session: AsyncSession, account: AccountRef) -> int:
    """The account's balance as it reads (see AccountRef.shown), from the cache."""
    cached = await session.scalar(
        select(LedgerAccount.balance).where(LedgerAccount.code == account.code)
    )
    return account.shown(cached or 0)


async def _transaction(session: AsyncSession, transaction_id: int) -> Transaction:
    row = await session.get(LedgerTransaction, transaction_id)
    if row is None:
        raise StorageError(f"no ledger transaction {transaction_id}")
    legs = await session.execute(
        select(
            LedgerAccount.kind, LedgerAccount.owner, LedgerAccount.currency, LedgerPosting.amount
        )
        .join(LedgerAccount, LedgerAccount.id == LedgerPosting.account_id)
        .where(LedgerPosting.transaction_id == transaction_id)
        .order_by(LedgerPosting.id)
    )
    return build(
        TransactionKind(row.kind),
        [(AccountRef(AccountKind(k), o, c), n) for k, o, c, n in legs],
        row.memo,
        row.corrects,
    )


@dataclass(frozen=True, slots=True)
class BalanceCheck:
    code: str
    cached: int
    from_postings: int


async def check_balances(db: Database) -> list[BalanceCheck]:
    """Every account's cached balance beside the sum of its postings."""
    async with db.read() as session:
        summed = await session.execute(
            select(LedgerPosting.account_id, func.sum(LedgerPosting.amount)).group_by(
                LedgerPosting.account_id
            )
        )
        sums = {account_id: total for account_id, total in summed}
        rows = (await session.scalars(select(LedgerAccount).order_by(LedgerAccount.code))).all()
    return [BalanceCheck(r.code, r.balance, int(sums.get(r.id) or 0)) for r in rows]


# -- payments -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Vendee:
    """What a payment to a meter is priced and delivered with."""

    meter: Meter
    account: str
    tariff: TariffRecord
    exponent: int
    keypad: bool


async def _vendees(
    session: AsyncSession, meter_ids: Sequence[str]
) -> dict[str, Vendee | PaymentRefused]:
    """Each meter's :class:`Vendee`, or why it cannot be paid for; one query."""
    found = await session.execute(_VENDEES, {"meters": sorted(set(meter_ids))})
    rows = {meter.id: (meter, account, tariff) for meter, account, tariff in found}
    out: dict[str, Vendee | PaymentRefused] = {}
    for meter_id in meter_ids:
        try:
            out[meter_id] = _vendee_of(meter_id, rows.get(meter_id))
        except PaymentRefused as refused:
            out[meter_id] = refused
    return out


_VENDEES = (
    select(Meter, Account, Tariff)
    .outerjoin(Account, Account.id == Meter.account_id)
    .outerjoin(Tariff, Tariff.id == Meter.tariff_id)
    .where(Meter.id.in_(bindparam("meters", expanding=True)))
)


def _vendee_of(meter_id: str, row: tuple[Meter, Account | None, Tariff | None] | None) -> Vendee:
    if row is None:
        raise PaymentRefused(Code.UNKNOWN_ACCOUNT, f"no meter {meter_id!r} is registered")
    meter, account, tariff_row = row
    if meter.status != "active":
        raise PaymentRefused(Code.UNKNOWN_ACCOUNT, f"meter {meter_id} is retired")
    if meter.account_id is None:
        raise PaymentRefused(Code.UNKNOWN_ACCOUNT, f"meter {meter_id} has no account")
    if account is None:  # pragma: no cover - a foreign key keeps it
        raise PaymentRefused(Code.UNKNOWN_ACCOUNT, f"no account {meter.account_id!r}")
    if account.status == "closed":
        raise PaymentRefused(Code.ACCOUNT_CLOSED, f"account {account.id} is closed")
    if meter.tariff_id is None:
        raise PaymentRefused(Code.NOT_VENDABLE, f"meter {meter_id} has no tariff")
    assert tariff_row is not None  # a foreign key keeps it
    tariff = tariff_record(tariff_row)
    if (tariff.currency, tariff.currency_scale) != (meter.currency, meter.currency_scale):
        raise PaymentRefused(
            Code.NOT_VENDABLE,
            f"meter {meter_id} counts {meter.currency} but its tariff {tariff.tariff_id} "
            f"prices in {tariff.currency}",
        )
    return Vendee(meter, account.id, tariff, -tariff.currency_scale, meter.sts_key_id is not None)


async def _vendee(session: AsyncSession, meter_id: str) -> Vendee:
    found = (await _vendees(session, [meter_id]))[meter_id]
    if isinstance(found, PaymentRefused):
        raise found
    return found


async def _meter_of(session: AsyncSession, meter_id: str | None, account_id: str | None) -> str:
    """The meter a payment or quote is for: the one named, or the account's one active
    meter (an account with several must name the meter, so credit never goes astray)."""
    if meter_id is not None:
        return meter_id
    assert account_id is not None
    account = await session.get(Account, account_id)
    if account is None:
        raise PaymentRefused(Code.UNKNOWN_ACCOUNT, f"no account {account_id!r}")
    if account.status == "closed":
        raise PaymentRefused(Code.ACCOUNT_CLOSED, f"account {account_id} is closed")
    meters = (
        await session.scalars(
            select(Meter.id)
            .where(Meter.account_id == account_id, Meter.status == "active")
            .order_by(Meter.id)
        )
    ).all()
    if not meters:
        raise PaymentRefused(Code.UNKNOWN_ACCOUNT, f"account {account_id} has no active meter")
    if len(meters) > 1:
        raise PaymentRefused(
            Code.MALFORMED_FIELD,
            f"meter_id: account {account_id} has {len(meters)} meters "
            f"({', '.join(meters[:5])}): name the meter",
        )
    return str(meters[0])


def parse_amount(text: str | int, currency: str, exponent: int) -> int:
    """A decimal amount in ``currency`` as minor units, exactly; more decimals than the
    currency has is refused (malformed_field). An int is minor units already."""
    if isinstance(text, int):
        if text <= 0:
            raise AmountOutOfBounds(f"an amount is more than zero, got {text}")
        return text
    try:
        money = Money.parse(text, currency, exponent)
    except ValidationError as exc:
        raise PaymentRefused(Code.MALFORMED_FIELD, f"amount: {exc}") from exc
    if money.minor <= 0:
        raise AmountOutOfBounds(f"an amount is more than zero, got {text!r}")
    return money.minor


def _month_start(now: datetime, tariff: TariffRecord) -> datetime:
    offset = timedelta(minutes=tariff.calendar.utc_offset_minutes)
    local = now.astimezone(UTC) + offset
    return local.replace(day=1, hour=0, minute=0, second=0, microsecond=0) - offset


_MONTH_SO_FAR = (
    select(
        Payment.account_id,
        func.coalesce(func.sum(Payment.service_charge), 0),
        func.coalesce(func.sum(Payment.wh), 0),
    )
    .where(
        Payment.account_id.in_(bindparam("accounts", expanding=True)),
        Payment.state == "accepted",
        Payment.paid_at >= bindparam("since"),
    )
    .group_by(Payment.account_id)
)
_UNDELIVERED = (
    select(Payment.account_id, func.coalesce(func.sum(CreditTransfer.value), 0))
    .join(Payment, Payment.id == CreditTransfer.payment_id)
    .where(
        Payment.account_id.in_(bindparam("accounts", expanding=True)),
        CreditTransfer.state.in_(HELD),
    )
    .group_by(Payment.account_id)
)
_BALANCES = select(LedgerAccount.code, LedgerAccount.balance).where(
    LedgerAccount.code.in_(bindparam("codes", expanding=True))
)


async def _situations(
    session: AsyncSession, vendees: Sequence[Vendee], now: datetime
) -> dict[str, Situation]:
    """Each vendee's :class:`Situation`, by account (one vendee per account): the month's
    service charge and energy, the money held and not owed to the meter, the debt; three
    queries, and one more per other month start (a tariff in another time zone)."""
    accounts = sorted({v.account for v in vendees})
    by_start: dict[datetime, list[str]] = {}
    for v in vendees:
        by_start.setdefault(_month_start(now, v.tariff), []).append(v.account)
    month: dict[str, tuple[int, int]] = {}
    for since, named in by_start.items():
        found = await session.execute(_MONTH_SO_FAR, {"accounts": named, "since": since})
        month.update({a: (int(s), int(w)) for a, s, w in found})
    undelivered = await session.execute(_UNDELIVERED, {"accounts": accounts})
    owed = {a: int(n) for a, n in undelivered}
    refs = {
        v.account: (prepaid(v.account, v.tariff.currency), debt(v.account, v.tariff.currency))
        for v in vendees
    }
    balances = await session.execute(
        _BALANCES, {"codes": [ref.code for pair in refs.values() for ref in pair]}
    )
    cached = {code: int(balance) for code, balance in balances}
    out: dict[str, Situation] = {}
    for v in vendees:
        held_ref, debt_ref = refs[v.account]
        service_paid, month_wh = month.get(v.account, (0, 0))
        held = held_ref.shown(cached.get(held_ref.code, 0))
        out[v.account] = Situation(
            debt=max(0, debt_ref.shown(cached.get(debt_ref.code, 0))),
            service_paid=service_paid,
            month_wh=month_wh,
            change=max(0, held - owed.get(v.account, 0)),
            credit_unit="energy" if v.meter.credit_unit == "energy" else "money",
            step_wh=TOKEN_STEP_WH if v.keypad else 1,
        )
    return out


async def _situation(session: AsyncSession, vendee: Vendee, now: datetime) -> Situation:
    return (await _situations(session, [vendee], now))[vendee.account]


@dataclass(frozen=True, slots=True)
class Quote:
    meter_id: str
    account: str
    tariff: TariffRecord
    split: Split
    keypad: bool

    def document(self) -> dict[str, Any]:
        return {
            "meter": self.meter_id,
            "account": self.account,
            "tariff": self.tariff.tariff_id,
            "tariff_kind": self.tariff.kind,
            "currency": self.tariff.currency,
            "currency_scale": self.tariff.currency_scale,
            "delivery": "token" if self.keypad else "transfer",
            "split": self.split.document(),
        }


async def quote(
    db: Database,
    meter_id: str | None,
    amount_text: str | int,
    now: datetime,
    *,
    account_id: str | None = None,
) -> Quote:
    """What ``amount_text`` (decimal text, or an int of minor units) would buy for the meter
    (or the account's one meter) now; changes nothing."""
    async with db.read() as session:
        meter_id = await _meter_of(session, meter_id, account_id)
        vendee = await _vendee(session, meter_id)
        amount = parse_amount(amount_text, vendee.tariff.currency, vendee.exponent)
        result = split(vendee.tariff, amount, await _situation(session, vendee, now))
    return Quote(meter_id, vendee.account, vendee.tariff, result, vendee.keypad)


#: how far from the head-end's clock a channel's ``paid_at`` may be
PAID_AHEAD = timedelta(minutes=5)
PAID_BEHIND = timedelta(days=7)


@dataclass(frozen=True, slots=True)
class PaymentRequest:
    channel: str
    reference: str
    meter_id: str | None  # None: the account's one active meter
    amount: str | int  # decimal text in the account's currency, or an int of minor units
    currency: str | None = None  # None: the account's
    payer: str | None = None
    account_id: str | None = None
    paid_at: datetime | None = None  # when the channel took the money; None: when stored

    def __post_init__(self) -> None:
        if not 1 <= len(self.reference) <= 128 or not self.reference.isprintable():
            raise PaymentRefused(Code.MALFORMED_FIELD, "reference is 1 to 128 printable characters")
        if self.payer is not None and not (
            1 <= len(self.payer) <= 200 and self.payer.isprintable() and self.payer.strip()
        ):
            raise PaymentRefused(Code.MALFORMED_FIELD, "payer is 1 to 200 printable characters")
        if (self.meter_id is None) == (self.account_id is None):
            raise PaymentRefused(
                Code.MALFORMED_FIELD, "meter_id or account_id: a payment names one of the two"
            )
        if self.paid_at is not None and self.paid_at.tzinfo is None:
            raise PaymentRefused(Code.MALFORMED_FIELD, "paid_at: give the time zone (e.g. Z)")

    def digest(self) -> str:
        """What makes two requests under one reference the same request."""
        body: dict[str, Any] = {
            "meter_id": self.meter_id,
            "currency": self.currency,
            "payer": self.payer,
        }
        if isinstance(self.amount, int):
            body["amount_minor"] = self.amount
        else:
            body["amount"] = self.amount.strip()
        if self.account_id is not None:
            body["account_id"] = self.account_id
        if self.paid_at is not None:
            body["paid_at"] = self.paid_at.astimezone(UTC).isoformat()
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def document(self) -> dict[str, Any]:
        """The request as it came, for the record of a refused attempt."""
        return {
            "reference": self.reference,
            "meter_id": self.meter_id,
            "account_id": self.account_id,
            "amount": self.amount,
            "currency": self.currency,
            "paid_at": None if self.paid_at is None else self.paid_at.isoformat(),
            "payer": self.payer,
        }


@dataclass(frozen=True, slots=True)
class PaymentAnswer:
    answer: dict[str, Any]
    replayed: bool  # the same request again: the first answer, nothing new stored


async def pay(
    db: Database, request: PaymentRequest, now: datetime, *, actor: str, source: str = "cli"
) -> PaymentAnswer:
    """Take a payment (see the module); the same request under a used reference gets the
    first answer again, a different one is refused with reference_conflict. A refusal
    changes no balance; the attempt is kept (:func:`list_attempts`)."""
    (taking,) = await _take(db, [_Taking(request, now, actor, source)])
    return taking.answer()


class PaymentIntake:
    """Group commit of payments: the ones that arrive while a group is being written go into
    the next transaction together (at most ``most``), with one statement per table for the
    whole group instead of some twenty per payment. Each caller gets its own answer or
    refusal, exactly as :func:`pay` gives it: a group holds one payment per account (the
    next one to the same account waits for the next group, so it is priced after the first)
    and one per channel and reference (a repeat gets the first one's answer); receipts are
    numbered in the order the payments came. When a group's transaction fails, each of its
    payments is taken again alone (a reference taken meanwhile by another worker), and a
    storage failure reaches every caller of the group with nothing of it written.

    On SQLite a group is made up once this process's turn to write has come
    (:meth:`Database.writing`), so the payments that arrive while another writer of the
    process holds it join the group instead of waiting for the next.

    A caller that authenticated its channel by an API key earlier (``key``) has the key
    checked again in the group's transaction: a channel no longer active, or whose key was
    replaced, is refused (unknown_channel) with nothing written."""

    def __init__(self, db: Database, most: int = 64) -> None:
        self.db = db
        self._group: GroupCommit[_Taking, _Taking] = GroupCommit(
            lambda takings: _take(db, takings), most=most, name="payment groups", turn=db.writing
        )

    @property
    def groups(self) -> int:
        """How many groups it took, for measurements."""
        return self._group.batches

    async def pay(
        self,
        request: PaymentRequest,
        now: datetime,
        *,
        actor: str,
        source: str = "api",
        key: str | None = None,
    ) -> PaymentAnswer:
        key_hash = None if key is None else _key_hash(key)
        taking = await self._group.submit(_Taking(request, now, actor, source, key_hash))
        return taking.answer()


@dataclass(slots=True)
class _Taking:
    """One payment request on its way through a group: its answer or refusal once taken."""

    request: PaymentRequest
    now: datetime
    actor: str
    source: str
    key_hash: str | None = None  # the API key the channel authenticated with, to check again
    outcome: PaymentAnswer | PaymentRefused | None = None

    def answer(self) -> PaymentAnswer:
        assert self.outcome is not None
        if isinstance(self.outcome, PaymentRefused):
            raise self.outcome
        return self.outcome


async def _take(db: Database, takings: Sequence[_Taking]) -> Sequence[_Taking]:
    """Take ``takings`` in as few transactions as they allow (each gets its outcome), then
    keep the refused attempts."""
    pending = list(takings)
    while pending:
        group = pending
        retaken, pending = await _group_transaction(db, group)
        if retaken:  # a reference taken meanwhile: each again alone, the answer found then
            for taking in group:
                taking.outcome = None
                for attempt in range(2):
                    again, _ = await _group_transaction(db, [taking])
                    if not again:
                        break
                    if attempt:
                        raise StorageError(
                            f"taking a payment: reference {taking.request.reference!r} of "
                            f"channel {taking.request.channel} was taken twice meanwhile"
                        )
            pending = []
    for taking in takings:
        if isinstance(taking.outcome, PaymentRefused):
            request = taking.request
            await record_attempt(
                db,
                request.channel,
                reference=request.reference,
                code=str(taking.outcome.code),
                detail=taking.outcome.detail,
                request=json.dumps(request.document(), sort_keys=True),
                now=taking.now,
                source=taking.source,
            )
    return takings


async def _group_transaction(db: Database, group: Sequence[_Taking]) -> tuple[bool, list[_Taking]]:
    """One transaction of ``group``; (True: an IntegrityError rolled it back, nothing was
    taken; the takings that wait for the next group)."""
    with storage_errors("taking a payment"):
        try:
            async with db.writing(), db.sessions() as session, session.begin():
                await session.connection(execution_options={DURABLE: True})  # answered 201
                return False, await _pay_group(session, group)
        except IntegrityError:
            for taking in group:
                taking.outcome = None
            return True, []


@dataclass(slots=True)
class _Accepted:
    """A payment of a group that passed every check: what its rows are written from."""

    taking: _Taking
    channel: PaymentChannel
    digest: str
    paid: datetime
    vendee: Vendee
    amount: int
    result: Split
    delivery: dict[str, Any] | None = None
    number: int | None = None
    token: str | None = None


_CHANNELS = select(PaymentChannel).where(
    PaymentChannel.name.in_(bindparam("names", expanding=True))
)
_EXISTING = select(Payment).where(
    tuple_(Payment.channel_id, Payment.reference).in_(bindparam("keys", expanding=True))
)


async def _pay_group(session: AsyncSession, group: Sequence[_Taking]) -> list[_Taking]:
    """Take the payments of ``group`` in ``session``'s transaction: every check first (a
    refusal writes nothing), then the accepted ones' rows, one statement per table. Returns
    the takings that must wait for the next group (a second payment to an account, a second
    request under one reference)."""
    requests = [t.request for t in group]
    names = sorted({r.channel for r in requests})
    channels = {c.name: c for c in (await session.scalars(_CHANNELS, {"names": names})).all()}
    later: list[_Taking] = []
    seen: set[tuple[int, str]] = set()
    open_: list[tuple[_Taking, PaymentChannel]] = []
    for taking in group:
        channel = channels.get(taking.request.channel)
        if channel is None or channel.status != "active":
            detail = f"no channel {taking.request.channel!r}"
            named = taking.request.meter_id
            if named is not None and await session.get(Meter, named) is None:
                detail += f"; no meter {named!r} is registered"  # name every unknown at once
            taking.outcome = PaymentRefused(Code.UNKNOWN_CHANNEL, detail)
        elif taking.key_hash is not None and taking.key_hash != channel.key_hash:
            taking.outcome = PaymentRefused(
                Code.UNKNOWN_CHANNEL, f"channel {channel.name} has another API key now"
            )
        elif (channel.id, taking.request.reference) in seen:
            later.append(taking)  # a repeat: the first one's answer, once it is taken
        else:
            seen.add((channel.id, taking.request.reference))
            open_.append((taking, channel))
    if not open_:
        return later
    existing = {
        (p.channel_id, p.reference): p
        for p in (await session.scalars(_EXISTING, {"keys": sorted(seen)})).all()
    }
    checked: list[tuple[_Taking, PaymentChannel, str, datetime, str]] = []
    for taking, channel in open_:
        request, now = taking.request, taking.now
        digest = request.digest()
        found = existing.get((channel.id, request.reference))
        try:
            if found is not None:
                if found.request_hash != digest:
                    raise PaymentRefused(
                        Code.REFERENCE_CONFLICT,
                        f"reference {request.reference!r} of channel {request.channel} was "
                        "used for a different payment",
                    )
                taking.outcome = PaymentAnswer(json.loads(found.answer), replayed=True)
                continue
            paid = now if request.paid_at is None else request.paid_at.astimezone(UTC)
            if not now - PAID_BEHIND <= paid <= now + PAID_AHEAD:
                raise PaymentRefused(
                    Code.MALFORMED_FIELD,
                    f"paid_at: {paid.isoformat()} is not within {PAID_BEHIND.days} days before "
                    f"and {int(PAID_AHEAD.total_seconds() // 60)} minutes after the head-end's "
                    f"clock ({now.isoformat(timespec='seconds')})",
                )
            meter_id = await _meter_of(session, request.meter_id, request.account_id)
        except PaymentRefused as refused:
            taking.outcome = refused
            continue
        checked.append((taking, channel, digest, paid, meter_id))
    vendees = await _vendees(session, [meter_id for *_, meter_id in checked])
    priced: list[tuple[_Taking, PaymentChannel, str, datetime, Vendee, int]] = []
    accounts: set[str] = set()
    for taking, channel, digest, paid, meter_id in checked:
        vendee = vendees[meter_id]
        try:
            if isinstance(vendee, PaymentRefused):
                raise vendee
            currency = taking.request.currency
            if currency is not None and currency != vendee.tariff.currency:
                raise PaymentRefused(
                    Code.CURRENCY_MISMATCH,
                    f"meter {meter_id}'s account pays in {vendee.tariff.currency}, not {currency}",
                )
            amount = parse_amount(taking.request.amount, vendee.tariff.currency, vendee.exponent)
        except PaymentRefused as refused:
            taking.outcome = refused
            continue
        if vendee.account in accounts:
            later.append(taking)  # priced after the one before it, in the next group
            continue
        accounts.add(vendee.account)
        priced.append((taking, channel, digest, paid, vendee, amount))
    if not priced:
        return later
    situations = await _situations(session, [p[4] for p in priced], group[0].now)
    accepted: list[_Accepted] = []
    for taking, channel, digest, paid, vendee, amount in priced:
        try:
            result = split(vendee.tariff, amount, situations[vendee.account])
        except PaymentRefused as refused:
            taking.outcome = refused
            continue
        accepted.append(_Accepted(taking, channel, digest, paid, vendee, amount, result))
    owed = [a for a in accepted if a.result.credit_amount > 0]
    if owed:
        await _deliver(session, owed)
    accepted = [a for a in accepted if a.taking.outcome is None]
    if accepted:
        await _write_payments(session, accepted)
    return later


async def _deliver(session: AsyncSession, owed: Sequence[_Accepted]) -> None:
    """The credit each payment owes its meter: a transfer with the meter's next transfer
    number, or an STS token with its next TID (a token the key data cannot give refuses the
    payment). The meters' vending rows are locked (created when new) and their numbers kept;
    each payment's ``delivery`` row is written by the caller with its payment id."""
    meter_ids = sorted({a.vendee.meter.id for a in owed})
    named = {"meters": meter_ids}
    vending = {row.meter_id: row for row in (await session.scalars(_LOCK_VENDING, named)).all()}
    if len(vending) < len(meter_ids):  # a meter's first credit: its row made, then locked
        await insert_ignore(
            session, MeterVending, [{"meter_id": m, "last_transfer": 0} for m in meter_ids]
        )
        vending = {row.meter_id: row for row in (await session.scalars(_LOCK_VENDING, named)).all()}
    keypads = {a.vendee.meter.id for a in owed if a.vendee.keypad}
    remote = [m for m in meter_ids if m not in keypads]
    reported: dict[str, int] = {}
    if remote:
        found = await session.execute(_REPORTED, {"meters": remote})
        reported = {m: int(n or 0) for m, n in found}
    changed: list[dict[str, Any]] = []
    for a in owed:
        meter, result, now = a.vendee.meter, a.result, a.taking.now
        row = vending[meter.id]
        if a.vendee.keypad:
            material = await session.get(KeyMaterial, meter.sts_key_id)
            key = _key_data(meter, row, material)
            assert key is not None
            try:
                vended = vend_credit(
                    key, result.credit_amount, now, last_tid=row.last_tid, rounding=Rounding.EXACT
                )
            except ValidationError as exc:
                a.taking.outcome = AmountOutOfBounds(f"no token for meter {meter.id}: {exc}")
                continue
            assert vended.tid is not None
            changed.append({"meter": meter.id, "transfer": row.last_transfer, "tid": vended.tid})
            a.number, a.token = vended.tid, vended.digits
            a.delivery = {"kind": "token", "unit": "energy", "token": vended.digits,
                          "state": "issued"}  # fmt: skip
        else:
            number = max(row.last_transfer, reported.get(meter.id, 0)) + 1
            changed.append({"meter": meter.id, "transfer": number, "tid": row.last_tid})
            a.number = number
            a.delivery = {"kind": "transfer", "unit": result.credit_unit, "token": None,
                          "state": PENDING}  # fmt: skip
        a.delivery |= {
            "meter_id": meter.id,
            "number": a.number,
            "amount": result.credit_amount,
            "value": result.credit_value,
            "created_at": now,
            "updated_at": now,
        }
    if changed:
        await session.execute(_NEXT_NUMBERS, changed)


_VENDING = _table(MeterVending)
_PAYMENTS = _table(Payment)
_RECEIPTS = _table(Receipt)
_TRANSFERS = _table(CreditTransfer)
_LOCK_VENDING = (
    select(MeterVending)
    .where(MeterVending.meter_id.in_(bindparam("meters", expanding=True)))
    .order_by(MeterVending.meter_id)
    .with_for_update()
    .execution_options(populate_existing=True)
)
_REPORTED = (
    select(Reading.meter_id, func.max(Reading.last_transfer))
    .where(Reading.meter_id.in_(bindparam("meters", expanding=True)))
    .group_by(Reading.meter_id)
)
_NEXT_NUMBERS = (
    update(_VENDING)
    .where(_VENDING.c.meter_id == bindparam("meter"))
    .values(last_transfer=bindparam("transfer"), last_tid=bindparam("tid"))
)
_INSERT_PAYMENTS = insert(_PAYMENTS).returning(
    _PAYMENTS.c.channel_id, _PAYMENTS.c.reference, _PAYMENTS.c.id
)
_INSERT_RECEIPTS = insert(_RECEIPTS)
_INSERT_TRANSFERS = insert(_TRANSFERS)
_KEEP_ANSWERS = (
    update(_PAYMENTS).where(_PAYMENTS.c.id == bindparam("payment")).values(answer=bindparam("doc"))
)


async def _write_payments(session: AsyncSession, accepted: Sequence[_Accepted]) -> None:
    """The accepted payments' rows: ledger transactions (with their audit entries), payments,
    receipts (numbered in order), credit transfers, and each payment's first answer."""
    postings = []
    for a in accepted:
        request, result, vendee = a.taking.request, a.result, a.vendee
        currency, account = vendee.tariff.currency, vendee.account
        legs = [
            (clearing(a.channel.name, currency), a.amount),
            (debt(account, currency), -result.debt_recovered),
            (utility(AccountKind.FEES, currency), -(result.fee - result.fee_tax)),
            (utility(AccountKind.SERVICE, currency),
             -(result.service_charge - result.service_tax)),
            (utility(AccountKind.TAX, currency), -result.tax),
            (prepaid(account, currency), -result.energy_net),
        ]  # fmt: skip
        transaction = build(
            TransactionKind.PAYMENT, legs, f"payment {a.channel.name}/{request.reference}"
        )
        postings.append(
            _Posting(
                transaction,
                a.taking.now,
                a.taking.actor,
                vendee.meter.id,
                f"payment by {a.channel.name}",
                {"channel": a.channel.name, "reference": request.reference},
            )
        )
    transaction_ids = await post_many(session, postings)
    inserted = await session.execute(  # one multi-row INSERT, ids found by their references
        _INSERT_PAYMENTS,
        [
            {
                "channel_id": a.channel.id,
                "reference": a.taking.request.reference,
                "request_hash": a.digest,
                "account_id": a.vendee.account,
                "meter_id": a.vendee.meter.id,
                "tariff_id": a.vendee.tariff.tariff_id,
                "currency": a.vendee.tariff.currency,
                "amount": a.amount,
                "debt_recovered": a.result.debt_recovered,
                "fee": a.result.fee,
                "service_charge": a.result.service_charge,
                "tax": a.result.tax,
                "energy_net": a.result.energy_net,
                "change_in": a.result.change_in,
                "change_out": a.result.change_out,
                "credit_unit": a.result.credit_unit,
                "credit_value": a.result.credit_value,
                "credit_amount": a.result.credit_amount,
                "wh": a.result.wh,
                "state": "accepted",
                "payer": a.taking.request.payer,
                "paid_at": a.paid,
                "created_at": a.taking.now,
                "transaction_id": transaction_id,
                "answer": "{}",
            }
            for a, transaction_id in zip(accepted, transaction_ids, strict=True)
        ],
    )  # a reference taken meanwhile by another worker fails here: IntegrityError
    by_reference = {(int(c), str(r)): int(i) for c, r, i in inserted.all()}
    payment_ids = [by_reference[a.channel.id, a.taking.request.reference] for a in accepted]
    last = await _next_numbers(session, "receipt", len(accepted))
    receipts = range(last - len(accepted) + 1, last + 1)
    await session.execute(
        _INSERT_RECEIPTS,
        [
            {"number": number, "payment_id": payment_id, "issued_at": a.taking.now}
            for a, payment_id, number in zip(accepted, payment_ids, receipts, strict=True)
        ],
    )
    transfers = [
        a.delivery | {"payment_id": payment_id}
        for a, payment_id in zip(accepted, payment_ids, strict=True)
        if a.delivery is not None
    ]
    if transfers:
        await session.execute(_INSERT_TRANSFERS, transfers)
    answers = []
    for a, payment_id, receipt in zip(accepted, payment_ids, receipts, strict=True):
        request, tariff = a.taking.request, a.vendee.tariff
        answer = {
            "payment_id": payment_id,
            "receipt": receipt,
            "channel": a.channel.name,
            "reference": request.reference,
            "account": a.vendee.account,
            "meter": a.vendee.meter.id,
            "tariff": tariff.tariff_id,
            "currency": tariff.currency,
            "currency_scale": tariff.currency_scale,
            "payer": request.payer,
            "paid_at": a.paid.isoformat(),
            "split": a.result.document(),
            "delivery": None
            if a.delivery is None
            else {"kind": a.delivery["kind"], "number": a.number, "state": a.delivery["state"]},
            "token": a.token,
        }
        answers.append({"payment": payment_id, "doc": json.dumps(answer, sort_keys=True)})
        a.taking.outcome = PaymentAnswer(answer, replayed=False)
    await session.execute(_KEEP_ANSWERS, answers)


_TAKE_NUMBERS = (
    update(LedgerCounter)
    .where(LedgerCounter.name == bindparam("counter"))
    .values(value=LedgerCounter.value + bindparam("count"))
    .returning(LedgerCounter.value)
)


async def _next_numbers(session: AsyncSession, name: str, count: int = 1) -> int:
    """Take the next ``count`` numbers of the gapless counter ``name`` in this transaction;
    the last of them (its row is locked until the transaction ends, so numbers are never
    skipped or shared)."""
    named = {"counter": name, "count": count}
    value = await session.scalar(_TAKE_NUMBERS, named)
    if value is None:  # the counter's first use
        await insert_ignore(session, LedgerCounter, [{"name": name, "value": 0}])
        value = await session.scalar(_TAKE_NUMBERS, named)
    assert value is not None
    return int(value)


async def next_number(session: AsyncSession, name: str) -> int:
    """The next number of the gapless counter ``name``, taken in this transaction (its row is
    locked until the transaction ends, so numbers are never skipped or shared)."""
    return await _next_numbers(session, name)


# -- reading payments back ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PaymentView:
    payment_id: int
    channel: str
    reference: str
    meter_id: str
    account: str
    currency: str
    currency_scale: int
    amount: int
    state: str
    paid_at: datetime
    receipt: int
    answer: dict[str, Any]
    delivery_state: str | None
    reversal_reason: str | None

    def document(self) -> dict[str, Any]:
        return {
            **self.answer,
            "state": self.state,
            "delivery_state": self.delivery_state,
            "reversal_reason": self.reversal_reason,
        }


def _view(payment: Payment, channel: str, receipt: int, transfer: str | None) -> PaymentView:
    return PaymentView(
        payment.id,
        channel,
        payment.reference,
        payment.meter_id,
        payment.account_id,
        payment.currency,
        json.loads(payment.answer)["currency_scale"],
        payment.amount,
        payment.state,
        payment.paid_at,
        receipt,
        json.loads(payment.answer),
        transfer,
        payment.reversal_reason,
    )


def _payments_query() -> Any:
    return (
        select(Payment, PaymentChannel.name, Receipt.number, CreditTransfer.state)
        .join(PaymentChannel, PaymentChannel.id == Payment.channel_id)
        .join(Receipt, Receipt.payment_id == Payment.id)
        .outerjoin(CreditTransfer, CreditTransfer.payment_id == Payment.id)
    )


async def list_payments(
    db: Database,
    *,
    meter: str | None = None,
    channel: str | None = None,
    account: str | None = None,
    limit: int = 50,
) -> list[PaymentView]:
    """The latest ``limit`` payments (of a meter, of a channel, of an account), newest
    first."""
    query = _payments_query().order_by(Payment.id.desc()).limit(limit)
    if meter is not None:
        query = query.where(Payment.meter_id == meter)
    if account is not None:
        query = query.where(Payment.account_id == account)
    if channel is not None:
        query = query.where(PaymentChannel.name == channel)
    async with db.read() as session:
        if meter is not None and await session.get(Meter, meter) is None:
            raise StorageError(f"no meter {meter!r} is registered")
        if channel is not None and await _channel(session, channel) is None:
            raise StorageError(f"no channel {channel!r}")
        rows = (await session.execute(query)).all()
    return [_view(*row) for row in rows]


async def get_payment(db: Database, payment_id: int) -> PaymentView:
    async with db.read() as session:
        return await _get(session, payment_id)


async def _get(session: AsyncSession, payment_id: int) -> PaymentView:
    row = (await session.execute(_payments_query().where(Payment.id == payment_id))).first()
    if row is None:
        raise StorageError(f"no payment {payment_id}")
    return _view(*row)


async def payment_by_reference(db: Database, channel: str, reference: str) -> PaymentView:
    """The payment ``channel`` posted under ``reference`` (a channel sees only its own)."""
    async with db.read() as session:
        row = (
            await session.execute(
                _payments_query().where(
                    PaymentChannel.name == channel, Payment.reference == reference
                )
            )
        ).first()
    if row is None:
        raise PaymentRefused(
            Code.UNKNOWN_PAYMENT, f"channel {channel} has no payment with reference {reference!r}"
        )
    return _view(*row)


async def payment_by_receipt(db: Database, number: int) -> PaymentView:
    async with db.read() as session:
        row = (await session.execute(_payments_query().where(Receipt.number == number))).first()
    if row is None:
        raise PaymentRefused(Code.UNKNOWN_RECEIPT, f"no receipt {number}")
    return _view(*row)


async def reprint(db: Database, payment_id: int, now: datetime, *, actor: str) -> PaymentView:
    """A payment's receipt and token again, as first issued (never a new token); the reprint
    is an entry on the audit trail."""
    async with db.begin() as session:
        view = await _get(session, payment_id)
        await audit.append(
            session,
            at=now,
            actor=actor,
            action="payment.reprint",
            subject=view.meter_id,
            reason=f"reprint for {view.channel}",
            outcome="reprinted",
            detail={"payment": payment_id, "receipt": view.receipt},
        )
    return view


# -- reversals ------------------------------------------------------------------------------------


async def reverse_payment(
    db: Database, payment_id: int, reason: str, now: datetime, *, actor: str
) -> PaymentView:
    """Reverse a payment: the channel's money goes back. Credit not yet delivered is cancelled
    (nothing reaches the meter); credit delivered, or a token (which cannot be revoked),
    becomes the account's debt, recovered from the next payments."""
    if not reason.strip():
        raise ValidationError("--reason: a reversal says why")
    async with db.begin(durable=True) as session:
        payment = await session.get(Payment, payment_id, with_for_update=True)
        if payment is None:
            raise StorageError(f"no payment {payment_id}")
        if payment.state == "reversed":
            raise PaymentRefused(Code.ALREADY_REVERSED, f"payment {payment_id} is reversed already")
        transfer = (
            await session.scalars(
                select(CreditTransfer)
                .where(CreditTransfer.payment_id == payment_id)
                .with_for_update()
            )
        ).first()
        original = await _transaction(session, payment.transaction_id)
        correction = reversal(original, payment.transaction_id, f"reversal of payment {payment_id}")
        outcome = "cancelled before delivery"
        if transfer is not None:
            leased = transfer.lease_until is not None and transfer.lease_until > now
            cancellable = transfer.state in (PENDING, TransferState.FAILED.value)
            if transfer.state == TransferState.SENDING.value or (cancellable and leased):
                # on its way (the meter may have it): confirmed or refused soon, not cancelled
                raise PaymentRefused(
                    Code.IN_DELIVERY,
                    f"payment {payment_id}'s transfer is being delivered: try again shortly",
                )
            if cancellable:
                transfer.state = TransferState.CANCELLED.value
                transfer.updated_at = now
                transfer.next_attempt_at = None
            else:
                value = transfer.value
                currency = payment.currency
                correction = build(
                    TransactionKind.REVERSAL,
                    [
                        *((p.account, p.amount) for p in correction.postings),
                        (prepaid(payment.account_id, currency), -value),
                        (debt(payment.account_id, currency), value),
                    ],
                    correction.memo,
                    payment.transaction_id,
                )
                outcome = "credit kept by the meter becomes debt"
        reversal_id = await post(
            session,
            correction,
            now,
            actor=actor,
            subject=payment.meter_id,
            reason=reason,
            detail={"payment": payment_id, "outcome": outcome},
        )
        payment.state = "reversed"
        payment.reversal_id = reversal_id
        payment.reversal_reason = reason
        await session.flush()
        return await _get(session, payment_id)


__all__ = [
    "PAID_AHEAD",
    "PAID_BEHIND",
    "AttemptView",
    "BalanceCheck",
    "ChannelView",
    "KeyChange",
    "PaymentAnswer",
    "PaymentIntake",
    "PaymentRequest",
    "PaymentView",
    "Quote",
    "add_channel",
    "channel_for_key",
    "check_balances",
    "get_payment",
    "list_attempts",
    "list_channels",
    "list_payments",
    "next_number",
    "pay",
    "payment_by_receipt",
    "payment_by_reference",
    "post",
    "quote",
    "record_attempt",
    "remember_signature",
    "reprint",
    "reverse_payment",
    "rotate_keypad",
    "set_keypad",
]
