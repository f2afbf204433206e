"""The tables, as SQLAlchemy 2 typed ORM models.

Money is in integer minor units and energy in integer Wh (``BigInteger``); meter times are the
meter's clock in integer seconds since the epoch, head-end times are UTC datetimes. The natural
keys that make storage exactly-once are primary keys: a reading per (meter, meter time), an
interval per (meter, interval start), an event per (meter, boot, sequence), MQTT telemetry per
(meter, boot, message number).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: constraint names Alembic can find again (SQLite batch mode and PostgreSQL both need names)
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UtcDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on every dialect (SQLite keeps no time zone of its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("a naive datetime cannot be stored: give it a time zone")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {int: BigInteger, datetime: UtcDateTime, str: Text, bytes: LargeBinary}


# -- registry -------------------------------------------------------------------------------------


class Customer(Base):
    __tablename__ = "customers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str]
    email: Mapped[str | None]
    phone: Mapped[str | None]
    notice_channel: Mapped[str] = mapped_column(String(16), default="sms")  # sms email webhook none
    language: Mapped[str] = mapped_column(String(8), default="en")
    created_at: Mapped[datetime]
    #: a business customer's tax id (VAT registration): its bills are e-invoices
    tax_id: Mapped[str | None]


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"))
    status: Mapped[str] = mapped_column(String(16), default="active")  # active suspended closed
    protected: Mapped[bool] = mapped_column(Boolean, default=False)
    protection_reason: Mapped[str | None]
    protected_until: Mapped[datetime | None]
    #: thresholds of this account instead of its tariff's (minor units or Wh), None: the tariff's
    low_threshold: Mapped[int | None]
    critical_threshold: Mapped[int | None]
    #: the lowest balance level a notice was raised for: 0 none, 1 low, 2 critical, 3 exhausted;
    #: raised on a downward crossing, lowered only when the balance climbs back above a
    #: threshold plus the hysteresis margin (so one crossing is one notice, across restarts)
    alert_level: Mapped[int] = mapped_column(Integer, default=0)
    #: a forecast reminder went out for the present run-down (re-armed with a day to spare)
    forecast_sent: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime]


class Tariff(Base):
    __tablename__ = "tariffs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # flat tou block
    currency: Mapped[str] = mapped_column(String(3))
    currency_scale: Mapped[int] = mapped_column(Integer)
    #: the tariff's prices, rates and blocks as JSON text (integers only)
    definition: Mapped[str]
    low_threshold: Mapped[int]
    critical_threshold: Mapped[int]
    created_at: Mapped[datetime]


class KeyMaterial(Base):
    """Secret key data, kept apart from the meters that refer to it and never logged."""

    __tablename__ = "key_material"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))  # command (HMAC) or sts (vending key data)
    secret: Mapped[bytes]
    created_at: Mapped[datetime]


class Meter(Base):
    __tablename__ = "meters"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    serial: Mapped[str]
    endpoint: Mapped[str]  # tcp://host:port/unit, rtu:///dev/tty?unit=N, mqtt://host:port/ID
    transport: Mapped[str] = mapped_column(String(8))  # tcp rtu mqtt
    gateway: Mapped[str]  # host:port, serial device or broker: what its reads share
    unit_id: Mapped[int | None] = mapped_column(Integer)
    control_mode: Mapped[int] = mapped_column(Integer)
    credit_unit: Mapped[str] = mapped_column(String(8))  # money energy
    currency: Mapped[str] = mapped_column(String(3))
    currency_scale: Mapped[int] = mapped_column(Integer)
    account_id: Mapped[str | None] = mapped_column(ForeignKey("accounts.id"))
    tariff_id: Mapped[str | None] = mapped_column(ForeignKey("tariffs.id"))
    command_key_id: Mapped[int | None] = mapped_column(ForeignKey("key_material.id"))
    sts_key_id: Mapped[int | None] = mapped_column(ForeignKey("key_material.id"))
    poll_group: Mapped[str] = mapped_column(String(64), default="default")
    profile_period: Mapped[int] = mapped_column(Integer, default=900)  # load-profile capture, s
    #: the last command sequence number the head-end used for this meter
    last_command_seq: Mapped[int] = mapped_column(default=0)
    status: Mapped[str] = mapped_column(String(16), default="active")  # active retired
    created_at: Mapped[datetime]
    retired_at: Mapped[datetime | None]

    __table_args__ = (Index("ix_meters_account", "account_id"),)


# -- readings -------------------------------------------------------------------------------------


class Reading(Base):
    """One register snapshot; ``flags`` holds validation findings (see ``flag_reason``)."""

    __tablename__ = "readings"

    meter_id: Mapped[str] = mapped_column(ForeignKey("meters.id"), primary_key=True)
    meter_time: Mapped[int] = mapped_column(primary_key=True)
    received_at: Mapped[datetime]
    source: Mapped[str] = mapped_column(String(8))  # poll mqtt
    energy_import_wh: Mapped[int]
    rate1_wh: Mapped[int]
    rate2_wh: Mapped[int]
    rate3_wh: Mapped[int]
    rate4_wh: Mapped[int]
    power_w: Mapped[int]
    voltage_dv: Mapped[int]
    current_ma: Mapped[int]
    power_factor_milli: Mapped[int]
    frequency_chz: Mapped[int]
    credit: Mapped[int]
    emergency_credit: Mapped[int]
    debt: Mapped[int]
    low_credit_threshold: Mapped[int]
    control_state: Mapped[int] = mapped_column(Integer)
    control_mode: Mapped[int] = mapped_column(Integer)
    status: Mapped[int]
    last_event_seq: Mapped[int]
    last_transfer: Mapped[int]
    last_command_seq: Mapped[int]
    flags: Mapped[int] = mapped_column(default=0)
    flag_reason: Mapped[str | None]


class MeterStateRow(Base):
    """Each meter's latest stored reading, the part of it that balances and supply control
    rest on, kept in the transaction that stores readings (:func:`readings.store_new_readings`)
    so that the monitor and the policy read one row a meter however long its history is.
    ``exhausted_since`` is the meter time of the first reading of the present run without
    credit (None while the latest reading has credit). A reading older than ``meter_time``
    changes nothing here."""

    __tablename__ = "meter_state"

    meter_id: Mapped[str] = mapped_column(ForeignKey("meters.id"), primary_key=True)
    meter_time: Mapped[int]
    credit: Mapped[int]
    emergency_credit: Mapped[int]
    low_credit_threshold: Mapped[int]
    control_state: Mapped[int] = mapped_column(Integer)
    control_mode: Mapped[int] = mapped_column(Integer)
    last_command_seq: Mapped[int]
    exhausted_since: Mapped[int | None]


class Interval(Base):
    """One load-profile interval; estimated intervals are kept apart from actual reads."""

    __tablename__ = "intervals"

    meter_id: Mapped[str] = mapped_column(ForeignKey("meters.id"), primary_key=True)
    start: Mapped[int] = mapped_column(primary_key=True)  # meter clock, seconds
    period: Mapped[int] = mapped_column(Integer)  # seconds
    energy_wh: Mapped[int]
    register_wh: Mapped[int]  # the energy register at the interval's end
    credit: Mapped[int]
    status: Mapped[int]
    estimated: Mapped[bool] = mapped_column(Boolean, default=False)
    flags: Mapped[int] = mapped_column(default=0)
    flag_reason: Mapped[str | None]


class MeterEvent(Base):
    __tablename__ = "meter_events"

    meter_id: Mapped[str] = mapped_column(ForeignKey("meters.id"), primary_key=True)
    boot: Mapped[int] = mapped_column(primary_key=True)  # 0: read by poll (sequence is lifelong)
    seq: Mapped[int] = mapped_column(primary_key=True)
    meter_time: Mapped[int]
    code: Mapped[int] = mapped_column(Integer)
    a: Mapped[int]
    b: Mapped[int]
    received_at: Mapped[datetime]

    #: accepted tokens' TIDs (event 35, token_tid), which issued tokens are matched to
    __table_args__ = (
        Index(
            "ix_meter_events_token_tid",
            "meter_id",
            "a",
            sqlite_where=text("code = 35"),
            postgresql_where=text("code = 35"),
        ),
    )


class TelemetrySeen(Base):
    """MQTT telemetry messages stored, by the agent's boot and message number."""

    __tablename__ = "telemetry_seen"

    meter_id: Mapped[str] = mapped_column(ForeignKey("meters.id"), primary_key=True)
    boot: Mapped[int] = mapped_column(primary_key=True)
    n: Mapped[int] = mapped_column(primary_key=True)
    meter_time: Mapped[int]


