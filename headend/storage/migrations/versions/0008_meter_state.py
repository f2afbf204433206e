"""Each meter's latest state: one row a meter with its latest reading's credit, emergency
credit, relay state and mode, last command sequence and since when its credit is used up, kept
by the transaction that stores readings; backfilled here from the readings stored so far.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

#: each meter's latest reading, and the first reading (meter time) of its present run without
#: credit: after its latest reading with credit, if it has one
BACKFILL = """
INSERT INTO meter_state (meter_id, meter_time, credit, emergency_credit, low_credit_threshold,
                         control_state, control_mode, last_command_seq, exhausted_since)
SELECT r.meter_id, r.meter_time, r.credit, r.emergency_credit, r.low_credit_threshold,
       r.control_state, r.control_mode, r.last_command_seq,
       CASE WHEN r.credit > 0 THEN NULL ELSE (
           SELECT min(x.meter_time) FROM readings x
           WHERE x.meter_id = r.meter_id AND x.credit <= 0
             AND x.meter_time > coalesce((
                 SELECT max(y.meter_time) FROM readings y
                 WHERE y.meter_id = r.meter_id AND y.credit > 0), -1)
       ) END
FROM readings r
JOIN (SELECT meter_id, max(meter_time) AS meter_time FROM readings GROUP BY meter_id) latest
  ON latest.meter_id = r.meter_id AND latest.meter_time = r.meter_time
"""


def upgrade() -> None:
    op.create_table(
        "meter_state",
        sa.Column("meter_id", sa.String(length=64), nullable=False),
        sa.Column("meter_time", sa.BigInteger(), nullable=False),
        sa.Column("credit", sa.BigInteger(), nullable=False),
        sa.Column("emergency_credit", sa.BigInteger(), nullable=False),
        sa.Column("low_credit_threshold", sa.BigInteger(), nullable=False),
        sa.Column("control_state", sa.Integer(), nullable=False),
        sa.Column("control_mode", sa.Integer(), nullable=False),
        sa.Column("last_command_seq", sa.BigInteger(), nullable=False),
        sa.Column("exhausted_since", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["meter_id"], ["meters.id"], name=op.f("fk_meter_state_meter_id_meters")
        ),
        sa.PrimaryKeyConstraint("meter_id", name=op.f("pk_meter_state")),
    )
    op.execute(sa.text(BACKFILL))


def downgrade() -> None:
    op.drop_table("meter_state")
