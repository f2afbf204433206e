"""The payment API: a channel's signature setting and signing secret, the signatures already
accepted (replay memory shared by every worker), and the refused payment attempts.

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
    with op.batch_alter_table("payment_channels", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("require_signature", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("signing_key_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            op.f("fk_payment_channels_signing_key_id_key_material"),
            "key_material",
            ["signing_key_id"],
            ["id"],
        )
    with op.batch_alter_table("payment_channels", schema=None) as batch_op:
        batch_op.alter_column("require_signature", server_default=None)
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
    with op.batch_alter_table("payment_channels", schema=None) as batch_op:
        batch_op.drop_constraint(
            op.f("fk_payment_channels_signing_key_id_key_material"), type_="foreignkey"
        )
        batch_op.drop_column("signing_key_id")
        batch_op.drop_column("require_signature")
