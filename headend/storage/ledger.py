"""The ledger's tables, payment channels, payments, receipts and the credit owed to meters.

A payment is one database transaction: the payment row (unique per channel and reference,
holding its first answer), its ledger transaction with the cached balances of the accounts it
touches, its entry on the audit trail's hash chain, its receipt (the next gapless number) and
the credit owed to the meter: a remote transfer with the meter's next transfer number, waiting
for the dispatcher ('pending_delivery'), or an STS token from the meter's key data with the
next TID. Refusals (:class:`~headend.domain.pricing.PaymentRefused`) store nothing.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
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
from headend.storage.database import Database, insert_ignore, insert_new, storage_errors
from headend.storage.registry import tariff_record
from headend.storage.schema import (
    Account,
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
    rows = [
        {
            "code": a.code,
            "kind": str(a.kind),
            "owner": a.owner,
            "currency": a.currency,
            "balance": 0,
            "created_at": now,
        }
        for a in accounts
    ]
    await insert_ignore(session, LedgerAccount, rows)
    found = await session.execute(
        select(LedgerAccount.code, LedgerAccount.id).where(
            LedgerAccount.code.in_([a.code for a in accounts])
        )
    )
    ids = {code: account_id for code, account_id in found}
    return {a: ids[a.code] for a in accounts}


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
    document = transaction.document()
    entry = await audit.append(
        session,
        at=now,
        actor=actor,
        action=f"ledger.{transaction.kind}",
        subject=subject,
        reason=reason,
        outcome="posted",
        detail={"transaction": document, **(detail or {})},
    )
    ids = await _account_ids(session, [p.account for p in transaction.postings], now)
    row = LedgerTransaction(
        kind=str(transaction.kind),
        memo=transaction.memo,
        corrects=transaction.corrects,
        at=now,
        audit_position=entry.position,
    )
    session.add(row)
    await session.flush()
    session.add_all(
        LedgerPosting(transaction_id=row.id, account_id=ids[p.account], amount=p.amount)
        for p in transaction.postings
    )
    for posting in transaction.postings:
        await session.execute(
            update(LedgerAccount)
            .where(LedgerAccount.id == ids[posting.account])
            .values(balance=LedgerAccount.balance + posting.amount)
        )
    await session.flush()
    return row.id


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


async def _vendee(session: AsyncSession, meter_id: str) -> Vendee:
    meter = await session.get(Meter, meter_id)
    if meter is None:
        raise PaymentRefused(Code.UNKNOWN_ACCOUNT, f"no meter {meter_id!r} is registered")
    if meter.status != "active":
        raise PaymentRefused(Code.UNKNOWN_ACCOUNT, f"meter {meter_id} is retired")
    if meter.account_id is None:
        raise PaymentRefused(Code.UNKNOWN_ACCOUNT, f"meter {meter_id} has no account")
    account = await session.get(Account, meter.account_id)
    if account is None:  # pragma: no cover - a foreign key keeps it
        raise PaymentRefused(Code.UNKNOWN_ACCOUNT, f"no account {meter.account_id!r}")
    if account.status == "closed":
        raise PaymentRefused(Code.ACCOUNT_CLOSED, f"account {account.id} is closed")
    if meter.tariff_id is None:
        raise PaymentRefused(Code.NOT_VENDABLE, f"meter {meter_id} has no tariff")
    row = await session.get(Tariff, meter.tariff_id)
    assert row is not None  # a foreign key keeps it
    tariff = tariff_record(row)
    if (tariff.currency, tariff.currency_scale) != (meter.currency, meter.currency_scale):
        raise PaymentRefused(
            Code.NOT_VENDABLE,
            f"meter {meter_id} counts {meter.currency} but its tariff {tariff.tariff_id} "
            f"prices in {tariff.currency}",
        )
    return Vendee(meter, account.id, tariff, -tariff.currency_scale, meter.sts_key_id is not None)


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


async def _situation(session: AsyncSession, vendee: Vendee, now: datetime) -> Situation:
    tariff, account = vendee.tariff, vendee.account
    since = _month_start(now, tariff)
    month = (
        await session.execute(
            select(
                func.coalesce(func.sum(Payment.service_charge), 0),
                func.coalesce(func.sum(Payment.wh), 0),
            ).where(
                Payment.account_id == account,
                Payment.state == "accepted",
                Payment.paid_at >= since,
            )
        )
    ).one()
    undelivered = await session.scalar(
        select(func.coalesce(func.sum(CreditTransfer.value), 0))
        .join(Payment, Payment.id == CreditTransfer.payment_id)
        .where(Payment.account_id == account, CreditTransfer.state.in_(HELD))
    )
    held = await _balance(session, prepaid(account, tariff.currency))
    return Situation(
        debt=max(0, await _balance(session, debt(account, tariff.currency))),
        service_paid=int(month[0]),
        month_wh=int(month[1]),
        change=max(0, held - int(undelivered or 0)),
        credit_unit="energy" if vendee.meter.credit_unit == "energy" else "money",
        step_wh=TOKEN_STEP_WH if vendee.keypad else 1,
    )


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
    try:
        with storage_errors("taking a payment"):
            for attempt in range(2):
                try:
                    async with db.sessions() as session, session.begin():
                        return await _pay(session, request, now, actor)
                except IntegrityError:
                    # the same reference taken by a concurrent request: its answer, on retry
                    if attempt:
                        raise
    except PaymentRefused as refused:
        await record_attempt(
            db,
            request.channel,
            reference=request.reference,
            code=str(refused.code),
            detail=refused.detail,
            request=json.dumps(request.document(), sort_keys=True),
            now=now,
            source=source,
        )
        raise
    raise AssertionError("unreachable")  # pragma: no cover


async def _pay(
    session: AsyncSession, request: PaymentRequest, now: datetime, actor: str
) -> PaymentAnswer:
    channel = await _channel(session, request.channel)
    if channel is None or channel.status != "active":
        detail = f"no channel {request.channel!r}"
        named = request.meter_id
        if named is not None and await session.get(Meter, named) is None:
            detail += f"; no meter {named!r} is registered"  # name every unknown at once
        raise PaymentRefused(Code.UNKNOWN_CHANNEL, detail)
    existing = (
        await session.scalars(
            select(Payment).where(
                Payment.channel_id == channel.id, Payment.reference == request.reference
            )
        )
    ).first()
    digest = request.digest()
    if existing is not None:
        if existing.request_hash != digest:
            raise PaymentRefused(
                Code.REFERENCE_CONFLICT,
                f"reference {request.reference!r} of channel {request.channel} was used for "
                "a different payment",
            )
        return PaymentAnswer(json.loads(existing.answer), replayed=True)
    paid = now if request.paid_at is None else request.paid_at.astimezone(UTC)
    if not now - PAID_BEHIND <= paid <= now + PAID_AHEAD:
        raise PaymentRefused(
            Code.MALFORMED_FIELD,
            f"paid_at: {paid.isoformat()} is not within {PAID_BEHIND.days} days before and "
            f"{int(PAID_AHEAD.total_seconds() // 60)} minutes after the head-end's clock "
            f"({now.isoformat(timespec='seconds')})",
        )
    meter_id = await _meter_of(session, request.meter_id, request.account_id)
    vendee = await _vendee(session, meter_id)
    tariff = vendee.tariff
    if request.currency is not None and request.currency != tariff.currency:
        raise PaymentRefused(
            Code.CURRENCY_MISMATCH,
            f"meter {meter_id}'s account pays in {tariff.currency}, not {request.currency}",
        )
    amount = parse_amount(request.amount, tariff.currency, vendee.exponent)
    vending = await _vending(session, meter_id)
    result = split(tariff, amount, await _situation(session, vendee, now))
    delivery, number, token = await _deliver(session, vendee, vending, result, now)
    currency, account = tariff.currency, vendee.account
    legs = [
        (clearing(channel.name, currency), amount),
        (debt(account, currency), -result.debt_recovered),
        (utility(AccountKind.FEES, currency), -(result.fee - result.fee_tax)),
        (utility(AccountKind.SERVICE, currency), -(result.service_charge - result.service_tax)),
        (utility(AccountKind.TAX, currency), -result.tax),
        (prepaid(account, currency), -result.energy_net),
    ]
    transaction = build(
        TransactionKind.PAYMENT, legs, f"payment {channel.name}/{request.reference}"
    )
    transaction_id = await post(
        session,
        transaction,
        now,
        actor=actor,
        subject=meter_id,
        reason=f"payment by {channel.name}",
        detail={"channel": channel.name, "reference": request.reference},
    )
    row = Payment(
        channel_id=channel.id,
        reference=request.reference,
        request_hash=digest,
        account_id=account,
        meter_id=meter_id,
        tariff_id=tariff.tariff_id,
        currency=currency,
        amount=amount,
        debt_recovered=result.debt_recovered,
        fee=result.fee,
        service_charge=result.service_charge,
        tax=result.tax,
        energy_net=result.energy_net,
        change_in=result.change_in,
        change_out=result.change_out,
        credit_unit=result.credit_unit,
        credit_value=result.credit_value,
        credit_amount=result.credit_amount,
        wh=result.wh,
        state="accepted",
        payer=request.payer,
        paid_at=paid,
        created_at=now,
        transaction_id=transaction_id,
        answer="{}",
    )
    session.add(row)
    await session.flush()  # a reference taken meanwhile fails here: IntegrityError
    receipt = await next_number(session, "receipt")
    session.add(Receipt(number=receipt, payment_id=row.id, issued_at=now))
    if delivery is not None:
        delivery.payment_id = row.id
        session.add(delivery)
    answer = {
        "payment_id": row.id,
        "receipt": receipt,
        "channel": channel.name,
        "reference": request.reference,
        "account": account,
        "meter": meter_id,
        "tariff": tariff.tariff_id,
        "currency": currency,
        "currency_scale": tariff.currency_scale,
        "payer": request.payer,
        "paid_at": paid.isoformat(),
        "split": result.document(),
        "delivery": None
        if delivery is None
        else {"kind": delivery.kind, "number": number, "state": delivery.state},
        "token": token,
    }
    row.answer = json.dumps(answer, sort_keys=True)
    await session.flush()
    return PaymentAnswer(answer, replayed=False)


async def _deliver(
    session: AsyncSession, vendee: Vendee, vending: MeterVending, result: Split, now: datetime
) -> tuple[CreditTransfer | None, int | None, str | None]:
    """The credit owed to the meter (its payment id set by the caller), the transfer number or
    TID, and the token's digits."""
    if result.credit_amount <= 0:
        return None, None, None
    meter = vendee.meter
    if vendee.keypad:
        material = await session.get(KeyMaterial, meter.sts_key_id)
        key = _key_data(meter, vending, material)
        assert key is not None
        try:
            vended = vend_credit(
                key, result.credit_amount, now, last_tid=vending.last_tid, rounding=Rounding.EXACT
            )
        except ValidationError as exc:
            raise AmountOutOfBounds(f"no token for meter {meter.id}: {exc}") from exc
        assert vended.tid is not None
        vending.last_tid = vended.tid
        transfer = CreditTransfer(
            meter_id=meter.id,
            kind="token",
            number=vended.tid,
            unit="energy",
            amount=result.credit_amount,
            value=result.credit_value,
            token=vended.digits,
            state="issued",
            created_at=now,
            updated_at=now,
        )
        return transfer, vended.tid, vended.digits
    reported = await session.scalar(
        select(func.max(Reading.last_transfer)).where(Reading.meter_id == meter.id)
    )
    number = max(vending.last_transfer, int(reported or 0)) + 1
    vending.last_transfer = number
    transfer = CreditTransfer(
        meter_id=meter.id,
        kind="transfer",
        number=number,
        unit=result.credit_unit,
        amount=result.credit_amount,
        value=result.credit_value,
        state=PENDING,
        created_at=now,
        updated_at=now,
    )
    return transfer, number, None


async def next_number(session: AsyncSession, name: str) -> int:
    """The next number of the gapless counter ``name``, taken in this transaction (its row is
    locked until the transaction ends, so numbers are never skipped or shared)."""
    await insert_ignore(session, LedgerCounter, [{"name": name, "value": 0}])
    value = await session.scalar(
        update(LedgerCounter)
        .where(LedgerCounter.name == name)
        .values(value=LedgerCounter.value + 1)
        .returning(LedgerCounter.value)
    )
    assert value is not None
    return int(value)


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
    async with db.begin() as session:
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
