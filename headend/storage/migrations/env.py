"""Alembic's entry point: migrations always run on a connection the head-end hands over."""

from __future__ import annotations

from alembic import context

from headend.storage.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the migrations through 'hes db upgrade', which opens the database")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=True,  # SQLite alters tables by copying them
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
