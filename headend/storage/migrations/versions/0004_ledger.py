"""The ledger, payment channels, payments, receipts and the credit owed to meters: accounts,
immutable transactions and postings (the database refuses to update or delete them), gapless
receipt numbers, per-meter transfer numbers and STS key data with the last TID.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

#: tables whose rows are never updated or deleted once written
IMMUTABLE = ("ledger_postings", "ledger_transactions")


def _immutable(table: str) -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            f"CREATE TRIGGER {table}_immutable BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION ledger_immutable()"
        )
        return
    for event in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER {table}_no_{event.lower()} BEFORE {event} ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{table} rows are immutable'); END"
        )


def upgrade() -> None:
    op.create_table(
        "ledger_accounts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("code", sa.String(length=160), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("balance", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_accounts")),
        sa.UniqueConstraint("code", name=op.f("uq_ledger_accounts_code")),
    )
    op.create_table(
        "ledger_counters",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_ledger_counters")),
    )
    op.create_table(
        "ledger_transactions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("memo", sa.Text(), nullable=False),
        sa.Column("corrects", sa.Integer(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("audit_position", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["corrects"],
            ["ledger_transactions.id"],
            name=op.f("fk_ledger_transactions_corrects_ledger_transactions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_transactions")),
        sa.UniqueConstraint("audit_position", name=op.f("uq_ledger_transactions_audit_position")),
    )
    op.create_table(
        "payment_channels",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("key_prefix", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payment_channels")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_payment_channels_key_hash")),
        sa.UniqueConstraint("name", name=op.f("uq_payment_channels_name")),
    )
    op.create_table(
        "ledger_postings",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("transaction_id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["ledger_accounts.id"],
            name=op.f("fk_ledger_postings_account_id_ledger_accounts"),
        ),
        sa.ForeignKeyConstraint(
            ["transaction_id"],
            ["ledger_transactions.id"],
            name=op.f("fk_ledger_postings_transaction_id_ledger_transactions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_postings")),
    )
    op.create_index("ix_ledger_postings_account", "ledger_postings", ["account_id"], unique=False)
    op.create_index(
        "ix_ledger_postings_transaction", "ledger_postings", ["transaction_id"], unique=False
    )
    op.create_table(
        "meter_vending",
        sa.Column("meter_id", sa.String(length=64), nullable=False),
        sa.Column("last_transfer", sa.BigInteger(), nullable=False),
        sa.Column("pan", sa.String(length=18), nullable=True),
        sa.Column("sgc", sa.Integer(), nullable=True),
        sa.Column("ti", sa.Integer(), nullable=True),
        sa.Column("krn", sa.Integer(), nullable=True),
        sa.Column("kt", sa.Integer(), nullable=True),
        sa.Column("base_date", sa.Integer(), nullable=True),
        sa.Column("ken", sa.Integer(), nullable=True),
        sa.Column("last_tid", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["meter_id"], ["meters.id"], name=op.f("fk_meter_vending_meter_id_meters")
        ),
        sa.PrimaryKeyConstraint("meter_id", name=op.f("pk_meter_vending")),
    )
    op.create_table(
        "payments",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("channel_id", sa.Integer(), nullable=False),
        sa.Column("reference", sa.String(length=128), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("meter_id", sa.String(length=64), nullable=False),
        sa.Column("tariff_id", sa.String(length=64), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("debt_recovered", sa.BigInteger(), nullable=False),
        sa.Column("fee", sa.BigInteger(), nullable=False),
        sa.Column("service_charge", sa.BigInteger(), nullable=False),
        sa.Column("tax", sa.BigInteger(), nullable=False),
        sa.Column("energy_net", sa.BigInteger(), nullable=False),
        sa.Column("change_in", sa.BigInteger(), nullable=False),
        sa.Column("change_out", sa.BigInteger(), nullable=False),
        sa.Column("credit_unit", sa.String(length=8), nullable=False),
        sa.Column("credit_value", sa.BigInteger(), nullable=False),
        sa.Column("credit_amount", sa.BigInteger(), nullable=False),
        sa.Column("wh", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("payer", sa.Text(), nullable=True),
        sa.Column("paid_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("transaction_id", sa.Integer(), nullable=False),
        sa.Column("reversal_id", sa.Integer(), nullable=True),
        sa.Column("reversal_reason", sa.Text(), nullable=True),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_payments_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["channel_id"],
            ["payment_channels.id"],
            name=op.f("fk_payments_channel_id_payment_channels"),
        ),
        sa.ForeignKeyConstraint(
            ["meter_id"], ["meters.id"], name=op.f("fk_payments_meter_id_meters")
        ),
        sa.ForeignKeyConstraint(
            ["reversal_id"],
            ["ledger_transactions.id"],
            name=op.f("fk_payments_reversal_id_ledger_transactions"),
        ),
        sa.ForeignKeyConstraint(
            ["tariff_id"], ["tariffs.id"], name=op.f("fk_payments_tariff_id_tariffs")
        ),
        sa.ForeignKeyConstraint(
            ["transaction_id"],
            ["ledger_transactions.id"],
            name=op.f("fk_payments_transaction_id_ledger_transactions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payments")),
        sa.UniqueConstraint(
            "channel_id", "reference", name=op.f("uq_payments_channel_id_reference")
        ),
    )
    op.create_index("ix_payments_account", "payments", ["account_id", "paid_at"], unique=False)
    op.create_index("ix_payments_meter", "payments", ["meter_id", "paid_at"], unique=False)
    op.create_table(
        "credit_transfers",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("meter_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("number", sa.BigInteger(), nullable=False),
        sa.Column("payment_id", sa.Integer(), nullable=False),
        sa.Column("unit", sa.String(length=8), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.Column("token", sa.String(length=20), nullable=True),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["meter_id"], ["meters.id"], name=op.f("fk_credit_transfers_meter_id_meters")
        ),
        sa.ForeignKeyConstraint(
            ["payment_id"], ["payments.id"], name=op.f("fk_credit_transfers_payment_id_payments")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_credit_transfers")),
        sa.UniqueConstraint(
            "meter_id", "kind", "number", name=op.f("uq_credit_transfers_meter_id_kind_number")
        ),
    )
    op.create_index(
        "ix_credit_transfers_state", "credit_transfers", ["state", "updated_at"], unique=False
    )
    op.create_table(
        "receipts",
        sa.Column("number", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("payment_id", sa.Integer(), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["payment_id"], ["payments.id"], name=op.f("fk_receipts_payment_id_payments")
        ),
        sa.PrimaryKeyConstraint("number", name=op.f("pk_receipts")),
        sa.UniqueConstraint("payment_id", name=op.f("uq_receipts_payment_id")),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION ledger_immutable() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION '% rows are immutable', TG_TABLE_NAME; END $$"
        )
    for table in IMMUTABLE:
        _immutable(table)


def downgrade() -> None:
    op.drop_table("receipts")
    op.drop_index("ix_credit_transfers_state", table_name="credit_transfers")
    op.drop_table("credit_transfers")
    op.drop_index("ix_payments_meter", table_name="payments")
    op.drop_index("ix_payments_account", table_name="payments")
    op.drop_table("payments")
    op.drop_table("meter_vending")
    op.drop_index("ix_ledger_postings_transaction", table_name="ledger_postings")
    op.drop_index("ix_ledger_postings_account", table_name="ledger_postings")
    op.drop_table("ledger_postings")
    op.drop_table("payment_channels")
    op.drop_table("ledger_transactions")
    op.drop_table("ledger_counters")
    op.drop_table("ledger_accounts")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS ledger_immutable()")
