"""Bills, reconciliation and auto-debit: customers' tax ids, monthly bills (numbered, kept as
issued), a notice's attachment (a bill's PDF), settlement adjustments applied by `hes reconcile
--apply` (once per channel, day, reference and finding), auto-debit mandates and their charges
(one per balance crossing).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ADD / DROP COLUMN (SQLite 3.35+ has both): a batch copy of customers would trip
    # the foreign keys of accounts on SQLite
    op.add_column("customers", sa.Column("tax_id", sa.Text(), nullable=True))
    op.add_column("notifications", sa.Column("attachment_name", sa.Text(), nullable=True))
    op.add_column("notifications", sa.Column("attachment", sa.LargeBinary(), nullable=True))
    op.create_table(
        "bills",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("number", sa.BigInteger(), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("month", sa.String(length=7), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_bills_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bills")),
        sa.UniqueConstraint("account_id", "month", name=op.f("uq_bills_account_id_month")),
        sa.UniqueConstraint("number", name=op.f("uq_bills_number")),
    )
    op.create_table(
        "settlement_adjustments",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("channel_id", sa.Integer(), nullable=False),
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column("reference", sa.String(length=128), nullable=False),
        sa.Column("finding", sa.String(length=32), nullable=False),
        sa.Column("transaction_id", sa.Integer(), nullable=False),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["channel_id"],
            ["payment_channels.id"],
            name=op.f("fk_settlement_adjustments_channel_id_payment_channels"),
        ),
        sa.ForeignKeyConstraint(
            ["transaction_id"],
            ["ledger_transactions.id"],
            name=op.f("fk_settlement_adjustments_transaction_id_ledger_transactions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_settlement_adjustments")),
        sa.UniqueConstraint(
            "channel_id",
            "reference",
            "finding",
            name=op.f("uq_settlement_adjustments_channel_id_reference_finding"),
        ),
    )
    op.create_table(
        "mandates",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("channel_id", sa.Integer(), nullable=False),
        sa.Column("mode", sa.String(length=8), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("monthly_cap", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_mandates_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["channel_id"],
            ["payment_channels.id"],
            name=op.f("fk_mandates_channel_id_payment_channels"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mandates")),
    )
    op.create_index("ix_mandates_account", "mandates", ["account_id", "status"], unique=False)
    op.create_table(
        "mandate_charges",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("mandate_id", sa.Integer(), nullable=False),
        sa.Column("reference", sa.String(length=128), nullable=False),
        sa.Column("meter_id", sa.String(length=64), nullable=False),
        sa.Column("credit", sa.BigInteger(), nullable=False),
        sa.Column("month", sa.String(length=7), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("payment_id", sa.Integer(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["mandate_id"], ["mandates.id"], name=op.f("fk_mandate_charges_mandate_id_mandates")
        ),
        sa.ForeignKeyConstraint(
            ["meter_id"], ["meters.id"], name=op.f("fk_mandate_charges_meter_id_meters")
        ),
        sa.ForeignKeyConstraint(
            ["payment_id"], ["payments.id"], name=op.f("fk_mandate_charges_payment_id_payments")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mandate_charges")),
        sa.UniqueConstraint("reference", name=op.f("uq_mandate_charges_reference")),
    )
    op.create_index(
        "ix_mandate_charges_state", "mandate_charges", ["state", "mandate_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_mandate_charges_state", table_name="mandate_charges")
    op.drop_table("mandate_charges")
    op.drop_index("ix_mandates_account", table_name="mandates")
    op.drop_table("mandates")
    op.drop_table("settlement_adjustments")
    op.drop_table("bills")
    op.drop_column("notifications", "attachment")
    op.drop_column("notifications", "attachment_name")
    op.drop_column("customers", "tax_id")
