"""The command lifecycle: each command's deadline, next attempt and last error; each
transition's trigger and actor.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("commands", schema=None) as batch_op:
        batch_op.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("last_error", sa.Text(), nullable=True))
    op.execute("UPDATE commands SET expires_at = updated_at, next_attempt_at = updated_at")
    with op.batch_alter_table("commands", schema=None) as batch_op:
        batch_op.alter_column("expires_at", nullable=False)
        batch_op.alter_column("next_attempt_at", nullable=False)
        batch_op.create_index("ix_commands_meter", ["meter_id", "state"], unique=False)
    with op.batch_alter_table("command_transitions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("trigger", sa.String(length=16), nullable=False, server_default="")
        )
        batch_op.add_column(sa.Column("actor", sa.Text(), nullable=False, server_default=""))
    with op.batch_alter_table("command_transitions", schema=None) as batch_op:
        batch_op.alter_column("trigger", server_default=None)
        batch_op.alter_column("actor", server_default=None)
        batch_op.create_index("ix_command_transitions_command", ["command_id", "at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("command_transitions", schema=None) as batch_op:
        batch_op.drop_index("ix_command_transitions_command")
        batch_op.drop_column("actor")
        batch_op.drop_column("trigger")
    with op.batch_alter_table("commands", schema=None) as batch_op:
        batch_op.drop_index("ix_commands_meter")
        batch_op.drop_column("last_error")
        batch_op.drop_column("next_attempt_at")
        batch_op.drop_column("expires_at")
