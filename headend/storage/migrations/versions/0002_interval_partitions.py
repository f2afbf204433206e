"""On PostgreSQL, the intervals table partitioned by month (range of ``start``), with a default
partition; its rows are kept, each month's in its own partition. Nothing changes on SQLite.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from headend.storage import partitions

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_OLD = "intervals_unpartitioned"


def _columns() -> list[sa.Column[object]]:
    return [
        sa.Column("meter_id", sa.String(length=64), nullable=False),
        sa.Column("start", sa.BigInteger(), nullable=False),
        sa.Column("period", sa.Integer(), nullable=False),
        sa.Column("energy_wh", sa.BigInteger(), nullable=False),
        sa.Column("register_wh", sa.BigInteger(), nullable=False),
        sa.Column("credit", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.BigInteger(), nullable=False),
        sa.Column("estimated", sa.Boolean(), nullable=False),
        sa.Column("flags", sa.BigInteger(), nullable=False),
        sa.Column("flag_reason", sa.Text(), nullable=True),
    ]


def _constraints() -> list[sa.Constraint]:
    return [
        sa.ForeignKeyConstraint(
            ["meter_id"], ["meters.id"], name=op.f("fk_intervals_meter_id_meters")
        ),
        sa.PrimaryKeyConstraint("meter_id", "start", name=op.f("pk_intervals")),
    ]


def _set_aside() -> None:
    """Rename the current intervals table and its constraints out of the way."""
    op.execute(f"ALTER TABLE intervals RENAME TO {_OLD}")
    op.execute(f"ALTER TABLE {_OLD} RENAME CONSTRAINT pk_intervals TO pk_{_OLD}")
    op.execute(
        f"ALTER TABLE {_OLD} RENAME CONSTRAINT fk_intervals_meter_id_meters TO fk_{_OLD}_meter_id"
    )


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    _set_aside()
    op.create_table(
        "intervals", *_columns(), *_constraints(), postgresql_partition_by="RANGE (start)"
    )
    op.execute(f'CREATE SCHEMA IF NOT EXISTS "{partitions.SCHEMA}"')
    op.execute(
        f'CREATE TABLE "{partitions.SCHEMA}"."{partitions.DEFAULT}" PARTITION OF intervals DEFAULT'
    )
    op.execute(f"INSERT INTO intervals SELECT * FROM {_OLD}")
    op.drop_table(_OLD)
    now = datetime.now(UTC)
    this_month = (now.year, now.month)
    months = [*partitions.months_in_default(bind), this_month, partitions.next_month(*this_month)]
    partitions.create_months(bind, months)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    _set_aside()
    op.create_table("intervals", *_columns(), *_constraints())
    op.execute(f"INSERT INTO intervals SELECT * FROM {_OLD}")
    op.drop_table(_OLD)  # its partitions with it
    op.execute(f'DROP SCHEMA IF EXISTS "{partitions.SCHEMA}"')
