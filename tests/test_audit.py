"""The audit trail on SQLite and PostgreSQL: operator actions are chained entries; `hes audit
verify` passes on an untouched log and names the first entry edited or deleted by hand."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

from sqlalchemy import text
from typer.testing import CliRunner

from cli.hes import app
from headend.storage import open_database
from headend.storage.audit import append, verify_chain
from tests.databases import db_url, postgres_server

__all__ = ["db_url", "postgres_server"]  # fixtures

runner = CliRunner()
NOW = datetime(2026, 3, 1, tzinfo=UTC)


def hes(db: str, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, [*args, "--db", db], env={"HES_OPERATOR": "amina"})
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def _registered(db: str) -> None:
    assert hes(db, "db", "upgrade")[0] == 0
    assert hes(db, "tariffs", "add", "T-1", "--price", "2500")[0] == 0
    assert hes(db, "meters", "add", "M-1", "--endpoint", "tcp://127.0.0.1:1/1")[0] == 0
    assert hes(db, "meters", "add", "M-2", "--endpoint", "tcp://127.0.0.1:1/2")[0] == 0
    assert hes(db, "meters", "retire", "M-2")[0] == 0
    assert hes(db, "customers", "add", "Li Wei", "--phone", "+8613800000000")[0] == 0


def test_operator_actions_are_chained_and_verify(db_url: str) -> None:
    _registered(db_url)
    code, out = hes(db_url, "audit", "show", "--json")
    assert code == 0
    shown = json.loads(out)
    assert [(e["position"], e["action"], e["subject"]) for e in shown] == [
        (1, "tariff.register", "T-1"),
        (2, "meter.register", "M-1"),
        (3, "meter.register", "M-2"),
        (4, "meter.retire", "M-2"),
        (5, "customer.register", "customer:1"),
    ]
    assert {e["actor"] for e in shown} == {"amina"}
    about = json.loads(hes(db_url, "audit", "show", "--meter", "M-2", "--json")[1])
    assert [e["action"] for e in about] == ["meter.register", "meter.retire"]
    code, out = hes(db_url, "audit", "verify")
    assert (code, out.strip()) == (0, "the audit trail is intact: 5 entries")
    assert hes(db_url, "meters", "retire", "M-2")[0] == 0  # retired already: no new entry
    assert json.loads(hes(db_url, "audit", "verify", "--json")[1])["entries"] == 5


async def _sql(db_url: str, statement: str) -> None:
    db = await open_database(db_url)
    try:
        async with db.engine.begin() as conn:
            await conn.execute(text(statement))
    finally:
        await db.close()


def test_an_edited_row_is_named(db_url: str) -> None:
    _registered(db_url)
    asyncio.run(_sql(db_url, "UPDATE audit_log SET actor = 'mallory' WHERE position = 3"))
    code, out = hes(db_url, "audit", "verify")
    assert code == 1
    assert (
        out.strip() == "error: audit entry 3 breaks the chain: its contents do not match its "
        "hash (edited)"
    )


def test_a_deleted_row_is_named(db_url: str) -> None:
    _registered(db_url)
    asyncio.run(_sql(db_url, "DELETE FROM audit_log WHERE position = 2"))
    code, out = hes(db_url, "audit", "verify", "--json")
    assert code == 1
    assert json.loads(out) | {"why": None} == {
        "entries": 2,
        "intact": False,
        "first_bad": 3,
        "why": None,
    }


async def test_concurrent_appends_never_fork_the_chain(db_url: str) -> None:
    first = await open_database(db_url, check=False)
    await first.upgrade()
    second = await open_database(db_url)

    async def write(db_name: str, n: int) -> None:
        database = first if db_name == "a" else second
        async with database.begin() as session:
            await append(
                session,
                at=NOW,
                actor=db_name,
                action="test",
                subject=str(n),
                reason="race",
                outcome="ok",
            )

    try:
        await asyncio.gather(*(write("a" if n % 2 else "b", n) for n in range(20)))
        result = await verify_chain(first)
        assert (result.entries, result.broken) == (20, None)
    finally:
        await first.close()
        await second.close()