class Gap(Base):
    """Data the meter could no longer give (its ring buffer overwrote it)."""

    __tablename__ = "gaps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    meter_id: Mapped[str] = mapped_column(ForeignKey("meters.id"))
    kind: Mapped[str] = mapped_column(String(16))  # intervals events
    first: Mapped[int]  # intervals: meter time; events: sequence number
    last: Mapped[int]
    found_at: Mapped[datetime]

    __table_args__ = (UniqueConstraint("meter_id", "kind", "first"),)


class PollHealth(Base):
    __tablename__ = "poll_health"

    meter_id: Mapped[str] = mapped_column(ForeignKey("meters.id"), primary_key=True)
    health: Mapped[str] = mapped_column(String(16), default="unknown")
    last_seen: Mapped[datetime | None]
    last_attempt: Mapped[datetime | None]
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None]
    next_due: Mapped[datetime | None]
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None]


class HealthChange(Base):
    __tablename__ = "health_changes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    meter_id: Mapped[str] = mapped_column(ForeignKey("meters.id"))
    at: Mapped[datetime]
    old: Mapped[str] = mapped_column(String(16))
    new: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str]

    __table_args__ = (Index("ix_health_changes_meter", "meter_id", "at"),)


# -- commands, notices, audit ---------------------------------------------------------------------


