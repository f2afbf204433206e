"""Credit delivery: each transfer's signed envelope (stored before it is first sent), its next
attempt, its last error and when the meter confirmed it; an index of the events that report
an accepted token's TID, which issued tokens are matched by.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("credit_transfers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("envelope", sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("last_error", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(
            "ix_credit_transfers_meter", ["meter_id", "state", "number"], unique=False
        )
    # partial: only the events that report an accepted token's TID (code 35, token_tid)
    op.create_index(
        "ix_meter_events_token_tid",
        "meter_events",
        ["meter_id", "a"],
        unique=False,
        sqlite_where=sa.text("code = 35"),
        postgresql_where=sa.text("code = 35"),
    )


def downgrade() -> None:
    op.drop_index("ix_meter_events_token_tid", table_name="meter_events")
    with op.batch_alter_table("credit_transfers", schema=None) as batch_op:
        batch_op.drop_index("ix_credit_transfers_meter")
        batch_op.drop_column("delivered_at")
        batch_op.drop_column("last_error")
        batch_op.drop_column("next_attempt_at")
        batch_op.drop_column("envelope")
