"""Databases for tests: a SQLite file always, and a PostgreSQL database of this run's own on
the server at 127.0.0.1:5432 when it answers (dropped at the end, so runs never collide)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

POSTGRES_ADMIN = os.environ.get("HES_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def postgres_server() -> str | None:
    """The admin URL when the server answers, else None."""
    import psycopg

    try:
        psycopg.connect(POSTGRES_ADMIN, autocommit=True, connect_timeout=2).close()
    except psycopg.Error:
        return None
    return POSTGRES_ADMIN


def fresh_postgres(admin_url: str) -> tuple[str, str]:
    """Create a database of its own; returns (its URL, its name)."""
    import psycopg

    name = f"hes_test_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0]
    return f"{base}/{name}", name


def drop_postgres(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_server: str | None
) -> Iterator[str]:
    """An empty database's URL, on SQLite and (when it answers) on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'hes.db'}"
        return
    if postgres_server is None:
        pytest.skip("PostgreSQL at 127.0.0.1:5432 does not answer")
    url, name = fresh_postgres(postgres_server)
    try:
        yield url
    finally:
        drop_postgres(postgres_server, name)