class CommandRow(Base):
    """A command to a meter; its signed envelope is stored before it is first sent."""

    __tablename__ = "commands"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    meter_id: Mapped[str] = mapped_column(ForeignKey("meters.id"))
    kind: Mapped[str] = mapped_column(String(32))
    sequence: Mapped[int]
    envelope: Mapped[bytes]
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str]
    actor: Mapped[str]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    result_code: Mapped[int | None] = mapped_column(Integer)
    superseded_by: Mapped[int | None] = mapped_column(ForeignKey("commands.id"))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None]
    #: the command is given up (expired) if not confirmed by then
    expires_at: Mapped[datetime]
    #: when the dispatcher may work on it next (after a back-off)
    next_attempt_at: Mapped[datetime]
    last_error: Mapped[str | None]

    __table_args__ = (
        UniqueConstraint("meter_id", "sequence"),
        Index("ix_commands_state", "state", "updated_at"),
        Index("ix_commands_meter", "meter_id", "state"),
    )


class CommandTransition(Base):
    __tablename__ = "command_transitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    command_id: Mapped[int] = mapped_column(ForeignKey("commands.id"))
    at: Mapped[datetime]
    old: Mapped[str] = mapped_column(String(16))
    new: Mapped[str] = mapped_column(String(16))
    trigger: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str]
    reason: Mapped[str]

    __table_args__ = (Index("ix_command_transitions_command", "command_id", "at"),)


class Notification(Base):
    """The outbox of notices; ``idempotency_key`` goes to the sender with every attempt."""

    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    idempotency_key: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    account_id: Mapped[str | None] = mapped_column(ForeignKey("accounts.id"))
    meter_id: Mapped[str | None] = mapped_column(ForeignKey("meters.id"))
    channel: Mapped[str] = mapped_column(String(16))
    address: Mapped[str]  # the phone number, e-mail address or operators' hook it goes to
    language: Mapped[str] = mapped_column(String(8))
    payload: Mapped[str]  # JSON text
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending sent failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    created_at: Mapped[datetime]
    sent_at: Mapped[datetime | None]
    last_error: Mapped[str | None]
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None]
    #: a file sent with the notice where its channel can carry one (a bill's PDF by e-mail)
    attachment_name: Mapped[str | None]
    attachment: Mapped[bytes | None]

    __table_args__ = (Index("ix_notifications_due", "state", "next_attempt_at"),)


