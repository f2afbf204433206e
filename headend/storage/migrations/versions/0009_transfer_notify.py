"""On PostgreSQL, a commit that writes credit transfers notifies the channel
``hes_credit_transfers``, so the credit deliverers of every worker listening on it claim them
at once instead of at their next tick (SQLite has one process: its deliverer is woken in
process). Nothing on SQLite.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

FUNCTION = """
CREATE FUNCTION hes_notify_credit_transfers() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('hes_credit_transfers', '');
    RETURN NULL;
END
$$
"""
TRIGGER = """
CREATE TRIGGER credit_transfers_notify AFTER INSERT ON credit_transfers
FOR EACH STATEMENT EXECUTE FUNCTION hes_notify_credit_transfers()
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(FUNCTION)
    op.execute(TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS credit_transfers_notify ON credit_transfers")
    op.execute("DROP FUNCTION IF EXISTS hes_notify_credit_transfers()")
