"""The payment API: the channels that sign their requests (with their signing secret), the
signatures already accepted (replay memory shared by every worker), and the refused payment
attempts.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "channel_signing",
        sa.Column("channel_id", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["channel_id"],
            ["payment_channels.id"],
            name=op.f("fk_channel_signing_channel_id_payment_channels"),
        ),
        sa.ForeignKeyConstraint(
            ["key_id"], ["key_material.id"], name=op.f("fk_channel_signing_key_id_key_material")
        ),
        sa.PrimaryKeyConstraint("channel_id", name=op.f("pk_channel_signing")),
    )
    op.create_table(
        "request_signatures",
        sa.Column("channel_id", sa.Integer(), nullable=False),
        sa.Column("signature", sa.String(length=64), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["channel_id"],
            ["payment_channels.id"],
            name=op.f("fk_request_signatures_channel_id_payment_channels"),
        ),
        sa.PrimaryKeyConstraint("channel_id", "signature", name=op.f("pk_request_signatures")),
    )
    op.create_index(
        "ix_request_signatures_seen_at", "request_signatures", ["seen_at"], unique=False
    )
    op.create_table(
        "payment_attempts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("channel", sa.String(length=64), nullable=False),
        sa.Column("reference", sa.Text(), nullable=True),
        sa.Column("source", sa.String(length=8), nullable=False),
        sa.Column("code", sa.String(length=32), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("request", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payment_attempts")),
    )
    op.create_index(
        "ix_payment_attempts_channel", "payment_attempts", ["channel", "at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_payment_attempts_channel", table_name="payment_attempts")
    op.drop_table("payment_attempts")
    op.drop_index("ix_request_signatures_seen_at", table_name="request_signatures")
    op.drop_table("request_signatures")
    op.drop_table("channel_signing")