class AuditEntry(Base):
    """Append-only; each entry carries the SHA-256 of the one before it (a hash chain)."""

    __tablename__ = "audit_log"

    #: 1, 2, 3 ... without gaps (a sequence would skip numbers on a rollback)
    position: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    at: Mapped[datetime]
    actor: Mapped[str]
    action: Mapped[str]
    subject: Mapped[str]
    reason: Mapped[str]
    outcome: Mapped[str]
    detail: Mapped[str]  # JSON text
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)

    __table_args__ = (Index("ix_audit_log_subject", "subject"),)


# -- ledger, payments, credit delivery ------------------------------------------------------------


class LedgerAccount(Base):
    """One account of the double-entry ledger; ``balance`` (debits minus credits) is a cache
    of its postings, written in the transaction that adds them."""

    __tablename__ = "ledger_accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    code: Mapped[str] = mapped_column(String(160), unique=True)  # kind:owner:currency
    kind: Mapped[str] = mapped_column(String(16))
    owner: Mapped[str] = mapped_column(String(64))  # account or channel; "" for the utility's
    currency: Mapped[str] = mapped_column(String(3))
    balance: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime]


class LedgerTransaction(Base):
    """A balanced set of postings; never changed. A correction names what it corrects, and
    ``audit_position`` is its entry on the audit trail's hash chain."""

    __tablename__ = "ledger_transactions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))  # payment delivery reversal adjustment
    memo: Mapped[str]
    corrects: Mapped[int | None] = mapped_column(ForeignKey("ledger_transactions.id"))
    at: Mapped[datetime]
    audit_position: Mapped[int] = mapped_column(unique=True)


class LedgerPosting(Base):
    """Immutable: the database refuses to update or delete one (triggers of migration 0004)."""

    __tablename__ = "ledger_postings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    transaction_id: Mapped[int] = mapped_column(ForeignKey("ledger_transactions.id"))
    account_id: Mapped[int] = mapped_column(ForeignKey("ledger_accounts.id"))
    amount: Mapped[int]  # minor units, debit positive

    __table_args__ = (
        Index("ix_ledger_postings_transaction", "transaction_id"),
        Index("ix_ledger_postings_account", "account_id"),
    )


class LedgerCounter(Base):
    """Gapless numbers (receipts): taken with an UPDATE in the transaction that uses them."""

    __tablename__ = "ledger_counters"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[int]


class PaymentChannel(Base):
    """A way money arrives (a wallet, a bank, a counter); its API key is kept as a SHA-256."""

    __tablename__ = "payment_channels"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # mobile bank app kiosk counter agent autodebit
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    key_prefix: Mapped[str] = mapped_column(String(16))  # shown to tell keys apart
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[datetime]


class ChannelSigning(Base):
    """A channel that signs every HTTP request (HMAC-SHA256, headend/domain/signature.py)
    with the signing secret kept in key_material."""

    __tablename__ = "channel_signing"

    channel_id: Mapped[int] = mapped_column(ForeignKey("payment_channels.id"), primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("key_material.id"))
    created_at: Mapped[datetime]


class RequestSignature(Base):
    """Signatures already accepted, so that a request replayed within the time window is
    refused by every worker; rows older than the window are pruned as new ones arrive."""

    __tablename__ = "request_signatures"

    channel_id: Mapped[int] = mapped_column(ForeignKey("payment_channels.id"), primary_key=True)
    signature: Mapped[str] = mapped_column(String(64), primary_key=True)
    seen_at: Mapped[datetime]

    __table_args__ = (Index("ix_request_signatures_seen_at", "seen_at"),)


class PaymentAttempt(Base):
    """A payment refused: no balance changed, but the attempt is kept for the operator (the
    request as received, the refusal's code and detail)."""

    __tablename__ = "payment_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime]
    channel: Mapped[str] = mapped_column(String(64))
    reference: Mapped[str | None]
    source: Mapped[str] = mapped_column(String(8))  # api cli
    code: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str]
    request: Mapped[str]  # JSON text, as received (cut to 4096 characters)

    __table_args__ = (Index("ix_payment_attempts_channel", "channel", "at"),)


class Payment(Base):
    """A payment taken, once per (channel, reference); ``answer`` is the first answer, given
    again to every repeat of the same request (``request_hash``)."""

    __tablename__ = "payments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    channel_id: Mapped[int] = mapped_column(ForeignKey("payment_channels.id"))
    reference: Mapped[str] = mapped_column(String(128))
    request_hash: Mapped[str] = mapped_column(String(64))
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    meter_id: Mapped[str] = mapped_column(ForeignKey("meters.id"))
    tariff_id: Mapped[str] = mapped_column(ForeignKey("tariffs.id"))
    currency: Mapped[str] = mapped_column(String(3))
    amount: Mapped[int]
    debt_recovered: Mapped[int]
    fee: Mapped[int]
    service_charge: Mapped[int]
    tax: Mapped[int]
    energy_net: Mapped[int]
    change_in: Mapped[int]
    change_out: Mapped[int]
    credit_unit: Mapped[str] = mapped_column(String(8))  # money energy
    credit_value: Mapped[int]  # minor units
    credit_amount: Mapped[int]  # in the credit unit
    wh: Mapped[int]  # energy bought (the block tariff's month position)
    state: Mapped[str] = mapped_column(String(16))  # accepted reversed
    payer: Mapped[str | None]
    paid_at: Mapped[datetime]
    created_at: Mapped[datetime]
    transaction_id: Mapped[int] = mapped_column(ForeignKey("ledger_transactions.id"))
    reversal_id: Mapped[int | None] = mapped_column(ForeignKey("ledger_transactions.id"))
    reversal_reason: Mapped[str | None]
    answer: Mapped[str]  # JSON text

    __table_args__ = (
        UniqueConstraint("channel_id", "reference"),
        Index("ix_payments_account", "account_id", "paid_at"),
        Index("ix_payments_meter", "meter_id", "paid_at"),
    )


class Receipt(Base):
    """Receipt numbers are gapless: 1, 2, 3 ... (ledger_counters 'receipt')."""

    __tablename__ = "receipts"

    number: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    payment_id: Mapped[int] = mapped_column(ForeignKey("payments.id"), unique=True)
    issued_at: Mapped[datetime]


class MeterVending(Base):
    """Per meter, what vending to it needs: the last credit transfer number allocated and, for
    a keypad (STS) meter, its key data (the vending key in key_material via the meter's
    ``sts_key_id``) and the last TID issued."""

    __tablename__ = "meter_vending"

    meter_id: Mapped[str] = mapped_column(ForeignKey("meters.id"), primary_key=True)
    last_transfer: Mapped[int] = mapped_column(default=0)
    pan: Mapped[str | None] = mapped_column(String(18))
    sgc: Mapped[int | None] = mapped_column(Integer)
    ti: Mapped[int | None] = mapped_column(Integer)
    krn: Mapped[int | None] = mapped_column(Integer)
    kt: Mapped[int | None] = mapped_column(Integer)
    base_date: Mapped[int | None] = mapped_column(Integer)
    ken: Mapped[int | None] = mapped_column(Integer)
    last_tid: Mapped[int | None]


class CreditTransfer(Base):
    """Credit owed to a meter: a remote transfer (``number`` the meter's transfer number) for
    the credit deliverer, or an STS token (``number`` its TID) for the customer to key in."""

    __tablename__ = "credit_transfers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    meter_id: Mapped[str] = mapped_column(ForeignKey("meters.id"))
    kind: Mapped[str] = mapped_column(String(8))  # transfer token
    number: Mapped[int]
    payment_id: Mapped[int] = mapped_column(ForeignKey("payments.id"))
    unit: Mapped[str] = mapped_column(String(8))  # money energy
    amount: Mapped[int]  # minor units or Wh, as the meter counts
    value: Mapped[int]  # minor units
    token: Mapped[str | None] = mapped_column(String(20))
    #: pending_delivery sending delivered failed cancelled (transfer); issued delivered (token)
    state: Mapped[str] = mapped_column(String(20))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None]
    #: the signed command envelope, stored before its first send (a transfer)
    envelope: Mapped[bytes | None]
    next_attempt_at: Mapped[datetime | None]  # None: due now
    last_error: Mapped[str | None]
    delivered_at: Mapped[datetime | None]  # when the meter confirmed it (or reported it accepted)

    __table_args__ = (
        UniqueConstraint("meter_id", "kind", "number"),
        Index("ix_credit_transfers_state", "state", "updated_at"),
        Index("ix_credit_transfers_meter", "meter_id", "state", "number"),
    )


# -- bills, reconciliation, auto-debit ------------------------------------------------------------


class Bill(Base):
    """An account's monthly bill (an e-invoice for a business customer), kept as issued:
    numbered from the gapless counter 'bill', one per account and month."""

    __tablename__ = "bills"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    number: Mapped[int] = mapped_column(unique=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    month: Mapped[str] = mapped_column(String(7))  # 2026-11
    kind: Mapped[str] = mapped_column(String(16))  # bill e-invoice
    document: Mapped[str]  # JSON text
    issued_at: Mapped[datetime]

    __table_args__ = (UniqueConstraint("account_id", "month"),)


class SettlementAdjustment(Base):
    """A finding of a reconciliation that ``--apply`` posted to the ledger, once per channel,
    reference and finding (so applying a report twice posts nothing new)."""

    __tablename__ = "settlement_adjustments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    channel_id: Mapped[int] = mapped_column(Integer, ForeignKey("payment_channels.id"))
    day: Mapped[str] = mapped_column(String(10))
    reference: Mapped[str] = mapped_column(String(128))
    finding: Mapped[str] = mapped_column(String(32))
    transaction_id: Mapped[int] = mapped_column(Integer, ForeignKey("ledger_transactions.id"))
    applied_at: Mapped[datetime]

    __table_args__ = (UniqueConstraint("channel_id", "reference", "finding"),)


class Mandate(Base):
    """An auto-debit mandate: when the account's balance crosses its low threshold, a payment
    of ``amount`` (mode fixed) or up to ``amount`` of credit (mode topup) through the channel,
    never more than ``monthly_cap`` in a calendar month (UTC)."""

    __tablename__ = "mandates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    channel_id: Mapped[int] = mapped_column(Integer, ForeignKey("payment_channels.id"))
    mode: Mapped[str] = mapped_column(String(8))  # fixed topup
    amount: Mapped[int]
    monthly_cap: Mapped[int]
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16))  # active cancelled
    created_at: Mapped[datetime]
    cancelled_at: Mapped[datetime | None]

    __table_args__ = (Index("ix_mandates_account", "account_id", "status"),)


class MandateCharge(Base):
    """One charge of a mandate per balance crossing (``reference`` derived from the crossing,
    unique); written with the crossing, then paid (or capped, or refused) by the collector."""

    __tablename__ = "mandate_charges"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    mandate_id: Mapped[int] = mapped_column(Integer, ForeignKey("mandates.id"))
    reference: Mapped[str] = mapped_column(String(128), unique=True)
    meter_id: Mapped[str] = mapped_column(ForeignKey("meters.id"))
    credit: Mapped[int]  # the meter's credit at the crossing
    month: Mapped[str] = mapped_column(String(7))
    amount: Mapped[int]  # what was (or would have been) paid; 0 until decided
    state: Mapped[str] = mapped_column(String(16))  # pending paid capped refused
    payment_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("payments.id"))
    detail: Mapped[str | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    __table_args__ = (Index("ix_mandate_charges_state", "state", "mandate_id"),)


metadata = Base.metadata
